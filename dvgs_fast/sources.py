"""Source sets for DVGS that need not fit in memory ("chunked sources").

DVGS scores every source sample at every snapshot, so the source is read once per snapshot
pass, in order, in batches of ``source_batch_size`` rows. A *source* is anything that can serve
rows ``[start, stop)`` in order; the loop never needs more than one batch (plus one block of the
underlying reader) in memory.

Accepted by ``DVGS.fit(x_source, ...)`` (see :func:`as_source`):

* a tensor / numpy array (in memory: :class:`TensorSource`);
* a :class:`~dvgs_fast.datasets.lincs.GctxReader`, i.e. ``load_lincs(path, chunked=True)``
  (:class:`GctxSource`: reads the HDF5 file block by block, one open per pass);
* a map-style ``torch.utils.data.Dataset`` whose items are ``x`` or ``(x, y)``
  (:class:`DatasetSource`; rows are fetched by index, ``__getitems__`` used when present);
* a zero-argument callable returning an iterator of ``(x_chunk, y_chunk_or_None)`` (or bare
  ``x_chunk``) chunks of any sizes (:class:`IteratorSource`, an "iterator factory"; it is
  called anew for every pass). Its length is counted in one extra pass at setup unless given.

Every source is re-cut into batches at the same global row boundaries (multiples of the batch
size from the start of the range), so a chunked source gives bit-for-bit the same values as the
same rows in memory. Chunks are validated as they stream (NaN/Inf -> ValueError naming the row
range); :meth:`Source.probe` does the cheap up-front check of the first rows.

A *sub-range* of any source is ``source.slice(start, stop)`` (for sharding across ranks), and
``source.iter_batches(size)`` / ``source.iter_chunks(start, stop, size)`` stream it.

A streamed (callable) source must yield the same rows on every pass: one that yields fewer or
more rows than it did when counted raises :class:`SourceLengthError` (a ValueError with both
counts; DVGS adds which snapshot's pass it was) before a short batch reaches the caller.

``source.identity()`` is what a DVGS checkpoint fingerprint records of the data: the content
hash of an in-memory or streamed (callable, Dataset) source, computed block by block; the path,
size and modification time of a GCTX file (hashing a multi-GB file per run would cost a pass).

Cost to know about: with a chunked source, each snapshot pass re-reads the whole source, so a
huge file makes DVGS IO-bound (bench/bench_lincs_scale.py quantifies it).
"""
from __future__ import annotations

import hashlib
import os
from typing import Any, Callable, Iterator

import numpy as np
import torch

from dvgs_fast.runstate import new_hash, update_with_tensor

Batch = tuple[int, int, torch.Tensor, "torch.Tensor | None"]


def _to_tensor(a: Any) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a.detach()
    arr = np.asarray(a)
    if arr.dtype == object:
        raise ValueError("x_source: a chunk is an object array; chunks must be numeric arrays")
    if arr.ndim and not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr)      # (which would also turn a 0-d label into shape [1])
    return torch.from_numpy(arr) if arr.dtype.kind != "U" else torch.as_tensor(arr)


class SourceLengthError(ValueError):
    """A pass over a streamed source yielded another number of rows than the source has."""

    def __init__(self, got: int, expected: int, more: bool):
        self.got, self.expected, self.more = int(got), int(expected), bool(more)
        super().__init__(f"x_source: the stream yielded {self.got} rows on this pass, but {self.expected} when "
                         f"it was counted; a streamed source must yield the same rows on every pass")


def _check_finite(x: torch.Tensor, a: int, b: int, what: str = "x_source") -> None:
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        bad = (~torch.isfinite(x)).reshape(x.shape[0], -1).any(1).nonzero().reshape(-1)
        raise ValueError(f"{what}: rows {a}:{b} of the source contain NaN/Inf "
                         f"({int(bad.numel())} row(s), first: row {a + int(bad[0])}); "
                         f"fill or drop them (e.g. load_lincs(..., fill_missing=0.0))")


