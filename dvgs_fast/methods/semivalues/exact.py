"""Exact semivalues of small games: every subset of the N source points refit once.

For N <= ``max_n`` (default 16: 65,536 refits, batched) the utility of all 2^N subsets is
computed with the same `utility.RefitUtility` the Monte Carlo samplers use, then

    semivalue   phi_i = sum over S not containing i of w(|S|) [U(S + i) - U(S)]     (`weights.py`)
    asymmetric  phi_i = sum over T in G \\ {i} of |T|! (g-1-|T|)! / g! [U(P + T + i) - U(P + T)]
                (G: the g points of i's group, P: every point of the earlier groups)

This is the ground truth the samplers are tested against, and a way to see what a semivalue
does on a toy problem. stderr is 0 (nothing is sampled).
"""
from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from dvgs_fast import _validation as V
from dvgs_fast.methods.base import Estimate, Run, Valuation
from dvgs_fast.methods.semivalues.core import Semivalue, resolve_weight
from dvgs_fast.methods.semivalues.methods import check_groups
from dvgs_fast.methods.semivalues.utility import RefitUtility


class ExactSemivalue(Semivalue):
    """Exact semivalue (or, with ``groups``, asymmetric Shapley) values by enumerating subsets.

    model, loss, metric, refit_*, weight_decay, hidden_dim, batched, batch_engine, n_classes,
    dtype, n_jobs : the utility, exactly as in `core.Semivalue`.
    weight : 'shapley' | 'banzhaf' | ('beta', alpha, beta) | a `weights.SemivalueWeight`.
    groups, order : asymmetric Shapley (`methods.AsymmetricShapley`); then weight must be Shapley.
    max_n : refuse more source points than this (2^N refits).
    """

    def __init__(self, model: Any = "logistic", weight: Any = "shapley", *, groups: Any = None, order: Any = None,
                 loss: str = "cross_entropy", metric: str | None = None, refit_steps: int = 100,
                 refit_lr: float = 0.1, refit_optimizer: str = "adam", weight_decay: float = 0.0,
                 hidden_dim: int = 100, batched: bool = True, batch_engine: str = "auto",
                 n_classes: int | None = None, dtype: str = "float32", n_jobs: int | None = None, max_n: int = 16,
                 device: Any = None, seed: int | None = None, max_time: float | None = None, progress: bool = True,
                 num_threads: int | None = None):
        self.weight = resolve_weight(weight)
        self.groups = self.order = None
        self._members = None
        if groups is not None:
            if not self.weight.is_shapley:
                raise ValueError(f"weight: asymmetric values (groups) are defined for Shapley weights, got "
                                 f"{self.weight.describe()!r}")
            self.groups, self.order, self._members = check_groups(groups, order)
        self.max_n = V.check_positive_int(max_n, "max_n")
        if self.max_n > 24:
            raise ValueError(f"max_n: {self.max_n} would mean 2^{self.max_n} refits; at most 24")
        self._init_common(model, loss=loss, metric=metric, tolerance=None, truncation_patience=1, stop=None,
                          check_every=1, refit_steps=refit_steps, refit_lr=refit_lr, refit_optimizer=refit_optimizer,
                          weight_decay=weight_decay, hidden_dim=hidden_dim, batched=batched, chunk_size=1,
                          batch_engine=batch_engine, n_classes=n_classes, dtype=dtype, cache=False, n_jobs=n_jobs,
                          keep_marginals=False, resampling_samples=0, resampling_method="pick_freeze",
                          resampling_inner=10, distributed=False)
        Valuation.__init__(self, device=device, seed=seed, max_time=max_time, progress=progress, num_threads=num_threads)

    @property
    def name(self) -> str:
        return "exact_asymmetric_shapley" if self.groups is not None else f"exact_{self.weight.name}"

    def _fit_ctx(self, ctx, run: Run, x_source, y_source, x_target, y_target) -> Estimate:
        t0 = time.perf_counter()
        data, metric = self._prepare(ctx, run, x_source, y_source, x_target, y_target)
        N = data.n_source
        if N > self.max_n:
            raise ValueError(f"x_source: {N} samples would need 2^{N} refits; ExactSemivalue takes at most "
                             f"max_n={self.max_n} (use a Monte Carlo method)")
        if self.groups is not None and len(self.groups) != N:
            raise ValueError(f"groups: has {len(self.groups)} labels for {N} source samples")
        u = RefitUtility(self, data, metric, run.seed, batched=self.batched, cache=False, n_jobs=self.n_jobs)
        codes = np.arange(2 ** N, dtype=np.int64)
        masks = ((codes[:, None] >> np.arange(N)) & 1).astype(bool)
        U = u.scores(masks, time_up=run.budget.time_up)
        info = {"n_source": N, "metric": metric, "semivalue": self.weight.describe(), "utility_refits": u.refits,
                "engine": u.engine, "empty_score": float(U[0]), "full_score": float(U[-1])}
        timings = {"setup": 0.0, "valuation": time.perf_counter() - t0}
        if np.isnan(U).any():
            return Estimate(values=np.zeros(N), counts=np.zeros(N, dtype=np.int64), status="stopped",
                            stop_reason="max_time", progress=f"{int((~np.isnan(U)).sum())} of {2 ** N} subsets",
                            info=info, timings=timings)
        if self._members is not None:
            values = asymmetric_from_table(U, self._members)
        else:
            values = semivalues_from_table(U, self.weight.coefficient(N))
        return Estimate(values=values, stderr=np.zeros(N), counts=np.ones(N, dtype=np.int64), info=info,
                        timings=timings, progress=f"{2 ** N} subsets")


def semivalues_from_table(U: np.ndarray, w: np.ndarray) -> np.ndarray:
    """phi_i = sum_{S not containing i} w(|S|) (U[S | i] - U[S]) for a table U over bitmasks."""
    n = int(round(math.log2(len(U))))
    codes = np.arange(len(U), dtype=np.int64)
    size = _popcount(codes)
    out = np.zeros(n)
    for i in range(n):
        bit = 1 << i
        S = codes[(codes & bit) == 0]
        out[i] = float(np.sum(w[size[S]] * (U[S | bit] - U[S])))
    return out


def asymmetric_from_table(U: np.ndarray, members: list[np.ndarray]) -> np.ndarray:
    """Asymmetric Shapley values from a table U over bitmasks and the groups in order."""
    n = int(round(math.log2(len(U))))
    codes = np.arange(len(U), dtype=np.int64)
    out = np.zeros(n)
    before = 0
    for grp in members:
        gmask = int(sum(1 << int(i) for i in grp))
        g = len(grp)
        inside = codes[(codes & ~gmask) == 0]                 # subsets T of the group
        t_size = _popcount(inside)
        coef = np.array([math.factorial(t) * math.factorial(g - 1 - t) / math.factorial(g) for t in range(g)])
        for i in grp:
            bit = 1 << int(i)
            T = inside[(inside & bit) == 0]
            out[int(i)] = float(np.sum(coef[t_size[(inside & bit) == 0]] * (U[before | T | bit] - U[before | T])))
        before |= gmask
    return out


def _popcount(codes: np.ndarray) -> np.ndarray:
    c = codes.copy()
    out = np.zeros_like(c)
    while c.any():
        out += c & 1
        c >>= 1
    return out
