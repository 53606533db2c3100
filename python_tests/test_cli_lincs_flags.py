"""The original DVGS README's LINCS command, through our CLI:

    python run_lincs_dvgs.py --data ../data/ --out ../lincs_results --epochs 25 --lr 1e-3 --compute_every 5
        --target_batch_size 2000 --source_batch_size 50 --do 0.2 --num_layers 2 --latent_channels 64
        --hidden_channels 500

becomes ``dvgs-fast run --dataset lincs`` + the same flags; checked on the real GCTX fixtures.
"""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from torch import nn

from dvgs_fast.cli import main
from dvgs_fast.cli import _models as M
from dvgs_fast.cli import build_parser

F272 = "lincs/modzs_n272x978.gctx"
F377 = "lincs/test_l1000_highprecision.gctx"
README_FLAGS = ["--epochs", "25", "--lr", "1e-3", "--compute_every", "5", "--target_batch_size", "2000",
                "--source_batch_size", "50", "--do", "0.2", "--num_layers", "2", "--latent_channels", "64",
                "--hidden_channels", "500"]


def _run(argv, capsys):
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_flags_parse_in_both_spellings():
    p = build_parser()
    a = p.parse_args(["run", "--dataset", "lincs", "--data", "D", "--out", "O", *README_FLAGS])
    b = p.parse_args(["run", "--dataset", "lincs", "--data-root", "D", "--out", "O", "--epochs", "25", "--lr", "1e-3",
                      "--compute-every", "5", "--target-batch-size", "2000", "--source-batch-size", "50",
                      "--dropout", "0.2", "--num-layers", "2", "--latent-channels", "64", "--hidden", "500"])
    for k, v in dict(data_root="D", out="O", epochs=25, lr=1e-3, compute_every=5, target_batch_size=2000,
                     source_batch_size=50, dropout=0.2, num_layers=2, latent=64, hidden=500).items():
        assert getattr(a, k) == v == getattr(b, k), k


def test_original_autoencoder_layout():
    # the original's AE(in=978, hidden=500, latent=64, num_layers=2, norm=False, dropout=0.2, act=Mish)
    m = M.factory("autoencoder", (978,), 0, hidden=500, dropout=0.2, num_layers=2, latent=64)()
    want = []
    for a, b in ((978, 64), (64, 978)):
        want += [("Linear", a, 500), ("Dropout", 0.2), ("Mish",), ("Linear", 500, 500), ("Dropout", 0.2), ("Mish",),
                 ("Linear", 500, b)]
    got = []
    for side in (m.encoder.f, m.decoder.f):
        for layer in side:
            if isinstance(layer, nn.Linear):
                got.append(("Linear", layer.in_features, layer.out_features))
            elif isinstance(layer, nn.Dropout):
                got.append(("Dropout", layer.p))
            else:
                got.append((type(layer).__name__,))
    assert got == want
    assert sum(p.numel() for p in m.parameters()) == 1_545_042
    assert [n for n, _ in m.named_parameters()][:2] == ["encoder.f.0.weight", "encoder.f.0.bias"]   # the original's names
    x = torch.randn(3, 978)
    m.eval()
    assert m(x).shape == (3, 978)
    # the default stays 978-256-64-256-978
    assert M.describe("autoencoder", (978,), 0, 256, 0.0) == "autoencoder 978-256-64-256-978 (Mish, MSE)"
    assert M.describe("autoencoder", (978,), 0, 500, 0.2, 2, 64) == \
        "autoencoder 978-500-500-64-500-500-978 (Mish, dropout 0.2, MSE)"


def test_readme_command_on_real_gctx_matches_native(tmp_path, capsys, data_file):
    path = data_file(F272)
    out = tmp_path / "lincs_results"
    rc, _, err = _run(["run", "--dataset", "lincs", "--data", str(path), "--out", str(out), *README_FLAGS,
                       "--no-progress", "--threads", "1"], capsys)
    assert rc == 0, err
    m = json.loads((out / "metrics.json").read_text())
    assert m["settings"]["model"] == "autoencoder 978-500-500-64-500-500-978 (Mish, dropout 0.2, MSE)"
    ms = m["method_settings"]
    assert (ms["epochs"], ms["lr"], ms["compute_every"], ms["target_batch_size"], ms["source_batch_size"],
            ms["loss"]) == (25, 1e-3, 5, 2000, 50, "mse")
    with open(out / "values.csv", newline="") as fh:
        vals = np.array([float(r["value"]) for r in csv.DictReader(fh)])
    assert vals.shape == (272,) and np.all(np.isfinite(vals)) and vals.std() > 0

    # the same run through the Python API: the flags mean what they say
    from dvgs_fast.cli import _lincs
    from dvgs_fast.cli._data import parse_noise
    from dvgs_fast.methods.dvgs import DVGS
    data = _lincs.split(_lincs.load(path, None), None, None, None, parse_noise("none"), 0)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = DVGS(M.factory("autoencoder", (978,), 0, hidden=500, dropout=0.2, num_layers=2, latent=64), loss="mse",
                   epochs=25, lr=1e-3, compute_every=5, target_batch_size=2000, source_batch_size=50, restarts=1,
                   seed=0, progress=False).fit(data.x_source, None, data.x_target, None)
    finally:
        torch.set_num_threads(before)
    assert res.info["snapshots"] == 5                  # 68 target samples: 1 step per epoch, 25 steps, every 5th
    np.testing.assert_allclose(vals, res.values, rtol=0, atol=1e-6)


def test_data_folder_of_the_original_setup_uses_level5(tmp_path, capsys, data_file):
    from dvgs_fast.cli._lincs import find_gctx
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "level4_beta_trt_cp_n1805898x12328.gctx").symlink_to(data_file(F377))
    (folder / "level5_beta_trt_cp_n720216x12328.gctx").symlink_to(data_file(F272))
    assert find_gctx(str(folder)).name.startswith("level5")
    out = tmp_path / "run"
    rc, _, err = _run(["run", "--dataset", "lincs", "--data", str(folder), "--out", str(out), "--epochs", "1",
                       "--num_layers", "1", "--hidden_channels", "32", "--latent_channels", "8", "--no-progress",
                       "--threads", "1"], capsys)
    assert rc == 0, err
    m = json.loads((out / "metrics.json").read_text())
    assert m["n_source"] == 272 and m["settings"]["model"] == "autoencoder 978-32-8-32-978 (Mish, MSE)"


@pytest.mark.parametrize("flags,message", [
    (["--dataset", "digits", "--latent_channels", "8"], "--latent-channels"),
    (["--dataset", "digits", "--model", "logistic", "--num_layers", "3"], "--num-layers"),
    (["--dataset", "digits", "--method", "random", "--compute_every", "2"], "--compute-every"),
    (["--dataset", "digits", "--compute_every", "0"], "--compute_every"),
])
def test_flag_errors_are_one_line(tmp_path, capsys, flags, message):
    rc, _, err = _run(["run", *flags, "--out", str(tmp_path / "o"), "--no-progress"], capsys)
    assert rc == 2 and err.count("\n") == 1 and message in err, err
