"""LAVA (dvgs_fast.methods.lava) against a float64 pure-PyTorch reference that builds the dense
label-aware cost matrix and runs the epsilon-scaling Sinkhorn loop on it (what OpenDataVal's
otdd/geomloss code computes), on fresh random data of several shapes; detection of flipped
labels; input checks. The agreement with OpenDataVal's own code is measured in
bench/bench_lava.py (its own virtualenv)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dvgs_fast import LAVA
from dvgs_fast.methods.base import BudgetWarning


def _softmin(eps, C, h):
    return -eps * torch.logsumexp(h[None, :] - C / eps, dim=1)


def _ot(C, a, b, blur, scaling, diameter):
    """geomloss's tensorized Sinkhorn (p = 2, not debiased) on a given cost: (cost, f)."""
    la, lb = a.log(), b.log()
    p = 2
    start, stop, step = p * math.log(diameter), p * math.log(blur), p * math.log(scaling)
    count = max(0, math.ceil((stop - start) / step))
    eps_list = [diameter ** p] + [math.exp(start + k * step) for k in range(count)] + [blur ** p]
    f, g = _softmin(eps_list[0], C, lb), _softmin(eps_list[0], C.T, la)
    for e in eps_list:
        ft, gt = _softmin(e, C, lb + g / e), _softmin(e, C.T, la + f / e)
        f, g = (f + ft) / 2, (g + gt) / 2
    e = eps_list[-1]
    f, g = _softmin(e, C, lb + g / e), _softmin(e, C.T, la + f / e)
    return float(a @ f + b @ g), f


def _sq(u, v):
    return ((u[:, None, :] - v[None, :, :]) ** 2).sum(-1) / 2


def _box(u, v):
    return float((torch.maximum(u.amax(0), v.amax(0)) - torch.minimum(u.amin(0), v.amin(0))).norm())


def lava_reference(X, Y, Xt, Yt, lam_x=1.0, lam_y=1.0, entreg=0.1, label_entreg=0.1, scaling=0.5):
    X, Xt = X.double(), Xt.double()
    cs, ct = torch.unique(Y), torch.unique(Yt)
    W = torch.zeros(len(cs), len(ct), dtype=torch.float64)
    for i, c in enumerate(cs):
        for j, k in enumerate(ct):
            u, v = X[Y == c], Xt[Yt == k]
            W[i, j] = _ot(_sq(u, v), torch.full((len(u),), 1 / len(u), dtype=torch.float64),
                          torch.full((len(v),), 1 / len(v), dtype=torch.float64), math.sqrt(label_entreg), scaling,
                          _box(u, v))[0]
    C = lam_x * _sq(X, Xt) + lam_y * W[torch.searchsorted(cs, Y)][:, torch.searchsorted(ct, Yt)] / 2
    n_cls = int(max(Y.max(), Yt.max())) + 1
    diameter = _box(torch.cat([X, Y[:, None].double()], 1), torch.cat([Xt, (Yt + n_cls)[:, None].double()], 1))
    N, M = len(X), len(Xt)
    _, f = _ot(C, torch.full((N,), 1 / N, dtype=torch.float64), torch.full((M,), 1 / M, dtype=torch.float64),
               math.sqrt(entreg), scaling, diameter)
    return -(f - (f.sum() - f) / (N - 1)), W


@pytest.mark.parametrize("n, m, d, k, lam", [(40, 25, 3, 2, (1.0, 1.0)), (60, 30, 5, 4, (1.0, 1.0)),
                                             (2, 7, 1, 2, (1.0, 1.0)), (50, 20, 4, 3, (0.5, 2.0)),
                                             (30, 30, 6, 3, (1.0, 0.0))])
