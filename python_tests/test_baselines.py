"""Reference baselines: DVRL, Data Shapley (TMC / G-Shapley, sequential and batched), LOO, random.

Data: scikit-learn's breast_cancer (min-max scaled), 300 source / 150 target, 20% of the source
labels flipped. Budgets are small (seconds per method); the whole module runs in about a minute
on 2 cores with one intra-op thread (set by the fixture below and restored afterwards).
"""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from torch import nn

import dvgs_fast
from dvgs_fast import DVRL, DataShapley, LeaveOneOut, RandomValuation, ValuationResult
from dvgs_fast.methods.base import BudgetWarning
from dvgs_fast.methods.semivalues.stopping import HistoryDeviation, Progress
from dvgs_fast.evaluate import detection_auroc

from _tasks import flipped_task

ALL = (DVRL, DataShapley, LeaveOneOut, RandomValuation)


@pytest.fixture(scope="module")
def bc():
    return flipped_task(300, 150, split_seed=0, flip_seed=1)


@pytest.fixture(scope="module")
def small(bc):
    """60 source points: for comparisons with the (slow) sequential reference."""
    xs, ys, xt, yt, flipped = bc
    return xs[:60], ys[:60], xt, yt, flipped[:60]


# quick settings per method (the AUROC test uses these; reproducibility uses smaller ones)
QUICK = {
    "tmc": (DataShapley, dict(method="tmc", max_permutations=12)),
    "gshapley": (DataShapley, dict(method="gshapley", max_permutations=32)),
    "loo": (LeaveOneOut, dict()),
    "dvrl": (DVRL, dict(n_iterations=150)),
}


# ----------------------------------------------------------------------------- detection
@pytest.mark.parametrize("name", list(QUICK))
def test_detects_flipped_labels(bc, name):
    xs, ys, xt, yt, flipped = bc
    cls, kw = QUICK[name]
    res = cls(seed=0, progress=False, **kw).fit(xs, ys, xt, yt)     # speed is measured in bench/, not here
    auroc = detection_auroc(res.values, flipped)
    assert auroc > 0.6, f"{name}: AUROC {auroc:.3f} (info {res.info})"
    assert res.values.shape == (300,) and np.isfinite(res.values).all()


def test_random_values_are_chance(bc):
    xs, ys, xt, yt, flipped = bc
    res = RandomValuation(seed=0).fit(xs, ys, xt, yt)
    assert res.method == "random" and res.values.shape == (300,)
    assert ((res.values >= 0) & (res.values < 1)).all()
    assert 0.3 < detection_auroc(res.values, flipped) < 0.7
    # salted stream: not the caller's np.random.default_rng(seed) sequence
    assert not np.allclose(res.values, np.random.default_rng(0).random(300))


def test_random_without_labels_autoencoder_task():
    """With loss='mse' and no labels (an autoencoder task) random still values every row, the same
    values as with labels (they depend on the seed and N only); shapes are still checked, and a
    missing label set on a labelled task, or cross-entropy without labels, is refused."""
    g = np.random.default_rng(4)
    xs, xt = g.normal(size=(12, 5)), g.normal(size=(4, 5))
    res = RandomValuation(loss="mse", seed=3, progress=False).fit(xs, None, xt, None)
    assert res.values.shape == (12,) and res.counts.tolist() == [1] * 12
    labelled = RandomValuation(loss="mse", seed=3, progress=False).fit(xs, g.normal(size=12), xt, g.normal(size=4))
    np.testing.assert_array_equal(res.values, labelled.values)
    with pytest.raises(ValueError, match="x_target"):
        RandomValuation(loss="mse", seed=3).fit(xs, None, g.normal(size=(4, 6)), None)
    with pytest.raises(ValueError, match="y_target: is None"):
        RandomValuation(loss="mse", seed=3).fit(xs, g.normal(size=12), xt, None)
    with pytest.raises(ValueError, match="y_source"):
        RandomValuation(seed=3).fit(xs, None, xt, None)


# ----------------------------------------------------------------------------- reproducibility
REPRO = {
    "tmc_batched": (DataShapley, dict(max_permutations=2)),
    "tmc_sequential": (DataShapley, dict(max_permutations=1, batched=False, refit_steps=10)),
    "gshapley": (DataShapley, dict(method="gshapley", max_permutations=4, g_learning_rate=0.01)),
    "loo": (LeaveOneOut, dict(max_points=40)),
    "dvrl": (DVRL, dict(n_iterations=5, inner_iterations=10)),
    "random": (RandomValuation, dict()),
}


