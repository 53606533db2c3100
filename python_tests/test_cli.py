"""The ``dvgs-fast`` command line: end-to-end runs, report files, config files, one-line errors.

Runs go through ``main([...])`` in-process (fast) with small sizes; one smoke run goes through a
real subprocess of the installed console script. The Adult quality run (DVGS paper settings) is
marked slow and skips without the real data.
"""
from __future__ import annotations

import base64
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dvgs_fast.cli import main
from dvgs_fast.cli import _methods

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Small, quick runs: ~2-4 s each on 2 cores. One thread: these tiny models gain nothing from more,
# and a machine shared by several test runs slows multi-threaded torch down many times over.
SMALL = ["--n-source", "300", "--n-target", "150", "--epochs", "8", "--no-progress", "--threads", "1"]
# (_run adds --threads 1 to every run.)


def _run(args, capsys):
    args = list(args)
    if args[:1] == ["run"] and "--threads" not in args:
        args += ["--threads", "1"]
    rc = main(args)
    out, err = capsys.readouterr()
    return rc, out, err


def _assert_one_line_error(rc, err, *needles):
    assert rc == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert lines, "no error message"
    # status lines ("dvgs-fast: loading ...") may come before; the error is one line, last.
    assert lines[-1].startswith("error: "), err
    assert all(not ln.startswith("error") for ln in lines[:-1]), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[-1], lines[-1]


