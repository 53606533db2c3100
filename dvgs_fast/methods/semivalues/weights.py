"""Semivalue weights: which method a sampler/utility loop computes.

A semivalue of point i in a game U over n points is

    phi_i = sum over S in N \\ {i} of  w(|S|) * [U(S + i) - U(S)],   sum_k C(n-1, k) w(k) = 1,

i.e. the mean marginal contribution of i under a distribution over the size k = |S| of the
subset it joins, ``q(k) = C(n-1, k) w(k)``, with S uniform among the subsets of that size:

* Shapley:      w(k) = 1 / (n C(n-1, k))          q uniform on 0..n-1
* Beta(a, b):   w(k) = B(k + b, n-1-k + a) / B(a, b)   q = Beta-binomial(n-1; b, a)
                (Kwon & Zou 2022, eq. 5; the same parameterisation as pyDVL and OpenDataVal:
                a > b puts the weight on small subsets, Beta(1, 1) is Shapley)
* Banzhaf:      w(k) = 1 / 2^(n-1)                q = Binomial(n-1, 1/2)

A permutation gives every point one marginal at a size k that is uniform on 0..n-1, so
``n q(k)`` is the importance weight that turns permutation marginals into an unbiased estimate
of any semivalue (1 for Shapley, which therefore stays bit-identical to plain TMC). Maximum
sample reuse (MSR) needs no weights for Banzhaf. All in log space (scipy.special.betaln /
gammaln): C(n-1, k) overflows float64 beyond n ~ 1000.
"""
from __future__ import annotations

import math

import numpy as np
from scipy.special import betaln, gammaln


class SemivalueWeight:
    """Base: ``log_q(n)`` is the log-probability of each subset size k = 0..n-1."""

    name = "semivalue"

    def log_q(self, n: int) -> np.ndarray:
        raise NotImplementedError

    def q(self, n: int) -> np.ndarray:
        """Probability of each size k = 0..n-1 of the subset a point joins (sums to 1)."""
        return np.exp(self.log_q(n))

    def coefficient(self, n: int) -> np.ndarray:
        """w(k) = q(k) / C(n-1, k): the weight of one subset of size k (k = 0..n-1)."""
        k = np.arange(n)
        return np.exp(self.log_q(n) - _log_comb(n - 1, k))

    def permutation_weights(self, n: int) -> np.ndarray:
        """n q(k): the importance weight of a permutation marginal at position k (0-based)."""
        return n * self.q(n)

    @property
    def is_shapley(self) -> bool:
        return False

    def describe(self) -> str:
        return self.name


class ShapleyWeight(SemivalueWeight):
    name = "shapley"

    def log_q(self, n: int) -> np.ndarray:
        return np.full(n, -math.log(n)) if n else np.zeros(0)

    def permutation_weights(self, n: int) -> np.ndarray:
        return np.ones(n)

    @property
    def is_shapley(self) -> bool:
        return True


class BetaWeight(SemivalueWeight):
    """Beta(alpha, beta) Shapley (Kwon & Zou 2022); Beta(16, 1) is their recommended default."""

    name = "beta"

    def __init__(self, alpha: float, beta: float):
        for v, nm in ((alpha, "alpha"), (beta, "beta")):
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) \
                    or not math.isfinite(v) or v <= 0:
                raise ValueError(f"{nm}: expected a positive number, got {v!r}")
        self.alpha, self.beta = float(alpha), float(beta)

    def log_q(self, n: int) -> np.ndarray:
        k = np.arange(n, dtype=np.float64)
        return _log_comb(n - 1, k) + betaln(k + self.beta, n - 1 - k + self.alpha) - betaln(self.alpha, self.beta)

    @property
    def is_shapley(self) -> bool:
        return self.alpha == 1.0 and self.beta == 1.0

    def describe(self) -> str:
        return f"beta({self.alpha:g}, {self.beta:g})"


class BanzhafWeight(SemivalueWeight):
    name = "banzhaf"

    def log_q(self, n: int) -> np.ndarray:
        k = np.arange(n, dtype=np.float64)
        return _log_comb(n - 1, k) - (n - 1) * math.log(2.0)


def _log_comb(n: int, k) -> np.ndarray:
    k = np.asarray(k, dtype=np.float64)
    return gammaln(n + 1.0) - gammaln(k + 1.0) - gammaln(n - k + 1.0)
