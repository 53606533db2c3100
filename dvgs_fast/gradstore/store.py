"""The on-disk layout of a gradient store and its readers.

A store is a folder:

* ``features.npy``  [N, k] float16 / float32 / float64, C order, a plain NumPy .npy file (so
  ``np.load(path, mmap_mode="r")`` reads it too);
* ``aux_<name>.npy`` [N] per-row values that go with the vectors (TRAK's out-to-loss weights);
* ``store.json``    shape, dtype, the fingerprint of what the vectors are (model, projection,
  data, settings), free-form ``info`` (the projector's description), and ``complete``;
* while it is being written: ``gradstore_checkpoint.pt`` (+ ``.rank<r>``) and ``gradstore.lock``
  (writer.py).

Reads go through ``os.preadv`` into a reused buffer, not a memory map: a pass over a store
larger than memory then costs page cache, never resident memory of the reading process.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from dvgs_fast._io import atomic_write_text

FORMAT = 1
FEATURES = "features.npy"
META = "store.json"
DTYPES = {"float16": np.float16, "float32": np.float32, "float64": np.float64}
# Rows per block of a pass over a store, unless the caller says otherwise: ~32 MiB of the file.
_BLOCK_BYTES = 32 << 20


class StoreError(ValueError):
    """A store folder that cannot be used (one line: the folder, what, the way out)."""


def _error(directory: Path, what: str) -> StoreError:
    return StoreError(f"store_dir: {directory}: {what}; delete that folder (or pass another store_dir) to start over")


def check_dtype(dtype) -> str:
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in DTYPES:
        raise ValueError(f"dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    return name


def _header(path: Path) -> tuple[tuple, np.dtype, int]:
    """(shape, dtype, data offset) of a .npy file, after checking that its size matches."""
    with open(path, "rb") as fh:
        version = np.lib.format.read_magic(fh)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(fh)
        offset = fh.tell()
    if fortran:
        raise ValueError(f"{path.name} is Fortran-ordered")
    expected = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    size = path.stat().st_size
    if size != expected:
        raise ValueError(f"{path.name} has {size} bytes, {expected} expected (truncated or overwritten)")
    return tuple(shape), dtype, offset


def create_npy(path: Path, shape: tuple, dtype) -> None:
    """An .npy file of the given shape, its data not written yet (a sparse file: no disk used
    until rows are written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                  "fortran_order": False, "shape": tuple(shape)})
        offset = fh.tell()
        fh.truncate(offset + int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize)