def _rebatch(pieces: Iterator[tuple[int, Any, Any]], start: int, stop: int, size: int
             ) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor | None]]:
    """Pieces (row offset, x, y) in order, covering at least [start, stop) -> exact batches
    [start + j*size, ...) clipped to stop. Rows outside the range are dropped."""
    buf_x: list[torch.Tensor] = []
    buf_y: list[torch.Tensor | None] = []
    have = 0
    pos = start                              # first row not yet yielded
    for off, x, y in pieces:
        x = _to_tensor(x)
        y = None if y is None else _to_tensor(y)
        n = int(x.shape[0])
        lo, hi = max(off, pos + have), min(off + n, stop)
        if hi <= lo:
            if off >= stop:
                break
            continue
        if lo != pos + have:
            raise ValueError(f"x_source: the chunks skip rows {pos + have}:{lo} (chunks must cover "
                             f"the rows in order)")
        xs = x[lo - off:hi - off]
        ys = None if y is None else y[lo - off:hi - off]
        while xs.shape[0]:
            take = min(size - have, xs.shape[0])
            buf_x.append(xs[:take])
            buf_y.append(None if ys is None else ys[:take])
            xs = xs[take:]
            ys = None if ys is None else ys[take:]
            have += take
            if have == size:
                yield _emit(pos, buf_x, buf_y)
                pos += have
                buf_x, buf_y, have = [], [], 0
        if off + n >= stop:
            break
    if pos + have < stop:            # checked before the short batch is handed out
        raise ValueError(f"x_source: the source ended at row {pos + have}, expected {stop} rows")
    if have:
        yield _emit(pos, buf_x, buf_y)


def _emit(pos, buf_x, buf_y):
    x = buf_x[0] if len(buf_x) == 1 else torch.cat(buf_x)
    if any(y is None for y in buf_y):
        if not all(y is None for y in buf_y):
            raise ValueError(f"x_source: some chunks near row {pos} have labels and some do not")
        y = None
    else:
        y = buf_y[0] if len(buf_y) == 1 else torch.cat(buf_y)
    n = int(x.shape[0])
    if y is not None and int(y.shape[0]) != n:
        raise ValueError(f"y_source: a chunk at rows {pos}:{pos + n} has {int(y.shape[0])} labels")
    return pos, pos + n, x, y


class _Failed:
    def __init__(self, exc: BaseException):
        self.exc = exc


_DONE = object()


def _prefetched(it: Iterator, depth: int = 1) -> Iterator:
    """Run iterator `it` in a background thread, `depth` items ahead of the consumer (IO overlaps
    compute). Exceptions are re-raised in the consumer; abandoning the generator stops the thread."""
    import queue
    import threading
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            for item in it:
                if not put(item):
                    break
            else:
                put(_DONE)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            put(_Failed(exc))
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()

    th = threading.Thread(target=work, name="dvgs-source-prefetch", daemon=True)
    th.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, _Failed):
                raise item.exc
            yield item
    finally:
        stop.set()
        th.join()


