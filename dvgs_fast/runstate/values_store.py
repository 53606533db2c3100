"""Per-sample running sums of a method's per-snapshot scores (DVGS similarities, TracIn
checkpoint terms) and of their squares (for the standard error) in a memory-mapped float64 file.

The sums live on disk (in ``checkpoint_dir``, else an unlinked temporary file), so an
N-sample run needs O(batch) memory for them, and they are written as snapshots are computed.

Crash safety at snapshot granularity: the file holds two slots ``[2, 2, N]`` (slot, [sum, sum of
squares], sample). After ``k`` completed
snapshots the valid sums are in slot ``k % 2``; snapshot ``k`` reads slot ``k % 2`` and writes
``sums + similarity`` into slot ``(k + 1) % 2``. A run killed in the middle of snapshot ``k``
leaves slot ``k % 2`` untouched, and the checkpoint (written atomically after the snapshot and
the following optimizer step, see methods/dvgs/loop.py) says which ``k`` is complete. So no copy of the
sums is ever put in the checkpoint itself, only the checksum of slot ``k % 2``
(:meth:`ValuesStore.slot_digest`; the files are written in place, so their checksum is taken
when the state is saved) and of every completed snapshot column (:meth:`column_digest`), which
:func:`open_store` verifies on resume.

``keep_snapshots`` keeps every snapshot in a column-major ``[N, K]`` ``.npy`` memmap beside it
(one snapshot = one contiguous column write).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from dvgs_fast import _io
from dvgs_fast.runstate.digest import digest_of_array
from dvgs_fast.runstate.files import CheckpointError, CheckpointFiles

SUMS_NAME = "dvgs_sums.npy"
SNAP_NAME = "dvgs_snapshots.npy"


def _anonymous(prefix: str, dtype, shape, fortran_order=False) -> np.memmap:
    fd, path = tempfile.mkstemp(prefix=prefix, suffix=".npy")
    os.close(fd)
    mm = _io.create_npy_memmap(path, dtype, shape, fortran_order)      # reopened by name: never through a link
    try:
        os.unlink(path)          # the mapping stays valid; nothing is left behind on exit
    except OSError:              # pragma: no cover - Windows keeps open files
        pass
    return mm


class StoreFileError(ValueError):
    """A sums/snapshots file of a checkpoint is missing, unreadable, truncated or of another run."""


def _open_existing(path: Path, dtype, shape, fortran_order: bool) -> np.memmap:
    """Open a .npy file written by an earlier run for update (never through a link), after
    checking its header and its size: np.memmap would silently zero-extend a file truncated by a
    crash."""
    try:
        mm, got_shape, got_dtype, got_fortran, offset, size = _io.open_npy_memmap(path)
    except _io.SymlinkError:
        raise
    except (OSError, ValueError) as exc:
        raise StoreFileError(f"{path.name} is unreadable ({type(exc).__name__}: {exc})") from None
    if tuple(got_shape) != tuple(shape) or got_dtype != np.dtype(dtype) or bool(got_fortran) != fortran_order:
        raise StoreFileError(f"{path.name} holds a {tuple(got_shape)} {got_dtype} array, this run needs "
                             f"{tuple(shape)} {np.dtype(dtype)}")
    if mm is None:
        expected = offset + int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        raise StoreFileError(f"{path.name} has {size} bytes, {expected} expected (truncated or overwritten)")
    return mm


def _open(directory: Path | None, name: str, dtype, shape, resume: bool, fortran_order=False) -> np.memmap:
    if directory is None:
        return _anonymous(name.split(".")[0] + "_", dtype, shape, fortran_order)
    path = Path(directory) / name
    if resume:
        if not os.path.lexists(path):
            raise StoreFileError(f"the state names {name} but the file is missing")
        return _open_existing(path, dtype, shape, fortran_order)
    Path(directory).mkdir(parents=True, exist_ok=True)
    return _io.create_npy_memmap(path, dtype, shape, fortran_order)


class ValuesStore:
    """Running sums and sums of squares [2, N] (float64, double-buffered on disk) and optional
    snapshots [N, K]."""

    def __init__(self, n: int, directory: str | os.PathLike | None = None, *, resume: bool = False,
                 n_snapshots: int = 0, keep_snapshots: bool = False, snapshot_dtype=np.float32,
                 sums_name: str = SUMS_NAME, snap_name: str = SNAP_NAME):
        self.n = int(n)
        self.directory = None if directory is None else Path(directory)
        self.sums = _open(self.directory, sums_name, np.float64, (2, 2, self.n), resume)
        if not resume:
            self.sums[0] = 0.0
        self.snapshots = None
        if keep_snapshots:
            self.snapshots = _open(self.directory, snap_name, snapshot_dtype, (self.n, int(n_snapshots)),
                                   resume, fortran_order=True)

    def add(self, k: int, a: int, b: int, sim: np.ndarray) -> None:
        """Snapshot k's similarities of rows [a, b): sums_{k+1} = sums_k + (sim, sim²) (float64)."""
        sim = np.asarray(sim)
        s64 = sim.astype(np.float64, copy=False)
        np.add(self.sums[k % 2, 0, a:b], s64, out=self.sums[(k + 1) % 2, 0, a:b])
        np.add(self.sums[k % 2, 1, a:b], s64 * s64, out=self.sums[(k + 1) % 2, 1, a:b])
        if self.snapshots is not None:
            self.snapshots[a:b, k] = sim

    def sums_after(self, k: int) -> np.ndarray:
        """[2, N]: per-sample sum of the k snapshots' similarities and of their squares."""
        return self.sums[k % 2]

    def slot_digest(self, k: int) -> str:
        """Checksum of the sums after k snapshots (slot k % 2), recorded in the saved state."""
        return digest_of_array(self.sums[k % 2])

    def column_digest(self, j: int) -> str:
        """Checksum of kept snapshot j (one contiguous column), once all its rows are written."""
        return digest_of_array(self.snapshots[:, j])

    def flush(self) -> None:
        self.sums.flush()
        if self.snapshots is not None:
            self.snapshots.flush()


def open_store(files: CheckpointFiles | None, n: int, *, state: dict | None, n_snapshots: int,
               keep_snapshots: bool, snapshot_dtype) -> ValuesStore:
    """The sums (and snapshot) memmaps; on resume, their sizes and checksums are verified."""
    resume = state is not None
    try:
        store = ValuesStore(n, None if files is None else files.directory, resume=resume,
                            n_snapshots=n_snapshots, keep_snapshots=keep_snapshots,
                            snapshot_dtype=snapshot_dtype,
                            sums_name=(files.sums.name if files else "dvgs_sums.npy"),      # no folder: names unused
                            snap_name=(files.snapshots.name if files else "dvgs_snapshots.npy"))
    except StoreFileError as exc:
        raise files.error(str(exc)) from None
    except _io.SymlinkError as exc:
        raise CheckpointError(f"checkpoint_dir: {exc}") from None
    if resume:
        k = int(state["k"])
        if store.slot_digest(k) != state["sums_digest"]:
            raise files.error(f"{files.sums.name} does not match the saved state (checksum of the sums "
                              f"after {k} snapshots): it was overwritten or corrupted")
        if keep_snapshots:
            digests = state["snap_digests"]
            bad = [j for j in range(k) if j >= len(digests) or store.column_digest(j) != digests[j]]
            if bad:
                raise files.error(f"{files.snapshots.name} does not match the saved state (checksum of "
                                  f"snapshot {bad[0]}): it was overwritten or corrupted")
    return store


__all__ = ["ValuesStore", "StoreFileError", "SUMS_NAME", "SNAP_NAME", "open_store"]
