"""Every method with N_source = 1 and/or N_target = 1: a value, or (LeaveOneOut at N_source = 1)
a clear refusal; never a crash or NaN.

DVGS is checked against a brute-force float64 computation (per-sample gradients by
torch.autograd, one at a time); Data Shapley at N_source = 1 against the exact Shapley value of
a one-player game, v({1}) - v({}); RandomValuation against its documented generator.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dvgs_fast.methods import DVGS, DVRL, DataShapley, LeaveOneOut, LossVal, RandomValuation

SIZES = [(1, 5), (5, 1), (1, 1)]          # (N_source, N_target)


def _data(n_source: int, n_target: int, d: int = 4, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(n_source, d, generator=g, dtype=torch.float64).to(dtype)
    xt = torch.randn(n_target, d, generator=g, dtype=torch.float64).to(dtype)
    ys = torch.randint(0, 2, (n_source,), generator=g)
    yt = torch.randint(0, 2, (n_target,), generator=g)
    return xs, ys, xt, yt


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))


def _brute_force_dvgs(model: nn.Module, xs, ys, xt, yt, epochs: int, lr: float) -> np.ndarray:
    """DVGS by definition in float64: full-batch SGD on the target; before every step each source
    sample's own loss gradient is compared with the target gradient by cosine similarity."""
    import copy
    model = copy.deepcopy(model).double()
    params = list(model.parameters())
    sims = []
    for _ in range(epochs):
        grads = torch.autograd.grad(F.cross_entropy(model(xt), yt), params)
        G = torch.cat([g.reshape(-1) for g in grads])
        row = []
        for i in range(len(xs)):
            li = F.cross_entropy(model(xs[i:i + 1]), ys[i:i + 1])
            gi = torch.cat([g.reshape(-1) for g in torch.autograd.grad(li, params)])
            row.append(float(gi @ G / max(float(gi.norm() * G.norm()), 1e-8)))
        sims.append(row)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p -= lr * g
    return np.mean(np.array(sims), axis=0)


@pytest.mark.parametrize("backend", ["fast", "reference"])
@pytest.mark.parametrize("n_source,n_target", SIZES)
def test_dvgs_small_n_equals_brute_force(n_source, n_target, backend):
    xs, ys, xt, yt = _data(n_source, n_target, dtype=torch.float64)
    net = _net().double()
    # target_batch_size >= N_target: one full batch per epoch, so the shuffle cannot matter
    res = DVGS(net, optimizer="sgd", lr=0.5, epochs=3, target_batch_size=8, backend=backend, seed=0,
               progress=False).fit(xs, ys, xt, yt)
    want = _brute_force_dvgs(net, xs, ys, xt, yt, epochs=3, lr=0.5)
    assert res.values.shape == (n_source,) and res.status == "completed" and res.info["snapshots"] == 3
    np.testing.assert_allclose(res.values, want, rtol=1e-9, atol=1e-12)
    assert (res.counts == 3).all() and np.isfinite(res.stderr).all()


@pytest.mark.parametrize("n_source,n_target", SIZES)
def test_dvgs_small_n_float32_streamed_and_autoencoder(n_source, n_target):
    xs, ys, xt, yt = _data(n_source, n_target)
    mem = DVGS(_net(), epochs=2, seed=1, progress=False).fit(xs, ys, xt, yt)

    def chunks():
        yield xs.numpy(), ys.numpy()
    streamed = DVGS(_net(), epochs=2, seed=1, progress=False).fit(chunks, None, xt, yt)
    np.testing.assert_array_equal(streamed.values, mem.values)
    ae = nn.Sequential(nn.Linear(4, 2), nn.Tanh(), nn.Linear(2, 4))
    res = DVGS(ae, loss="mse", epochs=2, seed=1, progress=False).fit(xs, None, xt, None)
    assert res.values.shape == (n_source,) and np.isfinite(res.values).all()


