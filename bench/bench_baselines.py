"""Reference baselines on Adult 1000 source / 400 target / 20% flipped labels (CPU).

    pytest bench/bench_baselines.py -m "not slow"    # quick subset (~4 min on 2 loaded cores)
    pytest bench/bench_baselines.py                  # + long budgets (~25 min)

Data: real UCI Adult from ../shared/data (or $DVGS_FAST_DATA): make_split(seed=0) from the
training rows, flip_labels(rate=0.2, seed=0) -- the configuration of bench_dvgs.py. Skipped with
a reason when the data folder is absent (AUROC on generated data would mean nothing).

Each benchmark runs once at 1 pinned thread, CPU and wall time and load average recorded
(bench/_timing.py); `extra_info` holds the flipped-label detection AUROC, how far a budgeted run
got, the method's own timings and the peak RSS above the level before the call (bench/_memory.py).
DVGS (fast engine, quick; reference engine, slow) runs in the same session with the bench_dvgs.py
settings, for the side-by-side table. Batched TMC-Shapley and batched leave-one-out are compared
with their sequential references in one test each, interleaved, on the *same permutations* (same
seed); the maximum absolute difference of the values goes into extra_info.
"""
from __future__ import annotations


import numpy as np
import pytest
from torch import nn

from _memory import peak_memory
from _timing import Comparison, record



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


INFO_KEYS = ("stopped_by", "iterations_done", "permutations_done", "mean_refits_per_permutation",
             "convergence_error", "points_done", "engine", "metric", "full_score", "g_learning_rate")


def _facts(res, peak) -> dict:
    from dvgs_fast.evaluate import detection_auroc
    flipped = adult()[4]
    out = {"auroc": round(detection_auroc(res.values, flipped), 4), "peak_rss_extra_mb": round(peak / 2**20, 1),
           "timings": {k: round(v, 3) for k, v in res.timings.items() if isinstance(v, (int, float))}}
    for key in INFO_KEYS:
        if key in res.info:
            v = res.info[key]
            out[key] = round(v, 4) if isinstance(v, float) else v
    return out


def _runner(make, holder, key):
    xs, ys, xt, yt, _ = adult()

    def run():
        res, peak = peak_memory(lambda: make().fit(xs, ys, xt, yt))
        holder[key] = (res, peak)
        return res.values
    return run


def _run(benchmark, group, impl, make, method, **info):
    """One method, one round."""
    holder = {}
    cmp = Comparison({impl: _runner(make, holder, impl)}, warmup=0).run(benchmark, 1, f"{group}, 1 thread(s)")
    res, peak = holder[impl]
    record(benchmark, cmp, None, threads=1, method=method, **info, **_facts(res, peak))
    return res


def _pair(benchmark, group, make_fast, make_ref, method, names):
    """Batched vs sequential on the same seed, interleaved, one round each."""
    holder = {}
    fast, ref = names
    cmp = Comparison({fast: _runner(make_fast, holder, fast), ref: _runner(make_ref, holder, ref)}, warmup=0).run(
        benchmark, 1, f"{group}, 1 thread(s)")
    (rf, pf), (rr, pr) = holder[fast], holder[ref]
    record(benchmark, cmp, ref, threads=1, method=method, batched=_facts(rf, pf), sequential=_facts(rr, pr),
           auroc=_facts(rf, pf)["auroc"], max_abs_diff=float(np.abs(rf.values - rr.values).max()))
    return rf, rr


# ------------------------------------------------------------------------------ quick subset
def test_random(benchmark):
    from dvgs_fast import RandomValuation
    _run(benchmark, "baselines adult: random", "RandomValuation", lambda: RandomValuation(seed=0, progress=False),
         "random")


def test_loo(benchmark):
    from dvgs_fast import LeaveOneOut
    _pair(benchmark, "baselines adult: leave-one-out (logistic, 100 Adam steps per refit)",
          lambda: LeaveOneOut(batched=True, seed=0, progress=False),
          lambda: LeaveOneOut(batched=False, seed=0, progress=False), "loo",
          ("LeaveOneOut(batched=True)", "LeaveOneOut(batched=False) (sequential reference)"))


def test_tmc_batched_budget(benchmark):
    """TMC-Shapley, the original settings (accuracy, tolerance 0.01), 32 permutations."""
    from dvgs_fast import DataShapley
    res = _run(benchmark, "baselines adult: TMC-Shapley batched, 32 permutations", "DataShapley(batched=True)",
               lambda: DataShapley(max_permutations=32, seed=0, progress=False), "dshap")
    refits = res.info["mean_refits_per_permutation"] * res.info["permutations_done"]
    benchmark.extra_info["ms_per_refit_wall"] = round(1e3 * res.timings["valuation"] / refits, 3)


def _tmc_same_perms(benchmark, n_perm):
    from dvgs_fast import DataShapley
    _pair(benchmark, f"baselines adult: TMC-Shapley, the same {n_perm} permutations",
          lambda: DataShapley(max_permutations=n_perm, batched=True, seed=0, progress=False),
          lambda: DataShapley(max_permutations=n_perm, batched=False, seed=0, progress=False), "dshap",
          ("DataShapley(batched=True)", "DataShapley(batched=False) (sequential reference)"))


def test_tmc_same_permutations_4(benchmark):
    _tmc_same_perms(benchmark, 4)


def test_gshapley(benchmark):
    from dvgs_fast import DataShapley
    _run(benchmark, "baselines adult: G-Shapley batched, 128 permutations (lr searched)",
         'DataShapley(method="gshapley")',
         lambda: DataShapley(method="gshapley", max_permutations=128, seed=0, progress=False), "gshapley")


def test_dvrl_500(benchmark):
    from dvgs_fast import DVRL
    _run(benchmark, "baselines adult: DVRL, 500 outer iterations (logistic predictor)", "DVRL",
         lambda: DVRL(n_iterations=500, seed=0, progress=False), "dvrl")


def test_dvgs_fast(benchmark):
    from dvgs_fast import DVGS
    _run(benchmark, "baselines adult: DVGS fast (MLP, 3 restarts x 100 epochs)", 'DVGS(backend="fast")',
         lambda: DVGS(adult_mlp, backend="fast", epochs=100, restarts=3, seed=0, progress=False), "dvgs")


# ------------------------------------------------------------------------------ long (slow)
@pytest.mark.slow
def test_tmc_same_permutations_16(benchmark):
    _tmc_same_perms(benchmark, 16)


@pytest.mark.slow
def test_tmc_batched_10min(benchmark):
    """The original stopping rule (convergence error < 0.1) under a 10-minute budget."""
    from dvgs_fast import DataShapley
    _run(benchmark, "baselines adult: TMC-Shapley batched, until convergence or 600 s", "DataShapley(max_time=600)",
         lambda: DataShapley(max_time=600, seed=0, progress=False), "dshap")


@pytest.mark.slow
def test_dvrl_2000(benchmark):
    from dvgs_fast import DVRL
    _run(benchmark, "baselines adult: DVRL, 2000 outer iterations (the original)", "DVRL",
         lambda: DVRL(n_iterations=2000, seed=0, progress=False), "dvrl")


@pytest.mark.slow
def test_dvgs_reference(benchmark):
    from dvgs_fast import DVGS
    _run(benchmark, "baselines adult: DVGS reference (MLP, 3 restarts x 100 epochs)", 'DVGS(backend="reference")',
         lambda: DVGS(adult_mlp, backend="reference", epochs=100, restarts=3, seed=0, progress=False), "dvgs")
