"""The semivalue core (dvgs_fast.methods.semivalues): every sampler against the exact values of a
small game (all 2^N subsets refit), the weights, the stopping rules, the cache, determinism and
input checks. The resampling variance and result.ci are in test_semivalue_ci.py, the KNN closed
form of asymmetric Shapley in test_knn_asymmetric.py."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import betaln, comb

from dvgs_fast import DataShapley
from dvgs_fast.methods.base import BudgetWarning
from dvgs_fast.methods.semivalues import (AsymmetricShapley, BetaShapley, DataBanzhaf, ExactSemivalue,
                                          HistoryDeviation, MaxTime, MaxUpdates, RankStable, Semivalue,
                                          StderrBelow)
from dvgs_fast.methods.semivalues.exact import asymmetric_from_table, semivalues_from_table
from dvgs_fast.methods.semivalues.stopping import Progress
from dvgs_fast.methods.semivalues.weights import BanzhafWeight, BetaWeight, ShapleyWeight

# one small game: 8 points, 2 classes, a logistic refit scored by log-loss (continuous values).
# The refits start from the given module's weights, so the game does not depend on the seed
# (with model="logistic" the initial weights are drawn from it).
REFIT = dict(refit_steps=10, refit_lr=0.3, dtype="float64", metric="neg_log_loss", progress=False)


def _linear(d=3, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(d, 2)


def _mlp(d=3, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(d, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))


def _game(n=8, m=30, seed=0, d=3):
    g = torch.Generator().manual_seed(seed)
    xs, xt = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(m, d, generator=g, dtype=torch.float64)
    w = torch.randn(d, generator=g, dtype=torch.float64)
    ys, yt = (xs @ w > 0).long(), (xt @ w > 0).long()
    ys[0] = 1 - ys[0]                                    # one flipped label
    ys[1], ys[2] = 0, 1                                  # both classes present
    return xs, ys, xt, yt


@pytest.fixture(scope="module")
def game():
    return _game()


@pytest.fixture(scope="module")
def exact(game):
    out = {}
    for name, w in (("shapley", "shapley"), ("banzhaf", "banzhaf"), ("beta4", ("beta", 4, 1)),
                    ("beta16", ("beta", 16, 1))):
        out[name] = ExactSemivalue(LINEAR, weight=w, **REFIT).fit(*game)
    out["asym"] = ExactSemivalue(LINEAR, groups=GROUPS, order=ORDER, **REFIT).fit(*game)
    return out


LINEAR = _linear()
GROUPS = np.array([1, 1, 0, 0, 0, 2, 2, 1])
ORDER = [2, 0, 1]


def _within_stderr(mc, ex, k=4.0):
    """Every Monte Carlo value within k standard errors of the exact one (exact where the
    marginals never varied, stderr 0)."""
    se = np.nan_to_num(mc.stderr)
    err = np.abs(mc.values - ex.values)
    assert (err <= k * se + 1e-9).all(), (err / np.maximum(se, 1e-12), mc.values, ex.values)
    assert (se > 0).sum() >= len(se) // 2                 # the check is not vacuous


# ------------------------------------------------------------------------------- weights
@pytest.mark.parametrize("n", [1, 2, 7, 50, 3000])
def test_weights_are_size_distributions(n):
    for w in (ShapleyWeight(), BanzhafWeight(), BetaWeight(16, 1), BetaWeight(0.5, 2)):
        q = w.q(n)
        assert q.shape == (n,) and np.all(q >= 0) and q.sum() == pytest.approx(1.0, rel=1e-9)
        # w(k) C(n-1, k) = q(k), the permutation weight n q(k)
        k = np.arange(n)
        if n <= 50:
            np.testing.assert_allclose(w.coefficient(n) * comb(n - 1, k), q, rtol=1e-9)
    np.testing.assert_allclose(BetaWeight(1, 1).q(n), ShapleyWeight().q(n), rtol=1e-9)
    assert np.all(ShapleyWeight().permutation_weights(n) == 1.0)


def test_weights_match_the_papers_formulas():
    n = 9
    k = np.arange(n)
    # Beta(a, b): w(k) = B(k + b, n - 1 - k + a) / B(a, b) (Kwon & Zou eq. 5; pyDVL's coefficient)
    a, b = 16.0, 1.0
    np.testing.assert_allclose(BetaWeight(a, b).coefficient(n),
                               np.exp(betaln(k + b, n - 1 - k + a) - betaln(a, b)), rtol=1e-12)
    np.testing.assert_allclose(BanzhafWeight().coefficient(n), np.full(n, 0.5 ** (n - 1)), rtol=1e-12)
    np.testing.assert_allclose(ShapleyWeight().coefficient(n), 1.0 / (n * comb(n - 1, k)), rtol=1e-12)


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), True, "1"])
def test_bad_beta_parameters(bad):
    with pytest.raises(ValueError, match="alpha"):
        BetaWeight(bad, 1.0)
    with pytest.raises(ValueError, match="beta"):
        BetaShapley(alpha=1.0, beta=bad, max_updates=1)


# ------------------------------------------------------------------ exact tables (no refits)
def test_exact_formulas_on_known_games():
    # additive game U(S) = sum of c_i: every semivalue is c_i; asymmetric too
    rng = np.random.default_rng(1)
    for n in (1, 3, 6):
        c = rng.normal(size=n)
        codes = np.arange(2 ** n)
        U = ((codes[:, None] >> np.arange(n)) & 1) @ c
        for w in (ShapleyWeight(), BanzhafWeight(), BetaWeight(3, 2)):
            np.testing.assert_allclose(semivalues_from_table(U, w.coefficient(n)), c, atol=1e-12)
        np.testing.assert_allclose(asymmetric_from_table(U, [np.arange(n)[::-1]]), c, atol=1e-12)
    # unanimity game of {0, 1} (U = 1 iff both present): Shapley 1/2 each; asymmetric with 0
    # first: all to the later point 1; Banzhaf 1/2 each
    U = np.array([0.0, 0.0, 0.0, 1.0])
    np.testing.assert_allclose(semivalues_from_table(U, ShapleyWeight().coefficient(2)), [0.5, 0.5])
    np.testing.assert_allclose(asymmetric_from_table(U, [np.array([0]), np.array([1])]), [0.0, 1.0])
    np.testing.assert_allclose(semivalues_from_table(U, BanzhafWeight().coefficient(2)), [0.5, 0.5])


def test_exact_efficiency_and_one_group(game, exact):
    sh, asym = exact["shapley"], exact["asym"]
    total = sh.info["full_score"] - sh.info["empty_score"]
    assert sh.values.sum() == pytest.approx(total, abs=1e-9)          # efficiency
    assert asym.values.sum() == pytest.approx(total, abs=1e-9)
    one = ExactSemivalue(LINEAR, groups=np.zeros(8), **REFIT).fit(*game)
    np.testing.assert_allclose(one.values, sh.values, atol=1e-12)
    assert not np.allclose(asym.values, sh.values)


# ------------------------------------------------------ Monte Carlo == exact within stderr
def test_tmc_shapley_matches_exact(game, exact):
    mc = DataShapley(LINEAR, max_permutations=300, convergence_tol=None, tolerance=None, seed=1, **REFIT).fit(*game)
    _within_stderr(mc, exact["shapley"])
    assert mc.info["cache_hits"] > 0 and mc.info["utility_refits"] < 8 * 300      # cached prefixes not refit


@pytest.mark.parametrize("alpha, name", [(4, "beta4"), (16, "beta16")])
def test_beta_shapley_matches_exact(game, exact, alpha, name):
    mc = BetaShapley(LINEAR, alpha=alpha, beta=1, max_updates=400, tolerance=None, seed=2, **REFIT).fit(*game)
    assert mc.method == "beta_shapley" and mc.info["semivalue"] == f"beta({alpha}, 1)"
    _within_stderr(mc, exact[name])


def test_msr_banzhaf_matches_exact(game, exact):
    mc = DataBanzhaf(LINEAR, max_updates=3000, seed=3, **REFIT).fit(*game)
    assert mc.method == "banzhaf" and mc.info["sampler"] == "msr"
    _within_stderr(mc, exact["banzhaf"])
    assert (mc.counts > 1000).all()


def test_banzhaf_by_weighted_permutations_matches_exact(game, exact):
    mc = Semivalue(LINEAR, weight="banzhaf", sampler="permutation", tolerance=None, max_updates=600, seed=4,
                   **REFIT).fit(*game)
    _within_stderr(mc, exact["banzhaf"])


def test_asymmetric_shapley_matches_exact(game, exact):
    mc = AsymmetricShapley(LINEAR, groups=GROUPS, order=ORDER, max_updates=300, tolerance=None, seed=5, **REFIT).fit(*game)
    _within_stderr(mc, exact["asym"])
    assert mc.method == "asymmetric_shapley"


class _Centroids:
    """A tiny scikit-learn-style classifier (nearest class mean): the sklearn refit path without
    the seconds a solver would cost."""

    def get_params(self, deep=True):
        return {}

    def set_params(self, **kw):
        return self

    def fit(self, x, y):
        self.classes_ = np.unique(y)
        self.means_ = np.stack([x[y == c].mean(0) for c in self.classes_])
        return self

    def predict(self, x):
        return self.classes_[((x[:, None, :] - self.means_[None]) ** 2).sum(-1).argmin(1)]


def test_mlp_and_sklearn_utilities_match_exact():
    small = _game(n=5, seed=2)
    kw = dict(model=_mlp(), weight=("beta", 4, 1), **REFIT)
    ex = ExactSemivalue(**kw).fit(*small)
    mc = Semivalue(tolerance=None, max_updates=150, seed=6, **kw).fit(*small)
    assert mc.info["engine"] == "mlp" and ex.info["engine"] == "mlp"
    _within_stderr(mc, ex)
    small = _game(n=7, seed=2)
    ex = ExactSemivalue(_Centroids(), metric="accuracy", progress=False).fit(*small)
    mc = DataBanzhaf(_Centroids(), metric="accuracy", max_updates=1500, seed=7, progress=False).fit(*small)
    assert mc.info["engine"] == "sklearn"
    _within_stderr(mc, ex)


@pytest.mark.parametrize("loss, kw", [("cross_entropy", dict(weight_decay=0.01)), ("mse", dict(refit_optimizer="sgd"))])
def test_mlp_engine_equals_vmap(loss, kw):
    """The hand-derived MLP grid (refit/batched_mlp.py) trains the same networks as vmap."""
    xs, ys, xt, yt = _game(n=25, m=20, seed=5)
    if loss == "mse":
        ys, yt = xs[:, 0] - xs[:, 1], xt[:, 0] - xt[:, 1]
    mlp = torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.ReLU(), torch.nn.Linear(6, 1 if loss == "mse" else 2))
    base = dict(model=mlp, loss=loss, refit_steps=12, refit_lr=0.05, dtype="float64", progress=False, seed=3,
                cache=False, **kw)
    for make in (lambda **k: DataShapley(max_permutations=3, convergence_tol=None, chunk_size=5, **k),
                 lambda **k: DataBanzhaf(max_updates=20, batch_size=8, **k),
                 lambda **k: DataShapley(method="gshapley", g_learning_rate=0.1, max_permutations=2, **k)):
        a = make(batch_engine="auto", **base).fit(xs, ys, xt, yt)
        b = make(batch_engine="vmap", **base).fit(xs, ys, xt, yt)
        assert a.info["engine"] == "mlp" and b.info["engine"] == "vmap"
        np.testing.assert_allclose(a.values, b.values, atol=1e-9, rtol=0)
    with pytest.raises(ValueError, match="batch_engine"):
        DataBanzhaf(model="logistic", loss=loss, batch_engine="mlp", max_updates=2, progress=False).fit(xs, ys, xt, yt)


def test_exact_refuses_large_games(game):
    xs, ys, xt, yt = _game(n=12)
    with pytest.raises(ValueError, match="max_n"):
        ExactSemivalue(max_n=10, progress=False).fit(xs, ys, xt, yt)
    with pytest.raises(ValueError, match="max_n"):
        ExactSemivalue(max_n=30)
    with pytest.raises(ValueError, match="weight"):
        ExactSemivalue(weight="banzhaf", groups=[0, 1])


# ------------------------------------------------------------------- paths agree, seeds
@pytest.mark.parametrize("cls, kw", [
    (BetaShapley, dict(max_updates=6, tolerance=0.05)),
    (DataBanzhaf, dict(max_updates=40, batch_size=7)),
    (AsymmetricShapley, dict(groups=np.arange(20) % 3, max_updates=5)),
])
def test_batched_equals_sequential_and_seeds_reproduce(cls, kw):
    xs, ys, xt, yt = _game(n=20, m=25, seed=3)
    base = dict(seed=9, cache=False, **REFIT, **kw)
    a = cls(batched=True, **base).fit(xs, ys, xt, yt)
    b = cls(batched=False, **base).fit(xs, ys, xt, yt)
    np.testing.assert_allclose(a.values, b.values, atol=1e-9, rtol=0)
    c = cls(batched=True, **base).fit(xs, ys, xt, yt)
    np.testing.assert_array_equal(a.values, c.values)
    d = cls(batched=True, **{**base, "seed": 10}).fit(xs, ys, xt, yt)
    assert not np.array_equal(a.values, d.values)
    e = cls(batched=True, **{**base, "cache": True}).fit(xs, ys, xt, yt)   # the cache changes nothing
    np.testing.assert_allclose(a.values, e.values, atol=1e-9, rtol=0)


def test_tmc_values_do_not_depend_on_the_cache():
    xs, ys, xt, yt = _game(n=30, m=25, seed=4)
    kw = dict(max_permutations=6, convergence_tol=None, seed=2, **REFIT)
    a = DataShapley(cache=True, **kw).fit(xs, ys, xt, yt)
    b = DataShapley(cache=False, **kw).fit(xs, ys, xt, yt)
    np.testing.assert_allclose(a.values, b.values, atol=1e-9, rtol=0)
    assert a.info["mean_refits_per_permutation"] == b.info["mean_refits_per_permutation"]
    assert "cache_hits" in a.info and "cache_hits" not in b.info


def test_single_point_and_regression():
    x = torch.randn(1, 3, dtype=torch.float64)
    y = torch.tensor([1])
    xt, yt = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1])
    ex = ExactSemivalue(**REFIT).fit(x, y, xt, yt)          # one class only: U = chance always
    assert ex.values.tolist() == [0.0]
    r = DataBanzhaf(max_updates=20, seed=0, progress=False).fit(x, y, xt, yt)
    assert r.values.shape == (1,) and np.isfinite(r.values).all()
    # regression: MSE refits, neg_mse utility
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(7, 2, generator=g, dtype=torch.float64)
    ys = xs @ torch.tensor([1.0, -2.0], dtype=torch.float64)
    kw = dict(loss="mse", refit_steps=10, refit_lr=0.3, dtype="float64", progress=False)
    lin = torch.nn.Linear(2, 1)
    ex = ExactSemivalue(lin, weight=("beta", 4, 1), **kw).fit(xs, ys, xs, ys)
    mc = BetaShapley(lin, alpha=4, beta=1, tolerance=None, max_updates=300, seed=1, **kw).fit(xs, ys, xs, ys)
    _within_stderr(mc, ex)


# ---------------------------------------------------------------------- stopping rules
def _prog(samples, values, stderr, elapsed=0.0, history=None):
    v = np.asarray(values, dtype=float)
    return Progress(samples=samples, elapsed=elapsed, values=v, stderr=np.asarray(stderr, dtype=float),
                    counts=np.full(len(v), samples), history=history)


def test_rules_compose():
    cap, clock = MaxUpdates(10), MaxTime(5.0)
    se = StderrBelow(0.1, min_samples=2)
    either, both = se | cap, se & cap
    p = _prog(12, [1, 2], [0.5, 0.5])
    assert either.check(p) is cap and both.check(p) is None
    p = _prog(3, [1, 2], [0.05, 0.01])
    assert either.check(p) is se and both.check(p) is None
    p = _prog(11, [1, 2], [0.05, 0.01])
    assert both.check(p) is both and both.status == "converged"
    assert (se | cap | clock).max_samples() == 10 and (se | cap | clock).deadline() == 5.0
    assert (se & cap).max_samples() is None and (cap & MaxUpdates(20)).max_samples() == 20
    assert clock.check(_prog(1, [0], [1], elapsed=6.0)) is clock and clock.status == "stopped"
    assert cap.status == "completed"
    assert repr(se | (cap & clock)) == "StderrBelow(0.1) | (MaxUpdates(10) & MaxTime(5))"
    with pytest.raises(ValueError, match="stop"):
        _ = cap | 3


def test_stderr_rule_relative_and_fraction():
    r = StderrBelow(0.1, relative=True, fraction=0.3, min_samples=2)
    assert r.check(_prog(5, [1.0, 10.0, 0.0], [0.2, 0.5, 0.1])) is r          # 10 +- 0.5 is within 10%
    assert r.check(_prog(5, [1.0, 10.0, 0.0], [0.2, 2.0, 0.1])) is None       # none is
    assert r.check(_prog(5, [1.0, 10.0, 0.0], [0.2, 2.0, 0.0])) is r          # a 0 +- 0 value counts
    assert StderrBelow(1.0, min_samples=10).check(_prog(5, [0.0], [0.0])) is None     # too early
    assert StderrBelow(1.0).check(_prog(20, [0.0], [np.nan])) is None               # unknown spread


def test_rank_stability_and_history_rules():
    r = RankStable(k=1, patience=2, min_samples=1)
    assert r.check(_prog(1, [0, 1, 2], [0, 0, 0])) is None
    assert r.check(_prog(2, [0, 1.5, 2], [0, 0, 0])) is None                       # same sets: 1
    assert r.check(_prog(3, [0, 1.7, 2], [0, 0, 0])) is r                          # same sets: 2
    assert r.check(_prog(4, [3, 1.7, 2], [0, 0, 0])) is None                       # bottom changed
    r.reset()
    assert r.check(_prog(5, [3, 1.7, 2], [0, 0, 0])) is None
    h = HistoryDeviation(tol=0.05, window=3)
    flat = np.ones((3, 2))
    assert h.check(_prog(2, [1, 1], [0, 0], history=lambda: flat[:2])) is None
    assert h.check(_prog(3, [1, 1], [0, 0], history=lambda: flat)) is h and h.last_error == 0.0
    for bad in (lambda: MaxUpdates(0), lambda: MaxTime(-1), lambda: StderrBelow(0), lambda: RankStable(k=0),
                lambda: HistoryDeviation(window=1), lambda: StderrBelow(1, fraction=2)):
        with pytest.raises(ValueError):
            bad()


def test_fits_stop_by_the_rule_that_fired(game):
    r = BetaShapley(LINEAR, alpha=4, beta=1, stop=StderrBelow(0.05, min_samples=5) | MaxUpdates(5000), check_every=5,
                    seed=0, **REFIT).fit(*game)
    assert r.status == "converged" and r.info["stopped_by"] == "StderrBelow(0.05)"
    n = r.info["permutations_done"]
    assert n % 5 == 0 and n < 5000 and np.nanmax(r.stderr) <= 0.05
    r = DataBanzhaf(stop=RankStable(k=2, patience=3) & MaxUpdates(100), check_every=10, seed=0, **REFIT).fit(*game)
    assert r.status == "converged" and r.info["stopped_by"] == "RankStable(k=2, patience=3) & MaxUpdates(100)"
    assert r.info["subsets_done"] >= 100
    r = DataBanzhaf(max_updates=30, check_every=7, seed=0, **REFIT).fit(*game)
    assert r.status == "completed" and r.info["stopped_by"] == "max_updates" and r.info["subsets_done"] == 30
    xs, ys, xt, yt = _game(n=300, m=50, seed=1)
    with pytest.warns(BudgetWarning, match="MaxTime"):
        r = DataShapley(stop=MaxTime(0.5), convergence_tol=None, seed=0, progress=False).fit(xs, ys, xt, yt)
    assert r.status == "stopped" and r.info["stopped_by"] == "MaxTime(0.5)"
    with pytest.warns(BudgetWarning, match="max_time"):
        r = DataBanzhaf(max_time=0.5, seed=0, progress=False, batch_size=8).fit(xs, ys, xt, yt)
    assert r.status == "stopped" and r.info["stopped_by"] == "max_time" and np.isfinite(r.values).all()


# ------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("make, needle", [
    (lambda: Semivalue(weight="shapley", sampler="msr", max_updates=1), "sampler"),
    (lambda: Semivalue(weight="owen", max_updates=1), "weight"),
    (lambda: Semivalue(max_updates=0), "max_updates"),
    (lambda: BetaShapley(), "stop"),
    (lambda: DataBanzhaf(stop=3), "stop"),
    (lambda: DataBanzhaf(max_updates=1, tolerance=0.1), "tolerance"),
    (lambda: DataBanzhaf(max_updates=1, resampling_samples=5), "resampling_samples"),
    (lambda: Semivalue(weight="banzhaf", sampler="msr", max_updates=1, resampling_samples=5), "resampling_samples"),
    (lambda: BetaShapley(max_updates=1, weight="banzhaf"), "weight"),
    (lambda: AsymmetricShapley(max_updates=1), "groups"),
    (lambda: AsymmetricShapley(groups=[[0, 1]], max_updates=1), "groups"),
    (lambda: AsymmetricShapley(groups=[0, 1], order=[0, 0, 1], max_updates=1), "order"),
    (lambda: AsymmetricShapley(groups=[0, 1], order=[0], max_updates=1), "order"),
    (lambda: BetaShapley(max_updates=1, batch_size=0), "batch_size"),
    (lambda: BetaShapley(max_updates=1, metric="f1"), "metric"),
    (lambda: BetaShapley(max_updates=1, model="resnet"), "model"),
    (lambda: DataShapley(max_permutations=1, resampling_samples=1), "resampling_samples"),
    (lambda: DataShapley(method="gshapley", max_permutations=1, resampling_samples=4), "resampling_samples"),
])
def test_bad_settings_fail_at_construction(make, needle):
    with pytest.raises(ValueError, match=needle):
        make()


def test_bad_data_fails_before_refits(game):
    xs, ys, xt, yt = game
    with pytest.raises(ValueError, match="groups"):
        AsymmetricShapley(groups=[0, 1, 2], max_updates=1, progress=False).fit(xs, ys, xt, yt)
    bad = xs.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="x_source"):
        DataBanzhaf(max_updates=1, progress=False).fit(bad, ys, xt, yt)
    with pytest.raises(ValueError, match="y_source"):
        BetaShapley(max_updates=1, progress=False).fit(xs, ys[:-1], xt, yt)


def test_settings_and_exports_follow_the_signature():
    import dvgs_fast
    s = BetaShapley(alpha=8, max_updates=5, stop=StderrBelow(0.01)).settings()
    assert s["alpha"] == 8 and s["max_updates"] == 5 and s["stop"] == "StderrBelow(0.01)"
    assert "weight" not in s and "sampler" not in s
    s = DataBanzhaf(max_updates=5).settings()
    assert s["batch_size"] == 64 and "tolerance" not in s
    for name in ("BetaShapley", "DataBanzhaf", "AsymmetricShapley", "Semivalue", "ExactSemivalue", "LAVA"):
        assert hasattr(dvgs_fast, name)
    assert math.isclose(BetaWeight(16, 1).q(3).sum(), 1.0)
