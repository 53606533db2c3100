"""The variance of semivalues under resampling of the data (Wu et al. 2024, "Uncertainty
quantification of Data Shapley via statistical inference"): what ``result.ci(level)`` is made of.

What it measures. A point's value phi_i(D) depends on the other m = N - 1 training points D,
seen as a draw from a data distribution. As a function of D it is a weighted sum of complete
U-statistics over the subsets of D (an infinite-order U-statistic), so by its Hajek projection

    Var_D phi_i  ~=  m * pi^2 * Var_z H_i(z),     pi = P(j in S) = sum_k q(k) k / m,
    H_i(z) = E[ U(S + i) - U(S) | S contains a point j with z_j = z ],  |S| ~ r(k) = q(k) k / (m pi),

with q the semivalue's subset-size distribution (`weights.py`; Shapley: pi = 1/2, r(k) ~ k).
This is the spread of the value a point would get if the *other* training data were drawn
afresh from the same distribution -- unlike ``result.stderr``, the Monte Carlo error of the
estimate for this very dataset, which more permutations shrink to 0; this one does not shrink
with more permutations, only with more data.

How. Both estimators use permutations that start with a shared point j ("frozen") and are
uniform otherwise: for every other point i, its predecessors then contain j and have a size
uniform on 1..m, which ``m r(k)`` reweights to r (TMC truncation applies as in the main run):

* pick_freeze (default): pairs of such permutations with the same j and independent rests;
  Var_z H_i = Cov(X, X') over the pairs (X, X' the two weighted marginals of i), unbiased;
  2 permutations per sample, every point gets one pair from every pair of permutations;
* double_mc: per outer point j, ``resampling_inner`` permutations; Var_z H_i = the variance
  of the inner means over the outer points minus the mean inner variance / inner.

Both share the refits with the main loop's machinery (batched grid, joblib, torchrun, cache).
``result.ci(level)`` then combines both errors: value +- z * sqrt(resampling_stderr^2 +
stderr^2), an interval for the expected value of the point over data drawn from the same
distribution (the target Wu et al. infer).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from dvgs_fast.methods.semivalues.accumulate import MarginalStats
from dvgs_fast.methods.semivalues.driver import make_driver
from dvgs_fast.methods.semivalues.stopping import MaxUpdates


def frozen_weights(q: np.ndarray) -> tuple[np.ndarray, float]:
    """(importance weight of each position 0..m of a frozen-first permutation, pi).

    Position 0 is the frozen point itself (weight 0: it is not valued by its own sample);
    position k >= 1 has k predecessors, which contain the frozen point."""
    n = len(q)                     # sizes 0..m, m = n - 1
    m = n - 1
    k = np.arange(n, dtype=np.float64)
    r = q * k
    pi = float(r.sum() / m)
    r = r / r.sum()
    w = m * r
    w[0] = 0.0
    return w, pi


class _PairedFirst:
    """Draw function: groups of `group` permutations that share their first point."""

    def __init__(self, n: int, group: int, seed: int):
        self.n, self.group = n, group
        self.firsts: list[int] = []
        self.calls = 0
        self.g_first = torch.Generator().manual_seed(seed)

    def __call__(self, g: torch.Generator) -> torch.Tensor:
        if self.calls % self.group == 0:
            self.firsts.append(int(torch.randint(self.n, (1,), generator=self.g_first)))
        self.calls += 1
        j = self.firsts[-1]
        rest = torch.as_tensor(np.delete(np.arange(self.n), j))
        return torch.cat([torch.tensor([j]), rest[torch.randperm(self.n - 1, generator=g)]])


def estimate_resampling_variance(method, ctx, run, u) -> tuple[np.ndarray, dict[str, Any]]:
    """Per-point resampling variance of the values (see the module doc) and what was done."""
    from dvgs_fast.methods.base import derive_seed
    N = u.n
    w, pi = frozen_weights(method._weight().q(N))
    group = 2 if method.resampling_method == "pick_freeze" else method.resampling_inner
    n_perm = method.resampling_samples * group
    seed = derive_seed(run.seed, 0xC1)
    draw = _PairedFirst(N, group, derive_seed(seed, 1))
    bar = run.progress(n_perm, "resampling variance", unit="perm")
    driver = make_driver(ctx, N, seed, draw=draw, stats=MarginalStats(N), stop=MaxUpdates(n_perm),
                         check_every=group * max(1, method.check_every // group), budget=run.budget,
                         on_complete=bar.update, keep=True)
    try:
        stopped = method._run_permutations(u, driver, w)
        if ctx.enabled:
            driver.finish(stopped)
    finally:
        bar.close()
    X = driver.kept_matrix()
    n_groups = X.shape[0] // group
    X = X[: n_groups * group].reshape(n_groups, group, N)
    firsts = np.asarray(draw.firsts[:n_groups])
    if n_groups < 2:
        var = np.full(N, np.nan)
    elif group == 2:
        var = _pick_freeze(X, firsts)
    else:
        var = _double_mc(X, firsts)
    m = N - 1
    out = m * pi * pi * var
    return np.maximum(out, 0.0), {"resampling_method": method.resampling_method, "resampling_samples": n_groups,
                                  "resampling_permutations": int(n_groups * group)}


def _valid(firsts: np.ndarray, N: int) -> np.ndarray:
    """[G, N] True where the group's frozen point is not the point itself."""
    return firsts[:, None] != np.arange(N)[None, :]


def _pick_freeze(X: np.ndarray, firsts: np.ndarray) -> np.ndarray:
    """Unbiased Cov(X, X') per point over the pairs whose frozen point is another one."""
    ok = _valid(firsts, X.shape[2]).astype(np.float64)
    c = ok.sum(0)
    a, b = X[:, 0] * ok, X[:, 1] * ok
    with np.errstate(invalid="ignore", divide="ignore"):
        ma, mb = a.sum(0) / c, b.sum(0) / c
        cov = ((a - ma) * (b - mb) * ok).sum(0) / (c - 1)
    return np.where(c > 1, cov, np.nan)


def _double_mc(X: np.ndarray, firsts: np.ndarray) -> np.ndarray:
    """Variance of the inner means over outer points, minus the inner noise."""
    L = X.shape[1]
    ok = _valid(firsts, X.shape[2]).astype(np.float64)
    c = ok.sum(0)
    inner_mean = X.mean(1)                          # [G, N]
    inner_var = X.var(1, ddof=1)                    # [G, N]
    with np.errstate(invalid="ignore", divide="ignore"):
        mu = (inner_mean * ok).sum(0) / c
        between = (((inner_mean - mu) ** 2) * ok).sum(0) / (c - 1)
        noise = (inner_var * ok).sum(0) / c / L
    return np.where(c > 1, between - noise, np.nan)