@pytest.mark.parametrize("n_source,n_target", SIZES)
def test_lossval_small_n_backends_agree(n_source, n_target):
    xs, ys, xt, yt = _data(n_source, n_target)
    kw = dict(epochs=3, lr=0.05, seed=0, progress=False)
    fast = LossVal(_net, backend="fast", **kw).fit(xs, ys, xt, yt)
    ref = LossVal(_net, backend="reference", **kw).fit(xs, ys, xt, yt)
    assert fast.values.shape == (n_source,) and fast.status == "completed"
    assert np.isfinite(fast.values).all()
    np.testing.assert_allclose(fast.values, ref.values, rtol=1e-4, atol=1e-5)
    assert not np.allclose(fast.values, 1.0)          # the weights did train


@pytest.mark.filterwarnings("ignore:.*outer iterations")       # 3 iterations: short on purpose
@pytest.mark.parametrize("n_source,n_target", SIZES)
def test_dvrl_small_n(n_source, n_target):
    xs, ys, xt, yt = _data(n_source, n_target)
    kw = dict(n_iterations=3, inner_iterations=2, seed=0, progress=False)
    a = DVRL(**kw).fit(xs, ys, xt, yt)
    b = DVRL(**kw).fit(xs, ys, xt, yt)
    assert a.values.shape == (n_source,) and np.isfinite(a.values).all()
    np.testing.assert_array_equal(a.values, b.values)


def test_data_shapley_one_source_sample_is_the_one_player_game():
    """One player: its Shapley value is v({1}) - v({}) = full score - chance score, when its class
    covers the target's classes (else the original never refits: marginal 0)."""
    xs, _, xt, _ = _data(1, 6)
    ys, yt = torch.tensor([1]), torch.ones(6, dtype=torch.long)
    kw = dict(max_permutations=3, convergence_tol=None, refit_steps=10, seed=0, progress=False, n_classes=2,
              metric="accuracy")
    res = DataShapley(**kw).fit(xs, ys, xt, yt)
    assert res.values.shape == (1,) and res.status in ("completed", "stopped")
    np.testing.assert_allclose(res.values[0], res.info["full_score"] - res.info["chance_score"], atol=1e-12)
    uncovered = DataShapley(**kw).fit(xs, ys, xt, torch.tensor([0, 1, 0, 1, 0, 1]))
    assert uncovered.values[0] == 0.0


@pytest.mark.parametrize("n_source,n_target", [(5, 1), (1, 1)])
def test_data_shapley_small_n_is_finite(n_source, n_target):
    xs, ys, xt, yt = _data(n_source, n_target)
    res = DataShapley(max_permutations=3, convergence_tol=None, refit_steps=10, seed=0, progress=False,
                      n_classes=2).fit(xs, ys, xt, yt)
    assert res.values.shape == (n_source,) and np.isfinite(res.values).all()


def test_leave_one_out_refuses_one_source_sample():
    xs, ys, xt, yt = _data(1, 5)
    with pytest.raises(ValueError, match=r"^x_source: leave-one-out needs at least 2 source samples"):
        LeaveOneOut(refit_steps=5, progress=False, seed=0).fit(xs, ys, xt, yt)


def test_leave_one_out_one_target_sample():
    xs, ys, xt, yt = _data(5, 1)
    res = LeaveOneOut(refit_steps=5, progress=False, seed=0, n_classes=2).fit(xs, ys, xt, yt)
    assert res.values.shape == (5,) and np.isfinite(res.values).all() and res.status == "completed"


@pytest.mark.parametrize("n_source,n_target", SIZES)
def test_random_small_n(n_source, n_target):
    xs, ys, xt, yt = _data(n_source, n_target)
    res = RandomValuation(seed=3, progress=False).fit(xs, ys, xt, yt)
    want = np.random.default_rng(np.random.SeedSequence([3, 0x52414E44])).random(n_source)
    np.testing.assert_array_equal(res.values, want)
