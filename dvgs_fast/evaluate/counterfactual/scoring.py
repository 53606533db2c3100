"""Scoring an attribution against a ground truth: LDS, leave-one-out correlation, seed noise.

An attribution is a matrix ``scores[n_query, n_source]``: ``scores[q, i] > 0`` says that training
on source row i raises query q's recorded output (margin or minus the loss: it *helps* q) -- the
sign of ``method.attribute()``. It may be given whole (numpy, a memory-mapped .npy, torch, an
``AttributionResult``; read a block of queries at a time) or as a callable ``scores(query_rows) ->
[len(query_rows), n_source]`` asked for blocks of queries (no [n_query, n_source] matrix need
exist).

* LDS (Ilyas et al. 2022, TRAK, dattri): per query, the Spearman correlation over the subsets
  between the predicted ``sum_{i in S_m} scores[q, i]`` and the actual output after training on
  S_m; the mean over queries, with its standard error over queries.
* leave-one-out: per query, the Spearman (and Pearson) correlation over the left-out rows between
  ``scores[q, i]`` and the actual effect output(all) - output(without i); mean and standard
  error over queries. (dattri's ``loo_corr`` is the Pearson one.)

A query whose predictions (or actual outputs) do not vary has no correlation: it counts as 0
and a warning says how many there were (dattri drops such queries from the mean instead).
The standard errors are over queries only (sd / sqrt(n_query)); the noise of the ground truth
itself is what :func:`seed_noise` measures.
"""
from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import numpy as np
from scipy.stats import rankdata

from .results import GroundTruth, LDSGroundTruth, LOOGroundTruth


class Correlation(NamedTuple):
    mean: float
    stderr: float
    per_query: np.ndarray


class LOOCorrelation(NamedTuple):
    spearman: Correlation
    pearson: Correlation


class SeedNoise(NamedTuple):
    """How much the ground truth's seeds agree. ``split_half``: per query, the Spearman correlation
    between the averages of the first and the second half of the seeds (LDS: over subsets; LOO:
    over left-out rows). ``reliability``: its Spearman-Brown extrapolation to the average of all
    seeds, 2r / (1 + r): roughly the best correlation any attribution can reach with it."""

    split_half: Correlation
    reliability: float


ScoreSource = Any      # [n_query, n_source] array / tensor, or a callable of query rows


def lds(scores: ScoreSource, gt: LDSGroundTruth, *, query_block: int = 1024) -> Correlation:
    """Linear datamodeling score of ``scores`` against ``gt`` (module docstring)."""
    _check_gt(gt, LDSGroundTruth, "lds_ground_truth")
    masks = gt.masks.astype(np.float64)                         # [M, N]
    actual = gt.actual                                          # [M, Q]
    per = np.empty(gt.n_query)
    for rows, block in _blocks(scores, gt.n_query, masks.shape[1], query_block):
        pred = block @ masks.T                                  # [q, M]
        per[rows] = _rowwise_pearson(_ranks(pred), _ranks(actual[:, rows].T))
    return _summary(per, "lds")


def loo_correlation(scores: ScoreSource, gt: LOOGroundTruth, *, query_block: int = 1024) -> LOOCorrelation:
    """Spearman and Pearson correlation of ``scores`` with the leave-one-out effects."""
    _check_gt(gt, LOOGroundTruth, "loo_ground_truth")
    effects = gt.effects                                        # [Q, n_left_out]
    sp, pe = np.empty(gt.n_query), np.empty(gt.n_query)
    for rows, block in _blocks(scores, gt.n_query, gt.n_source, query_block):
        s = block[:, gt.indices]
        e = effects[rows]
        sp[rows] = _rowwise_pearson(_ranks(s), _ranks(e))
        pe[rows] = _rowwise_pearson(s, e)
    return LOOCorrelation(_summary(sp, "loo_correlation"), _summary(pe, "loo_correlation"))


