"""Reference baselines on Adult 1000 source / 400 target / 20% flipped labels (CPU).

    pytest bench/bench_baselines.py -m "not slow"    # quick subset (~4 min on 2 loaded cores)
    pytest bench/bench_baselines.py                  # + long budgets (~25 min)

Data: real UCI Adult from ../shared/data (or $DVGS_FAST_DATA): make_split(seed=0) from the
training rows, flip_labels(rate=0.2, seed=0) -- the configuration of bench_dvgs.py. Skipped with
a reason when the data folder is absent (AUROC on generated data would mean nothing).

Each benchmark runs once (`benchmark.pedantic(rounds=1, iterations=1)`); `extra_info` holds the
flipped-label detection AUROC, how far a budgeted run got, the method's own timings and the peak
RSS above the level before the call (bench/_memory.py). DVGS (fast engine, quick; reference
engine, slow) runs in the same session with the bench_dvgs.py settings, for the side-by-side table.
Batched TMC-Shapley is compared with the sequential reference on the *same permutations*
(same seed); the maximum absolute difference of the values goes into extra_info.
Threads: 1 intra-op thread unless DVGS_BENCH_THREADS says otherwise.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn

from _memory import peak_memory

torch.set_num_threads(int(os.environ.get("DVGS_BENCH_THREADS", "1")))

_SAME_SESSION: dict[str, object] = {}


# ------------------------------------------------------------------------------ data
_ADULT = None


def adult():
    global _ADULT
    if _ADULT is None:
        try:
            from dvgs_fast.datasets import flip_labels, load_adult, make_split
            ds = load_adult()
        except Exception as exc:  # noqa: BLE001 - any failure to find the files skips
            pytest.skip(f"Adult data not available ({type(exc).__name__}: {exc})")
        sp = make_split(ds.X, ds.y, 1000, 400, 0, seed=0, train_idx=np.arange(ds.meta["n_train"]))
        ys, flipped = flip_labels(sp.y_source, 0.2, seed=0)
        _ADULT = (sp.x_source, ys, sp.x_target, sp.y_target, flipped)
    return _ADULT


def adult_mlp() -> nn.Module:
    """The DVGS paper's Adult network, as bench_dvgs.py."""
    return nn.Sequential(nn.Linear(108, 100), nn.Dropout(0.25), nn.Mish(),
                         nn.Linear(100, 100), nn.Dropout(0.25), nn.Mish(), nn.Linear(100, 2))


def _run(benchmark, group, make, **info):
    from dvgs_fast.evaluate import detection_auroc
    xs, ys, xt, yt, flipped = adult()
    benchmark.group = group
    holder = {}

    def once():
        res, peak = peak_memory(lambda: make().fit(xs, ys, xt, yt))
        holder["res"], holder["peak"] = res, peak
        return res

    res = benchmark.pedantic(once, rounds=1, iterations=1, warmup_rounds=0)
    ex = benchmark.extra_info
    ex.update(info)
    ex["auroc"] = round(detection_auroc(res.values, flipped), 4)
    ex["peak_rss_extra_mb"] = round(holder["peak"] / 2**20, 1)
    ex["threads"] = torch.get_num_threads()
    ex["method"] = res.method
    ex["timings"] = {k: round(v, 3) for k, v in res.timings.items()}
    for key in ("stopped_by", "iterations_done", "permutations_done", "mean_refits_per_permutation",
                "convergence_error", "points_done", "engine", "metric", "full_score", "g_learning_rate"):
        if key in res.info:
            v = res.info[key]
            ex[key] = round(v, 4) if isinstance(v, float) else v
    return res


# ------------------------------------------------------------------------------ quick subset
def test_random(benchmark):
    from dvgs_fast import RandomValuation
    _run(benchmark, "baselines adult: random", lambda: RandomValuation(seed=0, progress=False))


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "sequential"])
def test_loo(benchmark, batched):
    from dvgs_fast import LeaveOneOut
    res = _run(benchmark, "baselines adult: leave-one-out (logistic, 100 Adam steps per refit)",
               lambda: LeaveOneOut(batched=batched, seed=0, progress=False), batched=batched)
    _SAME_SESSION[f"loo_{batched}"] = (benchmark.stats.stats.median, res.values)
    if not batched and "loo_True" in _SAME_SESSION:
        t_b, v_b = _SAME_SESSION["loo_True"]
        benchmark.extra_info["speedup_batched_vs_sequential"] = round(benchmark.stats.stats.median / t_b, 2)
        benchmark.extra_info["max_abs_diff_vs_batched"] = float(np.abs(v_b - res.values).max())


