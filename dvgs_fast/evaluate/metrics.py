"""Scalar scores of a valuation against known corruption.

Convention throughout: a *low* data value means "probably corrupted". Detection metrics therefore
rank samples by ``-values``.
"""
from __future__ import annotations

import warnings
from typing import Any, Sequence

import numpy as np

from ._checks import as_fractions, as_mask, as_values


def detection_auroc(values, is_corrupted) -> float:
    """ROC AUC of finding the corrupted samples by low value: ``roc_auc_score(is_corrupted, -values)``.

    1.0 = every corrupted sample is valued below every clean one, 0.5 = chance.
    """
    from sklearn.metrics import roc_auc_score
    v = as_values(values)
    m = as_mask(is_corrupted, v.shape[0])
    return float(roc_auc_score(m, -v))


def detection_auprc(values, is_corrupted) -> float:
    """Average precision of finding the corrupted samples by low value (chance = corrupted fraction)."""
    from sklearn.metrics import average_precision_score
    v = as_values(values)
    m = as_mask(is_corrupted, v.shape[0])
    return float(average_precision_score(m, -v))


def kmeans_f1(values, is_corrupted, *, random_state: int = 0, n_init: Any = "auto") -> float:
    """OpenDataVal's noisy-detection F1: 2-means on the values, the lower cluster predicted noisy.

    ``KMeans(n_clusters=2)`` is fitted on the values as a 1-D feature; samples in the cluster with
    the lower center are predicted corrupted and scored by F1 against ``is_corrupted``. A fixed
    ``random_state`` makes the score reproducible.
    """
    from sklearn.cluster import KMeans
    from sklearn.metrics import f1_score
    v = as_values(values)
    m = as_mask(is_corrupted, v.shape[0])
    if np.unique(v).size < 2:
        # Two clusters of identical points are arbitrary; predict nothing noisy rather than
        # let k-means pick a side at random.
        return 0.0
    x = v.reshape(-1, 1)
    km = KMeans(n_clusters=2, n_init=n_init, random_state=random_state).fit(x)
    low = int(np.argmin(km.cluster_centers_.reshape(-1)))
    pred = km.labels_ == low
    return float(f1_score(m, pred))


def noise_spearman(values, sigma) -> float:
    """Spearman correlation of the values with the noise level, ``spearmanr(values, -sigma)``.

    Positive = noisier samples get lower values (the desired direction). NaN when either input is
    constant (the correlation is undefined).
    """
    from scipy.stats import spearmanr
    v = as_values(values)
    s = as_values(sigma, "sigma")
    if s.shape[0] != v.shape[0]:
        raise ValueError(f"sigma: has {s.shape[0]} entries but values has {v.shape[0]}")
    if np.unique(v).size < 2 or np.unique(s).size < 2:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = spearmanr(v, -s)
    return float(getattr(res, "statistic", res[0]))


def summarize(values, is_corrupted=None, sigma=None, *,
              discovery_fractions: Sequence[float] = (0.05, 0.1, 0.2, 0.3, 0.5),
              random_state: int = 0, x_train=None, y_train=None, x_test=None, y_test=None,
              removal_fractions: Sequence[float] | None = None, model=None) -> dict[str, Any]:
    """All applicable metrics as a JSON-friendly dict (plain floats and lists).

    Always: ``n`` and value statistics. With ``is_corrupted``: ``n_corrupted``, ``auroc``,
    ``auprc``, ``kmeans_f1``, ``discovery@<f>`` (fraction of corrupted found among the lowest
    ``f`` of samples) and ``discovery_auc``. With ``sigma``: ``noise_spearman``. With
    ``x_train``/``y_train``/``x_test``/``y_test`` (the valued samples and a test set):
    ``remove_high`` and ``remove_low`` curves (``{"fractions": [...], "scores": [...]}``).
    """
    from .curves import discovery_curve, remove_curve
    v = as_values(values)
    out: dict[str, Any] = {"n": int(v.shape[0]), "value_mean": float(v.mean()), "value_std": float(v.std()),
                           "value_min": float(v.min()), "value_max": float(v.max())}
    if is_corrupted is not None:
        m = as_mask(is_corrupted, v.shape[0])
        out["n_corrupted"] = int(m.sum())
        out["auroc"] = detection_auroc(v, m)
        out["auprc"] = detection_auprc(v, m)
        out["kmeans_f1"] = kmeans_f1(v, m, random_state=random_state)
        fr = as_fractions(discovery_fractions, "discovery_fractions")
        dc = discovery_curve(v, m, fractions=fr, seed=random_state)
        for f, found in zip(fr, dc.found):
            out[f"discovery@{f:g}"] = float(found)
        out["discovery_auc"] = discovery_curve(v, m, seed=random_state).auc()
    if sigma is not None:
        out["noise_spearman"] = noise_spearman(v, sigma)
    given = [a is not None for a in (x_train, y_train, x_test, y_test)]
    if any(given):
        if not all(given):
            raise ValueError("x_train, y_train, x_test, y_test: give all four to compute removal curves")
        for mode in ("high", "low"):
            c = remove_curve(v, x_train, y_train, x_test, y_test, mode=mode, fractions=removal_fractions,
                             model=model, seed=random_state)
            out[f"remove_{mode}"] = {"fractions": c.fractions.tolist(), "scores": c.scores.tolist(),
                                     "metric": c.metric}
    return out
