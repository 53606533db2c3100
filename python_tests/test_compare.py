"""`dvgs-fast compare` (and `run --method a,b` / `run --seeds ...`): several methods, one split per
seed, one report with mean +- 2 sd; checked against direct computations from the written values."""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from dvgs_fast.cli import main
from dvgs_fast.cli._compare_report import fmt_mean_sd, mean_sd
from dvgs_fast.evaluate import detection_auprc, detection_auroc, kmeans_f1

BASE = ["--no-progress", "--threads", "1", "--n-source", "120", "--n-target", "60"]


def _run(argv, capsys):
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def _values(path):
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return (np.array([float(r["value"]) for r in rows]), np.array([r["corrupted"] == "1" for r in rows]),
            np.array([int(r["counts"]) for r in rows]))


def test_mean_sd_reference():
    xs = [0.71, 0.74, 0.69, 0.77, 0.75]
    m, sd = mean_sd(xs)
    assert m == pytest.approx(sum(xs) / 5, abs=1e-15)
    assert sd == pytest.approx(math.sqrt(sum((x - m) ** 2 for x in xs) / 4), abs=1e-15)   # ddof 1
    assert fmt_mean_sd(xs) == f"{m:.3f} ± {2 * sd:.3f}"
    assert mean_sd([0.5]) == (0.5, None) and fmt_mean_sd([0.5]) == "0.500"
    assert mean_sd([]) == (None, None) and fmt_mean_sd([float("nan")]) == "-"


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    import io
    from contextlib import redirect_stderr, redirect_stdout
    out = tmp_path_factory.mktemp("cmp") / "c"
    so, se = io.StringIO(), io.StringIO()
    with redirect_stdout(so), redirect_stderr(se):
        rc = main(["compare", "--method", "random,loo", "--seeds", "0,1,2", "--out", str(out), *BASE])
    return rc, out, so.getvalue(), se.getvalue()


def test_compare_writes_one_report(compared):
    rc, out, stdout, stderr = compared
    assert rc == 0, stderr
    for name in ("compare.md", "compare.html", "compare.json", "runs.csv"):
        assert (out / name).is_file(), name
    for m in ("random", "loo"):
        for s in (0, 1, 2):
            assert (out / "values" / f"{m}-seed{s}.csv").is_file()
    plots = {p.name for p in (out / "plots").glob("*.png")}
    assert {"auroc.png", "discovery.png", "remove_curves.png", "times.png"} <= plots
    md = (out / "compare.md").read_text()
    assert "AUROC (mean ± 2 sd)" in md and "| random |" in md and "| loo |" in md
    assert "AUROC (mean ± 2 sd)" in stdout and "compare.html" in stdout
    assert not (out.parent / "c.incomplete").exists()


def test_compare_metrics_match_the_values(compared):
    rc, out, _, stderr = compared
    assert rc == 0, stderr
    doc = json.loads((out / "compare.json").read_text())
    assert [(r["method"], r["seed"]) for r in doc["runs"]] == [(m, s) for s in (0, 1, 2) for m in ("random", "loo")]
    for r in doc["runs"]:
        v, bad, counts = _values(out / "values" / f"{r['method']}-seed{r['seed']}.csv")
        assert counts.min() > 0 and r["status"] == "completed"
        assert r["metrics"]["auroc"] == pytest.approx(detection_auroc(v, bad), abs=1e-12)
        assert r["metrics"]["auprc"] == pytest.approx(detection_auprc(v, bad), abs=1e-12)
        assert r["metrics"]["kmeans_f1"] == pytest.approx(kmeans_f1(v, bad, random_state=r["seed"]), abs=1e-12)
        assert r["wall_s"] >= 0 and r["cpu_s"] >= 0
        assert "remove_high" in r["metrics"] and "remove_low" in r["metrics"]
    for e in doc["summary"]:
        per_seed = [r["metrics"]["auroc"] for r in doc["runs"] if r["method"] == e["method"]]
        assert e["auroc"]["values"] == per_seed
        assert e["auroc"]["mean"] == pytest.approx(np.mean(per_seed), abs=1e-12)
        assert e["auroc"]["sd"] == pytest.approx(np.std(per_seed, ddof=1), abs=1e-12)
    loo = next(e for e in doc["summary"] if e["method"] == "loo")
    rnd = next(e for e in doc["summary"] if e["method"] == "random")
    assert loo["auroc"]["mean"] > rnd["auroc"]["mean"]          # the comparison can tell methods apart


def test_compare_same_split_per_seed(compared):
    rc, out, _, _ = compared
    for s in (0, 1, 2):
        a = list(csv.DictReader(open(out / "values" / f"random-seed{s}.csv")))
        b = list(csv.DictReader(open(out / "values" / f"loo-seed{s}.csv")))
        assert [(r["source_row"], r["label"], r["corrupted"]) for r in a] == \
               [(r["source_row"], r["label"], r["corrupted"]) for r in b]
    r0 = [r["source_row"] for r in csv.DictReader(open(out / "values" / "random-seed0.csv"))]
    r1 = [r["source_row"] for r in csv.DictReader(open(out / "values" / "random-seed1.csv"))]
    assert r0 != r1                                               # seeds draw different splits


def test_run_with_method_list_is_a_comparison(tmp_path, capsys):
    out = tmp_path / "c"
    rc, stdout, err = _run(["run", "--method", "random,loo", "--no-curves", "--out", str(out), *BASE], capsys)
    assert rc == 0, err
    doc = json.loads((out / "compare.json").read_text())
    assert doc["seeds"] == [0] and doc["methods"] == ["random", "loo"]
    assert not (out / "plots" / "remove_curves.png").exists()