def test_tmc_batched_budget(benchmark):
    """TMC-Shapley, the original settings (accuracy, tolerance 0.01), 32 permutations."""
    from dvgs_fast import DataShapley
    res = _run(benchmark, "baselines adult: TMC-Shapley batched, 32 permutations",
               lambda: DataShapley(max_permutations=32, seed=0, progress=False))
    refits = res.info["mean_refits_per_permutation"] * res.info["permutations_done"]
    benchmark.extra_info["ms_per_refit"] = round(1e3 * res.timings["valuation"] / refits, 3)
    _SAME_SESSION["tmc_ms_per_refit_batched"] = 1e3 * res.timings["valuation"] / refits


def _tmc_same_perms(benchmark, n_perm, batched):
    from dvgs_fast import DataShapley
    res = _run(benchmark, f"baselines adult: TMC-Shapley, the same {n_perm} permutations",
               lambda: DataShapley(max_permutations=n_perm, batched=batched, seed=0, progress=False),
               batched=batched)
    refits = res.info["mean_refits_per_permutation"] * res.info["permutations_done"]
    benchmark.extra_info["ms_per_refit"] = round(1e3 * res.timings["valuation"] / refits, 3)
    key = f"tmc{n_perm}"
    if batched:
        _SAME_SESSION[key] = (res.timings["valuation"], res.values)
    elif key in _SAME_SESSION:
        t_b, v_b = _SAME_SESSION[key]
        benchmark.extra_info["speedup_batched_vs_sequential"] = round(res.timings["valuation"] / t_b, 2)
        benchmark.extra_info["max_abs_diff_vs_batched"] = float(np.abs(v_b - res.values).max())
        if "tmc_ms_per_refit_batched" in _SAME_SESSION:
            benchmark.extra_info["speedup_per_refit_vs_32perm_batched"] = round(
                1e3 * res.timings["valuation"] / refits / _SAME_SESSION["tmc_ms_per_refit_batched"], 2)


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "sequential"])
def test_tmc_same_permutations_4(benchmark, batched):
    _tmc_same_perms(benchmark, 4, batched)


def test_gshapley(benchmark):
    from dvgs_fast import DataShapley
    _run(benchmark, "baselines adult: G-Shapley batched, 128 permutations (lr searched)",
         lambda: DataShapley(method="gshapley", max_permutations=128, seed=0, progress=False))


def test_dvrl_500(benchmark):
    from dvgs_fast import DVRL
    _run(benchmark, "baselines adult: DVRL, 500 outer iterations (logistic predictor)",
         lambda: DVRL(n_iterations=500, seed=0, progress=False))


def test_dvgs_fast(benchmark):
    from dvgs_fast import DVGS
    _run(benchmark, "baselines adult: DVGS fast (MLP, 3 restarts x 100 epochs)",
         lambda: DVGS(adult_mlp, backend="fast", epochs=100, restarts=3, seed=0, progress=False))


# ------------------------------------------------------------------------------ long (slow)
@pytest.mark.slow
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "sequential"])
def test_tmc_same_permutations_16(benchmark, batched):
    _tmc_same_perms(benchmark, 16, batched)


@pytest.mark.slow
def test_tmc_batched_10min(benchmark):
    """The original stopping rule (convergence error < 0.1) under a 10-minute budget."""
    from dvgs_fast import DataShapley
    _run(benchmark, "baselines adult: TMC-Shapley batched, until convergence or 600 s",
         lambda: DataShapley(max_time=600, seed=0, progress=False))


@pytest.mark.slow
def test_dvrl_2000(benchmark):
    from dvgs_fast import DVRL
    _run(benchmark, "baselines adult: DVRL, 2000 outer iterations (the original)",
         lambda: DVRL(n_iterations=2000, seed=0, progress=False))


@pytest.mark.slow
def test_dvgs_reference(benchmark):
    from dvgs_fast import DVGS
    _run(benchmark, "baselines adult: DVGS reference (MLP, 3 restarts x 100 epochs)",
         lambda: DVGS(adult_mlp, backend="reference", epochs=100, restarts=3, seed=0, progress=False))
