"""Budgets never hide, and output folders are complete or marked so (`dvgs-fast run`).

* a budget-stopped run opens report.md, report.html and the printed summary with a banner (what
  stopped it, how far it got, how many samples were valued); its metrics are computed over the
  valued samples only (checked against a direct computation from values.csv); its removal
  curves are skipped with a note;
* values.csv carries stderr and counts, and is written before the evaluation starts: an
  interrupt during the removal curves keeps it, in a folder marked incomplete;
* DVRL and Data Shapley get a default time budget, printed at the start; an explicit one wins.
"""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from dvgs_fast.cli import main
from dvgs_fast.cli._pipeline import DEFAULT_MAX_TIME
from dvgs_fast.evaluate import detection_auprc, detection_auroc

BASE = ["--no-progress", "--threads", "1"]


def _run(argv, capsys):
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """LOO stopped by its point budget after 40 of 200 points (deterministic, ~2 s)."""
    import io
    from contextlib import redirect_stderr, redirect_stdout
    tmp = tmp_path_factory.mktemp("budget")
    cfg = tmp / "loo.toml"
    cfg.write_text("[method]\nmax_points = 40\n")
    out = tmp / "loo"
    so, se = io.StringIO(), io.StringIO()
    with redirect_stdout(so), redirect_stderr(se):
        rc = main(["run", "--method", "loo", "--config", str(cfg), "--n-source", "200", "--n-target", "100",
                   "--out", str(out), *BASE])
    return rc, out, so.getvalue(), se.getvalue()


def test_stopped_run_banner_everywhere(stopped_run):
    rc, out, stdout, stderr = stopped_run
    assert rc == 0, stderr
    first = stdout.strip().splitlines()[:3]
    assert any("STOPPED EARLY" in ln for ln in first), stdout          # the printed summary opens with it
    flat = " ".join(stdout.split())                                   # the banner is wrapped at 78
    assert "max_points" in flat and "40 of 200 points" in flat and "40 of 200 samples were valued" in flat
    assert "40 of 200 valued" in stdout and "stopped (max_points)" in stdout
    md = (out / "report.md").read_text().splitlines()
    banner = next(i for i, ln in enumerate(md) if "STOPPED EARLY" in ln)
    table = next(i for i, ln in enumerate(md) if ln.startswith("| method"))
    assert banner < table <= 4                                   # at the top, above the summary table
    assert "40 of 200 points" in md[banner] and "valued samples only" in md[banner]
    assert "Removal curves were skipped" in md[banner]
    html = (out / "report.html").read_text()
    assert html.index('class="banner"') < html.index("<table>")
    assert "STOPPED EARLY" in html
    m = json.loads((out / "metrics.json").read_text())
    assert (m["status"], m["stopped_by"], m["n_valued"]) == ("stopped", "max_points", 40)
    assert m["progress"] == "40 of 200 points" and m["banner"].startswith("STOPPED EARLY")


def test_stopped_run_metrics_over_valued_samples_only(stopped_run):
    rc, out, _, stderr = stopped_run
    assert rc == 0, stderr
    rows = _rows(out / "values.csv")
    assert len(rows) == 200 and {"stderr", "counts"} <= set(rows[0])
    counts = np.array([int(r["counts"]) for r in rows])
    values = np.array([float(r["value"]) for r in rows])
    bad = np.array([r["corrupted"] == "1" for r in rows])
    valued = counts > 0
    assert valued.sum() == 40
    assert all(r["rank"] == "" for r, ok in zip(rows, valued) if not ok)        # placeholders are not ranked
    assert sorted(int(r["rank"]) for r, ok in zip(rows, valued) if ok) == list(range(1, 41))
    met = json.loads((out / "metrics.json").read_text())["metrics"]
    assert met["n"] == 40 and met["n_unvalued"] == 160
    assert met["n_corrupted"] == int(bad[valued].sum())
    # the reference: the same metric on the valued rows alone (not on 200 with 160 zeros)
    assert met["auroc"] == pytest.approx(detection_auroc(values[valued], bad[valued]), abs=1e-12)
    assert met["auprc"] == pytest.approx(detection_auprc(values[valued], bad[valued]), abs=1e-12)
    assert met["auroc"] != pytest.approx(detection_auroc(values, bad), abs=1e-9)
    assert "remove_high" not in met and "remove_low" not in met
    assert not (out / "plots" / "remove_curves.png").exists()


def test_completed_run_has_no_banner_and_counts(tmp_path, capsys):
    out = tmp_path / "r"
    rc, stdout, err = _run(["run", "--method", "random", "--n-source", "100", "--n-target", "50", "--out", str(out),
                            *BASE], capsys)
    assert rc == 0, err
    assert "STOPPED" not in stdout and "completed" in stdout
    assert "banner" not in (out / "report.html").read_text().split("<style>")[1].split("</style>")[1]
    rows = _rows(out / "values.csv")
    assert all(r["counts"] == "1" and r["stderr"] == "" for r in rows)   # no spread notion: empty stderr


