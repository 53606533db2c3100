"""The variance of semivalues under resampling of the data (semivalues/resampling.py) and
ValuationResult.ci: the estimators' arithmetic on synthetic draws with a known covariance, the
whole pipeline against the exact Hajek variance of a small game (every subset enumerated), and
the result API (interval, save/load, merge, errors)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dvgs_fast import DataShapley, ValuationResult
from dvgs_fast import _validation as V
from dvgs_fast.methods.semivalues import BetaShapley, ExactSemivalue
from dvgs_fast.methods.semivalues.resampling import _double_mc, _pick_freeze, frozen_weights
from dvgs_fast.methods.semivalues.utility import RefitUtility
from dvgs_fast.methods.semivalues.weights import BetaWeight, ShapleyWeight

REFIT = dict(refit_steps=10, refit_lr=0.3, dtype="float64", metric="neg_log_loss", progress=False)


def _game(n=6, m=30, seed=0, d=3):
    g = torch.Generator().manual_seed(seed)
    xs, xt = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(m, d, generator=g, dtype=torch.float64)
    w = torch.randn(d, generator=g, dtype=torch.float64)
    ys, yt = (xs @ w > 0).long(), (xt @ w > 0).long()
    ys[0], ys[1], ys[2] = 1 - ys[0], 0, 1
    return xs, ys, xt, yt


def _linear(d=3):
    torch.manual_seed(0)
    return torch.nn.Linear(d, 2)


def test_frozen_weights():
    for n in (2, 5, 40):
        m = n - 1
        w, pi = frozen_weights(ShapleyWeight().q(n))
        k = np.arange(n)
        assert pi == pytest.approx(0.5)                              # a given other point precedes i half the time
        np.testing.assert_allclose(w[1:], 2 * k[1:] / (m + 1))       # r(k) ~ k, sampled uniformly on 1..m
        assert w[0] == 0 and w[1:].mean() == pytest.approx(1.0)
        q = BetaWeight(4, 1).q(n)
        w, pi = frozen_weights(q)
        assert pi == pytest.approx((q * k).sum() / m) and w[1:].mean() == pytest.approx(1.0)


def test_estimators_are_unbiased_on_synthetic_draws():
    """X[g, l, i] = H[g, i] + noise: both estimators recover Var_g H (the noise has variance 4x)."""
    rng = np.random.default_rng(0)
    G, N, reps = 400, 5, 60
    sd_h = np.array([0.5, 1.0, 1.5, 2.0, 0.0])
    est_pf, est_dm = [], []
    for _ in range(reps):
        firsts = rng.integers(0, N, G)
        H = rng.normal(size=(G, 1, N)) * sd_h
        est_pf.append(_pick_freeze(H + 2 * sd_h.max() * rng.normal(size=(G, 2, N)), firsts))
        est_dm.append(_double_mc(H + 2 * sd_h.max() * rng.normal(size=(G, 6, N)), firsts))
    for est in (np.array(est_pf), np.array(est_dm)):
        mean, se = est.mean(0), est.std(0, ddof=1) / np.sqrt(reps)
        assert (np.abs(mean - sd_h ** 2) <= 4 * se + 1e-12).all(), (mean, sd_h ** 2, se)


def test_pipeline_matches_the_exact_hajek_variance():
    """On a 6-point game every subset is enumerated: the target m pi^2 Var_j H_i(j) exactly; the
    estimates (all subsets cached, so many permutations are cheap) agree in aggregate."""
    xs, ys, xt, yt = game = _game()
    N, m = 6, 5
    lin = _linear()
    spec = ExactSemivalue(lin, **REFIT)
    data = V.prepare_inputs(xs, ys, xt, yt, loss="cross_entropy", n_classes=None, device=torch.device("cpu"),
                            dtype=torch.float64, flatten=True)
    u = RefitUtility(spec, data, "neg_log_loss", seed=0)
    codes = np.arange(2 ** N)
    masks = (codes[:, None] >> np.arange(N)) & 1
    U, size = u.scores(masks.astype(bool)), masks.sum(1)
    for weight, make in ((ShapleyWeight(), lambda **kw: DataShapley(lin, max_permutations=2, convergence_tol=None,
                                                                   batch_permutations=64, **kw)),
                         (BetaWeight(4, 1), lambda **kw: BetaShapley(lin, alpha=4, beta=1, max_updates=2, batch_size=64,
                                                                     **kw))):
        w, pi = frozen_weights(weight.q(N))
        target = np.zeros(N)
        for i in range(N):
            H = [sum(w[k] / m * np.mean([U[c | 1 << i] - U[c] for c in codes
                                         if not c >> i & 1 and c >> j & 1 and size[c] == k]) for k in range(1, N))
                 for j in range(N) if j != i]
            target[i] = m * pi ** 2 * np.var(H)
        for kw in (dict(resampling_samples=3000), dict(resampling_samples=400, resampling_method="double_mc",
                                                         resampling_inner=12)):
            r = make(tolerance=None, seed=1, **kw, **REFIT).fit(*game)
            est = r.resampling_stderr ** 2
            assert r.info["resampling_samples"] == kw["resampling_samples"]
            assert 0.6 < est.sum() / target.sum() < 1.6, (weight.describe(), kw, est, target)


def test_ci_api_and_round_trip(tmp_path):
    xs, ys, xt, yt = _game(n=12, seed=3)
    kw = dict(max_permutations=20, convergence_tol=None, seed=0, **REFIT)
    r = DataShapley(_linear(), resampling_samples=30, **kw).fit(xs, ys, xt, yt)
    lo, hi = r.ci(0.95)
    assert lo.shape == hi.shape == (12,) and (lo <= r.values).all() and (r.values <= hi).all()
    lo9, hi9 = r.ci(0.99)
    assert (lo9 <= lo).all() and (hi <= hi9).all()
    half = (hi - lo) / 2
    np.testing.assert_allclose(half, 1.959963984540054 * np.sqrt(r.resampling_stderr ** 2 + r.stderr ** 2))
    assert (half >= 1.959963984540054 * r.stderr - 1e-15).all()       # never narrower than the MC error alone
    assert r.info["resampling_method"] == "pick_freeze" and "resampling" in r.timings
    back = ValuationResult.load(r.save(tmp_path / "r.npz"))
    np.testing.assert_array_equal(back.resampling_stderr, r.resampling_stderr)
    np.testing.assert_array_equal(back.ci(0.9)[0], r.ci(0.9)[0])
    other = DataShapley(_linear(), resampling_samples=30, **{**kw, "seed": 1}).fit(xs, ys, xt, yt)
    both = r + other
    np.testing.assert_allclose(both.resampling_stderr ** 2, (r.resampling_stderr ** 2 + other.resampling_stderr ** 2) / 2)
    plain = DataShapley(_linear(), **{**kw, "seed": 2}).fit(xs, ys, xt, yt)     # another run: pooling refuses one run twice
    assert plain.resampling_stderr is None and (r + plain).resampling_stderr is None
    with pytest.raises(ValueError, match="resampling_samples"):
        plain.ci(0.95)
    for bad in (0, 1, 1.5, -0.1, True, "0.9"):
        with pytest.raises(ValueError, match="level"):
            r.ci(bad)
    with pytest.raises(ValueError, match="resampling_stderr"):
        ValuationResult(values=np.zeros(3), method="x", resampling_stderr=np.zeros(2))