@pytest.mark.parametrize("name", list(REPRO))
def test_fixed_seed_reproduces_values(bc, small, name):
    cls, kw = REPRO[name]
    xs, ys, xt, yt, _ = small if name == "tmc_sequential" else bc
    a = cls(seed=3, progress=False, **kw).fit(xs, ys, xt, yt)
    b = cls(seed=3, progress=False, **kw).fit(xs, ys, xt, yt)
    np.testing.assert_array_equal(a.values, b.values)
    if name != "random":
        c = cls(seed=4, progress=False, **kw).fit(xs, ys, xt, yt)
        assert not np.array_equal(a.values, c.values)


# ----------------------------------------------------------------------------- batched == sequential
@pytest.mark.parametrize("model, dtype", [("logistic", "float64"), ("mlp", "float64"), ("logistic", "float32")])
def test_batched_tmc_matches_sequential_reference(small, model, dtype):
    """Same seed -> same permutations -> same values, with truncation happening at different
    positions inside the batched groups."""
    xs, ys, xt, yt, _ = small
    kw = dict(model=model, hidden_dim=8, max_permutations=5, refit_steps=15, dtype=dtype, seed=11,
              progress=False, tolerance=0.02, batch_permutations=3, chunk_size=7, keep_marginals=True)
    seq = DataShapley(batched=False, **kw).fit(xs, ys, xt, yt)
    bat = DataShapley(batched=True, **kw).fit(xs, ys, xt, yt)
    assert seq.info["engine"] == "sequential"
    assert bat.info["engine"] == ("linear" if model == "logistic" else "mlp")
    # truncation did happen, and not at the same place in every permutation
    refits = (seq.snapshots != 0).sum(0)
    assert seq.info["truncated_fraction"] > 0 and len(set(refits.tolist())) > 1, seq.info
    assert seq.info["mean_refits_per_permutation"] == bat.info["mean_refits_per_permutation"]
    atol = 1e-9 if dtype == "float64" else 1e-5
    np.testing.assert_allclose(bat.snapshots, seq.snapshots, atol=atol, rtol=0)
    np.testing.assert_allclose(bat.values, seq.values, atol=atol, rtol=0)


def test_batched_engines_agree_on_logistic(small):
    xs, ys, xt, yt, _ = small
    kw = dict(max_permutations=4, refit_steps=15, dtype="float64", seed=5, progress=False)
    lin = DataShapley(batch_engine="linear", **kw).fit(xs, ys, xt, yt)
    vm = DataShapley(batch_engine="vmap", **kw).fit(xs, ys, xt, yt)
    np.testing.assert_allclose(lin.values, vm.values, atol=1e-9)


def test_batched_gshapley_and_loo_match_sequential(small):
    xs, ys, xt, yt, _ = small
    kw = dict(method="gshapley", max_permutations=3, g_learning_rate=0.05, dtype="float64", seed=2,
              progress=False)
    a = DataShapley(batched=True, **kw).fit(xs, ys, xt, yt)
    b = DataShapley(batched=False, **kw).fit(xs, ys, xt, yt)
    np.testing.assert_allclose(a.values, b.values, atol=1e-9)
    kw = dict(refit_steps=15, dtype="float64", seed=2, progress=False, max_points=12, batch_size=5)
    a = LeaveOneOut(batched=True, **kw).fit(xs, ys, xt, yt)
    b = LeaveOneOut(batched=False, **kw).fit(xs, ys, xt, yt)
    assert a.info["points_done"] == b.info["points_done"] == 12
    np.testing.assert_allclose(a.values, b.values, atol=1e-9)
    assert (a.values != 0).sum() > 6


def test_multiclass_and_regression_run(bc):
    from sklearn.datasets import load_digits
    x, y = load_digits(return_X_y=True)
    x = x / 16.0
    res = DataShapley(max_permutations=2, seed=0, progress=False).fit(x[:80], y[:80], x[100:200], y[100:200])
    assert res.values.shape == (80,) and res.info["engine"] == "linear"
    seq = DataShapley(max_permutations=1, seed=0, progress=False, batched=False, refit_steps=5,
                      dtype="float64").fit(x[:30], y[:30], x[100:200], y[100:200])
    bat = DataShapley(max_permutations=1, seed=0, progress=False, refit_steps=5,
                      dtype="float64").fit(x[:30], y[:30], x[100:200], y[100:200])
    np.testing.assert_allclose(seq.values, bat.values, atol=1e-9)
    # regression: targets of the corrupted points replaced by noise
    g = np.random.default_rng(0)
    xr = g.normal(size=(260, 5))
    yr = xr @ g.normal(size=5) + 0.1 * g.normal(size=260)
    bad = np.zeros(200, bool)
    bad[:40] = True
    ys = yr[:200].copy()
    ys[bad] = g.normal(scale=3 * yr.std(), size=40)
    for cls, kw in ((DataShapley, dict(max_permutations=8)), (LeaveOneOut, dict()),
                    (DVRL, dict(n_iterations=30, metric="neg_mse"))):
        r = cls(loss="mse", seed=0, progress=False, **kw).fit(xr[:200], ys, xr[200:], yr[200:])
        assert r.values.shape == (200,) and np.isfinite(r.values).all()
        if cls is not DVRL:
            assert detection_auroc(r.values, bad) > 0.6, cls.__name__


