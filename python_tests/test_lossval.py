"""LossVal: the batch objective against the original formula (geomloss), fast vs reference
backend, the result, input errors, and noisy-label detection on breast_cancer (and Adult)."""
import math

import numpy as np
import pytest
import torch
from torch import nn

import dvgs_fast
from dvgs_fast import LossVal, ValuationResult
from dvgs_fast.methods.lossval import batch_ot, lossval_batch_loss

geomloss = pytest.importorskip("geomloss", reason="geomloss is a test dependency (pip install geomloss)")


def original_batch_loss(out, y, x_batch, x_target, w, n_classes):
    """LossVal's published formula: softmax outputs, one-hot targets, geomloss Sinkhorn."""
    prob = torch.softmax(out, dim=1)
    onehot = torch.nn.functional.one_hot(y, n_classes).to(out.dtype)
    ce = -torch.sum(onehot * torch.log(prob + 1e-8), dim=1)
    weighted = torch.sum(w @ ce)
    diameter = torch.cdist(x_batch, x_target, p=2).max().item()
    S = geomloss.SamplesLoss(loss="sinkhorn", diameter=diameter * 1.1, backend="tensorized")
    dist = S(w, x_batch, torch.ones(x_target.shape[0], dtype=out.dtype), x_target)
    return weighted * dist ** 2


@pytest.mark.parametrize("backend", ["fast", "reference"])
@pytest.mark.parametrize("negative", [False, True])
def test_batch_loss_matches_original(backend, negative):
    g = torch.Generator().manual_seed(3)
    xb = torch.rand(24, 6, generator=g, dtype=torch.float64)
    xt = torch.rand(30, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (24,), generator=g)
    out0 = torch.randn(24, 3, generator=g, dtype=torch.float64)
    w0 = torch.rand(24, generator=g, dtype=torch.float64) + 0.5
    if negative:          # weights pushed below 0 by training: geomloss's convention must hold
        w0[::5] = -0.3
        w0[3] = 0.0
    out_a, w_a = out0.clone().requires_grad_(), w0.clone().requires_grad_()
    ref = original_batch_loss(out_a, y, xb, xt, w_a, 3)
    g_ref = torch.autograd.grad(ref, (out_a, w_a))
    out_b, w_b = out0.clone().requires_grad_(), w0.clone().requires_grad_()
    ours = lossval_batch_loss(out_b, y, xb, xt, w_b, "cross_entropy", backend)
    g_ours = torch.autograd.grad(ours, (out_b, w_b))
    assert math.isclose(float(ours.detach()), float(ref.detach()), rel_tol=1e-7)
    for a, b in zip(g_ours, g_ref):
        assert float((a - b).abs().max()) <= 1e-7 * float(b.abs().max())


def test_all_nonpositive_batch_still_defined():
    g = torch.Generator().manual_seed(1)
    xb, xt = torch.rand(8, 3, generator=g, dtype=torch.float64), torch.rand(10, 3, generator=g, dtype=torch.float64)
    w = -torch.rand(8, generator=g, dtype=torch.float64)
    S = geomloss.SamplesLoss(loss="sinkhorn", diameter=1.1 * torch.cdist(xb, xt).max().item(), backend="tensorized")
    ref = S(w, xb, torch.ones(10, dtype=torch.float64), xt)
    assert math.isclose(float(batch_ot(xb, xt, w)), float(ref), rel_tol=1e-7)


def mlp(d, k=2, hidden=25, dtype=torch.float32):
    def make():
        return nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                             nn.Linear(hidden, k)).to(dtype)
    return make


def toy(n=120, m=40, d=5, seed=0):
    g = np.random.default_rng(seed)
    x = g.normal(size=(n, d)).astype(np.float32)
    y = (x[:, 0] + 0.3 * x[:, 1] > 0).astype(np.int64)
    xt = g.normal(size=(m, d)).astype(np.float32)
    yt = (xt[:, 0] + 0.3 * xt[:, 1] > 0).astype(np.int64)
    return x, y, xt, yt


def test_fast_and_reference_backends_agree():
    x, y, xt, yt = toy()
    kw = dict(epochs=3, batch_size=32, seed=5, progress=False)
    fast = LossVal(mlp(5, dtype=torch.float64), backend="fast", **kw).fit(x.astype(np.float64), y,
                                                                          xt.astype(np.float64), yt)
    ref = LossVal(mlp(5, dtype=torch.float64), backend="reference", **kw).fit(x.astype(np.float64), y,
                                                                              xt.astype(np.float64), yt)
    np.testing.assert_allclose(fast.values, ref.values, rtol=0, atol=1e-8)
    assert not np.allclose(fast.values, 1.0)       # the weights did train