class Source:
    """Rows [start, stop) of something, served in order. Subclasses implement `_pieces`."""

    chunked = True               # False only for in-memory tensors
    #: extra labels held in memory (y_source given as an array next to a chunked x_source)
    _y_extra: torch.Tensor | None = None

    def __len__(self) -> int:
        n = self.length
        if n is None:
            raise TypeError("this source's length is not known yet (call count())")
        return n

    @property
    def length(self) -> int | None:
        raise NotImplementedError

    def _pieces(self, start: int, stop: int) -> Iterator[tuple[int, Any, Any]]:
        """(row offset, x, y) pieces covering [start, stop) in order (may overhang)."""
        raise NotImplementedError

    def describe(self) -> str:
        return type(self).__name__

    def identity(self) -> bytes:
        """Bytes identifying the data, for checkpoint fingerprints. This fallback (for source
        classes that define nothing better) hashes the description, the length and every row,
        in one pass; subclasses with a cheaper exact identity override it."""
        h = new_hash()
        h.update(self.describe().encode())
        h.update(repr(self.length).encode())
        for _, _, x, y in self.iter_chunks(0, None, 4096, validate=False):
            update_with_tensor(h, x)
            if y is not None:
                update_with_tensor(h, y)
        return h.digest()

    # ---- public API ------------------------------------------------------------------------
    def with_labels(self, y) -> "Source":
        """Attach in-memory labels (one per row of the whole source)."""
        t = _to_tensor(y)
        if t.dim() == 0 or t.shape[0] != len(self):
            raise ValueError(f"y_source: has {0 if t.dim() == 0 else t.shape[0]} labels but x_source has "
                             f"{len(self)} rows")
        self._y_extra = t
        return self

    def iter_chunks(self, start: int = 0, stop: int | None = None, size: int = 1024,
                    validate: bool = True) -> Iterator[Batch]:
        """Yield (a, b, x, y) for consecutive batches [a, b) of `size` rows within [start, stop)."""
        n = len(self)
        stop = n if stop is None else min(int(stop), n)
        start = int(start)
        if start < 0 or start > stop:
            raise ValueError(f"start/stop: invalid range [{start}, {stop}) of a source of {n} rows")
        if start == stop:
            return
        for a, b, x, y in _rebatch(self._pieces(start, stop), start, stop, int(size)):
            if self._y_extra is not None:
                y = self._y_extra[a:b]
            if validate:
                _check_finite(x, a, b)
                if y is not None:
                    _check_finite(y, a, b, "y_source")
            yield a, b, x, y

    def iter_batches(self, size: int, validate: bool = True) -> Iterator[Batch]:
        return self.iter_chunks(0, None, size, validate)

    def slice(self, start: int, stop: int) -> "SliceSource":
        """Rows [start, stop) of this source as a source of its own (row 0 = `start`)."""
        n = len(self)
        start, stop = int(start), min(int(stop), n)
        if not 0 <= start <= stop:
            raise ValueError(f"start/stop: invalid range [{start}, {stop}) of a source of {n} rows")
        return SliceSource(self, start, stop)

    def probe(self, rows: int = 2) -> Batch:
        """The first `rows` rows (checked): the cheap up-front validation."""
        for batch in self.iter_chunks(0, min(rows, len(self)), rows):
            return batch
        raise ValueError("x_source: is empty (0 samples)")

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.probe(1)[2].shape[1:])

    @property
    def shape(self) -> tuple[int, ...]:
        """(rows, *sample_shape), like an array's (reads the first row)."""
        return (len(self), *self.sample_shape)

    @property
    def has_labels(self) -> bool:
        return self._y_extra is not None or self.probe(1)[3] is not None


class SliceSource(Source):
    def __init__(self, parent: Source, start: int, stop: int):
        self.parent, self.start, self.stop = parent, start, stop
        self.chunked = parent.chunked

    @property
    def length(self) -> int:
        return self.stop - self.start

    def describe(self) -> str:
        return f"{self.parent.describe()}[{self.start}:{self.stop}]"

    def identity(self) -> bytes:
        return source_identity(self.parent) + repr((self.start, self.stop)).encode()

    def iter_chunks(self, start=0, stop=None, size=1024, validate=True):
        stop = self.length if stop is None else min(int(stop), self.length)
        for a, b, x, y in self.parent.iter_chunks(self.start + int(start), self.start + stop, size, validate):
            yield a - self.start, b - self.start, x, y


class TensorSource(Source):
    """In-memory rows (a tensor, optionally labels): DVGS's source for array inputs."""

    chunked = False

    def __init__(self, x: torch.Tensor, y: torch.Tensor | None = None):
        self.x, self.y = x, y

    @property
    def length(self) -> int:
        return int(self.x.shape[0])

    def describe(self) -> str:
        return f"TensorSource{tuple(self.x.shape)}"

    def identity(self) -> bytes:
        h = new_hash()                       # block by block: no copy of the whole source
        update_with_tensor(h, self.x)
        if self.y is not None:
            update_with_tensor(h, self.y)
        return h.digest()

    def iter_chunks(self, start=0, stop=None, size=1024, validate=False):
        # Checked once up front (as_float_tensor), so no per-batch validation.
        stop = self.length if stop is None else min(int(stop), self.length)
        y = self.y if self._y_extra is None else self._y_extra
        for a in range(int(start), stop, int(size)):
            b = min(a + int(size), stop)
            yield a, b, self.x[a:b], (None if y is None else y[a:b])