# ----------------------------------------------------------------------------- budgets
@pytest.mark.parametrize("name", ["tmc", "tmc_sequential", "gshapley", "loo", "dvrl"])
def test_max_time_stops_cleanly(bc, name):
    xs, ys, xt, yt, _ = bc
    cls, kw = {
        "tmc": (DataShapley, dict()),
        "tmc_sequential": (DataShapley, dict(batched=False)),
        "gshapley": (DataShapley, dict(method="gshapley", g_learning_rate=0.01)),
        "loo": (LeaveOneOut, dict(batched=False)),
        "dvrl": (DVRL, dict(n_iterations=100_000)),
    }[name]
    budget = 1.5
    t0 = time.perf_counter()
    with pytest.warns(BudgetWarning, match="stopped early by max_time"):
        res = cls(max_time=budget, seed=0, progress=False, **kw).fit(xs, ys, xt, yt)
    elapsed = time.perf_counter() - t0
    assert res.info["stopped_by"] == "max_time", res.info
    assert res.status == "stopped"
    # The setup (the models every estimate needs: DVRL's target and full-data predictors, the
    # reference scores) is not skippable; on a loaded machine it can outlast the budget by itself,
    # and then the run stops right after it, before its first iteration.
    setup = res.timings.get("setup", 0.0)
    assert elapsed < max(budget, setup) + 4.0, f"{name}: {elapsed:.1f}s for a {budget}s budget (setup {setup:.1f}s)"
    assert np.isfinite(res.values).all()
    if name in ("tmc", "gshapley"):
        done = res.info["permutations_done"]
        assert isinstance(done, int) and (done >= 1 or name == "tmc")
        assert (res.counts == done).all()
    if name == "dvrl":
        assert isinstance(res.info["iterations_done"], int)
        assert res.info["iterations_done"] >= 1 or setup >= budget
    if name == "loo":
        done = res.info["points_done"]
        assert 0 < done < 300 and (res.values != 0).sum() <= done
        assert (res.counts > 0).sum() == done and set(np.unique(res.counts)) <= {0, 1}


def test_batched_tmc_budget_within_one_refit_and_progress_counts_refits(capsys):
    # Issue 34: on digits (1000 source, 10 classes) one round of the batched grid trains 512
    # models and takes seconds, longer than a short budget; the budget is asked between the
    # grid's optimizer steps, and the bar counts refits before any permutation is done.
    from dvgs_fast.datasets import flip_labels, load_digits
    sp = load_digits().split(n_source=1000, n_target=200, n_test=100, seed=0)
    y, _ = flip_labels(sp.y_source, 0.2, seed=0)
    t0 = time.perf_counter()
    with pytest.warns(BudgetWarning):
        res = DataShapley(max_time=1.0, seed=0).fit(sp.x_source, y, sp.x_target, sp.y_target)
    elapsed = time.perf_counter() - t0
    assert res.status == "stopped" and res.info["permutations_done"] == 0 and (res.counts == 0).all()
    assert elapsed < max(1.0, res.timings["setup"]) + 1.5, (elapsed, res.timings)
    err = capsys.readouterr().err
    assert "refit" in err and "perm]" not in err
    seen = []
    from dvgs_fast.methods.semivalues import driver
    orig = driver.SampleDriver.refitted
    try:
        driver.SampleDriver.refitted = lambda self, n: (seen.append((n, self.stats.samples)), orig(self, n))
        DataShapley(max_permutations=2, seed=0, progress=False).fit(sp.x_source[:80], y[:80], sp.x_target,
                                                                     sp.y_target)
    finally:
        driver.SampleDriver.refitted = orig
    assert seen and seen[0] == (2 * 32, 0)        # the first grid's 2 permutations x 32 refits, none done yet