def test_stopped_run_flagged_in_comparison(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[method.loo]\nmax_points = 30\n")
    out = tmp_path / "c"
    rc, stdout, err = _run(["compare", "--method", "random,loo", "--config", str(cfg), "--out", str(out), *BASE],
                           capsys)
    assert rc == 0, err
    assert "STOPPED EARLY" in stdout.splitlines()[1]
    doc = json.loads((out / "compare.json").read_text())
    loo = next(r for r in doc["runs"] if r["method"] == "loo")
    assert loo["status"] == "stopped" and loo["n_valued"] == 30 and loo["metrics"]["n"] == 30
    assert "remove_high" not in loo["metrics"]
    v, bad, counts = _values(out / "values" / "loo-seed0.csv")
    ok = counts > 0
    assert loo["metrics"]["auroc"] == pytest.approx(detection_auroc(v[ok], bad[ok]), abs=1e-12)
    md = (out / "compare.md").read_text()
    assert md.index("STOPPED EARLY") < md.index("| method")
    assert "stopped (max_points)" in md


def test_option_for_some_methods_applies_to_those(tmp_path, capsys):
    # --epochs is a LossVal setting, not one of random's: it goes to lossval only
    out = tmp_path / "c"
    rc, _, err = _run(["compare", "--method", "random,lossval", "--epochs", "2", "--no-curves", "--out", str(out),
                       *BASE], capsys)
    assert rc == 0, err
    doc = json.loads((out / "compare.json").read_text())
    assert doc["method_settings"]["lossval"]["epochs"] == 2 and "epochs" not in doc["method_settings"]["random"]


def test_failed_method_does_not_lose_the_others(tmp_path, capsys, monkeypatch):
    from dvgs_fast.methods.loo import LeaveOneOut

    def boom(self, *a, **k):
        raise RuntimeError("simulated crash")
    monkeypatch.setattr(LeaveOneOut, "_fit", boom)
    out = tmp_path / "c"
    rc, stdout, err = _run(["compare", "--method", "random,loo", "--no-curves", "--out", str(out), *BASE], capsys)
    assert rc == 1
    assert "loo seed 0 failed: RuntimeError: simulated crash" in err
    doc = json.loads((out / "compare.json").read_text())
    st = {r["method"]: r["status"] for r in doc["runs"]}
    assert st == {"random": "completed", "loo": "failed"}
    assert "FAILED" in doc["banner"] and (out / "values" / "random-seed0.csv").is_file()


def test_interrupted_comparison_keeps_finished_runs(tmp_path, capsys, monkeypatch):
    from dvgs_fast.methods.loo import LeaveOneOut

    def interrupt(self, *a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(LeaveOneOut, "_fit", interrupt)
    out = tmp_path / "c"
    rc, _, err = _run(["compare", "--method", "random,loo", "--out", str(out), *BASE], capsys)
    assert rc == 130 and not out.exists()
    stage = tmp_path / "c.incomplete"
    assert (stage / "INCOMPLETE.txt").is_file() and (stage / "values" / "random-seed0.csv").is_file()
    assert json.loads((stage / "compare.json").read_text())["partial"] is True
    assert str(stage) in err


@pytest.mark.parametrize("args, needle", [
    (["--method", "random,random"], "twice"),
    (["--method", "random,nope"], "unknown method 'nope'"),
    (["--method", "random,"], "--method"),
    (["--seeds", "0,x"], "--seeds"),
    (["--seeds", "1,1"], "repeated"),
    (["--seed", "1", "--seeds", "0,1"], "either --seed"),
    (["--method", "random,loo", "--restarts", "2"], "--restarts"),
])
def test_compare_bad_arguments(tmp_path, capsys, args, needle):
    rc, _, err = _run(["compare", *args, "--out", str(tmp_path / "o"), *BASE], capsys)
    assert rc == 2, err
    assert err.strip().splitlines()[-1].startswith("error: ") and needle in err
    assert not (tmp_path / "o").exists()


def test_compare_config_tables(tmp_path, capsys):
    flat = tmp_path / "flat.toml"
    flat.write_text("[method]\nmax_points = 3\n")
    rc, _, err = _run(["compare", "--method", "random,loo", "--config", str(flat), "--out", str(tmp_path / "o"),
                       *BASE], capsys)
    assert rc == 2 and "[method.random]" in err
    other = tmp_path / "other.toml"
    other.write_text("[method.dshap]\nmax_time = 3\n")
    rc, _, err = _run(["compare", "--method", "random,loo", "--config", str(other), "--out", str(tmp_path / "o"),
                       *BASE], capsys)
    assert rc == 2 and "[method.dshap]" in err


def test_per_method_model_in_config(tmp_path, capsys):
    cfg = tmp_path / "m.toml"
    cfg.write_text('[method.lossval]\nmodel = "logistic"\nepochs = 2\n')
    out = tmp_path / "c"
    rc, _, err = _run(["compare", "--method", "random,lossval", "--config", str(cfg), "--no-curves",
                       "--out", str(out), *BASE], capsys)
    assert rc == 0, err
    doc = json.loads((out / "compare.json").read_text())
    assert doc["models"]["lossval"].startswith("linear 64-10") and doc["models"]["random"].startswith("MLP")
    cfg.write_text('[method.lossval]\nmodel = "transformer"\n')
    rc, _, err = _run(["compare", "--method", "random,lossval", "--config", str(cfg), "--out", str(tmp_path / "d"),
                       *BASE], capsys)
    assert rc == 2 and "[method] model" in err
