"""AttributionResult: what ``method.attribute(...)`` returns.

scores[j, i] says how much training sample i helps query j: > 0 when training on i lowers query
j's loss (raises its margin), < 0 when it raises it. The sign is the one of ``fit()``'s values
(higher = more valuable), so a method's values are, up to its own normalisation, the mean of its
scores over a set of queries.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class AttributionResult:
    """Pairwise attribution scores of n_source training samples for n_query queries.

    scores         [n_query, n_source] float array, in memory or memory-mapped from ``path``;
                   None when only ``top_k`` / a callback was asked for (``keep=False``)
    path           the .npy file holding the scores when ``out=`` was given
    top_indices    [n_query, k] source indices of each query's k highest scores (its "proponents"),
    top_scores     best first; None without ``top_k``
    bottom_indices [n_query, k] the k lowest ("opponents"), lowest first
    bottom_scores
    method, params, info, timings   as ValuationResult
    """

    n_query: int
    n_source: int
    method: str
    scores: np.ndarray | None = None
    path: Path | None = None
    top_indices: np.ndarray | None = None
    top_scores: np.ndarray | None = None
    bottom_indices: np.ndarray | None = None
    bottom_scores: np.ndarray | None = None
    params: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def __array__(self, dtype=None, copy=None):
        if self.scores is None:
            raise ValueError("attribute: the scores were not kept (keep=False); use top_indices/top_scores, or "
                             "rerun with keep=True or out=PATH")
        return np.asarray(self.scores, dtype=dtype)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_query, self.n_source)

    def source_values(self) -> np.ndarray:
        """[n_source]: each training sample's mean score over the queries (blockwise over a memmap)."""
        s = np.asarray(self)
        out = np.zeros(self.n_source, dtype=np.float64)
        step = max(1, (1 << 24) // max(1, self.n_source))
        for a in range(0, self.n_query, step):
            out += np.asarray(s[a:a + step], dtype=np.float64).sum(0)
        return out / max(1, self.n_query)


__all__ = ["AttributionResult"]