def test_dvgs_stderr_reaches_values_csv(tmp_path, capsys):
    out = tmp_path / "d"
    rc, _, err = _run(["run", "--n-source", "120", "--n-target", "60", "--epochs", "3", "--no-curves",
                       "--out", str(out), *BASE], capsys)
    assert rc == 0, err
    rows = _rows(out / "values.csv")
    counts = np.array([int(r["counts"]) for r in rows])
    se = np.array([float(r["stderr"]) if r["stderr"] else np.nan for r in rows])
    assert np.all(counts > 1) and np.all(np.isfinite(se)) and np.all(se >= 0)


def test_interrupt_during_curves_keeps_values(tmp_path, capsys, monkeypatch):
    import dvgs_fast.evaluate as ev

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(ev, "remove_curves", interrupted)   # what score_values calls (both curves at once)
    out = tmp_path / "run"
    rc, _, err = _run(["run", "--method", "random", "--n-source", "100", "--n-target", "50", "--out", str(out),
                       *BASE], capsys)
    assert rc == 130
    stage = tmp_path / "run.incomplete"
    assert not out.exists()                                   # never a half-written --out
    assert (stage / "INCOMPLETE.txt").is_file()
    rows = _rows(stage / "values.csv")
    assert len(rows) == 100 and all(r["value"] for r in rows)
    assert str(stage) in err and "did not finish" in err
    assert err.strip().splitlines()[-1] == "error: interrupted"
    # the same command again replaces the stale folder and finishes
    monkeypatch.undo()
    rc, _, err = _run(["run", "--method", "random", "--n-source", "100", "--n-target", "50", "--out", str(out),
                       *BASE], capsys)
    assert rc == 0, err
    assert not stage.exists() and (out / "report.html").is_file() and not (out / "INCOMPLETE.txt").exists()
    assert _rows(out / "values.csv") == rows                  # same seed, same values


def test_failure_before_values_leaves_nothing(tmp_path, capsys, monkeypatch):
    from dvgs_fast.methods.random import RandomValuation

    def boom(self, *a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(RandomValuation, "_fit", boom)
    out = tmp_path / "run"
    rc, _, err = _run(["run", "--method", "random", "--n-source", "100", "--n-target", "50", "--out", str(out),
                       *BASE], capsys)
    assert rc == 130
    assert not out.exists() and not (tmp_path / "run.incomplete").exists()


def test_foreign_incomplete_folder_is_refused(tmp_path, capsys):
    (tmp_path / "run.incomplete").mkdir()
    (tmp_path / "run.incomplete" / "mine.txt").write_text("x")
    rc, _, err = _run(["run", "--method", "random", "--out", str(tmp_path / "run"), *BASE], capsys)
    assert rc == 2 and "run.incomplete" in err and err.count("\n") == 1
    assert (tmp_path / "run.incomplete" / "mine.txt").read_text() == "x"


@pytest.mark.parametrize("method", sorted(DEFAULT_MAX_TIME))
def test_default_budget_printed_and_explicit_one_wins(tmp_path, capsys, monkeypatch, method):
    from dvgs_fast.cli import _methods
    seen = {}
    real_build = _methods.build

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    def spy(name, *a, **k):   # record the settings, stop before any valuation work
        b = real_build(name, *a, **k)
        seen[name] = dict(b.kwargs)
        b.method.fit = interrupt
        return b
    monkeypatch.setattr(_methods, "build", spy)
    rc, _, err = _run(["run", "--method", method, "--out", str(tmp_path / "a"), *BASE], capsys)
    assert rc == 130
    assert seen[method]["max_time"] == DEFAULT_MAX_TIME[method]
    assert f"time budget {DEFAULT_MAX_TIME[method]:g} s" in err and "--max-time" in err
    rc, _, err = _run(["run", "--method", method, "--max-time", "7", "--out", str(tmp_path / "b"), *BASE], capsys)
    assert seen[method]["max_time"] == 7.0 and "time budget" not in err
    cfg = tmp_path / "c.toml"
    cfg.write_text("[method]\nmax_time = 9\n")
    rc, _, err = _run(["run", "--method", method, "--config", str(cfg), "--out", str(tmp_path / "c"), *BASE], capsys)
    assert seen[method]["max_time"] == 9 and "time budget" not in err


def test_dvrl_stopped_with_every_sample_valued_says_so(tmp_path, capsys):
    out = tmp_path / "dvrl"
    rc, stdout, err = _run(["run", "--method", "dvrl", "--max-time", "0.5", "--n-source", "100", "--n-target", "50",
                            "--no-curves", "--out", str(out), *BASE], capsys)
    assert rc == 0, err
    m = json.loads((out / "metrics.json").read_text())
    if m["status"] != "stopped":          # a very fast machine finished 2000 iterations in 0.5 s
        pytest.skip("DVRL completed within its budget")
    assert "STOPPED EARLY" in stdout and "outer iterations" in " ".join(stdout.split())
    assert m["n_valued"] == 100 and "cut short" in m["banner"]
    assert "auroc" in m["metrics"] and m["metrics"]["n"] == 100