def test_iteration_budgets(bc):
    xs, ys, xt, yt, _ = bc
    r = DataShapley(max_permutations=3, seed=0, progress=False).fit(xs, ys, xt, yt)
    assert r.info["stopped_by"] == "max_permutations" and r.info["permutations_done"] == 3
    r = DVRL(n_iterations=4, inner_iterations=5, seed=0, progress=False).fit(xs, ys, xt, yt)
    assert r.info["stopped_by"] == "max_iterations" and r.info["iterations_done"] == 4
    r = LeaveOneOut(max_points=10, seed=0, progress=False).fit(xs, ys, xt, yt)
    assert r.info["stopped_by"] == "max_points" and r.info["points_done"] == 10
    assert (r.values != 0).sum() <= 10


def _history_error(mem):
    """The original DShap convergence error of a [permutations, N] marginal history (None: not
    checked, fewer than 100 permutations), as DataShapley's HistoryDeviation rule computes it."""
    means = np.cumsum(mem, 0) / np.arange(1, len(mem) + 1)[:, None]
    rule = HistoryDeviation(tol=0.1, window=100)
    fired = rule.check(Progress(samples=len(mem), elapsed=0.0, values=means[-1], stderr=np.zeros(mem.shape[1]),
                                counts=np.full(mem.shape[1], len(mem)), history=lambda: means))
    assert (fired is rule) == (rule.last_error is not None and rule.last_error < 0.1)
    return rule.last_error


def test_convergence_criterion():
    assert _history_error(np.ones((50, 4))) is None           # fewer than 100: not checked
    assert _history_error(np.ones((150, 4))) == pytest.approx(0.0)
    g = np.random.default_rng(0)
    noisy = g.normal(1.0, 5.0, size=(120, 4))
    assert _history_error(noisy) > 0.05


def test_converges_with_the_original_criterion(small):
    """G-Shapley on 60 points: stops on the convergence check, batched and sequential alike."""
    xs, ys, xt, yt, _ = small
    kw = dict(method="gshapley", g_learning_rate=0.05, convergence_tol=0.5, check_every=10,
              max_permutations=400, seed=0, progress=False, dtype="float64", batch_permutations=64)
    a = DataShapley(**kw).fit(xs, ys, xt, yt)
    assert a.info["stopped_by"] == "converged", a.info
    n = a.info["permutations_done"]
    assert n >= 100 and n % 10 == 0 and a.info["convergence_error"] < 0.5


# ----------------------------------------------------------------------------- results
@pytest.mark.parametrize("cls, kw, method", [
    (DataShapley, dict(max_permutations=1), "tmc_shapley"),
    (DataShapley, dict(method="gshapley", max_permutations=1, g_learning_rate=0.01), "g_shapley"),
    (LeaveOneOut, dict(max_points=3), "loo"),
    (DVRL, dict(n_iterations=2, inner_iterations=3), "dvrl"),
    (RandomValuation, dict(), "random"),
])
def test_result_metadata_and_save(bc, tmp_path, cls, kw, method):
    xs, ys, xt, yt, _ = bc
    res = cls(seed=1, progress=False, **kw).fit(xs, ys, xt, yt)
    assert isinstance(res, ValuationResult) and res.method == method
    assert res.params and "total" in res.timings and "stopped_by" in res.info
    json.dumps(res.params)
    json.dumps(res.info)
    loaded = ValuationResult.load(res.save(tmp_path / method))
    np.testing.assert_array_equal(loaded.values, res.values)
    assert loaded.params == res.params and loaded.method == method


def test_lazy_exports():
    assert dvgs_fast.DVRL is DVRL and dvgs_fast.DataShapley is DataShapley
    assert dvgs_fast.LeaveOneOut is LeaveOneOut and dvgs_fast.RandomValuation is RandomValuation


def test_models_given_as_module_or_factory(bc):
    xs, ys, xt, yt, _ = bc
    mod = nn.Linear(30, 2)
    before = mod.weight.detach().clone()
    r1 = DataShapley(mod, max_permutations=1, seed=0, progress=False).fit(xs, ys, xt, yt)
    assert torch.equal(mod.weight, before)          # the caller's module is not trained
    assert r1.info["engine"] == "linear"
    r2 = LeaveOneOut(lambda: nn.Sequential(nn.Linear(30, 4), nn.Tanh(), nn.Linear(4, 2)), max_points=4,
                     seed=0, progress=False).fit(xs, ys, xt, yt)
    assert r2.info["engine"] == "vmap"
    r3 = DVRL(lambda: nn.Sequential(nn.Linear(30, 8), nn.ReLU(), nn.Linear(8, 2)), n_iterations=2,
              inner_iterations=3, seed=0, progress=False).fit(xs, ys, xt, yt)
    assert r3.values.shape == (300,)