def test_result_reproducible_and_model_untouched():
    x, y, xt, yt = toy(seed=1)
    model = mlp(5)()
    before = [p.detach().clone() for p in model.parameters()]
    r1 = LossVal(model, epochs=2, batch_size=50, seed=7, progress=False).fit(x, y, xt, yt)
    r2 = LossVal(model, epochs=2, batch_size=50, seed=7, progress=False).fit(torch.from_numpy(x), y, xt)
    assert isinstance(r1, ValuationResult) and r1.method == "lossval" and len(r1) == 120
    assert r1.info["epochs_done"] == 2 and r1.info["steps"] == 6 and (r1.counts == 2).all()
    assert {"setup", "train", "per_epoch", "total"} <= set(r1.timings)
    np.testing.assert_array_equal(r1.values, r2.values)
    for p, q in zip(before, model.parameters()):
        assert torch.equal(p, q)


def test_mse_loss():
    g = np.random.default_rng(0)
    x = g.normal(size=(80, 4)).astype(np.float32)
    y = (x @ np.array([1.0, -2.0, 0.5, 0.0])).astype(np.float32)
    y[:10] += 5.0                                             # corrupted targets
    xt = g.normal(size=(30, 4)).astype(np.float32)
    res = LossVal(lambda: nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1)), loss="mse",
                  epochs=20, batch_size=16, seed=0, progress=False).fit(x, y, xt)
    assert res.values.shape == (80,) and np.isfinite(res.values).all()
    assert res.values[:10].mean() < res.values[10:].mean()


@pytest.mark.parametrize("kwargs,needle", [
    (dict(loss="hinge"), "loss"), (dict(epochs=0), "epochs"), (dict(batch_size=0), "batch_size"),
    (dict(lr=-1.0), "lr"), (dict(backend="geomloss"), "backend"), (dict(scaling=1.5), "scaling"),
])
def test_bad_settings(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        LossVal(mlp(5), **kwargs)


def test_bad_data():
    x, y, xt, yt = toy()
    lv = LossVal(mlp(5), epochs=1, progress=False)
    with pytest.raises(ValueError, match="x_target"):
        lv.fit(x, y, xt[:, :3], yt)
    with pytest.raises(ValueError, match="y_source"):
        lv.fit(x, y[:-1], xt, yt)
    with pytest.raises(ValueError, match="y_source"):
        lv.fit(x, y + 5, xt, yt)
    with pytest.raises(ValueError, match="x_source"):
        lv.fit(np.full_like(x, np.nan), y, xt, yt)
    with pytest.raises(ValueError, match="x_target"):
        lv.fit(x, y, None, yt)


# ------------------------------------------------------------------------------ quality
def _detect(ds, n_source, n_target, seed, *, batch_size, epochs=30, hidden=25):
    from dvgs_fast.datasets import flip_labels
    from dvgs_fast.evaluate import detection_auroc, kmeans_f1
    sp = ds.split(n_source, n_target, 1, seed=seed)
    y_noisy, flipped = flip_labels(sp.y_source, 0.2, seed=seed)
    res = LossVal(mlp(ds.X.shape[1], hidden=hidden), epochs=epochs, batch_size=batch_size, seed=seed,
                  progress=False).fit(sp.x_source, y_noisy, sp.x_target, sp.y_target)
    return detection_auroc(res.values, flipped), kmeans_f1(res.values, flipped)


def test_detects_flipped_labels_breast_cancer():
    from dvgs_fast.datasets import load_breast_cancer
    ds = load_breast_cancer()
    scores = [_detect(ds, 400, 100, seed, batch_size=32) for seed in (0, 1, 2)]
    aurocs, f1s = zip(*scores)
    assert min(aurocs) > 0.9, scores          # random: 0.5
    assert min(f1s) > 0.6, scores             # random: ~0.29 for 20% noise


@pytest.mark.slow
def test_detects_flipped_labels_adult(data_root):
    from dvgs_fast.datasets import load_adult
    ds = load_adult(root=data_root)
    auroc, f1 = _detect(ds, 1000, 100, 0, batch_size=32)
    assert auroc > 0.7 and f1 > 0.4, (auroc, f1)
