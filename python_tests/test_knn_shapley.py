"""KNNShapley against a direct loop over the recursion of Jia et al. (2019), Theorem 1, and against
brute-force Shapley values of the KNN utility (all subsets) on tiny problems."""
from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest
import torch

from dvgs_fast import KNNShapley
from dvgs_fast.methods.base import BudgetWarning

from _tasks import flipped_task

torch.set_num_threads(1)


def _order(X, x, metric):
    if metric == "euclidean":
        d = np.sqrt(((X - x) ** 2).sum(1))
    elif metric == "manhattan":
        d = np.abs(X - x).sum(1)
    else:
        Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
        d = np.sqrt(((Xn - x / np.linalg.norm(x)) ** 2).sum(1))
    return np.argsort(d, kind="stable")        # nearest first, ties by index


def loop_reference(X, y, Xt, yt, k, metric="euclidean"):
    """The recursion, one target point and one source point at a time; float64. Returns the
    per-target values [T, N]."""
    N = X.shape[0]
    out = np.zeros((Xt.shape[0], N))
    for t in range(Xt.shape[0]):
        a = _order(X, Xt[t], metric)
        m = (y[a] == yt[t]).astype(np.float64)
        s = np.zeros(N)
        s[a[N - 1]] = m[N - 1] * min(k, N) / (k * N)
        for i in range(N - 2, -1, -1):           # paper's i = N-1, ..., 1 (1-based) is i + 1 here
            s[a[i]] = s[a[i + 1]] + (m[i] - m[i + 1]) / k * min(k, i + 1) / (i + 1)
        out[t] = s
    return out


def brute_force_shapley(X, y, xt, yt, k):
    """Shapley values of U(S) = (1/k) * #correct among the min(k, |S|) nearest points of S."""
    N = X.shape[0]
    a = _order(X, xt, "euclidean")
    rank = np.empty(N, dtype=np.int64)
    rank[a] = np.arange(N)
    match = (y == yt).astype(np.float64)

    def U(S):
        if not S:
            return 0.0
        near = sorted(S, key=lambda j: rank[j])[:k]
        return match[near].sum() / k

    phi = np.zeros(N)
    for i in range(N):
        others = [j for j in range(N) if j != i]
        for r in range(N):
            w = math.factorial(r) * math.factorial(N - r - 1) / math.factorial(N)
            for S in itertools.combinations(others, r):
                phi[i] += w * (U(list(S) + [i]) - U(list(S)))
    return phi


