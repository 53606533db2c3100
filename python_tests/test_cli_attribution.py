"""`dvgs-fast compare --metric lds,loo`: LDS and leave-one-out correlation beside the detection
metrics, for the methods with attribute(); checked against the Python API on the same split
(evaluate.lds of the method's own attribute() against the cached ground truth)."""
from __future__ import annotations

import io
import json
from contextlib import redirect_stderr, redirect_stdout

import numpy as np
import pytest

from dvgs_fast.cli import main

BASE = ["--no-progress", "--threads", "1", "--n-source", "120", "--n-target", "40", "--no-curves",
        "--epochs", "3"]
METRIC = ["--metric", "lds,loo", "--n-query", "15", "--lds-subsets", "12", "--loo-rows", "10"]


def _main(argv):
    so, se = io.StringIO(), io.StringIO()
    with redirect_stdout(so), redirect_stderr(se):
        rc = main(argv)
    return rc, so.getvalue(), se.getvalue()


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    out = tmp_path_factory.mktemp("attr") / "c"
    rc, stdout, stderr = _main(["compare", "--method", "grad_dot,random,loo", "--out", str(out), *BASE, *METRIC])
    return rc, out, stdout, stderr


def test_lds_and_loo_beside_auroc(compared):
    rc, out, stdout, stderr = compared
    assert rc == 0, stderr
    doc = json.loads((out / "compare.json").read_text())
    by = {r["method"]: r["metrics"] for r in doc["runs"]}
    for m in ("grad_dot", "random"):
        assert {"auroc", "lds", "lds_stderr", "loo_spearman"} <= set(by[m]), by[m]
        assert -1.0 <= by[m]["lds"] <= 1.0
    assert "lds" not in by["loo"] and any("loo: no attribute()" in n for n in doc["notes"])
    assert by["grad_dot"]["lds"] > by["random"]["lds"] + 0.2          # far above the floor even this small
    assert doc["ground_truth"]["metrics"] == ["lds", "loo"] and (out / "ground_truth" / "seed0" / "lds").is_dir()
    md = (out / "compare.md").read_text()
    assert "| LDS (mean ± 2 sd) |" in md and "LDS / LOO Spearman (--metric lds,loo)" in md
    assert "LDS" in stdout


def test_cli_lds_equals_the_python_api(compared):
    """The same split, recipe and subsets by hand: evaluate.lds of GradDot.attribute() equals the report."""
    import torch
    from dvgs_fast import GradDot
    from dvgs_fast.cli import _data as D
    from dvgs_fast.cli import _models as M
    from dvgs_fast.evaluate import TrainingRecipe, lds, lds_ground_truth
    rc, out, _, stderr = compared
    assert rc == 0, stderr
    doc = json.loads((out / "compare.json").read_text())
    reported = next(r["metrics"]["lds"] for r in doc["runs"] if r["method"] == "grad_dot")
    data = D.split_and_corrupt(D.load(D.parse_dataset("digits"), None), 120, 40, None, D.parse_noise("label:0.2"), 0,
                               max_test=D.PRESETS["digits"].get("max_test"))
    factory = M.factory("mlp", data.sample_shape, data.n_classes, hidden=100, dropout=D.PRESETS["digits"]["dropout"])
    recipe = TrainingRecipe(factory, optimizer="adam", lr=1e-3, epochs=3, batch_size=64)
    xs = torch.as_tensor(np.asarray(data.x_source, dtype=np.float32))
    xq, yq = data.x_test[:15], data.y_test[:15]
    gt = lds_ground_truth(recipe, xs, torch.as_tensor(data.y_source), torch.as_tensor(np.asarray(xq, np.float32)),
                          torch.as_tensor(yq), n_subsets=12, seeds=2, subset_seed=0, progress=False,
                          cache_dir=out / "ground_truth" / "seed0" / "lds")
    att = GradDot(factory, epochs=3, seed=0, progress=False).attribute(data.x_source, data.y_source, xq, yq)
    assert lds(att, gt).mean == pytest.approx(reported, abs=1e-9)


@pytest.mark.parametrize("argv, msg", [
    (["--metric", "auroc"], "--metric: expected"),
    (["--n-query", "5"], "--n-query: applies with --metric"),
    (["--metric", "lds", "--n-query", "100000"], "--n-query: 100000 queries asked"),
])
def test_metric_errors(tmp_path, argv, msg):
    rc, _, stderr = _main(["compare", "--method", "grad_dot", "--out", str(tmp_path / "x"), *BASE, *argv])
    assert rc == 2 and msg in stderr, stderr