class GctxSource(Source):
    """A :class:`~dvgs_fast.datasets.lincs.GctxReader` (``load_lincs(..., chunked=True)``)."""

    def __init__(self, reader):
        self.reader = reader

    @property
    def length(self) -> int:
        return self.reader.n_samples

    def describe(self) -> str:
        r = self.reader
        return (f"GctxSource({str(r.path)!r}, shape={r.shape}, zscore={r.zscore}, "
                f"fill_missing={r.fill_missing})")

    def identity(self) -> bytes:
        r = self.reader
        h = hashlib.blake2b(digest_size=16)
        st = os.stat(r.path)
        h.update(repr((os.path.realpath(r.path), st.st_size, st.st_mtime_ns, r.shape, r.fill_missing)).encode())
        h.update(np.asarray(r.gene_index, dtype=np.int64).tobytes())
        stats = r.stats()
        if stats is not None:
            for a in stats:
                h.update(np.asarray(a, dtype=np.float64).tobytes())
        return h.digest()

    def _pieces(self, start, stop):
        r = self.reader
        r.stats()                            # a first pass over the file when not computed yet
        # Read (and z-score) the next block in a background thread while the current one is scored.
        return _prefetched(self._read_blocks(start, stop), depth=1)

    def _read_blocks(self, start, stop):
        from dvgs_fast.datasets.lincs import MATRIX_PATH, _apply, _open
        r = self.reader
        stats = r.stats()
        block = max(r.chunk_size, 1)
        with _open(r.path) as fh:
            m = fh[MATRIX_PATH]
            for a in range(start, stop, block):
                b = min(a + block, stop)
                yield a, _apply(m[a:b], r._cols, stats, r.fill_missing), None


class DatasetSource(Source):
    """A map-style ``torch.utils.data.Dataset`` with items ``x`` or ``(x, y)``."""

    def __init__(self, ds, block: int = 4096):
        self.ds, self.block = ds, int(block)
        try:
            self._n = len(ds)
        except TypeError:
            raise ValueError("x_source: a torch Dataset source must have a length (map-style); "
                             "for a stream pass a zero-argument callable returning an iterator of chunks") from None

    @property
    def length(self) -> int:
        return self._n

    def describe(self) -> str:
        return f"DatasetSource({type(self.ds).__name__}, n={self._n})"

    # identity(): the base class's content hash (one pass over the items)

    def _items(self, a, b):
        get_many = getattr(self.ds, "__getitems__", None)
        return list(get_many(list(range(a, b)))) if get_many is not None else [self.ds[i] for i in range(a, b)]

    def _pieces(self, start, stop):
        for a in range(start, stop, self.block):
            b = min(a + self.block, stop)
            items = self._items(a, b)
            if items and isinstance(items[0], (tuple, list)):
                if len(items[0]) != 2:
                    raise ValueError(f"x_source: Dataset items must be x or (x, y), got a {len(items[0])}-tuple")
                x = torch.stack([_to_tensor(it[0]) for it in items])
                y = torch.stack([_to_tensor(it[1]) for it in items])
            else:
                x = torch.stack([_to_tensor(it) for it in items])
                y = None
            yield a, x, y