def read_meta(directory: Path) -> dict | None:
    path = Path(directory) / META
    if not path.exists():
        return None
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise _error(Path(directory), f"{META} is unreadable ({type(exc).__name__})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise _error(Path(directory), f"{META} is not a gradient store of this version")
    return meta


def write_meta(directory: Path, meta: dict) -> None:
    atomic_write_text(Path(directory) / META, json.dumps(meta, indent=1, sort_keys=True))


class GradientStore:
    """A finished (or, with ``require_complete=False``, partly written) store, read-only.

    >>> st = GradientStore.open("runs/trak/member_00")
    >>> st.n, st.dim, st.dtype                   # rows, vector width, on-disk dtype
    >>> for a, b, block in st.blocks():          # float32 tensors [b - a, dim], a block at a time
    ...     ...
    >>> st.aux("q")                              # a per-row column
    """

    def __init__(self, directory: str | os.PathLike, meta: dict):
        self.directory = Path(directory)
        self.meta = meta
        self.n, self.dim = int(meta["n"]), int(meta["dim"])
        self.dtype = np.dtype(DTYPES[meta["dtype"]])
        self.path = self.directory / FEATURES
        try:
            shape, dtype, self._offset = _header(self.path)
        except (OSError, ValueError) as exc:
            raise _error(self.directory, f"{FEATURES}: {exc}") from None
        if shape != (self.n, self.dim) or dtype != self.dtype:
            raise _error(self.directory, f"{FEATURES} holds {shape} {dtype}, {META} says {(self.n, self.dim)} "
                                         f"{self.dtype}")

    @classmethod
    def open(cls, directory: str | os.PathLike, *, require_complete: bool = True) -> "GradientStore":
        directory = Path(directory)
        meta = read_meta(directory)
        if meta is None:
            raise StoreError(f"store_dir: {directory} holds no gradient store ({META} is missing)")
        if require_complete and not meta.get("complete"):
            raise StoreError(f"store_dir: {directory}: the store is not complete (its writing was interrupted); "
                             f"run the featurisation again with the same settings to finish it")
        return cls(directory, meta)

    # ------------------------------------------------------------------------------ metadata
    @property
    def fingerprint(self) -> dict:
        return self.meta.get("fingerprint", {})

    @property
    def info(self) -> dict:
        return self.meta.get("info", {})

    @property
    def complete(self) -> bool:
        return bool(self.meta.get("complete"))

    @property
    def nbytes(self) -> int:
        """Bytes of the vectors on disk (the file's data part)."""
        return self.n * self.dim * self.dtype.itemsize

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        return (f"GradientStore({str(self.directory)!r}, n={self.n}, dim={self.dim}, dtype={self.dtype.name}, "
                f"complete={self.complete})")

    # ------------------------------------------------------------------------------ reading
    def aux(self, name: str) -> np.ndarray:
        """[N] per-row values stored beside the vectors (read into memory)."""
        if name not in self.meta.get("aux", {}):
            raise KeyError(f"{name!r}: not a column of this store (columns: {', '.join(self.meta.get('aux', {}))})")
        return np.load(self.directory / f"aux_{name}.npy")

    def array(self) -> np.memmap:
        """The vectors as a read-only memory map (convenient; a full pass over a large store
        through it leaves its pages resident in this process -- blocks() does not)."""
        return np.load(self.path, mmap_mode="r")

    def read(self, a: int, b: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows [a, b) as an array of the on-disk dtype (into `out` when given)."""
        if not 0 <= a <= b <= self.n:
            raise ValueError(f"rows: [{a}, {b}) is outside the store's {self.n} rows")
        if out is None:
            out = np.empty((b - a, self.dim), dtype=self.dtype)
        buf = memoryview(out).cast("B")
        want, pos = len(buf), self._offset + a * self.dim * self.dtype.itemsize
        fd = os.open(self.path, os.O_RDONLY)
        try:
            got = 0
            while got < want:
                k = os.preadv(fd, [buf[got:]], pos + got)
                if k <= 0:
                    raise _error(self.directory, f"{FEATURES} ended early (truncated)")
                got += k
        finally:
            os.close(fd)
        return out

    def block_rows(self, block_bytes: int = _BLOCK_BYTES) -> int:
        return max(1, block_bytes // max(1, self.dim * self.dtype.itemsize))

    def blocks(self, start: int = 0, stop: int | None = None, rows: int | None = None,
               dtype: torch.dtype | None = torch.float32) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(a, b, [b - a, dim] tensor) over rows [start, stop), `rows` at a time, a fresh tensor
        of `dtype` each; dtype None: the on-disk dtype as a view of one reused buffer (valid
        until the next block is read: no copy)."""
        stop = self.n if stop is None else int(stop)
        rows = self.block_rows() if rows is None else int(rows)
        buf = np.empty((min(rows, max(0, stop - start)), self.dim), dtype=self.dtype)
        for a in range(int(start), stop, rows):
            b = min(a + rows, stop)
            arr = self.read(a, b, buf[:b - a])
            t = torch.from_numpy(arr)
            yield a, b, (t if dtype is None else t.to(dtype, copy=True))


__all__ = ["DTYPES", "FEATURES", "FORMAT", "GradientStore", "META", "StoreError", "check_dtype", "create_npy",
           "read_meta", "write_meta"]
