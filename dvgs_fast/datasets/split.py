"""Source / target / test splits as in the DVRL and DVGS experiments.

The *source* set is the one being valued (it gets corrupted); the *target* set is the small clean
set a method may use to judge samples (DVRL's "validation" set); the *test* set is only for final
scores. Source samples come from the training part; target and test come from the held-out part,
and are disjoint, so no sample is ever in two roles.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Iterator

import numpy as np

from .._validation import check_positive_int


@dataclass
class Split:
    """The three parts, plus each part's row indices into the arrays given to :func:`make_split`."""

    x_source: Any
    y_source: Any
    x_target: Any
    y_target: Any
    x_test: Any
    y_test: Any
    idx_source: np.ndarray
    idx_target: np.ndarray
    idx_test: np.ndarray

    # dict-style access so ``split["x_source"]`` and ``dict(**split)``-like code both work
    def __getitem__(self, key: str):
        if key not in self.keys():
            raise KeyError(key)
        return getattr(self, key)

    def keys(self) -> list[str]:
        return [f.name for f in fields(self)]

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.keys()}

    def __repr__(self) -> str:
        return (f"Split(source={len(self.idx_source)}, target={len(self.idx_target)}, "
                f"test={len(self.idx_test)})")


def _as_index(idx, n: int, name: str) -> np.ndarray:
    idx = np.asarray(idx)
    if idx.dtype == bool:
        if idx.shape != (n,):
            raise ValueError(f"{name}: boolean mask has shape {idx.shape}, expected ({n},)")
        return np.flatnonzero(idx)
    if idx.ndim != 1 or (idx.size and idx.dtype.kind not in "iu"):
        raise ValueError(f"{name}: expected a 1-D integer index array or boolean mask")
    idx = idx.astype(np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise ValueError(f"{name}: indices must be in [0, {n}), found range [{idx.min()}, {idx.max()}]")
    if np.unique(idx).size != idx.size:
        raise ValueError(f"{name}: contains repeated indices")
    return idx


def make_split(X, y, n_source: int, n_target: int, n_test: int, seed=0, *,
               train_idx=None, heldout_idx=None) -> Split:
    """Draw disjoint source / target / test sets.

    X, y         all samples (numpy arrays or torch tensors, indexed along the first axis)
    n_source     how many source samples, drawn from ``train_idx``
    n_target     how many target samples, drawn from ``heldout_idx``
    n_test       how many test samples, drawn from ``heldout_idx`` (disjoint from the target)
    seed         int / None / numpy Generator
    train_idx    rows of the training part (indices or bool mask); default: all rows not in
                 ``heldout_idx``; when both are None every part is drawn from all rows
    heldout_idx  rows of the held-out part; default: all rows not in ``train_idx``

    Indices within each part are sorted (row order of the input is kept). Raises ValueError,
    before drawing anything, if a part is asked for more samples than its pool holds.
    """
    n = int(X.shape[0]) if hasattr(X, "shape") else len(X)
    if y is None or (int(y.shape[0]) if hasattr(y, "shape") else len(y)) != n:
        got = None if y is None else (y.shape[0] if hasattr(y, "shape") else len(y))
        raise ValueError(f"y: has {got} labels but X has {n} rows")
    n_source = check_positive_int(n_source, "n_source")
    n_target = check_positive_int(n_target, "n_target", allow_zero=True)
    n_test = check_positive_int(n_test, "n_test", allow_zero=True)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)

    if train_idx is None and heldout_idx is None:
        need = n_source + n_target + n_test
        if need > n:
            raise ValueError(f"n_source + n_target + n_test: asked for {need} samples "
                             f"({n_source} + {n_target} + {n_test}) but X has only {n} rows")
        perm = rng.permutation(n)
        src = perm[:n_source]
        tgt = perm[n_source:n_source + n_target]
        tst = perm[n_source + n_target:need]
    else:
        all_rows = np.arange(n)
        tr = _as_index(train_idx, n, "train_idx") if train_idx is not None else None
        ho = _as_index(heldout_idx, n, "heldout_idx") if heldout_idx is not None else None
        if tr is None:
            tr = np.setdiff1d(all_rows, ho)
        if ho is None:
            ho = np.setdiff1d(all_rows, tr)
        overlap = np.intersect1d(tr, ho)
        if overlap.size:
            raise ValueError(f"heldout_idx: shares {overlap.size} rows with train_idx (e.g. {overlap[:3].tolist()})")
        if n_source > tr.size:
            raise ValueError(f"n_source: asked for {n_source} source samples but the training part "
                             f"has only {tr.size} rows")
        if n_target + n_test > ho.size:
            raise ValueError(f"n_target + n_test: asked for {n_target} + {n_test} = {n_target + n_test} "
                             f"samples but the held-out part has only {ho.size} rows")
        src = rng.permutation(tr)[:n_source]
        ho_perm = rng.permutation(ho)
        tgt = ho_perm[:n_target]
        tst = ho_perm[n_target:n_target + n_test]

    src, tgt, tst = np.sort(src), np.sort(tgt), np.sort(tst)

    def take(a, idx):
        return a[idx] if not isinstance(a, np.ndarray) else a[idx].copy()

    if not hasattr(X, "shape"):
        X = np.asarray(X)
    if not hasattr(y, "shape"):
        y = np.asarray(y)
    return Split(x_source=take(X, src), y_source=take(y, src), x_target=take(X, tgt),
                 y_target=take(y, tgt), x_test=take(X, tst), y_test=take(y, tst),
                 idx_source=src, idx_target=tgt, idx_test=tst)