def _read_values(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as fh:
        rd = csv.DictReader(fh)
        return list(rd.fieldnames), list(rd)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """One end-to-end digits run (DVGS, 20% flipped labels) shared by the checks below."""
    out = tmp_path_factory.mktemp("cli") / "digits"
    import io
    from contextlib import redirect_stderr, redirect_stdout
    so, se = io.StringIO(), io.StringIO()
    with redirect_stdout(so), redirect_stderr(se):
        rc = main(["run", "--out", str(out), *SMALL])
    return rc, out, so.getvalue(), se.getvalue()


# ----------------------------------------------------------------------------- end to end
def test_digits_run_writes_values_and_metrics(digits_run):
    rc, out, stdout, stderr = digits_run
    assert rc == 0, stderr
    cols, rows = _read_values(out / "values.csv")
    assert cols[:3] == ["index", "source_row", "value"]
    assert {"label", "corrupted", "rank"} <= set(cols)
    assert len(rows) == 300
    assert [int(r["index"]) for r in rows] == list(range(300))
    corrupted = np.array([int(r["corrupted"]) for r in rows])
    assert corrupted.sum() == 60                       # exactly floor(300 * 0.2) flipped
    values = np.array([float(r["value"]) for r in rows])
    assert np.all(np.isfinite(values))
    assert sorted(int(r["rank"]) for r in rows) == list(range(1, 301))

    m = json.loads((out / "metrics.json").read_text())
    for key in ("method", "dataset", "noise", "n_source", "n_target", "n_test", "metrics", "timings",
                "settings", "method_settings", "versions", "command"):
        assert key in m, key
    assert (m["method"], m["dataset"], m["noise"]) == ("dvgs", "digits", "label:0.2")
    assert (m["n_source"], m["n_target"]) == (300, 150)
    met = m["metrics"]
    for key in ("auroc", "auprc", "kmeans_f1", "discovery_auc", "n_corrupted", "remove_high", "remove_low"):
        assert key in met, key
    assert met["auroc"] > 0.6
    assert met["n_corrupted"] == 60
    assert m["method_settings"]["epochs"] == 8           # the flag reached the method
    # the values in the CSV are the ones scored
    from dvgs_fast.evaluate import detection_auroc
    assert detection_auroc(values, corrupted.astype(bool)) == pytest.approx(met["auroc"])


def test_digits_run_plots_and_reports(digits_run):
    rc, out, stdout, _ = digits_run
    assert rc == 0
    plots = sorted((out / "plots").glob("*.png"))
    names = {p.name for p in plots}
    assert {"discovery.png", "values_hist.png", "remove_curves.png"} <= names
    for p in plots:
        assert p.read_bytes()[:8] == PNG_MAGIC, p
    md = (out / "report.md").read_text()
    assert "AUROC" in md and "](plots/discovery.png)" in md
    html = (out / "report.html").read_text()
    assert html.lstrip().startswith("<!DOCTYPE html>")
    assert html.count('src="data:image/png;base64,') == len(plots)
    assert "<img" in html and 'src="plots/' not in html    # self-contained
    b64 = html.split('src="data:image/png;base64,', 1)[1].split('"', 1)[0]
    assert base64.b64decode(b64)[:8] == PNG_MAGIC
    # the printed summary: a table with the metrics and where the report is
    assert "AUROC" in stdout and "k-means F1" in stdout and "dvgs" in stdout and "digits" in stdout
    assert str(out / "report.html") in stdout


def test_existing_output_needs_overwrite(tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    args = ["run", "--out", str(out), "--n-source", "150", "--n-target", "80", "--epochs", "2",
            "--no-curves", "--no-progress"]
    rc, _, err = _run(args, capsys)
    _assert_one_line_error(rc, err, "--overwrite")
    assert not (out / "values.csv").exists()               # refused before any work
    rc, _, err = _run([*args, "--overwrite"], capsys)
    assert rc == 0, err
    assert (out / "values.csv").is_file() and (out / "mine.txt").read_text() == "keep me"


def test_subprocess_smoke(tmp_path):
    out = tmp_path / "sub"
    exe = shutil.which("dvgs-fast")
    cmd = [exe] if exe else [sys.executable, "-m", "dvgs_fast.cli"]
    res = subprocess.run([*cmd, "run", "--n-source", "150", "--n-target", "80", "--epochs", "2",
                          "--no-curves", "--no-progress", "--threads", "1", "--out", str(out)],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "AUROC" in res.stdout
    assert (out / "values.csv").is_file() and (out / "report.html").is_file()
    # bad arguments through the real entry point: one line, exit code 2
    bad = subprocess.run([*cmd, "run", "--n-source", "zero"], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and bad.stderr.startswith("error: ")
    assert "Traceback" not in bad.stderr


@pytest.mark.parametrize("method, extra", [
    ("dshap", ["--max-time", "3"]), ("dvrl", ["--max-time", "3"]), ("lossval", ["--epochs", "3"]),
    ("loo", []), ("random", []), ("trak", ["--epochs", "2"]), ("logra", ["--epochs", "2"]),
])
def test_every_method_runs_through_the_cli(tmp_path, capsys, method, extra):
    try:
        _methods.load_class(method)
    except _methods.NotAvailable as exc:
        pytest.skip(str(exc))
    out = tmp_path / method
    rc, stdout, err = _run(["run", "--method", method, *extra, "--n-source", "100", "--n-target", "50",
                            "--no-curves", "--no-progress", "--out", str(out)], capsys)
    assert rc == 0, err
    m = json.loads((out / "metrics.json").read_text())
    assert m["method"] == method and m["n_source"] == 100
    if m["n_valued"] == 100 or "auroc" in m["metrics"]:
        assert 0.0 <= m["metrics"]["auroc"] <= 1.0
    else:   # a budget this short may end before a sample is valued on a busy machine: then it says so
        assert m["status"] == "stopped" and m["banner"].startswith("STOPPED EARLY") and "auroc" not in m["metrics"]
    if method in ("dshap", "loo"):
        assert m["settings"]["model"].startswith("linear 64-10")   # refitting methods: logistic by default


# ----------------------------------------------------------------------------- other data
def test_feature_noise_uses_spearman(tmp_path, capsys):
    out = tmp_path / "feat"
    rc, stdout, err = _run(["run", "--noise", "feature:0.5", "--out", str(out), "--no-curves", *SMALL], capsys)
    assert rc == 0, err
    cols, rows = _read_values(out / "values.csv")
    assert "noise_sigma" in cols and "corrupted" not in cols
    met = json.loads((out / "metrics.json").read_text())["metrics"]
    assert "noise_spearman" in met and "auroc" not in met
    assert (out / "plots" / "values_vs_noise.png").read_bytes()[:8] == PNG_MAGIC
    assert "Spearman" in stdout


def test_lincs_gctx_autoencoder(tmp_path, capsys):
    from dvgs_fast.datasets import write_gctx
    rng = np.random.default_rng(0)
    path = tmp_path / "tiny.gctx"
    write_gctx(path, rng.standard_normal((120, 40)).astype(np.float32), [f"g{i}" for i in range(40)], None)
    out = tmp_path / "lincs"
    rc, stdout, err = _run(["run", "--dataset", f"lincs:{path}", "--n-source", "60", "--n-target", "30",
                            "--epochs", "3", "--out", str(out), "--no-progress"], capsys)
    assert rc == 0, err
    m = json.loads((out / "metrics.json").read_text())
    assert m["noise"] == "feature:3" and "noise_spearman" in m["metrics"]
    assert "autoencoder 40-256-64-256-40" in m["settings"]["model"]
    assert m["method_settings"]["loss"] == "mse"
    # no labels: flipping them is refused with one line
    rc, _, err = _run(["run", "--dataset", f"lincs:{path}", "--noise", "label:0.2", "--out",
                       str(tmp_path / "x"), "--no-progress"], capsys)
    _assert_one_line_error(rc, err, "no labels")


def test_csv_dataset(tmp_path, capsys):
    rng = np.random.default_rng(1)
    X = rng.standard_normal((400, 5))
    y = np.where(X[:, 0] + X[:, 1] > 0, "yes", "no")
    path = tmp_path / "d.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["a", "b", "target", "c", "d", "e"])
        for row, lab in zip(X, y):
            w.writerow([*row[:2], lab, *row[2:]])
    out = tmp_path / "csv"
    rc, _, err = _run(["run", "--dataset", f"csv:{path}", "--label-column", "target", "--n-source", "200",
                       "--n-target", "100", "--epochs", "5", "--no-curves", "--out", str(out), "--no-progress"],
                      capsys)
    assert rc == 0, err
    m = json.loads((out / "metrics.json").read_text())
    assert m["n_source"] == 200 and "auroc" in m["metrics"]
    assert "MLP 5-100-100-2" in m["settings"]["model"]


def test_cifar10_sample_pngs_convnet(data_file, tmp_path, capsys):
    """Without the CIFAR-10 batches the 20 shared sample PNGs are used, with a note saying so."""
    folder = data_file("cifar10_foolbox_samples")
    if (folder.parent / "cifar-10-batches-py").is_dir():
        pytest.skip("the full CIFAR-10 batches are present: the sample-PNG path is not taken")
    out = tmp_path / "cifar"
    rc, stdout, err = _run(["run", "--dataset", "cifar10", "--data-root", str(folder.parent), "--epochs", "3",
                            "--out", str(out), "--no-progress"], capsys)
    assert rc == 0, err
    m = json.loads((out / "metrics.json").read_text())
    assert m["dataset"] == "cifar10 (samples)" and m["n_source"] == 12 and m["n_target"] == 8
    assert "conv net [3, 32, 32]" in m["settings"]["model"]
    assert any("sample PNGs" in n for n in m["notes"])


# ----------------------------------------------------------------------------- config
def test_config_file_and_flag_precedence(tmp_path, capsys):
    cfg = tmp_path / "exp.toml"
    cfg.write_text('dataset = "breast_cancer"\nn-source = 200\nn_target = 100\nepochs = 9\nno-curves = true\n'
                   'no_progress = true\n[method]\nrestarts = 2\nsimilarity = "dot"\n')
    out = tmp_path / "cfg"
    rc, _, err = _run(["run", "--config", str(cfg), "--epochs", "2", "--out", str(out)], capsys)
    assert rc == 0, err
    m = json.loads((out / "metrics.json").read_text())
    assert m["dataset"] == "breast_cancer" and m["n_source"] == 200 and m["n_target"] == 100
    ms = m["method_settings"]
    assert ms["epochs"] == 2                       # the flag beats the config
    assert ms["restarts"] == 2 and ms["similarity"] == "dot"    # [method] reaches the method
    assert m["settings"]["config"] == str(cfg)


def test_config_accepts_every_long_flag_name(data_file, tmp_path, capsys):
    """A TOML key may be any long flag of an option, as on the command line: latent-channels,
    hidden-channels and num_layers set the autoencoder's shape."""
    gctx = data_file("lincs/modzs_n25x50.gctx")
    cfg = tmp_path / "ae.toml"
    cfg.write_text(f'dataset = "lincs:{gctx}"\nnoise = "feature:1.0"\n'
                   'n-source = 15\nn-target = 10\nepochs = 1\nno-curves = true\nno-progress = true\n'
                   'latent-channels = 3\nhidden-channels = 7\nnum_layers = 1\n')
    out = tmp_path / "ae"
    rc, _, err = _run(["run", "--config", str(cfg), "--out", str(out)], capsys)
    assert rc == 0, err
    model = json.loads((out / "metrics.json").read_text())["settings"]["model"]
    assert "-7-3-7-" in model, model


@pytest.mark.parametrize("text, needle", [
    ('bogus_option = 1\n', "unknown setting 'bogus_option'"),
    ('n_source = "many"\n', "n_source"),
    ('[method]\nnot_a_setting = 3\n', "not_a_setting"),
    ('dataset = \n', "not valid TOML"),
])
def test_bad_config(tmp_path, capsys, text, needle):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    rc, _, err = _run(["run", "--config", str(cfg), "--out", str(tmp_path / "o"), "--no-progress"], capsys)
    _assert_one_line_error(rc, err, needle)


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("args, needle", [
    (["run", "--n-source", "-1"], "--n-source"),
    (["run", "--epochs", "abc"], "--epochs"),
    (["run", "--noise", "bogus"], "--noise"),
    (["run", "--noise", "label:1.5"], "--noise"),
    (["run", "--method", "nope"], "unknown method"),
    (["run", "--dataset", "foo"], "unknown dataset"),
    (["run", "--dataset", "csv:"], "csv:"),
    (["run", "--model", "transformer"], "--model"),
    (["run", "--n-source", "5000"], "--n-source"),
    (["run", "--dataset", "digits", "--model", "convnet"], "convnet"),
    (["run", "--restarts", "2", "--method", "dshap"], "--restarts"),
    (["run", "--unknown-flag"], "unrecognized"),
    (["nonsense"], "invalid choice"),
    ([], "a command is needed"),
])
def test_bad_arguments_one_line_exit_2(tmp_path, capsys, args, needle):
    if args and args[0] == "run":
        args = [*args, "--out", str(tmp_path / "o"), "--no-progress"]
    rc, _, err = _run(args, capsys)
    _assert_one_line_error(rc, err, needle)
    assert not (tmp_path / "o").exists()


def test_missing_data_root_and_files(tmp_path, capsys):
    rc, _, err = _run(["run", "--dataset", "adult", "--data-root", str(tmp_path / "nope"),
                       "--out", str(tmp_path / "o"), "--no-progress"], capsys)
    _assert_one_line_error(rc, err, "--data-root", str(tmp_path / "nope"))
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, _, err = _run(["run", "--dataset", "adult", "--data-root", str(empty), "--out", str(tmp_path / "o"),
                       "--no-progress"], capsys)
    _assert_one_line_error(rc, err, "adult.data", str(empty))
    rc, _, err = _run(["run", "--dataset", "lincs", "--data-root", str(empty), "--out", str(tmp_path / "o"),
                       "--no-progress"], capsys)
    _assert_one_line_error(rc, err, "modzs_n272x978.gctx")


def test_missing_data_env_var(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DVGS_FAST_DATA", str(tmp_path / "not_there"))
    rc, _, err = _run(["run", "--dataset", "blog", "--out", str(tmp_path / "o"), "--no-progress"], capsys)
    _assert_one_line_error(rc, err, "DVGS_FAST_DATA")


def test_unreadable_gctx(tmp_path, capsys):
    bad = tmp_path / "garbage.gctx"
    bad.write_bytes(os.urandom(2048))
    rc, _, err = _run(["run", "--dataset", f"lincs:{bad}", "--out", str(tmp_path / "o"), "--no-progress"], capsys)
    _assert_one_line_error(rc, err, str(bad))
    missing = tmp_path / "missing.gctx"
    rc, _, err = _run(["run", "--dataset", f"lincs:{missing}", "--out", str(tmp_path / "o"), "--no-progress"],
                      capsys)
    _assert_one_line_error(rc, err, str(missing), "not found")


def test_method_with_missing_optional_package_says_so(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(_methods.METHODS, "lossval",
                        ("some_optional_pkg_not_installed.sub", "LossVal", {}, "placeholder"))
    rc, _, err = _run(["run", "--method", "lossval", "--out", str(tmp_path / "o"), "--no-progress"], capsys)
    _assert_one_line_error(rc, err, "needs the package 'some_optional_pkg_not_installed'", "pip install")


def test_info_lists_methods_and_datasets(capsys):
    rc, out, err = _run(["info"], capsys)
    assert rc == 0, err
    assert "torch_version" in out
    for name in ("dvgs", "lossval", "dshap", "digits", "adult", "lincs"):
        assert name in out


# ----------------------------------------------------------------------------- quality (slow)
@pytest.mark.slow
def test_adult_paper_settings_reach_quality_bar(data_root, tmp_path, capsys):
    """DVGS paper, Adult: 1000 source / 400 target, 20% flipped labels, 3 restarts x 100 epochs."""
    if not ((data_root / "adult.data").is_file() and (data_root / "adult.test").is_file()):
        pytest.skip(f"adult.data / adult.test not found under {data_root}")
    out = tmp_path / "adult"
    rc, stdout, err = _run(["run", "--dataset", "adult", "--data-root", str(data_root), "--n-source", "1000",
                            "--n-target", "400", "--noise", "label:0.2", "--restarts", "3", "--epochs", "100",
                            "--no-curves", "--no-progress", "--out", str(out)], capsys)
    assert rc == 0, err
    m = json.loads((out / "metrics.json").read_text())
    assert m["method_settings"]["restarts"] == 3 and m["method_settings"]["epochs"] == 100
    assert m["metrics"]["auroc"] >= 0.85, m["metrics"]


def test_explicit_n_target_is_never_replaced(data_file, tmp_path, capsys):
    """--n-target 5000 equals the LINCS preset; it used to be replaced silently by n/4 (68 here).
    Given explicitly it is used as given: on a 272-sample file that leaves nothing to value."""
    path = data_file("lincs/modzs_n272x978.gctx")
    rc, _, err = _run(["run", "--dataset", "lincs", "--data-root", str(path), "--n-target", "5000", "--epochs", "1",
                       "--out", str(tmp_path / "o"), "--no-progress"], capsys)
    _assert_one_line_error(rc, err, "--n-target 5000")
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.incomplete").exists()