def test_matches_the_dense_reference(n, m, d, k, lam):
    g = torch.Generator().manual_seed(n * 7 + d)
    X, Xt = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(m, d, generator=g, dtype=torch.float64)
    Y, Yt = torch.randint(0, k, (n,), generator=g), torch.randint(0, k, (m,), generator=g)
    Y[:2] = torch.tensor([0, 1])
    Yt[:k] = torch.arange(k)
    ref, W = lava_reference(X, Y, Xt, Yt, *lam)
    r = LAVA(lam_x=lam[0], lam_y=lam[1], dtype="float64", progress=False).fit(X, Y, Xt, Yt)
    np.testing.assert_allclose(np.array(r.info["label_distances"]), W.numpy(), rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(r.values, ref.numpy(), rtol=0, atol=1e-8 * max(1.0, float(ref.abs().max())))
    assert np.isnan(r.stderr).all() and (r.counts == 1).all() and r.method == "lava"
    r32 = LAVA(lam_x=lam[0], lam_y=lam[1], progress=False).fit(X.float(), Y, Xt.float(), Yt)
    np.testing.assert_allclose(r32.values, ref.numpy(), rtol=0, atol=2e-4 * max(1.0, float(ref.abs().max())))


def test_classes_missing_on_one_side_and_embedding():
    g = torch.Generator().manual_seed(3)
    X, Xt = torch.randn(30, 4, generator=g, dtype=torch.float64), torch.randn(20, 4, generator=g, dtype=torch.float64)
    Y = torch.randint(0, 3, (30,), generator=g)
    Yt = torch.randint(1, 4, (20,), generator=g)          # class 0 only in the source, 3 only in the target
    ref, _ = lava_reference(X, Y, Xt, Yt)
    r = LAVA(dtype="float64", progress=False).fit(X, Y, Xt, Yt)
    np.testing.assert_allclose(r.values, ref.numpy(), atol=1e-8)
    proj = torch.nn.Linear(4, 2).double()
    with torch.no_grad():
        ref, _ = lava_reference(proj(X), Y, proj(Xt), Yt)
    r = LAVA(proj, dtype="float64", batch_size=7, progress=False).fit(X, Y, Xt, Yt)
    np.testing.assert_allclose(r.values, ref.numpy(), atol=1e-8)


def test_detects_flipped_labels():
    from dvgs_fast.datasets import flip_labels, load_digits
    from dvgs_fast.evaluate import detection_auroc
    ds = load_digits()
    sp = ds.split(n_source=500, n_target=200, n_test=0, seed=0)
    y, flipped = flip_labels(sp.y_source, 0.2, seed=0)
    r = LAVA(progress=False).fit(sp.x_source, y, sp.x_target, sp.y_target)
    assert detection_auroc(r.values, flipped) > 0.9


@pytest.mark.parametrize("kw, needle", [
    (dict(entreg=0), "entreg"), (dict(lam_x=0, lam_y=0), "lam_x"), (dict(lam_y=-1), "lam_y"),
    (dict(scaling=1.0), "scaling"), (dict(embedding=3), "embedding"), (dict(dtype="int8"), "dtype"),
    (dict(diameter=-2), "diameter"),
])
def test_bad_settings(kw, needle):
    with pytest.raises(ValueError, match=needle):
        LAVA(**kw)


def test_bad_data():
    X, Y = torch.randn(10, 3), torch.randint(0, 2, (10,))
    with pytest.raises(ValueError, match="x_source"):
        LAVA(progress=False).fit(X[:1], Y[:1], X, Y)
    with pytest.raises(ValueError, match="y_source"):
        LAVA(progress=False).fit(X, None, X, Y)
    with pytest.raises(ValueError, match="y_target"):
        LAVA(progress=False).fit(X, Y, X, Y.float() + 0.5)
    bad = X.clone()
    bad[1, 1] = float("inf")
    with pytest.raises(ValueError, match="x_target"):
        LAVA(progress=False).fit(X, Y, bad, Y)
    with pytest.raises(ValueError, match="embedding"):
        LAVA(lambda x: x[:1], progress=False).fit(X, Y, X, Y)


def test_budget_stops_before_the_outer_problem():
    X, Y = torch.randn(40, 3), torch.randint(0, 3, (40,))
    with pytest.warns(BudgetWarning, match="max_time"):
        r = LAVA(max_time=1e-9, progress=False).fit(X, Y, X, Y)
    assert r.status == "stopped" and (r.counts == 0).all()
