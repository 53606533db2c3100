"""Multi-process runs with torch.distributed (launched by torchrun, or spawned by tests).

What scales: the *source* set is sharded across ranks (each rank scores its own contiguous
slice; linear in ranks); the *target* model is trained identically on every rank (same seed,
same data, so no communication is needed for G; replicated work). Values are gathered to
every rank at the end. gloo works on CPU, nccl on GPUs (one process per GPU).

`DistContext.from_env()` is a no-op single-process context unless torchrun's variables
(WORLD_SIZE > 1) are set or a process group is already initialised.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


class PeerFailed(RuntimeError):
    """Another rank of the process group failed (its error is in the message)."""


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    owns_group: bool = False  # we initialised the process group, so we tear it down

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: torch.device | str | None = None, backend: str | None = None,
                 timeout_s: float = 1800.0) -> "DistContext":
        """Join the process group torchrun describes (or the one already initialised)."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)),
                       dist.get_backend())
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        if not dist.is_available():
            raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        dev = torch.device(device) if device is not None else None
        if backend is None:
            backend = "nccl" if (dev is not None and dev.type == "cuda") else "gloo"
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
        return cls(dist.get_rank(), dist.get_world_size(), local_rank, backend, owns_group=True)

    def device_for(self, device: torch.device) -> torch.device:
        """One GPU per process: a bare 'cuda' means this rank's local GPU."""
        if device.type == "cuda" and device.index is None and self.enabled:
            return torch.device("cuda", self.local_rank)
        return device

    # ---- sharding -------------------------------------------------------------------------
    def shard(self, n: int) -> tuple[int, int]:
        """Contiguous [start, stop) of n items owned by this rank (sizes differ by at most 1)."""
        base, extra = divmod(n, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (1 if self.rank < extra else 0)

    def shard_of(self, n: int, rank: int) -> tuple[int, int]:
        base, extra = divmod(n, self.world_size)
        start = rank * base + min(rank, extra)
        return start, start + base + (1 if rank < extra else 0)

    # ---- collectives (CPU tensors for gloo; moved to the GPU for nccl) -------------------
    def _comm_device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")

    def gather_shards(self, local: np.ndarray, n_total: int) -> np.ndarray:
        """Concatenate every rank's shard (rank order) into the full [n_total, ...] array."""
        local = np.ascontiguousarray(local, dtype=np.float64)
        if not self.enabled:
            return local
        dev = self._comm_device()
        longest = max(b - a for a, b in (self.shard_of(n_total, r) for r in range(self.world_size)))
        tail = local.shape[1:]
        buf = torch.zeros((longest, *tail), dtype=torch.float64, device=dev)
        buf[: local.shape[0]] = torch.from_numpy(local).to(dev)
        parts = [torch.empty_like(buf) for _ in range(self.world_size)]
        dist.all_gather(parts, buf)
        out = [parts[r][: b - a].cpu().numpy() for r, (a, b) in
               enumerate(self.shard_of(n_total, r) for r in range(self.world_size))]
        return np.concatenate(out, axis=0)

    def all_reduce_sum(self, arr: np.ndarray) -> np.ndarray:
        if not self.enabled:
            return np.asarray(arr, dtype=np.float64)
        t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float64)).to(self._comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.cpu().numpy()

    def broadcast_object(self, obj, src: int = 0):
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def check_peers(self, error: BaseException | None = None) -> None:
        """A status exchange at a sync point: every rank says whether it failed since the last one.

        Without torchrun nothing stops the other ranks when one raises: they would wait in their
        next collective until the process group's timeout (30 min). So a method calls this
        before each collective of its loop, and from its error handler with the error: when any
        rank failed, every rank raises (the failed one its own error, the others PeerFailed
        naming it) at the same sync point. One all_reduce of one integer when all is well."""
        if not self.enabled:
            if error is not None:
                raise error
            return
        try:
            flag = torch.tensor([0 if error is None else 1], dtype=torch.int64, device=self._comm_device())
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if int(flag.item()) == 0:
                return
            msgs: list = [None] * self.world_size
            dist.all_gather_object(msgs, None if error is None else f"{type(error).__name__}: {error}")
        except Exception:  # noqa: BLE001 - a peer that died hard: our own error (if any) says more
            if error is not None:
                raise error from None
            raise
        if error is not None:
            raise error
        bad = next(r for r, m in enumerate(msgs) if m is not None)
        raise PeerFailed(f"distributed: rank {bad} of {self.world_size} failed, so rank {self.rank} stops too: "
                         f"{msgs[bad]}")

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def context_for(distributed: bool | None, device: torch.device):
    """DistContext for `distributed` (None: automatic under torchrun; True: required; False: off)."""
    if distributed is not None and not isinstance(distributed, bool):
        raise ValueError(f"distributed: expected None, True or False, got {distributed!r}")
    if distributed is False:
        return DistContext()
    ctx = DistContext.from_env(device=device)
    if distributed and not ctx.enabled:
        raise ValueError("distributed: True needs a process group with more than one process: launch with "
                         "torchrun --nproc_per_node=K (WORLD_SIZE > 1) or initialise torch.distributed first")
    return ctx
