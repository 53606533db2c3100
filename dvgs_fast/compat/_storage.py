"""Where the compat layer keeps the similarity snapshots, and ``agg`` over them.

Two layouts, both under ``save_dir/<run id>/``:

* ``files`` (the original's): one float array per snapshot, ``data_value_iter=K.npy`` for
  K = 1, 2, ..., each of length N (source order), so the original's notebooks and its own
  ``DVGS.agg`` read them unchanged.
* ``memmap``: one ``[N, K]`` column-major ``.npy`` matrix, ``dvgs_snapshots.npy`` (a snapshot
  is one contiguous column), plus ``dvgs_compat.json`` saying how many columns are complete.
  Chosen automatically when the snapshots would exceed ``MEMMAP_BYTES`` (LINCS: 500 epochs x
  720k samples) or ``MEMMAP_FILES`` files, because the engine would otherwise hold a temporary
  copy as large as all the files, and thousands of files are unwieldy; the choice is printed.
  The original's ``agg`` does not read this layout (it looks for ``data_value_`` files); ours
  reads both.

``agg`` reads either in blocks of columns (float64 accumulation), so 'mean' and 'quantile' never
hold the whole matrix; 'none' returns the matrix (the memmap itself in the memmap layout).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from dvgs_fast._io import atomic_write_bytes, create_npy_memmap, save_npy

MEMMAP_BYTES = 1 << 30          # 1 GiB of snapshots
MEMMAP_FILES = 10_000
SNAP_FILE = "dvgs_snapshots.npy"
META_FILE = "dvgs_compat.json"
_ITER = re.compile(r"data_value_iter=(\d+)\.npy$")
REDUCTIONS = ("mean", "quantile", "none")


def choose_layout(n: int, k: int, itemsize: int, storage: str) -> str:
    if storage != "auto":
        return storage
    return "memmap" if (n * k * itemsize > MEMMAP_BYTES or k > MEMMAP_FILES) else "files"


def file_name(k: int) -> str:
    """The original's name of snapshot k (1-based)."""
    return f"data_value_iter={k}.npy"


def write_meta(run_dir: Path, **meta) -> None:
    atomic_write_bytes(run_dir / META_FILE, json.dumps(meta, indent=1).encode())


def read_meta(run_dir: Path) -> dict | None:
    p = Path(run_dir) / META_FILE
    if not p.exists():
        return None
    try:
        meta = json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"path: {p.name} in {p.parent} cannot be read ({type(exc).__name__}): it is damaged; "
                         f"rerun the run") from None
    if not isinstance(meta, dict):
        raise ValueError(f"path: {p.name} in {p.parent} holds a {type(meta).__name__}, not a run's description")
    return meta


class FileWriter:
    """Snapshots as data_value_iter=K.npy, written as they come (a killed run leaves the completed
    ones, as the original does)."""

    layout = "files"

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)

    def write(self, k: int, sims: np.ndarray) -> None:
        save_npy(self.run_dir / file_name(k + 1), sims)        # never through a link

    def close(self, k: int) -> None:
        pass


class MemmapWriter:
    """Snapshots as columns of one [N, K] column-major .npy memmap."""

    layout = "memmap"

    def __init__(self, run_dir: Path, n: int, k_total: int, dtype):
        self.run_dir = Path(run_dir)
        self.mm = create_npy_memmap(self.run_dir / SNAP_FILE, dtype, (n, k_total), fortran_order=True)

    def write(self, k: int, sims: np.ndarray) -> None:
        self.mm[:, k] = sims

    def close(self, k: int) -> None:
        self.mm.flush()
        write_meta(self.run_dir, layout="memmap", file=SNAP_FILE, n=int(self.mm.shape[0]), snapshots=int(k),
                   complete=True)


# ============================================================================== reading
def _snapshot_files(path: Path) -> list[Path]:
    """data_value_ files in snapshot order (K ascending; other names matching the original's
    'data_value_' test after them, by name)."""
    hits = [p for p in path.iterdir() if "data_value_" in p.name and p.is_file()]
    def key(p: Path):
        m = _ITER.search(p.name)
        return (0, int(m.group(1)), "") if m else (1, 0, p.name)
    return sorted(hits, key=key)


