"""Writing a gradient store block by block: resumable after a kill, sharded under torchrun.

    store = write_store("runs/feats", source, compute, dim=4096, dtype="float16",
                        fingerprint={"model": ..., "projector": ...})

``compute(x, y)`` turns a block of source rows into their vectors ([b, dim], or (vectors,
{column: [b]})). Rows are written in order, each block once, through ``os.pwrite`` (no mapping:
the writer's memory stays one block). The progress is checkpointed with the run-state rules
every method uses (dvgs_fast.runstate): a lock per folder and rank, a checksummed state file
written atomically every ``checkpoint_every`` seconds, naming the rows done and the checksum
of every block written. A killed run resumes at its last checkpoint: the blocks written are
verified against their checksums, the rows after it are computed again at the same block
boundaries, so the finished file is byte-identical to an uninterrupted run's. A folder holding
another run's store (another fingerprint) is refused.

Under torchrun every rank writes a contiguous range of whole blocks into the same file (rank 0
creates it, so the folder must be on a file system all ranks see); the store is marked complete
once every rank has finished its range.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from dvgs_fast import runstate
from dvgs_fast.gradstore.store import (DTYPES, FEATURES, FORMAT, GradientStore, StoreError, _error, check_dtype,
                                       create_npy, read_meta, write_meta)



def _plain(fp: dict) -> dict:
    """The fingerprint as it reads back from JSON (tuples become lists)."""
    return json.loads(json.dumps(fp, sort_keys=True, default=str))


def _differs(saved: dict, now: dict) -> str:
    keys = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    return ", ".join(keys[:4]) + (", ..." if len(keys) > 4 else "")


def create_store(directory: str | os.PathLike, n: int, dim: int, *, dtype: str = "float32",
                 aux: dict[str, str] | None = None, fingerprint: dict | None = None,
                 info: dict | None = None) -> dict:
    """The store's files, created when the folder has none; an existing store with the same
    shape and fingerprint is kept (to resume or reuse), another one refused. Returns its meta."""
    directory = Path(directory)
    dtype = check_dtype(dtype)
    aux = {str(k): check_dtype(v) for k, v in (aux or {}).items()}
    meta = {"format": FORMAT, "n": int(n), "dim": int(dim), "dtype": dtype, "aux": aux,
            "fingerprint": _plain(fingerprint or {}), "info": _plain(info or {}), "complete": False}
    old = read_meta(directory)
    if old is not None:
        same = {k: old.get(k) for k in ("n", "dim", "dtype", "aux", "fingerprint")}
        want = {k: meta[k] for k in same}
        if same != want:
            what = _differs(same, want)
            if "fingerprint" in what:
                parts = _differs(old["fingerprint"], meta["fingerprint"])
                what = what.replace("fingerprint", f"the fingerprint ({parts})")
            raise _error(directory, f"holds another store (different {what})")
        return old
    if n < 1 or dim < 1:
        raise ValueError(f"n, dim: a store needs at least one row and one column, got {n} x {dim}")
    create_npy(directory / FEATURES, (int(n), int(dim)), DTYPES[dtype])
    for name, dt in aux.items():
        create_npy(directory / f"aux_{name}.npy", (int(n),), DTYPES[dt])
    write_meta(directory, meta)
    return meta


class StoreWriter:
    """Writes rows [lo, hi) of a created store (one process's range), resumably (module doc)."""

    def __init__(self, directory: str | os.PathLike, lo: int, hi: int, *, rank: int | None = None,
                 checkpoint_every: float = 60.0):
        self.directory, self.lo, self.hi, self.rank = Path(directory), int(lo), int(hi), rank
        self.checkpoint_every = float(checkpoint_every)
        self.files = runstate.CheckpointFiles(self.directory, rank, method="GradStore")
        self._lock = None
        self._fds: dict[str, int] = {}

    def open(self) -> "StoreWriter":
        self._lock = runstate.DirLock(self.files).acquire()
        try:
            self.files.remove_temporaries()
            meta = read_meta(self.directory)
            if meta is None:
                raise StoreError(f"store_dir: {self.directory}: no store was created there (create_store first)")
            self.store = GradientStore(self.directory, meta)
            self.fingerprint = {"settings": {"rows": [self.lo, self.hi], "n": self.store.n, "dim": self.store.dim,
                                             "dtype": meta["dtype"], "aux": meta["aux"]},
                                "store": meta["fingerprint"]}
            state = runstate.read_state(self.files)
            self.digests: list = []
            self.done = self.lo
            if state is not None:
                runstate.compare(state["fingerprint"], self.fingerprint, self.files)
                self.digests = [tuple(d) for d in state["digests"]]
                self._verify()
                self.done = int(state["rows_done"])
            flags = os.O_RDWR
            self._fds[""] = os.open(self.store.path, flags)
            self._offsets = {"": self.store._offset}
            for name in meta["aux"]:
                path = self.directory / f"aux_{name}.npy"
                self._fds[name] = os.open(path, flags)
                self._offsets[name] = _data_offset(path)
            self.pos = self.done
            self._last = time.monotonic()
        except BaseException:
            self.close(commit=False)
            raise
        return self

    def _verify(self) -> None:
        """Every block written before the interruption must still read back as written."""
        for a, b, digest in self.digests:
            if _block_digest(self.store, a, b) != digest:
                raise self.files.error(f"{FEATURES} rows {a}:{b} do not match their checksum (overwritten or "
                                       f"corrupted)")

    # ------------------------------------------------------------------------------------------
    def write(self, a: int, b: int, vectors: torch.Tensor | np.ndarray, aux: dict | None = None) -> None:
        """Rows [a, b) (the next rows of this range), and their aux columns."""
        if a != self.pos or not a < b <= self.hi:
            raise RuntimeError(f"StoreWriter: rows {a}:{b} written at position {self.pos} of range "
                               f"{self.lo}:{self.hi}")
        arr = checked_rows(vectors, a, b, self.store.dim, self.store.dtype)
        _pwrite(self._fds[""], arr, self._offsets[""] + a * arr.shape[1] * arr.itemsize)
        digest = runstate.digest_of_array(arr)
        meta_aux = self.store.meta["aux"]
        if set(aux or {}) != set(meta_aux):
            raise ValueError(f"aux: expected the columns {sorted(meta_aux)}, got {sorted(aux or {})}")
        for name in sorted(meta_aux):
            col = np.ascontiguousarray(_as_numpy(aux[name]).reshape(-1), dtype=DTYPES[meta_aux[name]])
            if col.shape[0] != b - a or not np.isfinite(col).all():
                raise ValueError(f"aux: column {name!r} of rows {a}:{b} has {col.shape[0]} values or a NaN/Inf")
            _pwrite(self._fds[name], col, self._offsets[name] + a * col.itemsize)
            digest += runstate.digest_of_array(col)
        self.digests.append((a, b, digest))
        self.pos = b
        self.commit()

    def commit(self, force: bool = False) -> None:
        """Checkpoint the rows written (at most every checkpoint_every seconds unless forced)."""
        if self.pos == self.done or (not force and time.monotonic() - self._last < self.checkpoint_every):
            return
        for fd in self._fds.values():
            os.fsync(fd)
        runstate.write_state(self.files.state, {"format": runstate.FORMAT, "fingerprint": self.fingerprint,
                                                "rows_done": self.pos, "digests": [list(d) for d in self.digests]})
        self.done = self.pos
        self._last = time.monotonic()

    def close(self, commit: bool = True) -> None:
        try:
            if commit and self._fds:
                self.commit(force=True)
        finally:
            for fd in self._fds.values():
                os.close(fd)
            self._fds = {}
            if self._lock is not None:
                self._lock.release()
                self._lock = None


def _block_digest(store: GradientStore, a: int, b: int) -> str:
    d = runstate.digest_of_array(store.read(a, b))
    for name in sorted(store.meta["aux"]):
        d += runstate.digest_of_array(np.load(store.directory / f"aux_{name}.npy", mmap_mode="r")[a:b])
    return d


def _data_offset(path: Path) -> int:
    with open(path, "rb") as fh:
        version = np.lib.format.read_magic(fh)
        (np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0)(fh)
        return fh.tell()


def checked_rows(vectors, a: int, b: int, dim: int, dtype: np.dtype) -> np.ndarray:
    """Rows [a, b) as a contiguous array of the store's dtype, after the checks every store makes:
    their shape, no NaN / Inf, no entry beyond the dtype's range (one-line errors naming the row)."""
    arr = _as_numpy(vectors)
    if arr.shape != (b - a, dim):
        raise ValueError(f"vectors: rows {a}:{b} have shape {arr.shape}, the store holds {dim} columns")
    # A finite sum means every entry is finite (NaN and Inf propagate); only a non-finite one
    # (or an overflowing sum of finite entries) pays the elementwise pass that finds the row.
    with np.errstate(over="ignore", invalid="ignore"):
        total = arr.sum() if arr.size else 0.0
    if not np.isfinite(total) and not np.isfinite(arr).all():
        bad = a + int(np.flatnonzero(~np.isfinite(arr).all(1))[0])
        raise ValueError(f"x_source: the vector of row {bad} is not finite (NaN/Inf gradient): rescale the inputs "
                         f"or check the model")
    limit = float(np.finfo(dtype).max)
    if arr.size and arr.dtype.itemsize > dtype.itemsize and float(np.abs(arr).max()) > limit:
        wider = "float32" if dtype == np.float16 else "float64"
        raise ValueError(f"dtype: row {a + int(np.abs(arr).max(1).argmax())} has an entry beyond "
                         f"{dtype.name}'s range ({limit:g}); use dtype='{wider}'")
    return np.ascontiguousarray(arr, dtype=dtype)


def _as_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return x.numpy() if x.dtype != torch.bfloat16 else x.float().numpy()
    return np.asarray(x)


def _pwrite(fd: int, arr: np.ndarray, offset: int) -> None:
    buf = memoryview(arr).cast("B")
    done = 0
    while done < len(buf):
        done += os.pwrite(fd, buf[done:], offset + done)


# ----------------------------------------------------------------------------------------------
@dataclass
class WriteResult:
    """What write_store did: the store when complete (else None), how it ended, the rows this
    process wrote in this call, and its CPU / wall seconds."""

    store: GradientStore | None
    status: str                        # "completed" | "stopped" (a stop rule / max_time)
    rows_written: int = 0
    rows: tuple[int, int] = (0, 0)     # this process's range
    timings: dict = field(default_factory=dict)


def write_store(directory: str | os.PathLike, source, compute: Callable[[torch.Tensor, Any], Any], *, dim: int,
                dtype: str = "float32", fingerprint: dict | None = None, aux: dict[str, str] | None = None,
                info: dict | None = None, block_rows: int = 4096, ctx=None, stop: Callable[[], bool] | None = None,
                progress: bool = False, desc: str = "featurising", checkpoint_every: float = 60.0) -> WriteResult:
    """Compute and write the vectors of every row of `source` (see the module docstring).

    source     a dvgs_fast.sources Source (``as_source(x, y)``): rows streamed in blocks
    compute    (x, y) -> [b, dim] vectors, or (vectors, {column: [b] values}) with `aux` columns
    ctx        a DistContext (dvgs_fast.distributed) under torchrun: each rank writes its range
    stop       called after every block; True ends the call ("stopped": the store can be resumed)
    """
    c0, w0 = time.process_time(), time.perf_counter()
    directory = Path(directory)
    n = len(source)
    ranks = ctx is not None and ctx.enabled
    fp = _plain(fingerprint or {})
    meta = read_meta(directory)
    if meta is not None and meta.get("complete") and meta.get("fingerprint") == fp:
        create_store(directory, n, dim, dtype=dtype, aux=aux, fingerprint=fp, info=info)   # checks the shape
        return WriteResult(GradientStore(directory, meta), "completed", 0, (0, 0), {"cpu": 0.0, "wall": 0.0})
    if not ranks or ctx.is_main:
        create_store(directory, n, dim, dtype=dtype, aux=aux, fingerprint=fp, info=info)
    if ranks:
        ctx.barrier()
    n_blocks = -(-n // block_rows)
    c_lo, c_hi = ctx.shard(n_blocks) if ranks else (0, n_blocks)
    lo, hi = min(c_lo * block_rows, n), min(c_hi * block_rows, n)
    writer = StoreWriter(directory, lo, hi, rank=ctx.rank if ranks else None, checkpoint_every=checkpoint_every).open()
    stopped, start = False, writer.done
    from tqdm.auto import tqdm
    bar = tqdm(total=hi - lo, initial=writer.done - lo, desc=desc, unit="row", leave=False, dynamic_ncols=True,
               disable=not progress or (ranks and not ctx.is_main))
    try:
        for a, b, x, y in source.iter_chunks(writer.done, hi, block_rows):
            got = compute(x, y)
            vec, cols = got if isinstance(got, tuple) else (got, None)
            writer.write(a, b, vec, cols)
            bar.update(b - a)
            if stop is not None and b < hi and stop():
                stopped = True
                break
    finally:
        bar.close()
        writer.close()
    written = writer.pos - start
    left = hi - writer.pos
    if ranks:
        left = int(ctx.all_reduce_sum(np.array([float(left)]))[0])
    store = None
    if left == 0:
        if not ranks or ctx.is_main:
            meta = read_meta(directory)
            meta["complete"] = True
            write_meta(directory, meta)
        if ranks:
            ctx.barrier()
        store = GradientStore.open(directory)
    return WriteResult(store, "completed" if store is not None else "stopped", written, (lo, hi),
                       {"cpu": time.process_time() - c0, "wall": time.perf_counter() - w0})


__all__ = ["StoreWriter", "WriteResult", "create_store", "write_store"]
