"""DVRL: the REINFORCE update against hand-computed numbers, the leave-one-out baseline and the
reward scaling, thread-count agreement, convergence, the too-few-iterations warning, and a
scikit-learn predictor. Quality and cost at full size are measured in bench/bench_dvrl.py."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from dvgs_fast import DVRL
from dvgs_fast.evaluate import detection_auroc
from dvgs_fast.methods.base import BudgetWarning
from dvgs_fast.methods.dvrl import (RunningScale, TooFewIterationsWarning, ValueEstimator, loo_advantages,
                                    reinforce_loss, reinforce_update)

from _tasks import flipped_task


@pytest.fixture(scope="module")
def bc():
    return flipped_task(120, 80, split_seed=2, flip_seed=3)


# ----------------------------------------------------------------------------- REINFORCE pieces
def test_loo_advantages_by_hand():
    r = torch.tensor([0.9, 0.7, 0.2], dtype=torch.float64)
    # a_k = r_k - mean of the others
    expected = [0.9 - 0.45, 0.7 - 0.55, 0.2 - 0.8]
    np.testing.assert_allclose(loo_advantages(r).numpy(), expected, atol=1e-15)
    assert float(loo_advantages(r).sum()) == pytest.approx(0.0, abs=1e-15)   # K/(K-1) x centred
    with pytest.raises(ValueError, match="n_samples"):
        loo_advantages(r[:1])


def test_reinforce_gradient_by_hand():
    """p = sigmoid(z) with z = (0, ln 3, -ln 3) -> p = (1/2, 3/4, 1/4); two selections with
    rewards 0.9 / 0.7 -> advantages +0.2 / -0.2; dL/dz_i = -(1/K) sum_k a_k (s_ki - p_i)
    = -0.1 (s_1i - s_2i) = (-0.1, 0, 0.1). mean p = 1/2: the penalty is inactive."""
    z = torch.tensor([0.0, math.log(3), -math.log(3)], dtype=torch.float64, requires_grad=True)
    p = torch.sigmoid(z)
    S = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]], dtype=torch.float64)
    adv = loo_advantages(torch.tensor([0.9, 0.7], dtype=torch.float64))
    loss = reinforce_loss(p, S, adv, threshold=0.9, penalty=1e3, epsilon=0.0)
    loss.backward()
    np.testing.assert_allclose(z.grad.numpy(), [-0.1, 0.0, 0.1], atol=1e-15)
    # loss value: -(1/2) [0.2 (log 1/2 + log 3/4 + log 3/4) - 0.2 (log 1/2 + log 3/4 + log 3/4)] = 0 here
    # by symmetry of the log-likelihoods; check a case where it is not
    lp = torch.log(torch.tensor([0.5, 0.75, 0.25], dtype=torch.float64))
    l1p = torch.log(1 - torch.tensor([0.5, 0.75, 0.25], dtype=torch.float64))
    ll1 = lp[0] + lp[1] + l1p[2]
    ll2 = l1p[0] + lp[1] + lp[2]
    assert float(loss.detach()) == pytest.approx(float(-(0.2 * ll1 - 0.2 * ll2) / 2), abs=1e-14)


def test_penalty_gradient_by_hand():
    """All p = 0.95 (mean above threshold 0.9): the penalty adds penalty * p(1-p) / B to dL/dz_i."""
    z = torch.full((4,), math.log(0.95 / 0.05), dtype=torch.float64, requires_grad=True)
    S = torch.ones(2, 4, dtype=torch.float64)
    reinforce_loss(torch.sigmoid(z), S, torch.zeros(2, dtype=torch.float64), threshold=0.9, penalty=10.0,
                   epsilon=0.0).backward()
    np.testing.assert_allclose(z.grad.numpy(), 10.0 * 0.95 * 0.05 / 4, rtol=1e-12)


def test_reinforce_update_by_hand():
    """One estimator step: Adam's first step moves every parameter by -lr * g / (|g| + eps), i.e.
    by -lr * sign(g); for the output bias g = sum_i dL/dz_i and for the output weights
    g_j = sum_i dL/dz_i h_ij (h = the comb activations) -- both computed here by hand from the
    closed-form dL/dz of the test above."""
    torch.manual_seed(0)
    est = ValueEstimator(x_dim=2, y_dim=2, hidden_dim=4, comb_dim=3, n_layers=3).double()
    x = torch.tensor([[0.1, 0.9], [0.5, 0.2], [0.8, 0.4]], dtype=torch.float64)
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    d = torch.tensor([[0.2, 0.2], [0.7, 0.7], [0.1, 0.1]], dtype=torch.float64)
    with torch.no_grad():
        h = est.comb(torch.cat([est.body(torch.cat([x, y], 1)), d], 1))       # [3, comb]
        p0 = est(x, y, d)
    S = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
    rewards = torch.tensor([0.8, 0.5], dtype=torch.float64)
    adv = loo_advantages(rewards)                                           # +0.3, -0.3
    dz = -(adv[:, None] * (S - p0[None, :])).sum(0) / 2                     # closed form
    g_bias = float(dz.sum())
    g_w = (dz[:, None] * h).sum(0)
    lr = 0.01
    b0, w0 = est.out.bias.detach().clone(), est.out.weight.detach().clone()
    opt = torch.optim.Adam(est.parameters(), lr=lr)
    reinforce_update(opt, est(x, y, d), S, adv, threshold=0.9, penalty=1e3, epsilon=0.0)
    # mean p0 is inside [0.1, 0.9] for this seed (the penalty is inactive)
    assert 0.1 < float(p0.mean()) < 0.9
    exp_b = b0 - lr * g_bias / (abs(g_bias) + 1e-8)
    exp_w = w0 - lr * g_w / (g_w.abs() + 1e-8)
    np.testing.assert_allclose(est.out.bias.detach().numpy(), exp_b.numpy(), atol=1e-12)
    np.testing.assert_allclose(est.out.weight.detach().numpy().ravel(), exp_w.numpy().ravel(), atol=1e-12)


def test_running_scale():
    sc = RunningScale(horizon=10)
    a = torch.tensor([3.0, -4.0], dtype=torch.float64)
    # first call: bias-corrected mean square = mean(a^2) = 12.5
    np.testing.assert_allclose(sc(a).numpy(), (a / math.sqrt(12.5)).numpy(), rtol=1e-12)
    b = torch.tensor([1.0, -1.0], dtype=torch.float64)
    beta = 0.9
    sq = beta * (1 - beta) * 12.5 + (1 - beta) * 1.0
    np.testing.assert_allclose(sc(b).numpy(), (b / math.sqrt(sq / (1 - beta ** 2))).numpy(), rtol=1e-12)
    assert torch.equal(RunningScale()(torch.zeros(3, dtype=torch.float64)), torch.zeros(3, dtype=torch.float64))


# ----------------------------------------------------------------------------- behaviour
def test_thread_count_agreement(bc):
    """The same seed on 1 and on 2 intra-op threads (forced: num_threads=2, where the default
    would use 1 for a problem this small): the trajectories may part (GEMM summation order), the
    values must not."""
    xs, ys, xt, yt, flipped = bc
    kw = dict(seed=5, progress=False, n_iterations=60, convergence_tol=0.0)
    a = DVRL(num_threads=1, **kw).fit(xs, ys, xt, yt)
    b = DVRL(num_threads=2, **kw).fit(xs, ys, xt, yt)
    assert a.info["threads"] == 1 and b.info["threads"] == 2
    assert torch.get_num_threads() == 1                     # restored after fit
    assert spearmanr(a.values, b.values)[0] >= 0.9
    for r in (a, b):
        assert detection_auroc(r.values, flipped) >= 0.9, r.info
    # the default caps a small problem at one thread whatever the process setting
    torch.set_num_threads(2)
    try:
        c = DVRL(n_iterations=10, seed=0, progress=False, convergence_tol=0.0).fit(xs, ys, xt, yt)
        assert c.info["threads"] == 1 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)


def test_converges_and_reports(bc):
    xs, ys, xt, yt, flipped = bc
    r = DVRL(seed=0, progress=False, n_iterations=1000).fit(xs, ys, xt, yt)
    assert r.status == "converged" and r.info["stopped_by"] == "converged"
    assert r.info["converged"] and r.info["iterations_done"] < 1000
    assert r.info["convergence_distance"] < 1e-3 and r.info["iterations_done"] % 10 == 0
    assert r.info["values_averaged_over"] == 5
    assert detection_auroc(r.values, flipped) >= 0.9
    # with early stopping off it runs to n_iterations, and keeps every check on request
    r2 = DVRL(seed=0, progress=False, n_iterations=60, convergence_tol=0.0, keep_checks=True,
              check_every=20).fit(xs, ys, xt, yt)
    assert r2.status == "completed" and r2.info["iterations_done"] == 60
    assert r2.info["check_iterations"] == [20, 40, 60] and r2.snapshots.shape == (3, len(xs))


def test_too_few_iterations_warns(bc):
    xs, ys, xt, yt, _ = bc
    with pytest.warns(TooFewIterationsWarning, match="5 outer iterations"):
        r = DVRL(seed=0, progress=False, n_iterations=5).fit(xs, ys, xt, yt)
    assert r.info["too_few_iterations"] and r.status == "completed"
    with warnings.catch_warnings():
        warnings.simplefilter("error", TooFewIterationsWarning)
        r = DVRL(seed=0, progress=False, n_iterations=DVRL.MIN_ITERATIONS, convergence_tol=0.0).fit(xs, ys, xt, yt)
    assert "too_few_iterations" not in r.info
    # a time budget that ends the run early: both warnings
    with pytest.warns(BudgetWarning), pytest.warns(TooFewIterationsWarning):
        DVRL(seed=0, progress=False, max_time=0.2, n_iterations=10_000).fit(xs, ys, xt, yt)


def test_sklearn_predictor(bc):
    from sklearn.linear_model import LogisticRegression
    xs, ys, xt, yt, flipped = bc
    r = DVRL(LogisticRegression(max_iter=200), seed=0, progress=False, n_iterations=30,
             n_samples=4).fit(xs, ys, xt, yt)
    assert r.info["predictor"] == "sklearn" and r.values.shape == (len(xs),)
    assert np.isfinite(r.values).all()
    assert detection_auroc(r.values, flipped) > 0.8
    assert r.params["model"] == "LogisticRegression" or "LogisticRegression" in str(r.params["model"])


@pytest.mark.parametrize("kw, needle", [
    (dict(n_samples=1), "n_samples"),
    (dict(n_samples=0), "n_samples"),
    (dict(feature_lr=-1.0), "feature_lr"),
    (dict(convergence_tol=-0.1), "convergence_tol"),
    (dict(keep_checks="yes"), "keep_checks"),
    (dict(normalize_rewards=1), "normalize_rewards"),
    (dict(num_threads=0), "num_threads"),
    (dict(model=object()), "model"),
])
def test_bad_settings(kw, needle):
    with pytest.raises(ValueError, match=needle):
        DVRL(**kw)


def test_single_sample_baselines_run(bc):
    xs, ys, xt, yt, _ = bc
    for baseline in ("moving_average", "fixed"):
        r = DVRL(n_samples=1, baseline=baseline, seed=0, progress=False, n_iterations=20,
                 convergence_tol=0.0).fit(xs, ys, xt, yt)
        assert np.isfinite(r.values).all() and r.info["final_baseline"] is not None
