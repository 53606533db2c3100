"""The DVGS training loop: train on the target set, snapshot, score the source set.

Each epoch shuffles the target into mini-batches; for each mini-batch the target loss and its
gradient G are computed in train mode. When the global step counter (never reset, also not
between restarts) is a multiple of `compute_every`, every source sample's own loss gradient is
compared with G before the optimizer step (a *snapshot*); then the optimizer steps. The source
is read from a `Source` (sources.py), in memory or streamed, in chunks of `source_batch_size`
rows; each rank of a distributed run scores its own contiguous range of whole chunks.

Failures that would otherwise give silently wrong values stop the run with a ValueError:
a non-finite target loss (naming restart, epoch and step), a non-finite similarity (naming the
snapshot and the row), a streamed source whose row count changed (naming the snapshot's pass).
"""
from __future__ import annotations

import math
import time
import warnings

import numpy as np
import torch
from torch import nn

from dvgs_fast import _validation as V
from dvgs_fast._utils import make_optimizer, reset_parameters
from dvgs_fast.methods.base import Budget, Estimate, derive_seed
from dvgs_fast import runstate
from dvgs_fast.grads import FrozenStatistics, cast_labels
from dvgs_fast.methods.dvgs.prepare import RunSpec
from dvgs_fast.sources import SourceLengthError
from dvgs_fast.result import stats_from_sums


class ScoringMode(FrozenStatistics):
    """FrozenStatistics, with randomness (dropout) from the snapshot's own stream."""

    def __init__(self, model: nn.Module, device: torch.device, snap_seed: int):
        super().__init__(model)
        self.device, self.snap_seed = device, snap_seed

    def __enter__(self):
        super().__enter__()
        self.rng = torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else [])
        self.rng.__enter__()
        torch.manual_seed(self.snap_seed)
        return self

    def __exit__(self, *exc):
        self.rng.__exit__(*exc)
        return super().__exit__(*exc)


def snapshot_seed(seed: int, k: int) -> int:
    return derive_seed(seed, k, 0x44564753)


def chunk_seed(seed: int, k: int, start: int) -> int:
    return derive_seed(seed, k, start, 0x43484E4B)


def rank_rows(spec: RunSpec, chunk: int) -> tuple[int, int]:
    """This rank's source rows: a contiguous range of whole chunks (the chunk grid of a
    single-process run), so every chunk's dropout masks are the same as there."""
    n_chunks = math.ceil(spec.n_source / chunk)
    c0, c1 = spec.ctx.shard(n_chunks)
    return min(c0 * chunk, spec.n_source), min(c1 * chunk, spec.n_source)


class _Position:
    """Global step -> (restart, epoch, step within the epoch), for messages."""

    def __init__(self, epochs: int, steps_per_epoch: int):
        self.epochs, self.spe = epochs, steps_per_epoch

    def __call__(self, step: int) -> str:
        return (f"restart {step // (self.epochs * self.spe)}, epoch {(step // self.spe) % self.epochs}, "
                f"step {step % self.spe} (global step {step})")


class _DivergenceWatch:
    """Stops the run at a non-finite target loss instead of returning NaN values.

    On CPU the loss is checked at every step (a free scalar read). On CUDA a read would stall the
    pipeline at every step, so the first bad step is recorded on the device and read where the
    loop synchronises anyway (before every snapshot, at epoch ends)."""

    _NONE = 1 << 62

    def __init__(self, device: torch.device, where: _Position, lr: float, lazy: bool | None = None):
        self.lazy = device.type == "cuda" if lazy is None else lazy
        self.where, self.lr = where, lr
        self.first = torch.full((), self._NONE, dtype=torch.int64, device=device) if self.lazy else None

    def observe(self, loss: torch.Tensor, step: int) -> None:
        if not self.lazy:
            if not bool(torch.isfinite(loss)):
                self._raise(step, float(loss.detach()))
            return
        bad = ~torch.isfinite(loss.detach())
        self.first = torch.where(bad & (self.first == self._NONE), torch.full_like(self.first, step), self.first)

    def check(self) -> None:
        if self.lazy:
            step = int(self.first)
            if step != self._NONE:
                self._raise(step, float("nan"))

    def _raise(self, step: int, value: float):
        raise V.diverged("DVGS", "the target loss", value, self.where(step), lr=self.lr, before_training=step == 0)