def _data(seed, N, T, d=5, classes=3, dup=False):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(N, d))
    if dup and N > 3:                 # exact duplicates and a duplicated target point: real ties
        X[N // 2] = X[0]
        X[N - 1] = X[1]
    y = rng.integers(0, classes, N)
    Xt = rng.normal(size=(T, d))
    if dup:
        Xt[0] = X[0]
    yt = rng.integers(0, classes, T)
    return X, y, Xt, yt


def _k_above_n(k, N):
    """k > N still gives the exact values, and says that the distances play no part."""
    import contextlib
    return pytest.warns(UserWarning, match="neighbours but only") if k > N else contextlib.nullcontext()


@pytest.mark.parametrize("N,T,k", [(40, 7, 5), (25, 3, 10), (6, 4, 10), (1, 3, 1), (1, 1, 4), (30, 1, 3),
                                   (50, 5, 50), (50, 5, 1)])
def test_matches_loop_recursion(N, T, k):
    X, y, Xt, yt = _data(N * 100 + T, N, T)
    ref = loop_reference(X, y, Xt, yt, k)
    with _k_above_n(k, N):
        res = KNNShapley(k=k, progress=False, seed=0).fit(X, y, Xt, yt)
    np.testing.assert_allclose(res.values, ref.mean(0), rtol=0, atol=1e-9)
    assert (res.counts == T).all()
    if T > 1:
        np.testing.assert_allclose(res.stderr, ref.std(0, ddof=1) / np.sqrt(T), rtol=1e-6, atol=1e-12)
    else:
        assert np.isnan(res.stderr).all()
    assert res.status == "completed" and res.method == "knn_shapley"


def test_k_larger_than_n_is_additive(N=7, k=10):
    """k > N: every subset is smaller than k, U is additive, the value of a point is m / k
    (the paper's base case m_N / N would give the farthest point m / N instead)."""
    X, y, Xt, yt = _data(11, N, 6, classes=2)
    with pytest.warns(UserWarning, match=f"k: {k} neighbours but only {N} source samples"):
        res = KNNShapley(k=k, progress=False).fit(X, y, Xt, yt)     # it runs, and says the distances play no part
    np.testing.assert_allclose(res.values, (y[None, :] == yt[:, None]).mean(0) / k, rtol=0, atol=1e-12)
    with pytest.warns(UserWarning, match="neighbours but only 1 source"):
        res1 = KNNShapley(k=k, progress=False).fit(X[:1], y[:1], Xt, np.full(6, y[0]))   # N = 1
    np.testing.assert_allclose(res1.values, [1.0 / k], rtol=0, atol=1e-15)


@pytest.mark.parametrize("metric", ["euclidean", "cosine", "manhattan"])
def test_ties_and_metrics(metric):
    X, y, Xt, yt = _data(7, 30, 6, dup=True)
    # a block of exactly equal rows (and targets equal to source rows): ordering by index decides
    ref = loop_reference(X, y, Xt, yt, 4, metric)
    for block in (None, 1, 4):
        res = KNNShapley(k=4, metric=metric, block_size=block, progress=False).fit(X, y, Xt, yt)
        np.testing.assert_allclose(res.values, ref.mean(0), rtol=0, atol=1e-9)


@pytest.mark.parametrize("N,k,seed", [(5, 2, 0), (6, 3, 1), (4, 6, 2), (6, 1, 3)])
def test_is_the_shapley_value(N, k, seed):
    """The recursion gives the exact Shapley values of the KNN utility, ties and k > N included."""
    X, y, Xt, yt = _data(seed, N, 1, d=2, classes=2, dup=True)
    X[2] = X[0]                       # a three-way tie
    phi = brute_force_shapley(X, y, Xt[0], yt[0], k)
    with _k_above_n(k, N):
        res = KNNShapley(k=k, progress=False).fit(X, y, Xt[:1], yt[:1])
    np.testing.assert_allclose(res.values, phi, rtol=0, atol=1e-12)
    # efficiency: the values add up to the utility of the whole source set
    a = _order(X, Xt[0], "euclidean")
    assert res.values.sum() == pytest.approx((y[a[:k]] == yt[0]).sum() / k, abs=1e-12)


def test_float32_and_tensor_inputs():
    X, y, Xt, yt = _data(3, 60, 9)
    ref = loop_reference(X, y, Xt, yt, 5).mean(0)
    res = KNNShapley(k=5, progress=False).fit(torch.tensor(X), torch.tensor(y), torch.tensor(Xt), torch.tensor(yt))
    np.testing.assert_allclose(res.values, ref, rtol=0, atol=1e-9)
    res32 = KNNShapley(k=5, dtype="float32", progress=False).fit(X, y, Xt, yt)
    np.testing.assert_allclose(res32.values, ref, rtol=0, atol=1e-6)


def test_finds_flipped_labels():
    from dvgs_fast.evaluate import detection_auroc
    xs, y_noisy, xt, yt, flipped = flipped_task(300, 100, 100, split_seed=0, flip_seed=0)
    res = KNNShapley(k=10, progress=False).fit(xs, y_noisy, xt, yt)
    assert detection_auroc(res.values, flipped) >= 0.9


def test_max_time_stops():
    X, y, Xt, yt = _data(4, 20, 5)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        res = KNNShapley(k=3, max_time=1e-9, progress=False).fit(X, y, Xt, yt)
    assert res.status == "stopped" and (res.counts == 0).all() and (res.values == 0).all()
    assert any(issubclass(x.category, BudgetWarning) for x in w)


def test_bad_input():
    X, y, Xt, yt = _data(5, 10, 3)
    with pytest.raises(ValueError, match="k:"):
        KNNShapley(k=0)
    with pytest.raises(ValueError, match="metric:"):
        KNNShapley(metric="chebyshev")
    with pytest.raises(ValueError, match="block_size:"):
        KNNShapley(block_size=0)
    with pytest.raises(ValueError, match="y_source"):
        KNNShapley(progress=False).fit(X, y + 0.5, Xt, yt)
    with pytest.raises(ValueError, match="x_target"):
        KNNShapley(progress=False).fit(X, y, Xt[:, :2], yt)
    with pytest.raises(ValueError, match="y_target"):
        KNNShapley(progress=False).fit(X, y, Xt, yt[:2])
