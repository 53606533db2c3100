"""ValuationResult: stderr, counts, status, merging, ranking, files; the Valuation base contract."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from dvgs_fast import (DVGS, DVRL, DataShapley, LeaveOneOut, LossVal, RandomValuation, ValuationResult)
from dvgs_fast.methods.base import BudgetWarning, Valuation
from dvgs_fast.result import stats_from_sums


def _from_snapshots(snaps: np.ndarray, method: str = "dvgs") -> ValuationResult:
    """A result as a method that averages snapshot columns reports it (mean, stderr, counts)."""
    k = snaps.shape[1]
    return ValuationResult(values=snaps.mean(1), method=method, stderr=snaps.std(1, ddof=1) / np.sqrt(k),
                           counts=np.full(snaps.shape[0], k))


def test_merge_is_the_count_weighted_mean_and_pooled_stderr():
    g = np.random.default_rng(0)
    a, b = g.normal(size=(7, 3)), g.normal(2.0, 3.0, size=(7, 5))
    m = _from_snapshots(a) + _from_snapshots(b)
    both = np.concatenate([a, b], axis=1)
    np.testing.assert_allclose(m.values, (3 * a.mean(1) + 5 * b.mean(1)) / 8, rtol=1e-13)
    np.testing.assert_allclose(m.values, both.mean(1), rtol=1e-12)
    np.testing.assert_allclose(m.stderr, both.std(1, ddof=1) / np.sqrt(8), rtol=1e-12)
    assert (m.counts == 8).all() and m.status == "completed"


def test_merge_with_unvalued_samples_and_single_evaluations():
    a = ValuationResult(values=[1.0, 0.0, 4.0], method="loo", counts=[1, 0, 1])
    b = ValuationResult(values=[3.0, 5.0, 0.0], method="loo", counts=[1, 1, 0], status="stopped")
    m = a + b
    np.testing.assert_array_equal(m.values, [2.0, 5.0, 4.0])
    np.testing.assert_array_equal(m.counts, [2, 1, 1])
    # two single evaluations 1 and 3: sd sqrt(2), stderr sqrt(2)/sqrt(2) = 1; one evaluation: NaN
    np.testing.assert_allclose(m.stderr[0], 1.0)
    assert np.isnan(m.stderr[1]) and np.isnan(m.stderr[2])
    assert m.status == "stopped"


def test_merge_refuses_other_methods_and_sizes():
    a = ValuationResult(values=np.zeros(3), method="dvgs")
    with pytest.raises(ValueError, match="merge"):
        a + ValuationResult(values=np.zeros(3), method="loo")
    with pytest.raises(ValueError, match="different samples"):
        a + ValuationResult(values=np.zeros(4), method="dvgs")


def test_merge_refuses_one_run_twice_and_identical_values():
    a = ValuationResult(values=[1.0, 2.0, 3.0], method="loo", info={"fingerprint": "f1"})
    with pytest.raises(ValueError, match="same run"):
        a + a
    with pytest.raises(ValueError, match="same run"):
        a + ValuationResult(values=[3.0, 2.0, 1.0], method="loo", info={"fingerprint": "f1"})
    b = ValuationResult(values=[1.0, 2.0, 3.0], method="loo", info={"fingerprint": "f2"})
    with pytest.raises(ValueError, match="identical values"):
        a + b                       # a deterministic result twice would claim a spread of 0
    c = ValuationResult(values=[1.5, 2.0, 3.0], method="loo", info={"fingerprint": "f3"})
    ab = a + c
    assert ab.info["fingerprints"] == ["f1", "f3"]
    with pytest.raises(ValueError, match="same run"):
        ab + c                      # a merged result remembers the runs it holds
    forced = a.merge(b, check_independent=False)
    assert (forced.counts == 2).all() and (forced.stderr == 0).all()


def test_merge_warns_when_the_values_are_too_close_for_independent_runs():
    from dvgs_fast.result import DependentRunsWarning
    g = np.random.default_rng(0)
    snaps = g.normal(size=(50, 8))
    a = _from_snapshots(snaps)
    twin = _from_snapshots(snaps + 1e-9 * g.normal(size=snaps.shape))   # one run again, rounding apart
    with pytest.warns(DependentRunsWarning, match="understates"):
        a + twin
    other = _from_snapshots(g.normal(size=(50, 8)))                    # an independent run
    with warnings.catch_warnings():
        warnings.simplefilter("error", DependentRunsWarning)
        a + other


def test_seeds_of_one_model_instance_are_caught_and_a_factory_pools(bc_small):
    # README, "The result": two seeds of DVGS pooled. The same nn.Module instance starts both runs
    # from the same weights, so the seeds change almost nothing and pooling warns; a factory
    # builds each run's initial weights from its seed and pools silently. The pooled stderr is
    # the spread over both runs' snapshots (Chan's formula, tested above).
    from dvgs_fast.result import DependentRunsWarning
    xs, ys, xt, yt = bc_small
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(xs.shape[1], 16), nn.Mish(), nn.Linear(16, 2))
    kw = dict(epochs=3, progress=False)            # full-batch target steps: nothing random but the init
    a, b = (DVGS(net, seed=s, **kw).fit(xs, ys, xt, yt) for s in (0, 1))
    assert a.info["fingerprint"] != b.info["fingerprint"]
    with pytest.warns(DependentRunsWarning):
        a + b
    fac = lambda: nn.Sequential(nn.Linear(xs.shape[1], 16), nn.Mish(), nn.Linear(16, 2))  # noqa: E731
    c, d = (DVGS(fac, seed=s, **kw).fit(xs, ys, xt, yt) for s in (0, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DependentRunsWarning)
        both = c + d
    assert (both.counts == c.counts + d.counts).all()
    with pytest.raises(ValueError, match="same run"):
        c + DVGS(fac, seed=0, **kw).fit(xs, ys, xt, yt)


@pytest.fixture
def bc_small():
    from sklearn.datasets import load_breast_cancer
    x, y = load_breast_cancer(return_X_y=True)
    x = ((x - x.mean(0)) / x.std(0)).astype(np.float32)
    return x[:120], y[:120], x[400:460], y[400:460]


def test_stats_from_sums_matches_numpy():
    g = np.random.default_rng(1)
    x = g.normal(0.3, 0.01, size=(5, 40))
    mean, se = stats_from_sums(x.sum(1), (x * x).sum(1), np.full(5, 40))
    np.testing.assert_allclose(mean, x.mean(1), rtol=1e-12)
    np.testing.assert_allclose(se, x.std(1, ddof=1) / np.sqrt(40), rtol=1e-6)
    m0, s0 = stats_from_sums(np.zeros(2), np.zeros(2), np.array([0, 1]))
    assert (m0 == 0).all() and np.isnan(s0).all()


def test_lowest_highest_ranks_and_dataframe():
    r = ValuationResult(values=[0.5, -1.0, 0.5, 2.0], method="x", stderr=[0.1, 0.2, 0.3, 0.4], counts=[3, 3, 0, 3])
    np.testing.assert_array_equal(r.lowest(2), [1, 0])          # ties broken by index
    np.testing.assert_array_equal(r.highest(3), [3, 0, 2])
    np.testing.assert_array_equal(r.lowest(10), [1, 0, 2, 3])
    np.testing.assert_array_equal(r.ranks(), [2, 1, 3, 4])
    with pytest.raises(ValueError, match="k:"):
        r.lowest(-1)
    df = r.to_dataframe()
    assert list(df.columns) == ["index", "value", "stderr", "counts", "rank"]
    assert df["counts"].tolist() == [3, 3, 0, 3] and df["rank"].tolist() == [2, 1, 3, 4]


def test_save_load_roundtrip_and_directory_refused(tmp_path):
    r = ValuationResult(values=[1.0, 2.0], method="dvgs", stderr=[0.1, np.nan], counts=[4, 1], status="stopped",
                        params={"lr": 0.1}, info={"stopped_by": "max_time"}, snapshots=np.ones((2, 3)))
    back = ValuationResult.load(r.save(tmp_path / "res"))
    np.testing.assert_array_equal(back.values, r.values)
    np.testing.assert_array_equal(back.stderr, r.stderr)
    np.testing.assert_array_equal(back.counts, r.counts)
    np.testing.assert_array_equal(back.snapshots, r.snapshots)
    assert back.status == "stopped" and back.params == r.params and back.info == r.info
    (tmp_path / "adir").mkdir()
    with pytest.raises(ValueError, match="is a directory"):
        r.save(tmp_path / "adir")
    assert not (tmp_path / "adir.npz").exists()
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable ValuationResult"):
        ValuationResult.load(tmp_path / "junk.npz")


def test_bad_fields_are_refused():
    with pytest.raises(ValueError, match="status"):
        ValuationResult(values=[1.0], method="x", status="done")
    with pytest.raises(ValueError, match="one entry per value"):
        ValuationResult(values=[1.0, 2.0], method="x", counts=[1])


# ------------------------------------------------------------------------- real methods
def _data(n=40, m=30, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs, xt = torch.randn(n, d, generator=g), torch.randn(m, d, generator=g)
    w = torch.randn(d, generator=g)
    return xs, (xs @ w > 0).long(), xt, (xt @ w > 0).long()


def test_dvgs_stderr_equals_the_snapshot_spread():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2))
    res = DVGS(net, epochs=3, restarts=2, target_batch_size=10, seed=0, progress=False,
               keep_snapshots=True).fit(*_data())
    snaps = np.asarray(res.snapshots, dtype=np.float64)
    k = snaps.shape[1]
    assert k == res.info["snapshots"] and (res.counts == k).all() and res.status == "completed"
    np.testing.assert_allclose(res.values, snaps.mean(1), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(res.stderr, snaps.std(1, ddof=1) / np.sqrt(k), rtol=1e-4, atol=1e-7)


def test_tmc_stderr_equals_the_permutation_spread():
    res = DataShapley(max_permutations=6, seed=0, progress=False, keep_marginals=True).fit(*_data())
    marg = res.snapshots
    assert marg.shape[1] == 6 and (res.counts == 6).all()
    np.testing.assert_allclose(res.stderr, marg.std(1, ddof=1) / np.sqrt(6), rtol=1e-10)


def test_budget_stop_gives_status_zero_counts_and_one_warning():
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        res = LeaveOneOut(max_points=5, seed=0, progress=False).fit(*_data())
    budget = [x for x in w if issubclass(x.category, BudgetWarning)]
    assert len(budget) == 1 and "5 of 40 points" in str(budget[0].message)
    assert res.status == "stopped" and res.info["stopped_by"] == "max_points"
    assert (res.counts > 0).sum() == 5 and (res.values[res.counts == 0] == 0).all()


def test_every_method_has_max_time_and_json_settings():
    net = nn.Sequential(nn.Linear(5, 2))
    methods = [DVGS(net, epochs=1, progress=False), LossVal(net, epochs=1, progress=False),
               DVRL(n_iterations=2, inner_iterations=2, progress=False),
               DataShapley(max_permutations=1, progress=False), LeaveOneOut(progress=False),
               RandomValuation(progress=False)]
    for m in methods:
        assert isinstance(m, Valuation)
        s = m.settings()
        json.dumps(s)
        assert "max_time" in s and "seed" in s and "progress" not in s, type(m).__name__
        res = m.fit(*_data())
        assert res.params == s and res.status == "completed" and np.isfinite(res.values).all()
        assert res.info["seed"] is not None and "cpu" in res.timings


def test_lossval_and_dvgs_stop_on_max_time():
    net = nn.Sequential(nn.Linear(5, 2))
    for m in (DVGS(net, epochs=10_000, target_batch_size=5, max_time=0.3, progress=False, seed=0),
              LossVal(net, epochs=10_000, batch_size=5, max_time=0.3, progress=False, seed=0)):
        with pytest.warns(BudgetWarning):
            res = m.fit(*_data())
        assert res.status == "stopped" and res.info["stopped_by"] == "max_time"
        assert np.isfinite(res.values).all()


def test_base_checks_before_work():
    with pytest.raises(ValueError, match="x_target"):
        RandomValuation().fit(np.zeros((3, 2)), np.zeros(3, dtype=int), None, None)
    with pytest.raises(ValueError, match="y_source"):
        LeaveOneOut().fit(np.zeros((3, 2)), None, np.zeros((3, 2)), np.zeros(3, dtype=int))
    with pytest.raises(ValueError, match="max_time"):
        DVRL(max_time=-1)
    with pytest.raises(ValueError, match="stopping rule"):
        DataShapley(max_permutations=None, convergence_tol=None, max_time=None)
    with pytest.raises(ValueError, match="seed"):
        RandomValuation(seed=-3)