def seed_noise(gt: GroundTruth) -> SeedNoise:
    """Split-half agreement of the ground truth's seeds (needs two or more)."""
    gt.check_complete("gt")
    S = len(gt.seeds)
    if S < 2:
        raise ValueError(f"gt: seed noise needs a ground truth with two or more seeds, it has {S}")
    h = S // 2
    if isinstance(gt, LOOGroundTruth):
        per_seed = gt.effects_per_seed()                        # [S, Q, n]
        a, b = per_seed[:h].mean(0), per_seed[h:].mean(0)
    else:
        a, b = gt.outputs[:h].mean(0).T, gt.outputs[h:].mean(0).T   # [Q, M]
    per = _rowwise_pearson(_ranks(a), _ranks(b))
    half = _summary(per, "seed_noise")
    return SeedNoise(half, float(2 * half.mean / (1 + half.mean)) if half.mean > -1 else float("nan"))


# ---------------------------------------------------------------------------------------------
def _check_gt(gt: Any, cls: type, maker: str) -> None:
    if not isinstance(gt, cls):
        raise ValueError(f"gt: expected a {cls.__name__} (from {maker}), got {type(gt).__name__}")
    gt.check_complete("gt")


def _blocks(scores: ScoreSource, n_query: int, n_source: int, query_block: int):
    """(query rows, float64 [len, n_source]) blocks of the scores, each checked. An array (numpy,
    memory-mapped, torch, an AttributionResult) is read a block of rows at a time."""
    if isinstance(query_block, bool) or not isinstance(query_block, (int, np.integer)) or query_block < 1:
        raise ValueError(f"query_block: expected a positive integer, got {query_block!r}")
    whole = None
    if not (callable(scores) and not hasattr(scores, "shape")):
        whole = scores.detach().cpu().numpy() if hasattr(scores, "detach") else np.asarray(scores)
        _check_array(whole, (n_query, n_source), "scores")
    for a in range(0, n_query, query_block):
        rows = np.arange(a, min(a + query_block, n_query))
        if whole is None:
            name = f"scores({a}:{rows[-1] + 1})"
            block = scores(rows)
            block = block.detach().cpu().numpy() if hasattr(block, "detach") else np.asarray(block)
            _check_array(block, (len(rows), n_source), name)
        else:
            name, block = "scores", whole[a:a + len(rows)]
        block = block.astype(np.float64)
        if not np.isfinite(block).all():
            raise ValueError(f"{name}: contains {int((~np.isfinite(block)).sum())} NaN/Inf value(s) "
                             f"(queries {a}-{rows[-1]})")
        yield rows, block


def _check_array(arr: np.ndarray, shape: tuple, name: str) -> None:
    if arr.dtype == object or arr.dtype.kind not in "fiub":
        raise ValueError(f"{name}: expected numbers, got dtype {arr.dtype}")
    if arr.shape != shape:
        raise ValueError(f"{name}: expected shape [{shape[0]}, {shape[1]}] (n_query x n_source), got "
                         f"{tuple(arr.shape)}")


def _ranks(x: np.ndarray) -> np.ndarray:
    return rankdata(x, axis=1)           # average ranks of ties, as scipy.stats.spearmanr


def _rowwise_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row of a with the same row of b; NaN where a row is constant."""
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    den = np.sqrt((a * a).sum(1) * (b * b).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (a * b).sum(1) / den
    r[den <= 0] = np.nan
    return np.clip(r, -1.0, 1.0)


def _summary(per: np.ndarray, name: str) -> Correlation:
    bad = np.isnan(per)
    if bad.any():
        warnings.warn(f"{name}: {int(bad.sum())} of {per.size} queries have constant predictions or outputs "
                      f"(no correlation); they count as 0", stacklevel=3)
        per = np.where(bad, 0.0, per)
    n = per.size
    stderr = float(per.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
    return Correlation(float(per.mean()), stderr, per)

