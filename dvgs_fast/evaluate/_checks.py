"""Input checks for the evaluation functions (ValueError naming the argument, before any work)."""
from __future__ import annotations

from typing import Any

import numpy as np


def as_values(values: Any, name: str = "values") -> np.ndarray:
    """Data values -> finite float64 1-D array (accepts a ValuationResult, tensor, list, array)."""
    if values is None:
        raise ValueError(f"{name}: is None")
    if hasattr(values, "values") and not isinstance(values, (np.ndarray, dict)) and not callable(values.values):
        values = values.values  # ValuationResult
    if hasattr(values, "detach"):  # torch tensor, without importing torch here
        values = values.detach().cpu().numpy()
    arr = np.asarray(values)
    if arr.dtype == object or arr.dtype.kind not in "fiub":
        raise ValueError(f"{name}: expected numbers, got dtype {arr.dtype}")
    if arr.ndim == 2 and 1 in arr.shape:
        arr = arr.reshape(-1)
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array (one value per sample), got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name}: is empty")
    arr = arr.astype(np.float64)
    bad = ~np.isfinite(arr)
    if bad.any():
        raise ValueError(f"{name}: contains {int(bad.sum())} NaN/Inf value(s)")
    return arr


def as_mask(mask: Any, n: int, name: str = "is_corrupted", *, need_both: bool = True) -> np.ndarray:
    """Ground-truth corruption flags -> bool array of length n (bool or 0/1 input)."""
    if mask is None:
        raise ValueError(f"{name}: is None")
    if hasattr(mask, "detach"):
        mask = mask.detach().cpu().numpy()
    arr = np.asarray(mask)
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D boolean array, got shape {arr.shape}")
    if arr.shape[0] != n:
        raise ValueError(f"{name}: has {arr.shape[0]} entries but values has {n}")
    if arr.dtype != bool:
        if arr.dtype.kind not in "iuf":
            raise ValueError(f"{name}: expected booleans (or 0/1), got dtype {arr.dtype}")
        if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            raise ValueError(f"{name}: contains NaN/Inf")
        if not np.all(np.isin(arr, (0, 1))):
            raise ValueError(f"{name}: expected a boolean mask (0/1), got other values; to pass "
                             f"indices of corrupted samples build a mask first")
        arr = arr.astype(bool)
    if need_both and (arr.all() or not arr.any()):
        raise ValueError(f"{name}: needs both corrupted and clean samples "
                         f"(got {int(arr.sum())} corrupted of {n})")
    return arr


def as_fractions(fractions: Any, name: str = "fractions", *, allow_one: bool = True) -> np.ndarray:
    arr = np.asarray(fractions, dtype=np.float64).reshape(-1)
    if arr.size == 0:
        raise ValueError(f"{name}: is empty")
    hi_ok = (arr <= 1.0) if allow_one else (arr < 1.0)
    if not np.all(np.isfinite(arr)) or np.any(arr < 0) or not np.all(hi_ok):
        raise ValueError(f"{name}: must lie in [0, 1{']' if allow_one else ')'}, got {arr.tolist()}")
    return arr


def rank_order(values: np.ndarray, seed: int | None, *, descending: bool = False) -> np.ndarray:
    """Indices sorted by value with ties broken at random (seeded).

    A stable sort would break ties by position, which makes a constant valuation look good or bad
    depending on where the corrupted samples sit; random tie-breaking makes it score like chance.
    """
    rng = np.random.default_rng(seed)
    key = -values if descending else values
    return np.lexsort((rng.random(values.shape[0]), key))
