"""`dvgs-fast run --dataset lincs --data-root FILE.gctx`: the out-of-core LINCS autoencoder run."""
from __future__ import annotations

import csv
import json

import numpy as np

from dvgs_fast.cli import main

F272 = "lincs/modzs_n272x978.gctx"
F377 = "lincs/test_l1000_highprecision.gctx"


def _run(argv, capsys):
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def _values(path):
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return rows


def test_lincs_gctx_run_balanced_target(tmp_path, capsys, data_file):
    path = data_file(F272)
    from dvgs_fast.datasets import load_lincs
    reader = load_lincs(path, chunked=True)
    # a folder holding exactly one .gctx file is as good as the file
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "level5.gctx").symlink_to(path)
    out = tmp_path / "run"
    rc, stdout, err = _run(["run", "--dataset", "lincs", "--data-root", str(folder), "--n-target", "40",
                            "--target-balance-by", "pert_id", "--epochs", "2", "--out", str(out),
                            "--no-progress", "--threads", "1"], capsys)
    assert rc == 0, err
    rows = _values(out / "values.csv")
    assert len(rows) == 272
    assert [r["cid"] for r in rows] == list(reader.sample_ids)
    vals = np.array([float(r["value"]) for r in rows])
    assert np.all(np.isfinite(vals)) and vals.std() > 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["noise"] == "none"
    assert "auroc" not in m["metrics"] and "noise_spearman" not in m["metrics"]
    assert m["metrics"]["n"] == 272 and "value_mean" in m["metrics"]
    assert "autoencoder 978-256-64-256-978" in m["settings"]["model"]
    ms = m["method_settings"]
    assert ms["loss"] == "mse" and ms["epochs"] == 2 and ms["target_batch_size"] == 512
    assert m["n_target"] == 40 and m["n_source"] == 272 and m["n_test"] == 0
    assert any("balanced over 6 values of 'pert_id'" in n for n in m["notes"])


def test_lincs_gctx_feature_noise_and_n_source(tmp_path, capsys, data_file):
    path = data_file(F377)                  # landmark flag pr_is_lmark, no HDF5 chunking
    out = tmp_path / "run"
    rc, stdout, err = _run(["run", "--dataset", "lincs", "--data-root", str(path), "--n-source", "200",
                            "--n-target", "60", "--noise", "feature:3", "--epochs", "2", "--out", str(out),
                            "--no-progress", "--threads", "1"], capsys)
    assert rc == 0, err
    rows = _values(out / "values.csv")
    assert len(rows) == 200 and "noise_sigma" in rows[0] and rows[0]["cid"]
    m = json.loads((out / "metrics.json").read_text())
    assert "noise_spearman" in m["metrics"] and "auroc" not in m["metrics"]
    assert np.isfinite(m["metrics"]["noise_spearman"])


def test_lincs_gctx_errors(tmp_path, capsys, data_root, data_file):
    data_file(F272)
    # the shared lincs folder holds several .gctx files: ambiguous, listed
    rc, _, err = _run(["run", "--dataset", "lincs", "--data-root", str(data_root / "lincs"), "--out",
                       str(tmp_path / "o"), "--no-progress"], capsys)
    assert rc == 2 and err.count("\n") == 1
    assert "modzs_n272x978.gctx" in err and "test_l1000_highprecision.gctx" in err
    rc, _, err = _run(["run", "--dataset", "lincs", "--data-root", str(data_root / F272), "--target-balance-by",
                       "no_such_field", "--out", str(tmp_path / "o2"), "--no-progress"], capsys)
    assert rc == 2 and "no_such_field" in err and "pert_id" in err
    rc, _, err = _run(["run", "--dataset", "digits", "--target-balance-by", "pert_id", "--out",
                       str(tmp_path / "o3"), "--no-progress"], capsys)
    assert rc == 2 and "--target-balance-by" in err
    rc, _, err = _run(["run", "--dataset", "lincs", "--data-root", str(data_root / F272), "--n-target", "272",
                       "--out", str(tmp_path / "o4"), "--no-progress"], capsys)
    assert rc == 2 and "--n-target" in err


def test_pick_target_balanced():
    from dvgs_fast.cli._lincs import pick_target
    codes = np.array([0] * 50 + [1] * 5 + [2] * 20)
    idx = pick_target(len(codes), 12, np.random.default_rng(0), codes)
    assert len(np.unique(idx)) == 12
    assert np.bincount(codes[idx], minlength=3).tolist() == [4, 4, 4]
    idx = pick_target(len(codes), 30, np.random.default_rng(0), codes)
    assert sorted(np.bincount(codes[idx], minlength=3).tolist()) == [5, 12, 13]   # the rare value exhausted