def _load(path: Path, mmap_mode: str | None = None) -> np.ndarray:
    """np.load, with a damaged file named in one line (numpy's own error does not say which)."""
    try:
        return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"path: {path.name} in {path.parent} cannot be read ({detail}): it is truncated or "
                         f"damaged; move it away (agg reads the other snapshots) or rerun the run") from None


class Snapshots:
    """Read access to a run folder's snapshots in either layout: n, k, column blocks."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise ValueError(f"path: {self.path} is not a folder (expected save_dir/<run id>/)")
        meta = read_meta(self.path)
        if meta is not None or (self.path / SNAP_FILE).exists():
            if meta is None or not meta.get("complete"):
                raise ValueError(f"path: {self.path} holds {SNAP_FILE} but no completed run ({META_FILE} "
                                 f"missing): the run was interrupted; call run() again with the same uid to "
                                 f"resume it")
            mm = _load(self.path / meta.get("file", SNAP_FILE), mmap_mode="r")
            self.k = int(meta["snapshots"])
            self.mm = mm[:, :self.k]
            self.n = int(mm.shape[0])
            self.files = None
            self.layout = "memmap"
        else:
            self.files = _snapshot_files(self.path)
            if not self.files:
                raise ValueError(f"path: {self.path} holds no snapshot files (data_value_iter=K.npy) and no "
                                 f"{SNAP_FILE}")
            first = _load(self.files[0], mmap_mode="r")
            self.n = int(first.size)
            self.k = len(self.files)
            self.mm = None
            self.layout = "files"

    def column(self, j: int) -> np.ndarray:
        if self.mm is not None:
            return np.asarray(self.mm[:, j])
        a = _load(self.files[j]).ravel()
        if a.size != self.n:
            raise ValueError(f"path: {self.files[j].name} has {a.size} values, {self.files[0].name} has {self.n}")
        return a

    def blocks(self, budget_bytes: int = 64 << 20):
        """(j0, j1, [N, j1 - j0] float64) over the columns, about budget_bytes at a time."""
        step = max(1, budget_bytes // max(1, 8 * self.n))
        for j0 in range(0, self.k, step):
            j1 = min(self.k, j0 + step)
            if self.mm is not None:
                yield j0, j1, np.asarray(self.mm[:, j0:j1], dtype=np.float64)
            else:
                yield j0, j1, np.stack([self.column(j) for j in range(j0, j1)], axis=1).astype(np.float64)

    def matrix(self) -> np.ndarray:
        if self.mm is not None:
            return self.mm
        return np.stack([self.column(j) for j in range(self.k)], axis=1)


def agg(path: str | os.PathLike, reduction: str = "mean") -> np.ndarray:
    """The original's DVGS.agg: 'mean' -> [N] mean over snapshots; 'quantile' -> [N] mean over
    snapshots of each sample's percentile rank within its snapshot (scipy's percentileofscore
    with kind='rank': the average 1-based rank x 100 / N, ties averaged); 'none' -> [N, K]."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: unknown value {reduction!r}; choose one of {', '.join(map(repr, REDUCTIONS))}")
    snaps = Snapshots(path)
    if reduction == "none":
        return snaps.matrix()
    total = np.zeros(snaps.n, dtype=np.float64)
    if reduction == "mean":
        for _, _, block in snaps.blocks():
            total += block.sum(axis=1)
    else:
        from scipy.stats import rankdata
        for _, _, block in snaps.blocks():
            total += rankdata(block, method="average", axis=0).sum(axis=1) * (100.0 / snaps.n)
    return total / snaps.k


__all__ = ["agg", "Snapshots", "FileWriter", "MemmapWriter", "choose_layout", "file_name", "read_meta",
           "write_meta", "MEMMAP_BYTES", "MEMMAP_FILES", "SNAP_FILE", "META_FILE", "REDUCTIONS"]
