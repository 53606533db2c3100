"""Where blocks of pairwise scores go: a matrix in memory or memory-mapped on disk, running top-k
per query, a callback per finished block -- so neither the query nor the source side, nor the
score matrix, ever has to fit in memory at once.

A method computes [query rows, source rows] blocks and hands them to ``ScoreSink.add``. A method
whose scores are sums over passes (TracIn's checkpoints, DVGS's snapshots, In-Run's steps) opens
the sink with ``accumulate=True``: blocks are added into the stored matrix (a temporary
memory-mapped file when the caller keeps none), and top-k and callbacks run once, in
``finish()``, over the completed rows.

A file given as ``out`` is written next to its final name and renamed into place by ``finish()``
(a crash never leaves a half-written score file under that name).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from dvgs_fast.attribution.result import AttributionResult

# Keep the matrix in memory below this many bytes when neither out= nor keep= says otherwise.
IN_MEMORY_BYTES = 2 << 30
# Rows of the stored matrix read at a time in finish().
_ROW_BLOCK_BYTES = 1 << 26


def _open_npy(path: Path, shape: tuple[int, int], dtype) -> np.memmap:
    return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)


class ScoreSink:
    """Collects the [n_query, n_source] scores of one attribute() call (see the module doc)."""

    def __init__(self, n_query: int, n_source: int, *, out: str | os.PathLike | None = None,
                 keep: bool | None = None, top_k: int | None = None,
                 callback: Callable[[int, int, int, int, np.ndarray], None] | None = None,
                 accumulate: bool = False, dtype=np.float32):
        self.n_query, self.n_source = int(n_query), int(n_source)
        self.top_k = None if top_k is None else min(int(top_k), self.n_source)
        self.callback, self.accumulate, self.dtype = callback, bool(accumulate), np.dtype(dtype)
        if keep is False and out is not None:
            raise ValueError("keep: False with out= would write a file and then not return it; drop one of them")
        if keep is False and self.top_k is None and callback is None:
            raise ValueError("keep: False needs top_k or callback (otherwise nothing of the scores is returned)")
        self.keep = keep is not False
        self.path = None if out is None else Path(out)
        self._tmp: Path | None = None
        shape = (self.n_query, self.n_source)
        nbytes = self.n_query * self.n_source * self.dtype.itemsize
        self.matrix: np.ndarray | None = None
        if self.path is not None:
            if self.path.suffix != ".npy":
                raise ValueError(f"out: {self.path} must end in .npy (the scores are written as a NumPy .npy file)")
            if self.path.exists() and not self.path.is_file():
                raise ValueError(f"out: {self.path} exists and is not a file")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
            os.close(fd)
            self._tmp = Path(tmp)
            self.matrix = _open_npy(self._tmp, shape, self.dtype)
        elif self.keep or self.accumulate:
            if nbytes <= IN_MEMORY_BYTES and self.keep:
                # every block is written once unless accumulating (then it must start at zero)
                self.matrix = (np.zeros if self.accumulate else np.empty)(shape, dtype=self.dtype)
            else:                                     # too large for memory, or only needed while summing
                fd, tmp = tempfile.mkstemp(prefix="dvgs_fast_scores.", suffix=".npy")
                os.close(fd)
                self.matrix = _open_npy(Path(tmp), shape, self.dtype)
                os.unlink(tmp)                        # the mapping stays valid; nothing is left behind
        self._top = None
        if self.top_k:
            k = self.top_k
            self._top = (torch.full((self.n_query, k), -np.inf, dtype=torch.float64),
                         torch.zeros((self.n_query, k), dtype=torch.int64),
                         torch.full((self.n_query, k), np.inf, dtype=torch.float64),
                         torch.zeros((self.n_query, k), dtype=torch.int64))

    # ------------------------------------------------------------------------------------------
    def add(self, q0: int, q1: int, s0: int, s1: int, block: torch.Tensor | np.ndarray) -> None:
        """Scores of queries [q0, q1) x sources [s0, s1) (added to what is there when accumulating)."""
        t = torch.as_tensor(block)
        if tuple(t.shape) != (q1 - q0, s1 - s0):
            raise RuntimeError(f"score block of shape {tuple(t.shape)} for rows {q0}:{q1} x {s0}:{s1}")
        arr = t.detach().cpu().numpy()
        self._check(arr, q0, s0)
        if self.accumulate:
            self.matrix[q0:q1, s0:s1] += arr.astype(self.dtype, copy=False)
            return
        if self.matrix is not None:
            self.matrix[q0:q1, s0:s1] = arr
        self._final_block(q0, q1, s0, s1, t.detach().cpu())

    def _check(self, arr: np.ndarray, q0: int, s0: int) -> None:
        """No NaN/Inf score, and none beyond what the stored dtype holds (a float32 matrix would
        turn it into Inf silently)."""
        if arr.size == 0:
            return
        lo, hi = float(np.min(arr)), float(np.max(arr))
        if not (np.isfinite(lo) and np.isfinite(hi)):
            bad = np.argwhere(~np.isfinite(arr))[0]
            raise ValueError(f"scores: the score of query {q0 + int(bad[0])} and source row {s0 + int(bad[1])} is not "
                             f"finite (a gradient overflowed, or the model diverged); rescale the inputs or lower lr")
        limit = float(np.finfo(self.dtype).max)
        if max(abs(lo), abs(hi)) > limit:
            raise ValueError(f"dtype: a score of magnitude {max(abs(lo), abs(hi)):.3g} is beyond {self.dtype.name}'s "
                             f"range; use dtype='float64'")

    def add_columns(self, q0: int, q1: int, cols: torch.Tensor | np.ndarray, block) -> None:
        """Add scores of queries [q0, q1) x the source rows `cols` (distinct, any order) to the
        accumulated matrix: a training step's batch (In-Run Data Shapley)."""
        if not self.accumulate:
            raise RuntimeError("add_columns: only for sinks that accumulate")
        c = np.asarray(torch.as_tensor(cols).cpu())
        arr = torch.as_tensor(block).detach().cpu().numpy()
        self._check(arr, q0, 0)
        arr = arr.astype(self.dtype, copy=False)
        if arr.shape != (q1 - q0, c.shape[0]):
            raise RuntimeError(f"score block of shape {arr.shape} for rows {q0}:{q1} x {c.shape[0]} columns")
        self.matrix[q0:q1, c] += arr

    def _final_block(self, q0, q1, s0, s1, t: torch.Tensor) -> None:
        if self.callback is not None:
            self.callback(q0, q1, s0, s1, t.numpy())
        if self._top is not None:
            # The block's own k best first (in its dtype, no copy of the block), then a merge of
            # 2k candidates per query: the cost stays one top-k pass over the block.
            hv, hi, lv, li = self._top
            k = self.top_k
            for largest, vals, inds in ((True, hv, hi), (False, lv, li)):
                kb = min(k, s1 - s0)
                bt = t.topk(kb, dim=1, largest=largest)
                v = torch.cat([vals[q0:q1], bt.values.to(torch.float64)], 1)
                i = torch.cat([inds[q0:q1], bt.indices + s0], 1)
                m = v.topk(k, dim=1, largest=largest)
                vals[q0:q1], inds[q0:q1] = m.values, i.gather(1, m.indices)

    def scale(self, factor: float) -> None:
        """Multiply the accumulated scores (e.g. a mean over passes), before finish()."""
        step = max(1, _ROW_BLOCK_BYTES // max(1, self.n_source * self.dtype.itemsize))
        for a in range(0, self.n_query, step):
            self.matrix[a:a + step] *= factor

    def finish(self, method: str, **fields) -> AttributionResult:
        if self.accumulate:
            step = max(1, _ROW_BLOCK_BYTES // max(1, self.n_source * self.dtype.itemsize))
            for a in range(0, self.n_query, step):
                b = min(a + step, self.n_query)
                self._final_block(a, b, 0, self.n_source, torch.from_numpy(np.array(self.matrix[a:b])))
        res = AttributionResult(self.n_query, self.n_source, method, **fields)
        if self._top is not None:
            hv, hi, lv, li = self._top
            res.top_scores, res.top_indices = hv.numpy(), hi.numpy()
            res.bottom_scores, res.bottom_indices = lv.numpy(), li.numpy()
        if self._tmp is not None:
            self.matrix.flush()
            del self.matrix
            os.replace(self._tmp, self.path)
            res.path = self.path
            res.scores = np.load(self.path, mmap_mode="r")
        elif self.keep:
            res.scores = self.matrix
        self.matrix = None
        return res

    def abandon(self) -> None:
        """Drop a half-written file (an error or interrupt before finish())."""
        if self._tmp is not None and self._tmp.exists():
            self._tmp.unlink()
        self.matrix = None


__all__ = ["ScoreSink", "IN_MEMORY_BYTES"]