class IteratorSource(Source):
    """A zero-argument callable returning an iterator of chunks ``(x, y_or_None)`` or ``x``."""

    def __init__(self, factory: Callable[[], Any], n: int | None = None):
        self.factory, self._n = factory, n
        self._digest: bytes | None = None      # content hash, taken in the counting pass

    @property
    def length(self) -> int | None:
        return self._n

    def describe(self) -> str:
        return f"IteratorSource({getattr(self.factory, '__name__', type(self.factory).__name__)})"

    def _stream(self):
        it = self.factory()
        try:
            it = iter(it)
        except TypeError:
            raise ValueError(f"x_source: the callable must return an iterator of chunks, returned "
                             f"{type(it).__name__}") from None
        off = 0
        for j, chunk in enumerate(it):
            if isinstance(chunk, (tuple, list)):
                if len(chunk) != 2:
                    raise ValueError(f"x_source: chunk {j} is a {len(chunk)}-tuple; expected x or (x, y)")
                x, y = chunk
            else:
                x, y = chunk, None
            x = _to_tensor(x)
            if x.dim() < 2:
                raise ValueError(f"x_source: chunk {j} has shape {tuple(x.shape)}; expected [rows, features...]")
            if y is not None:
                y = _to_tensor(y)
                if y.shape[0] != x.shape[0]:
                    raise ValueError(f"y_source: chunk {j} has {y.shape[0]} labels for {x.shape[0]} rows")
            yield off, x, y
            off += int(x.shape[0])

    def count(self) -> int:
        """Length by one pass over the chunks (checking and hashing them), when not given."""
        if self._n is None or self._digest is None:
            n = 0
            h = new_hash()
            for off, x, y in self._stream():
                _check_finite(x, off, off + int(x.shape[0]))
                update_with_tensor(h, x)
                if y is not None:
                    update_with_tensor(h, y)
                n = off + int(x.shape[0])
            if n == 0:
                raise ValueError("x_source: the iterator yielded no rows")
            if self._n is not None and n != self._n:
                raise SourceLengthError(n, self._n, more=n > self._n)
            self._n, self._digest = n, h.digest()
        return self._n

    def identity(self) -> bytes:
        self.count()
        h = new_hash()
        h.update(self.describe().encode())
        h.update(repr(self._n).encode())
        h.update(self._digest)
        return h.digest()

    def _pieces(self, start, stop):
        """The stream, checked against the counted length: a pass that ends early raises before
        its last rows are used; a pass that reaches the end of the source is read to the stream's
        end first, so extra rows raise too (instead of being silently ignored)."""
        n = len(self)
        it = self._stream()
        end = 0
        for off, x, y in it:
            end = off + int(x.shape[0])
            if end >= n and stop == n:
                end += sum(int(c.shape[0]) for _, c, _ in it)     # rows beyond the counted end
                if end != n:
                    raise SourceLengthError(end, n, more=True)
            yield off, x, y
        if end < n:
            raise SourceLengthError(end, n, more=False)


def source_identity(src: Source) -> bytes:
    """A source's identity including in-memory labels attached with ``with_labels``."""
    out = src.identity()
    y = src._y_extra
    if y is not None:
        h = new_hash()
        update_with_tensor(h, y)
        out += h.digest()
    return out


def is_chunked_input(x: Any) -> bool:
    """Whether `x` is one of the chunked source kinds (not an in-memory array)."""
    if isinstance(x, (torch.Tensor, np.ndarray, list, tuple)):
        return False                           # before importing the readers (~40 ms the first time)
    from torch.utils.data import Dataset
    from dvgs_fast.datasets.lincs import GctxReader
    return isinstance(x, (Source, GctxReader, Dataset)) or callable(x)


def as_source(x: Any, y: Any = None) -> Source:
    """Wrap a chunked source input (see the module docstring); y_source, if given, in memory."""
    from torch.utils.data import Dataset
    from dvgs_fast.datasets.lincs import GctxReader
    if isinstance(x, Source):
        src = x
    elif isinstance(x, GctxReader):
        src = GctxSource(x)
    elif isinstance(x, Dataset):
        src = DatasetSource(x)
    elif callable(x):
        src = IteratorSource(x)
    else:
        raise ValueError(f"x_source: expected an array, tensor, GctxReader, torch Dataset or a callable "
                         f"returning an iterator of chunks, got {type(x).__name__}")
    if isinstance(src, IteratorSource):
        src.count()
    if y is not None:
        src.with_labels(y)
    return src


__all__ = ["Source", "SliceSource", "TensorSource", "GctxSource", "DatasetSource", "IteratorSource",
           "SourceLengthError", "as_source", "is_chunked_input", "source_identity"]