def train_and_score(cfg, spec: RunSpec, timings: dict, budget: Budget, snapshot_hook=None) -> Estimate:
    """The run. snapshot_hook(k): called at each snapshot inside the scoring mode, INSTEAD of
    scoring the source against the target gradient (DVGS.attribute's per-query pass)."""
    from tqdm.auto import tqdm

    model, device, scorer, ctx = spec.model, spec.device, spec.scorer, spec.ctx
    steps_per_epoch = math.ceil(spec.n_target / cfg.target_batch_size)
    n_total = math.ceil(cfg.restarts * cfg.epochs * steps_per_epoch / cfg.compute_every)
    where = _Position(cfg.epochs, steps_per_epoch)
    watch = _DivergenceWatch(device, where, cfg.lr)
    selected = [(n, p) for n, p in model.named_parameters() if n in set(spec.names)]
    optimizer = make_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.weight_decay)
    restart, epoch, step, k = 0, 0, 0, 0
    pos = 0                   # next target batch of the current epoch (a resume may start mid-epoch)
    state = spec.state
    snap_digests: list[str] = []
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng_cpu"])
        if device.type == "cuda" and state.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(state["rng_cuda"], device)
        spec.gen.set_state(state["rng_shuffle"])
        restart, epoch, step, k = state["restart"], state["epoch"], state["step"], state["k"]
        pos = int(state["pos"])
        snap_digests = list(state["snap_digests"])
    # Per-sample running sums (and kept snapshots) live in memory-mapped files, written as
    # computed; on resume their sizes and checksums are verified against the state.
    store = runstate.open_store(spec.files, spec.n_source, state=state, n_snapshots=n_total,
                                keep_snapshots=cfg.keep_snapshots,
                                snapshot_dtype=np.float64 if spec.dtype == torch.float64 else np.float32)
    snaps = store.snapshots
    lo, hi = rank_rows(spec, cfg.source_batch_size)
    if ctx.enabled and ctx.is_main and math.ceil(spec.n_source / cfg.source_batch_size) < ctx.world_size:
        warnings.warn(f"DVGS: {spec.n_source} source samples make fewer chunks of source_batch_size="
                      f"{cfg.source_batch_size} than there are ranks ({ctx.world_size}); some ranks have "
                      f"nothing to score. Lower source_batch_size to spread the scoring.", RuntimeWarning,
                      stacklevel=4)
    stopped = None
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    source, dtype = spec.source, spec.dtype

    def save(pos: int, rng_shuffle) -> None:
        # The sums/snapshots files first, then the small state file (atomic): after a crash the
        # state file never names a snapshot whose sums are not on disk (see dvgs_fast/runstate/values_store.py).
        store.flush()
        runstate.write_state(spec.files.state, {
            "format": runstate.FORMAT, "fingerprint": spec.fingerprint, "seed": spec.seed,
            "restart": restart, "epoch": epoch, "pos": pos, "step": step, "k": k,
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "rng_shuffle": rng_shuffle, "sums_digest": store.slot_digest(k), "snap_digests": snap_digests})

    def score_snapshot(target, bi: int) -> None:
        """Snapshot k: every source row of this rank against the target gradient."""
        try:
            for a, b, x, y in source.iter_chunks(lo, hi, cfg.source_batch_size):
                if a > 0:        # chunk 0 keeps the snapshot's own stream
                    torch.manual_seed(chunk_seed(spec.seed, k, a))
                x = x.to(device=device, dtype=spec.x_dtype, non_blocking=True)
                y = x if not spec.source_labels else cast_labels(y, dtype).to(device, non_blocking=True)
                sim = scorer.score(x, y, target).detach().cpu().numpy()
                if not np.isfinite(sim).all():
                    bad = np.flatnonzero(~np.isfinite(sim))
                    if len(bad) == len(sim) and len(sim) > 1:      # every row: the model, not the data
                        raise V.diverged("DVGS", f"the similarity of every source row {a}:{b} (the gradients "
                                         f"overflow)", float(sim[0]), f"{where(step)} (snapshot {k})", lr=cfg.lr)
                    raise ValueError(f"x_source: the similarity of source row {a + int(bad[0])} is not finite at "
                                     f"snapshot {k}, at {where(step)} ({len(bad)} of rows {a}:{b}): its loss gradient "
                                     f"overflowed; rescale the inputs or lower lr (now {cfg.lr:g})")
                store.add(k, a, b, sim)
        except SourceLengthError as exc:
            raise ValueError(f"x_source: the stream yielded {'more' if exc.more else 'fewer'} rows on the pass of "
                             f"snapshot {k}, at {where(step)}: {exc.got} rows, but {exc.expected} when it was "
                             f"counted; a streamed source must yield the same rows on every pass") from None
        if snaps is not None and spec.files is not None:
            snap_digests.append(store.column_digest(k))

    bar = tqdm(total=cfg.restarts * cfg.epochs, initial=restart * cfg.epochs + epoch,
               disable=not (cfg.progress and ctx.is_main),
               desc=f"DVGS ({cfg.backend})", unit="epoch", leave=False)
    bar.set_postfix(snapshots=k)
    try:
        while restart < cfg.restarts:
            if restart > 0 and epoch == 0 and pos == 0:
                reset_parameters(model)
                optimizer = make_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.weight_decay)
            while epoch < cfg.epochs:
                epoch_rng = spec.gen.get_state()      # a mid-epoch resume redraws this epoch's order
                perm = torch.randperm(spec.n_target, generator=spec.gen).to(device)
                batches = perm.split(cfg.target_batch_size)
                for bi in range(pos, len(batches)):
                    idx = batches[bi]
                    t0 = time.perf_counter()
                    model.train()
                    optimizer.zero_grad(set_to_none=True)
                    xb = spec.xt[idx]
                    yb = xb if spec.yt is None else spec.yt[idx]
                    loss = spec.batch_loss(model(xb), yb)
                    watch.observe(loss, step)
                    loss.backward()
                    if step % cfg.compute_every == 0:
                        G = {n: (p.grad.detach() if p.grad is not None else torch.zeros_like(p))
                             for n, p in selected}
                        sync()
                        watch.check()
                        t1 = time.perf_counter()
                        timings["train"] += t1 - t0
                        with ScoringMode(model, device, snapshot_seed(spec.seed, k)):
                            if snapshot_hook is None:
                                score_snapshot(scorer.target(G), bi)
                            else:
                                snapshot_hook(k)
                        k += 1
                        sync()
                        t0 = time.perf_counter()
                        timings["score"] += t0 - t1
                    optimizer.step()
                    step += 1
                    timings["train"] += time.perf_counter() - t0
                    if spec.files is not None and (step - 1) % cfg.compute_every == 0 and bi + 1 < len(batches):
                        # Snapshot granularity: a run killed mid-epoch resumes after its last snapshot.
                        t0 = time.perf_counter()
                        save(pos=bi + 1, rng_shuffle=epoch_rng)
                        timings["checkpoint"] += time.perf_counter() - t0
                    if ctx.enabled and (step - 1) % cfg.compute_every == 0:
                        ctx.check_peers()       # a rank whose rows failed stops every rank now
                    # Every rank decides alike (rank 0's clock), so all stop after the same snapshot.
                    if (step - 1) % cfg.compute_every == 0 and budget.max_time is not None:
                        stopped = ctx.broadcast_object(budget.exhausted())
                        if stopped:
                            break
                if stopped:
                    break
                watch.check()
                pos = 0
                epoch += 1
                if epoch == cfg.epochs:
                    restart, epoch = restart + 1, 0
                if spec.files is not None:
                    t0 = time.perf_counter()
                    save(pos=0, rng_shuffle=spec.gen.get_state())
                    timings["checkpoint"] += time.perf_counter() - t0
                bar.set_postfix(snapshots=k, refresh=False)
                bar.update(1)
                if epoch == 0:
                    break                       # restart finished: go reset for the next one
            if stopped:
                break
        watch.check()
        ctx.check_peers()                         # before the last collective, as in the loop
    finally:
        bar.close()
    sums = np.array(store.sums_after(k))          # [2, N]: sum of similarities and of their squares
    if ctx.enabled:                     # zeros outside each rank's rows: the sum is exact
        sums = ctx.all_reduce_sum(sums)
    counts = np.full(spec.n_source, k, dtype=np.int64)
    values, stderr = stats_from_sums(sums[0], sums[1], counts)
    store.flush()
    # the thread count decides the rounding of some CPU reductions (see the README, reproducibility)
    info = {"steps": step, "snapshots": k, "snapshots_planned": n_total, "torch_threads": torch.get_num_threads()}
    if ctx.enabled:
        info.update({"world_size": ctx.world_size, "rank": ctx.rank, "shard": [lo, hi]})
    return Estimate(values=values, stderr=stderr, counts=counts, status="stopped" if stopped else "completed",
                    stop_reason=stopped, info=info,
                    snapshots=None if snaps is None else snaps[:, :k], progress=f"{k} of {n_total} snapshots")


__all__ = ["train_and_score", "ScoringMode", "snapshot_seed", "chunk_seed", "rank_rows"]
