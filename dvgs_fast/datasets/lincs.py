"""LINCS L1000 expression matrices in GCTX (HDF5) files: reading, streaming, writing.

GCTX layout (the Connectivity Map convention, "row" = gene, "column" = sample):

    /0/DATA/0/matrix   float, shape [n_samples, n_genes]  (samples x genes as stored in HDF5)
    /0/META/COL/id     sample ids, length n_samples; other sample (column) metadata beside it
    /0/META/ROW/id     gene ids, length n_genes; other gene (row) metadata beside it
    root attribute ``version`` = "GCTX1.0", a plain value or a 1-element array, bytes or str

``-666`` marks a missing value: in the matrix and in floating-point metadata it is read as NaN
(and NaN is written as -666). Integer and string metadata are returned as stored ("-666" strings
stay strings). Text metadata is UTF-8 where it can be, otherwise decoded as latin-1: older CMap
files hold latin-1 bytes such as ``b"10 \\xb5M"`` (10 uM), which must not crash a loader.

Full-size LINCS files (720k-1.8M samples x 12,328 genes, tens of GB) do not fit in memory:
``load_lincs(..., chunked=True)`` returns a :class:`GctxReader` that streams blocks of samples,
and :class:`GctxWriter` writes such files block by block.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from .base import Dataset

MATRIX_PATH = "0/DATA/0/matrix"
COL_META_PATH = "0/META/COL"
ROW_META_PATH = "0/META/ROW"
GCTX_VERSION = "GCTX1.0"
MISSING = -666
N_LANDMARKS = 978
# Names CMap files have used for the landmark flag (L1000 Level 3/4, Level 5 2017, 2020 beta).
LANDMARK_FIELDS = ("pr_is_lm", "is_lm", "pr_is_lmark")
_DEFAULT_CHUNK_BYTES = 64 << 20  # streaming block of ~64 MiB of float32


def _h5py():
    try:
        import h5py
    except ImportError as exc:  # pragma: no cover - h5py is a declared dependency
        raise ImportError("reading GCTX files needs h5py: pip install h5py") from exc
    return h5py


# ---------------------------------------------------------------------------------------------
# decoding helpers
# ---------------------------------------------------------------------------------------------
def _decode_one(b: Any) -> str:
    if isinstance(b, bytes):
        try:
            return b.decode("utf-8")
        except UnicodeDecodeError:
            return b.decode("latin-1")  # every byte string is valid latin-1
    return str(b)


def decode_strings(arr: np.ndarray) -> np.ndarray:
    """Fixed-length or variable-length byte strings -> numpy str array (UTF-8, else latin-1)."""
    arr = np.asarray(arr)
    if arr.dtype.kind == "S":
        try:
            return np.char.decode(arr, "utf-8")  # fast path: all valid UTF-8
        except UnicodeDecodeError:
            pass
    if arr.dtype.kind in "SO":
        return np.array([_decode_one(b) for b in arr.ravel()], dtype=str).reshape(arr.shape)
    return arr


def _read_field(dset, sel=slice(None)) -> np.ndarray:
    arr = dset[sel] if dset.ndim else np.asarray(dset[()])
    arr = np.asarray(arr)
    if arr.dtype.kind in "SO":
        return decode_strings(arr)
    if arr.dtype.kind == "f":
        arr = arr.astype(np.float64 if arr.dtype.itemsize > 4 else np.float32, copy=True)
        arr[arr == MISSING] = np.nan
    return arr


def read_version(attrs) -> str | None:
    """The ``version`` root attribute as str, whether stored as a scalar or a 1-element array."""
    if "version" not in attrs:
        return None
    v = attrs["version"]
    if isinstance(v, np.ndarray):
        v = v.reshape(-1)[0] if v.size else ""
    if isinstance(v, (bytes, np.bytes_)):
        return _decode_one(bytes(v))
    return str(v)


def _open(path: str | os.PathLike):
    """Open a GCTX file read-only; errors name the path and say what is wrong."""
    h5py = _h5py()
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: GCTX file not found")
    try:
        fh = h5py.File(path, "r")
    except OSError as exc:
        raise OSError(f"{path}: not a readable HDF5/GCTX file ({exc})") from None
    try:
        problems = []
        for p in (MATRIX_PATH, f"{COL_META_PATH}/id", f"{ROW_META_PATH}/id"):
            if p not in fh or not isinstance(fh[p], h5py.Dataset):
                problems.append(f"/{p}")
        if problems:
            raise ValueError(f"{path}: not a GCTX file: missing {', '.join(problems)}")
        m = fh[MATRIX_PATH]
        n_col, n_row = fh[f"{COL_META_PATH}/id"].shape[0], fh[f"{ROW_META_PATH}/id"].shape[0]
        if m.ndim != 2 or m.shape != (n_col, n_row):
            raise ValueError(f"{path}: matrix shape {m.shape} does not match {n_col} sample ids x "
                             f"{n_row} gene ids (expected samples x genes)")
    except BaseException:
        fh.close()
        raise
    return fh


def _read_meta_group(group, fields: Iterable[str] | None, sel=slice(None)) -> dict[str, np.ndarray]:
    names = [k for k in group.keys() if k != "id"]
    if fields is not None:
        fields = list(fields)
        unknown = [f for f in fields if f not in group]
        if unknown:
            raise ValueError(f"col_meta_fields: unknown field(s) {unknown}; the file has {sorted(names)}")
        names = [f for f in fields if f != "id"]
    return {k: _read_field(group[k], sel) for k in names}


def _landmark_mask(row_meta: dict[str, np.ndarray]) -> np.ndarray | None:
    for name in LANDMARK_FIELDS:
        if name in row_meta:
            v = row_meta[name]
            if v.dtype.kind in "US":
                return np.isin(np.char.strip(v.astype(str)), ["1", "1.0", "True", "true"])
            return np.asarray(v, dtype=np.float64) == 1
    return None


def _select_genes(gene_ids: np.ndarray, row_meta: dict[str, np.ndarray], landmark_only: bool,
                  genes: Sequence[str] | None, path) -> tuple[np.ndarray, str]:
    """Indices (into the file's genes) of the selected genes, and how they were chosen."""
    if genes is not None:
        pos = {g: i for i, g in enumerate(gene_ids)}
        genes = [str(g) for g in genes]
        missing = [g for g in genes if g not in pos]
        if missing:
            raise ValueError(f"genes: {len(missing)} id(s) not in {path}, e.g. {missing[:5]}")
        return np.array([pos[g] for g in genes], dtype=np.int64), "genes argument"
    if not landmark_only:
        return np.arange(len(gene_ids)), "all"
    mask = _landmark_mask(row_meta)
    if mask is not None:
        if not mask.any():
            raise ValueError(f"{path}: landmark flag present but no gene has it set to 1")
        return np.flatnonzero(mask), "landmark flag"
    # No flag: CMap files list the 978 landmark genes first.
    return np.arange(min(N_LANDMARKS, len(gene_ids))), f"first {N_LANDMARKS} genes"


def _auto_chunk_rows(n_genes_file: int, hdf5_chunks) -> int:
    rows = max(1, _DEFAULT_CHUNK_BYTES // (4 * max(1, n_genes_file)))
    if hdf5_chunks:  # whole HDF5 chunks per read avoid decompressing a chunk twice
        c = int(hdf5_chunks[0])
        rows = max(c, rows // c * c)
    return rows


# ---------------------------------------------------------------------------------------------
# streaming statistics
# ---------------------------------------------------------------------------------------------
class _RunningMoments:
    """Per-column count / mean / M2 in float64, merged block by block (Chan et al.), NaN-aware.

    Merging block moments instead of summing x and x^2 avoids the catastrophic cancellation of
    the naive formula over hundreds of thousands of rows.
    """

    def __init__(self, n_cols: int) -> None:
        self.n = np.zeros(n_cols)
        self.mean = np.zeros(n_cols)
        self.m2 = np.zeros(n_cols)

    def update(self, block: np.ndarray) -> None:
        b = np.asarray(block)
        if b.shape[0] == 0:
            return
        nan = np.isnan(b)
        if not nan.any():
            # Common case, kept cheap: sums accumulate in float64, but deviations from the block
            # mean stay in the block's dtype (float32), which halves the memory traffic and
            # costs ~1e-9 relative accuracy in M2.
            nb = np.full(b.shape[1], float(b.shape[0]))
            mb = b.mean(axis=0, dtype=np.float64)
            d = b - mb.astype(b.dtype)
            np.square(d, out=d)
            m2b = d.sum(axis=0, dtype=np.float64)
        else:
            b = b.astype(np.float64)
            ok = ~nan
            nb = ok.sum(axis=0).astype(np.float64)
            sb = np.where(ok, b, 0.0).sum(axis=0)
            mb = np.divide(sb, nb, out=np.zeros_like(sb), where=nb > 0)
            m2b = np.where(ok, (b - mb) ** 2, 0.0).sum(axis=0)
        n = self.n + nb
        delta = mb - self.mean
        w = np.divide(nb, n, out=np.zeros_like(n), where=n > 0)
        self.mean = self.mean + delta * w
        self.m2 = self.m2 + m2b + delta ** 2 * self.n * w
        self.n = n

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean, population std); columns without any value get mean 0 / std 1."""
        var = np.divide(self.m2, self.n, out=np.zeros_like(self.m2), where=self.n > 0)
        mean = np.where(self.n > 0, self.mean, 0.0)
        std = np.sqrt(var)
        return mean, np.where(std > 0, std, 1.0)  # constant gene -> zeros, not NaN


def _apply(block: np.ndarray, cols: np.ndarray | None, stats, fill_missing) -> np.ndarray:
    # h5py returns a fresh array per read, so in-place edits below never touch caller data.
    out = np.asarray(block if cols is None else block[:, cols], dtype=np.float32)
    out[out == MISSING] = np.nan
    if stats is not None:
        mean, std = stats
        out -= mean.astype(np.float32)
        out /= std.astype(np.float32)
    if fill_missing is not None:
        np.nan_to_num(out, copy=False, nan=float(fill_missing))
    return out


# ---------------------------------------------------------------------------------------------
# reader
# ---------------------------------------------------------------------------------------------
class GctxReader:
    """Streams a GCTX matrix block by block (blocks of samples), for files larger than memory.

    ``for X in reader`` yields float32 arrays [<= chunk_size, n_features] in file order, with the
    gene selection, missing-value handling and z-scoring of :func:`load_lincs` applied. With
    ``zscore=True`` the per-gene mean/std are computed in a first streaming pass (on first use;
    see :meth:`stats`) unless ``zscore_stats`` was given. The HDF5 file is opened per pass, never
    held open between calls, so a reader is cheap to keep around and safe to iterate repeatedly.
    """

    def __init__(self, path, *, landmark_only: bool = False, genes: Sequence[str] | None = None,
                 zscore: bool = False, zscore_stats: tuple[np.ndarray, np.ndarray] | None = None,
                 chunk_size: int | None = None, col_meta_fields: Iterable[str] | None = None,
                 fill_missing: float | None = None) -> None:
        self.path = Path(path)
        with _open(self.path) as fh:
            self.version = read_version(fh.attrs)
            m = fh[MATRIX_PATH]
            self._file_shape = tuple(int(s) for s in m.shape)
            self._hdf5_chunks = m.chunks
            self.file_dtype = m.dtype
            self.sample_ids = _read_field(fh[f"{COL_META_PATH}/id"])
            all_gene_ids = _read_field(fh[f"{ROW_META_PATH}/id"])
            all_row_meta = _read_meta_group(fh[ROW_META_PATH], None)
        if all_gene_ids.dtype.kind not in "U":
            all_gene_ids = all_gene_ids.astype(str)  # numeric ids (e.g. Entrez) as text
        self.sample_ids = self.sample_ids.astype(str)
        self.gene_index, self.gene_selection = _select_genes(all_gene_ids, all_row_meta,
                                                             landmark_only, genes, self.path)
        whole = np.array_equal(self.gene_index, np.arange(len(all_gene_ids)))
        self._cols = None if whole else self.gene_index
        self.gene_ids = all_gene_ids[self.gene_index]
        self.row_meta = {k: v[self.gene_index] for k, v in all_row_meta.items()}
        if chunk_size is None:
            chunk_size = _auto_chunk_rows(self._file_shape[1], self._hdf5_chunks)
        if isinstance(chunk_size, bool) or int(chunk_size) != chunk_size or chunk_size < 1:
            raise ValueError(f"chunk_size: must be a positive integer, got {chunk_size!r}")
        self.chunk_size = int(chunk_size)
        self.zscore = bool(zscore) or zscore_stats is not None
        self._stats = None
        if zscore_stats is not None:
            mean, std = (np.asarray(a, dtype=np.float64).reshape(-1) for a in zscore_stats)
            if mean.shape != (self.n_features,) or std.shape != (self.n_features,):
                raise ValueError(f"zscore_stats: expected two arrays of {self.n_features} values "
                                 f"(one per selected gene), got {mean.shape} and {std.shape}")
            if not np.all(np.isfinite(std)) or np.any(std <= 0):
                raise ValueError("zscore_stats: std must be finite and > 0")
            self._stats = (mean, std)
        self.fill_missing = fill_missing
        self._col_meta_fields = None if col_meta_fields is None else list(col_meta_fields)
        self._col_meta: dict[str, np.ndarray] | None = None

    # ---- shape ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._file_shape[0]

    @property
    def n_samples(self) -> int:
        return self._file_shape[0]

    @property
    def n_features(self) -> int:
        return int(len(self.gene_index))

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_samples, self.n_features)

    @property
    def n_chunks(self) -> int:
        return -(-self.n_samples // self.chunk_size)

    def __repr__(self) -> str:
        return (f"GctxReader({str(self.path)!r}, shape={self.shape}, chunk_size={self.chunk_size}, "
                f"zscore={self.zscore}, genes={self.gene_selection!r})")

    # ---- metadata ---------------------------------------------------------------------------
    @property
    def col_meta(self) -> dict[str, np.ndarray]:
        """Sample metadata (fields chosen by ``col_meta_fields``; all by default), read on first use."""
        if self._col_meta is None:
            with _open(self.path) as fh:
                self._col_meta = _read_meta_group(fh[COL_META_PATH], self._col_meta_fields)
        return self._col_meta

    def labels(self, field: str) -> tuple[np.ndarray, np.ndarray]:
        """Class codes (int64) of a sample metadata field, and the sorted class values."""
        with _open(self.path) as fh:
            if field not in fh[COL_META_PATH]:
                raise ValueError(f"label_field: {field!r} is not a column-metadata field of {self.path}")
            values = _read_field(fh[COL_META_PATH][field])
        classes, codes = np.unique(values.astype(str), return_inverse=True)
        return codes.astype(np.int64), classes

    # ---- data -------------------------------------------------------------------------------
    def _raw_blocks(self) -> Iterator[tuple[int, int, np.ndarray]]:
        with _open(self.path) as fh:
            m = fh[MATRIX_PATH]
            for start in range(0, self.n_samples, self.chunk_size):
                stop = min(start + self.chunk_size, self.n_samples)
                yield start, stop, m[start:stop]

    def stats(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(mean, std) per selected gene (float64) used for z-scoring; None when ``zscore`` is off.

        Computed once, in a streaming pass over the file (missing values ignored, population
        std, constant genes get std 1).
        """
        if not self.zscore:
            return None
        if self._stats is None:
            acc = _RunningMoments(self.n_features)
            for _, _, block in self._raw_blocks():
                acc.update(_apply(block, self._cols, None, None))
            self._stats = acc.result()
        return self._stats

    def iter_chunks(self) -> Iterator[tuple[int, int, np.ndarray]]:
        """Yield ``(start, stop, X_block)``; rows ``start:stop`` of the file, transformed."""
        stats = self.stats()
        for start, stop, block in self._raw_blocks():
            yield start, stop, _apply(block, self._cols, stats, self.fill_missing)

    def __iter__(self) -> Iterator[np.ndarray]:
        for _, _, block in self.iter_chunks():
            yield block

    def read(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows ``start:stop`` (transformed) as one float32 array."""
        stop = self.n_samples if stop is None else min(int(stop), self.n_samples)
        stats = self.stats()
        with _open(self.path) as fh:
            return _apply(fh[MATRIX_PATH][int(start):stop], self._cols, stats, self.fill_missing)

    def read_rows(self, idx) -> np.ndarray:
        """Arbitrary rows (transformed), in the order given."""
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n_samples):
            raise ValueError(f"idx: row indices must be in [0, {self.n_samples})")
        order = np.unique(idx)  # h5py point selection needs increasing, unique indices
        stats = self.stats()
        with _open(self.path) as fh:
            block = fh[MATRIX_PATH][order] if order.size else np.empty((0, self._file_shape[1]))
        out = _apply(np.asarray(block), self._cols, stats, self.fill_missing)
        return out[np.searchsorted(order, idx)]

    def to_array(self) -> np.ndarray:
        """The whole (selected, transformed) matrix in memory, filled block by block."""
        out = np.empty(self.shape, dtype=np.float32)
        for start, stop, block in self.iter_chunks():
            out[start:stop] = block
        return out


def load_lincs(path: str | os.PathLike, *, landmark_only: bool = False, genes: Sequence[str] | None = None,
               zscore: bool = False, zscore_stats: tuple[np.ndarray, np.ndarray] | None = None,
               chunked: bool = False, chunk_size: int | None = None,
               col_meta_fields: Iterable[str] | None = None, label_field: str | None = None,
               fill_missing: float | None = None) -> Dataset | GctxReader:
    """Read a LINCS GCTX file: samples x genes, float32.

    landmark_only    keep the 978 landmark genes: those whose ``pr_is_lm`` (or ``is_lm`` /
                     ``pr_is_lmark``) row metadata is 1; without such a field, the first 978 genes
    genes            explicit gene ids to keep, in this order (overrides ``landmark_only``)
    zscore           standardise each gene over the samples (population std; missing values
                     ignored; a constant gene becomes 0)
    zscore_stats     (mean, std) to use instead of this file's own (e.g. a training file's)
    chunked          return a :class:`GctxReader` that streams blocks of ``chunk_size`` samples
                     (default: ~64 MiB per block) instead of reading everything
    col_meta_fields  sample metadata fields to read (default all; ``[]`` none)
    label_field      a sample metadata field whose values become class labels ``y``
                     (``meta["classes"]`` holds the class values)
    fill_missing     value for missing entries (-666 / NaN) after z-scoring; default keep NaN

    Returns a :class:`~dvgs_fast.datasets.Dataset` (``feature_names`` = gene ids;
    ``meta``: ``sample_ids``, ``col_meta``, ``row_meta``, ``version``, ``zscore_stats``), or the
    reader when ``chunked``. Raises FileNotFoundError / OSError / ValueError naming the path for a
    missing, unreadable or non-GCTX file.
    """
    reader = GctxReader(path, landmark_only=landmark_only, genes=genes, zscore=zscore,
                        zscore_stats=zscore_stats, chunk_size=chunk_size,
                        col_meta_fields=col_meta_fields, fill_missing=fill_missing)
    if chunked:
        return reader
    if reader.zscore and reader._stats is None:
        # In memory, one pass over the file suffices: accumulate the statistics while reading,
        # then standardise the loaded matrix in place.
        X = np.empty(reader.shape, dtype=np.float32)
        acc = _RunningMoments(reader.n_features)
        for start, stop, block in reader._raw_blocks():
            X[start:stop] = _apply(block, reader._cols, None, None)
            acc.update(X[start:stop])
        reader._stats = acc.result()
        mean, std = reader._stats
        X -= mean.astype(np.float32)
        X /= std.astype(np.float32)
        if fill_missing is not None:
            np.nan_to_num(X, copy=False, nan=float(fill_missing))
    else:
        X = reader.to_array()
    y, n_classes, classes = None, 0, None
    if label_field is not None:
        y, classes = reader.labels(label_field)
        n_classes = len(classes)
    meta = {"path": str(reader.path), "version": reader.version, "sample_ids": reader.sample_ids,
            "gene_ids": reader.gene_ids, "col_meta": reader.col_meta, "row_meta": reader.row_meta,
            "gene_selection": reader.gene_selection, "zscore_stats": reader.stats(),
            "per_row": ["sample_ids", "col_meta"]}
    if classes is not None:
        meta["classes"] = classes
        meta["label_field"] = label_field
    return Dataset(X=X, y=y, feature_names=[str(g) for g in reader.gene_ids], n_classes=n_classes,
                   name="lincs", meta=meta)


# ---------------------------------------------------------------------------------------------
# writer
# ---------------------------------------------------------------------------------------------
def _encode_field(values, name: str, n: int, missing) -> np.ndarray:
    arr = np.asarray(values)
    if arr.shape != (n,):
        raise ValueError(f"{name}: expected {n} values, got shape {arr.shape}")
    if arr.dtype.kind in "UO":
        enc = [v if isinstance(v, bytes) else str(v).encode("utf-8") for v in arr]
        width = max([len(b) for b in enc] + [1])
        return np.array(enc, dtype=f"S{width}")
    if arr.dtype.kind == "S":
        return arr
    if arr.dtype.kind == "f":
        arr = arr.copy()
        arr[np.isnan(arr)] = missing
        return arr
    if arr.dtype.kind in "iub":
        return arr
    raise ValueError(f"{name}: unsupported dtype {arr.dtype}")


class GctxWriter:
    """Write a GCTX file block by block (samples appended in order), atomically.

    ::

        with GctxWriter("big.gctx", gene_ids, n_samples=720_216) as w:
            for block, ids in blocks:           # block: [k, n_genes]
                w.append(block, col_ids=ids)

    The matrix goes to disk as it is appended (resizable HDF5 dataset, chunked by rows of all
    genes, ~1 MiB per chunk by default like CMap's files); sample ids/metadata are small and are
    written at :meth:`close`. The file is built under a temporary name and renamed into place only
    when complete, so a crash never leaves a truncated ``.gctx`` behind. Sample ids may be given
    up front (``col_ids``), with each block, or not at all (then ``"0".."n-1"``).
    """

    def __init__(self, path, row_ids: Sequence[str], *, n_samples: int | None = None,
                 col_ids: Sequence[str] | None = None, row_meta: dict[str, Any] | None = None,
                 col_meta: dict[str, Any] | None = None, dtype=np.float32,
                 chunks: int | tuple[int, int] | None = None, compression: str | None = None,
                 version: str = GCTX_VERSION, version_as_array: bool = False) -> None:
        h5py = _h5py()
        self.path = Path(path)
        self.n_genes = len(row_ids)
        if self.n_genes == 0:
            raise ValueError("row_ids: need at least one gene id")
        if col_ids is not None:
            if n_samples is not None and len(col_ids) != n_samples:
                raise ValueError(f"col_ids: {len(col_ids)} ids but n_samples={n_samples}")
            n_samples = len(col_ids)
        self.n_expected = n_samples
        self._col_ids_upfront = None if col_ids is None else list(col_ids)
        self._col_meta_upfront = col_meta
        self._col_id_blocks: list[np.ndarray] = []
        self._ids_per_block: bool | None = None  # fixed by the first append
        self._col_meta_blocks: dict[str, list[np.ndarray]] = {}
        self.n_written = 0
        self.dtype = np.dtype(dtype)
        if chunks is None:
            rows = max(1, (1 << 20) // (self.n_genes * self.dtype.itemsize))
            chunks = (rows, self.n_genes)
        elif isinstance(chunks, (int, np.integer)):
            chunks = (int(chunks), self.n_genes)
        chunks = (max(1, min(int(chunks[0]), n_samples or int(chunks[0]))), min(int(chunks[1]), self.n_genes))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        self._fh = h5py.File(self._tmp, "w")
        try:
            ver = np.bytes_(version.encode())
            self._fh.attrs["version"] = np.array([ver]) if version_as_array else ver
            self._m = self._fh.create_dataset(MATRIX_PATH, shape=(n_samples or 0, self.n_genes),
                                              maxshape=(None, self.n_genes), dtype=self.dtype,
                                              chunks=chunks, compression=compression)
            rg = self._fh.require_group(ROW_META_PATH)
            rg.create_dataset("id", data=_encode_field([str(r) for r in row_ids], "row_ids", self.n_genes, MISSING))
            for k, v in (row_meta or {}).items():
                if k == "id":
                    continue
                rg.create_dataset(k, data=_encode_field(v, f"row_meta[{k!r}]", self.n_genes, MISSING))
            self._fh.require_group(COL_META_PATH)
        except BaseException:
            self.abort()
            raise

    def append(self, rows, col_ids: Sequence[str] | None = None,
               col_meta: dict[str, Any] | None = None) -> None:
        """Write the next block of samples: ``rows`` [k, n_genes] (NaN stored as -666)."""
        if self._fh is None:
            raise ValueError("append: the writer is closed")
        rows = np.asarray(rows)
        if rows.ndim == 1:
            rows = rows[None, :]
        if rows.ndim != 2 or rows.shape[1] != self.n_genes:
            raise ValueError(f"rows: expected shape [k, {self.n_genes}], got {rows.shape}")
        k = rows.shape[0]
        if self._ids_per_block is None:
            self._ids_per_block = col_ids is not None
        elif self._ids_per_block != (col_ids is not None):
            raise ValueError("col_ids: give sample ids with every block or with none")
        if col_ids is not None:
            if self._col_ids_upfront is not None:
                raise ValueError("col_ids: already given to the constructor")
            if len(col_ids) != k:
                raise ValueError(f"col_ids: {len(col_ids)} ids for {k} rows")
            self._col_id_blocks.append(np.asarray([str(c) for c in col_ids]))
        if col_meta:
            if self._col_meta_upfront is not None:
                raise ValueError("col_meta: already given to the constructor")
            for f, v in col_meta.items():
                v = np.asarray(v)
                if v.shape != (k,):
                    raise ValueError(f"col_meta[{f!r}]: expected {k} values, got shape {v.shape}")
                self._col_meta_blocks.setdefault(f, []).append(v)
        end = self.n_written + k
        if self.n_expected is not None and end > self.n_expected:
            raise ValueError(f"rows: {end} rows would exceed n_samples={self.n_expected}")
        if end > self._m.shape[0]:
            self._m.resize(end, axis=0)
        block = rows.astype(self.dtype, copy=True)
        if block.dtype.kind == "f":
            block[np.isnan(block)] = MISSING
        self._m[self.n_written:end] = block
        self.n_written = end

    def close(self) -> Path:
        """Write sample ids/metadata, check the row count, and move the file into place."""
        if self._fh is None:
            return self.path
        try:
            n = self.n_written
            if self.n_expected is not None and n != self.n_expected:
                raise ValueError(f"n_samples: {self.n_expected} expected but {n} rows were appended")
            if self._col_ids_upfront is not None:
                ids = self._col_ids_upfront
            elif self._col_id_blocks:
                ids = np.concatenate(self._col_id_blocks)
                if len(ids) != n:
                    raise ValueError("col_ids: give sample ids with every block or with none")
            else:
                ids = [str(i) for i in range(n)]
            cg = self._fh[COL_META_PATH]
            cg.create_dataset("id", data=_encode_field(ids, "col_ids", n, MISSING))
            meta = self._col_meta_upfront if self._col_meta_upfront is not None else {
                f: np.concatenate(v) for f, v in self._col_meta_blocks.items()}
            for f, v in meta.items():
                if f == "id":
                    continue
                cg.create_dataset(f, data=_encode_field(v, f"col_meta[{f!r}]", n, MISSING))
            self._fh.close()
            self._fh = None
            os.replace(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise
        return self.path

    def abort(self) -> None:
        """Discard everything written (the temporary file is deleted)."""
        if self._fh is not None:
            try:
                self._fh.close()
            finally:
                self._fh = None
        if self._tmp.exists():
            self._tmp.unlink()

    def __enter__(self) -> "GctxWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_gctx(path, matrix, row_ids: Sequence[str], col_ids: Sequence[str] | None, *,
               col_meta: dict[str, Any] | None = None, row_meta: dict[str, Any] | None = None,
               chunks: int | tuple[int, int] | None = None, dtype=np.float32,
               compression: str | None = None, version_as_array: bool = False) -> Path:
    """Write ``matrix`` [n_samples, n_genes] as a GCTX file (read back by :func:`load_lincs`).

    row_ids are the gene ids (one per matrix column), col_ids the sample ids (one per matrix row;
    None -> "0".."n-1"). ``matrix`` may be anything sliceable by rows (numpy array, memmap, h5py
    dataset): it is copied in blocks of HDF5 chunk rows, so it need not fit in memory.
    """
    n = int(matrix.shape[0])
    if len(matrix.shape) != 2 or int(matrix.shape[1]) != len(row_ids):
        raise ValueError(f"matrix: shape {tuple(matrix.shape)} does not match {len(row_ids)} row_ids "
                         f"(expected [n_samples, n_genes])")
    with GctxWriter(path, row_ids, n_samples=n, col_ids=col_ids, row_meta=row_meta, col_meta=col_meta,
                    dtype=dtype, chunks=chunks, compression=compression,
                    version_as_array=version_as_array) as w:
        step = max(w._m.chunks[0], (16 << 20) // max(1, len(row_ids) * w.dtype.itemsize))
        for start in range(0, n, step):
            w.append(np.asarray(matrix[start:start + step]))
    return Path(path)


__all__ = ["load_lincs", "GctxReader", "GctxWriter", "write_gctx", "read_version", "decode_strings",
           "MISSING", "N_LANDMARKS"]
