"""KNNShapley(groups=...): the closed form of asymmetric Data Shapley for a KNN utility
(dvgs_fast/methods/knn_asymmetric.py) against enumeration of every subset of every group, on
fresh random data (ties included: coordinates rounded to one decimal), several K and group
layouts, N = 1 included; one group is plain KNN-Shapley."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from dvgs_fast import KNNShapley


def _knn_utility(S, d, m, k):
    if not S:
        return 0.0
    near = sorted(S, key=lambda i: (d[i], i))[:k]          # ties by index, as the method
    return sum(m[i] for i in near) / k


def brute_asymmetric(X, Y, xt, yt, k, groups, order):
    N = len(X)
    vals = np.zeros(N)
    for t in range(len(xt)):
        d = np.sqrt(((X - xt[t]) ** 2).sum(1))
        m = (Y == yt[t]).astype(float)
        before: list[int] = []
        for g in order:
            G = [i for i in range(N) if groups[i] == g]
            n = len(G)
            for i in G:
                others = [j for j in G if j != i]
                for r in range(n):
                    c = math.factorial(r) * math.factorial(n - 1 - r) / math.factorial(n)
                    for T in itertools.combinations(others, r):
                        base = before + list(T)
                        vals[i] += c * (_knn_utility(base + [i], d, m, k) - _knn_utility(base, d, m, k))
            before += G
    return vals / len(xt)


@pytest.mark.parametrize("seed", range(8))
def test_closed_form_equals_enumeration(seed):
    rng = np.random.default_rng(seed)
    N = int(rng.integers(1, 10))
    k = int(rng.integers(1, 5))
    n_groups = int(rng.integers(1, 4))
    X, xt = rng.normal(size=(N, 2)).round(1), rng.normal(size=(4, 2)).round(1)
    Y, yt = rng.integers(0, 3, N), rng.integers(0, 3, 4)
    groups = rng.integers(0, n_groups, N)
    order = sorted(set(groups.tolist()), reverse=bool(seed % 2))
    r = KNNShapley(k, groups=groups, order=order, progress=False).fit(X, Y, xt, yt)
    np.testing.assert_allclose(r.values, brute_asymmetric(X, Y, xt, yt, k, groups, order), atol=1e-12)
    assert r.method == "asymmetric_knn_shapley" and r.info["n_groups"] == len(order)
    # efficiency: the values add up to U(all) - U(empty), averaged over the target points
    total = np.mean([_knn_utility(list(range(N)), np.sqrt(((X - xt[t]) ** 2).sum(1)), (Y == yt[t]).astype(float), k)
                     for t in range(len(xt))])
    assert r.values.sum() == pytest.approx(total, abs=1e-12)


def test_one_group_is_knn_shapley_and_order_matters():
    g = torch.Generator().manual_seed(0)
    X, xt = torch.randn(50, 4, generator=g, dtype=torch.float64), torch.randn(20, 4, generator=g, dtype=torch.float64)
    Y, yt = torch.randint(0, 2, (50,), generator=g), torch.randint(0, 2, (20,), generator=g)
    plain = KNNShapley(5, progress=False).fit(X, Y, xt, yt)
    one = KNNShapley(5, groups=np.zeros(50), block_size=7, progress=False).fit(X, Y, xt, yt)
    np.testing.assert_allclose(one.values, plain.values, atol=1e-12)
    stages = np.repeat([0, 1], 25)
    a = KNNShapley(5, groups=stages, progress=False).fit(X, Y, xt, yt)
    b = KNNShapley(5, groups=stages, order=[1, 0], progress=False).fit(X, Y, xt, yt)
    assert not np.allclose(a.values, b.values)
    assert a.values.sum() == pytest.approx(plain.values.sum(), abs=1e-12)
    for metric in ("cosine", "manhattan"):
        one = KNNShapley(3, metric=metric, groups=np.zeros(50), progress=False).fit(X, Y, xt, yt)
        np.testing.assert_allclose(one.values, KNNShapley(3, metric=metric, progress=False).fit(X, Y, xt, yt).values,
                                   atol=1e-12)


def test_bad_groups():
    X, Y = torch.randn(6, 2), torch.tensor([0, 1] * 3)
    with pytest.raises(ValueError, match="groups"):
        KNNShapley(2, groups=[0, 1], progress=False).fit(X, Y, X, Y)
    with pytest.raises(ValueError, match="order"):
        KNNShapley(2, groups=[0, 1, 0, 1, 0, 1], order=[0])
    with pytest.raises(ValueError, match="order"):
        KNNShapley(2, order=[0, 1])