# ----------------------------------------------------------------------------- bad input
def _bad_inputs(bc):
    xs, ys, xt, yt, _ = bc
    nan_x = xs.copy()
    nan_x[3, 2] = np.nan
    inf_t = xt.copy()
    inf_t[0, 0] = np.inf
    big = ys.copy()
    big[0] = 2
    return {
        "length": ((xs, ys[:-1], xt, yt), {}, "y_source"),
        "target_length": ((xs, ys, xt, yt[:-2]), {}, "y_target"),
        "nan": ((nan_x, ys, xt, yt), {}, "x_source"),
        "inf": ((xs, ys, inf_t, yt), {}, "x_target"),
        "empty_target": ((xs, ys, xt[:0], yt[:0]), {}, "x_target"),
        "float_labels": ((xs, ys.astype(np.float32) + 0.5, xt, yt), {}, "y_source"),
        "float_int_labels": ((xs, ys.astype(np.float64), xt, yt), {}, "y_source"),
        "label_range": ((xs, big, xt, yt), {"n_classes": 2}, "y_source"),
        "negative_label": ((xs, ys - 1, xt, yt), {}, "y_source"),
        "features": ((xs, ys, xt[:, :5], yt), {}, "x_target"),
        "devices": ((torch.as_tensor(xs), ys, torch.zeros(150, 30, device="meta"), yt), {}, "devices"),
    }


@pytest.mark.parametrize("case", ["length", "target_length", "nan", "inf", "empty_target", "float_labels",
                                  "float_int_labels", "label_range", "negative_label", "features", "devices"])
@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_bad_input_fails_fast(bc, cls, case):
    args, extra, needle = _bad_inputs(bc)[case]
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=needle):
        cls(progress=False, seed=0, **extra).fit(*args)
    assert time.perf_counter() - t0 < 2.0


@pytest.mark.parametrize("cls, kw, needle", [
    (DataShapley, dict(method="banzhaf"), "method"),
    (DataShapley, dict(metric="f1"), "metric"),
    (DataShapley, dict(model="resnet"), "model"),
    (DataShapley, dict(model=3), "model"),
    (DataShapley, dict(max_permutations=0), "max_permutations"),
    (DataShapley, dict(tolerance=-1), "tolerance"),
    (DataShapley, dict(dtype="float16"), "dtype"),
    (DataShapley, dict(batch_engine="jit"), "batch_engine"),
    (DataShapley, dict(model="mlp", batch_engine="linear"), "batch_engine"),
    (DataShapley, dict(max_time=float("nan")), "max_time"),
    (DataShapley, dict(device="tpu"), "device"),
    (DVRL, dict(baseline="ema"), "baseline"),
    (DVRL, dict(metric="r2"), "metric"),
    (DVRL, dict(n_layers=2), "n_layers"),
    (DVRL, dict(threshold=1.5), "threshold"),
    (DVRL, dict(n_iterations=-3), "n_iterations"),
    (LeaveOneOut, dict(loss="hinge"), "loss"),
    (LeaveOneOut, dict(refit_optimizer="lbfgs"), "refit_optimizer"),
    (LeaveOneOut, dict(batched="yes"), "batched"),
    (RandomValuation, dict(seed=-1), "seed"),
    (RandomValuation, dict(progress=None), "progress"),
    (DataShapley, dict(max_permutation=3), "max_permutation: not an option of DataShapley; did you mean "
                                           "'max_permutations'"),
    (DVRL, dict(foo=1), "foo: not an option of DVRL; valid: model, "),
])
def test_bad_options_fail_at_construction(cls, kw, needle):
    with pytest.raises(ValueError, match=needle):
        cls(**kw)


@pytest.mark.parametrize("cls", [DataShapley, LeaveOneOut, DVRL])
def test_bad_model_fails_before_training(bc, cls):
    xs, ys, xt, yt, _ = bc
    with pytest.raises(ValueError, match="model"):
        cls(lambda: nn.Linear(30, 5), progress=False).fit(xs, ys, xt, yt)      # 5 outputs, 2 classes
    with pytest.raises(ValueError, match="model"):
        cls(lambda: nn.Linear(7, 2), progress=False).fit(xs, ys, xt, yt)       # wrong input size
    with pytest.raises(ValueError, match="model"):
        cls(lambda: "not a module", progress=False).fit(xs, ys, xt, yt)


def test_auc_metric_needs_binary():
    from sklearn.datasets import load_digits
    x, y = load_digits(return_X_y=True)
    with pytest.raises(ValueError, match="metric"):
        DataShapley(metric="auc", progress=False).fit(x[:50], y[:50], x[50:80], y[50:80])
