"""Quality side by side: how well each method finds corrupted samples.

Each benchmark runs the `dvgs-fast run` command line in-process (exactly what a user runs) for
3 seeds and records detection AUROC (label noise) or Spearman with the noise level (feature
noise) in extra_info, for bench/report.py's quality table and plot.

Quick subset (default markers): digits (bundled) with 20% flipped labels, every method with
small budgets. `-m slow` adds Adult and BlogFeedback (../shared/data), the DVGS paper's Adult
configuration (1000 source / 400 target), Spearman for feature noise 3.0, and the Adult
remove-high/low curves.
"""
import json
import os
import statistics
from pathlib import Path

import pytest
import torch

from _timing import Comparison, record
from dvgs_fast.cli import main

SEEDS = (0, 1, 2)
METHODS = ["dvgs", "lossval", "dvrl", "dshap", "loo", "random"]
# Per-method command-line settings: budgets keep the slow baselines to seconds per seed.
QUICK_ARGS = {"dvgs": ["--epochs", "30"], "lossval": ["--epochs", "10"], "dvrl": ["--max-time", "15"],
              "dshap": ["--max-time", "15"], "loo": ["--max-time", "15"], "random": []}
FULL_ARGS = {"dvgs": ["--epochs", "100", "--restarts", "3"], "lossval": [], "dvrl": ["--max-time", "120"],
             "dshap": ["--max-time", "120"], "loo": ["--max-time", "120"], "random": []}


def _data_root():
    env = os.environ.get("DVGS_FAST_DATA")
    root = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"
    return root if root.is_dir() else None


def _run(tmp_path, method, dataset, seed, extra, noise="label:0.2", curves=False):
    out = tmp_path / f"{method}-{dataset}-{seed}"
    argv = ["run", "--method", method, "--dataset", dataset, "--noise", noise, "--seed", str(seed),
            "--out", str(out), "--no-progress", "--threads", "1", *extra]
    if not curves:
        argv.append("--no-curves")
    root = _data_root()
    if root is not None and dataset in ("adult", "blog"):
        argv += ["--data-root", str(root)]
    rc = main(argv)
    assert rc == 0, f"dvgs-fast {' '.join(argv)} exited {rc}"
    return json.loads((out / "metrics.json").read_text())


def _metric(m):
    return m.get("metrics", m)


def _record(benchmark, method, dataset, results, key="auroc"):
    # A wall-clock budget (--max-time) on a loaded machine can stop a run before it valued enough
    # samples for the metric: record how far each seed got instead of a number.
    benchmark.extra_info["runs"] = [{"status": r.get("status"), "progress": r.get("progress"),
                                     "n_valued": r.get("n_valued")} for r in results]
    if any(key not in _metric(r) for r in results):
        benchmark.extra_info.update(method=method, dataset=dataset, metric=key, metric_missing=True)
        return
    vals = [float(_metric(r)[key]) for r in results]
    benchmark.extra_info.update(method=method, dataset=dataset, seeds=list(SEEDS), metric=key,
                                **{key: vals, f"{key}_mean": statistics.mean(vals),
                                   f"{key}_std": statistics.pstdev(vals)})
    if key != "auroc":
        benchmark.extra_info.pop("auroc", None)


def _bench(benchmark, tmp_path, method, dataset, extra, noise="label:0.2", key="auroc"):
    name = f"dvgs-fast run --method {method} {' '.join(extra)} (seeds {', '.join(map(str, SEEDS))})"
    cmp = Comparison({name: lambda: [_run(tmp_path, method, dataset, s, extra, noise) for s in SEEDS]},
                     warmup=0).run(benchmark, 1, f"quality {dataset} {noise}, 1 thread(s)")
    record(benchmark, cmp, None, threads=1)
    _record(benchmark, method, dataset, cmp.results[name], key)


@pytest.mark.parametrize("method", METHODS)
def test_quality_digits(benchmark, tmp_path, method):
    _bench(benchmark, tmp_path, method, "digits", QUICK_ARGS[method])


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["adult", "blog"])
@pytest.mark.parametrize("method", METHODS)
def test_quality_tabular(benchmark, tmp_path, method, dataset):
    if _data_root() is None:
        pytest.skip("real data not found: set DVGS_FAST_DATA or place ../shared/data")
    _bench(benchmark, tmp_path, method, dataset, FULL_ARGS[method])


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dvgs", "lossval", "random"])
def test_feature_noise_spearman(benchmark, tmp_path, method):
    # feature noise 3.0 on digits: values should fall as the noise level rises
    _bench(benchmark, tmp_path, method, "digits", QUICK_ARGS[method], noise="feature:3.0", key="noise_spearman")


@pytest.mark.slow
def test_adult_remove_curves(benchmark, tmp_path):
    if _data_root() is None:
        pytest.skip("real data not found: set DVGS_FAST_DATA or place ../shared/data")
    name = "dvgs-fast run --method dvgs (with removal curves)"
    cmp = Comparison({name: lambda: _run(tmp_path, "dvgs", "adult", 0, FULL_ARGS["dvgs"], curves=True)},
                     warmup=0).run(benchmark, 1, "remove-high/low curves adult, 1 thread(s)")
    record(benchmark, cmp, None, threads=1)
    m = cmp.results[name]
    mm = _metric(m)
    benchmark.extra_info.update(method="dvgs", dataset="adult", remove_high=mm["remove_high"],
                                remove_low=mm["remove_low"])
    # removing the most valuable data must hurt more than removing the least valuable
    assert statistics.mean(mm["remove_high"]["scores"]) < statistics.mean(mm["remove_low"]["scores"])


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
