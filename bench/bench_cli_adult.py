"""The DVGS quality bar through the command line: Adult with the DVGS paper's settings.

    pytest bench/bench_cli_adult.py --benchmark-json=RESULTS.json

One ``dvgs-fast run`` per seed (in-process ``main``): 1000 source / 400 target samples of the
real UCI Adult data, 20% flipped labels, the default MLP 108-100-100-2 (Mish, dropout 0.5), DVGS
with 3 restarts x 100 epochs, Adam lr 1e-3, target batch 500, balanced class weights. The whole
CLI path is timed (load, split, corruption, valuation, metrics, report files; removal curves off)
and the detection AUROC goes into extra_info; each run must reach AUROC >= 0.85.
Threads: 1 unless DVGS_BENCH_THREADS says otherwise (as bench_dvgs.py; multi-threaded torch on
the shared 2-core container was several times slower and erratic).
Skips with a reason when adult.data / adult.test are not in $DVGS_FAST_DATA or ../shared/data.
"""
from __future__ import annotations

import io
import json
import os
from contextlib import redirect_stderr, redirect_stdout

import pytest

from _timing import Comparison, record
from dvgs_fast.cli import main
from dvgs_fast.datasets import default_data_root

THREADS = os.environ.get("DVGS_BENCH_THREADS", "1")
AUROC_BAR = 0.85


def _adult_root():
    root = default_data_root()
    if root is None or not ((root / "adult.data").is_file() and (root / "adult.test").is_file()):
        pytest.skip("adult.data / adult.test not found ($DVGS_FAST_DATA or ../shared/data)")
    return root


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cli_adult_paper_settings(benchmark, tmp_path, seed):
    root = _adult_root()
    out = tmp_path / f"adult_seed{seed}"
    args = ["run", "--method", "dvgs", "--dataset", "adult", "--data-root", str(root),
            "--n-source", "1000", "--n-target", "400", "--noise", "label:0.2",
            "--restarts", "3", "--epochs", "100", "--seed", str(seed), "--threads", THREADS,
            "--no-curves", "--no-progress", "--out", str(out)]
    so, se = io.StringIO(), io.StringIO()

    def run():
        with redirect_stdout(so), redirect_stderr(se):
            return main(args)

    cmp = Comparison({"dvgs-fast run --method dvgs (Adult, paper settings)": run}, threads=int(THREADS),
                     warmup=0).run(benchmark, 1, f"dvgs-fast run, Adult paper settings, {THREADS} thread(s)")
    record(benchmark, cmp, None, threads=int(THREADS))
    rc = next(iter(cmp.results.values()))
    assert rc == 0, se.getvalue()
    m = json.loads((out / "metrics.json").read_text())
    met = m["metrics"]
    benchmark.extra_info.update({"method": "dvgs", "dataset": "adult",
        "seed": seed, "threads": int(THREADS), "auroc": met["auroc"], "auprc": met["auprc"],
        "kmeans_f1": met["kmeans_f1"], "discovery_auc": met["discovery_auc"],
        "valuation_s": m["timings"]["valuation"], "total_s": m["timings"]["total"],
        "summary": so.getvalue().strip().splitlines()[:2],
    })
    assert m["method_settings"]["restarts"] == 3 and m["method_settings"]["epochs"] == 100
    assert met["auroc"] >= AUROC_BAR, met
