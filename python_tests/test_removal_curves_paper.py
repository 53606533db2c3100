"""Removal curves with the DVGS paper's model and settings (evaluate.remove_curves, --curve-model).

* the metrics are scikit-learn's on the same predictions (AUROC binary / multiclass, R^2);
* a curve point is the mean of its replicates, which differ;
* the batched refits (K networks trained as one stacked batch) equal a plain sequential
  ``nn.Module`` + ``torch.optim.Adam`` training of each network, float64, on random subsets of
  several sizes (1 row, a partial last batch, the whole set), for the paper's MLP (dropout,
  LayerNorm) and autoencoder;
* the paper's quantile selection, and the CLI (`run` and `compare` with --curve-model paper).
"""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.metrics import r2_score, roc_auc_score

from dvgs_fast import evaluate as ev
from dvgs_fast.cli import main
from dvgs_fast.cli._models import autoencoder, mlp
from dvgs_fast.evaluate import _net_refits as R


@pytest.fixture(scope="module")
def cancer():
    d = load_breast_cancer()
    X = (d.data - d.data.mean(0)) / d.data.std(0)
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(X))
    tr, te = idx[:200], idx[200:400]
    return X[tr], d.target[tr], X[te], d.target[te]


# ---------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------
def test_auroc_and_r2_equal_sklearn():
    rng = np.random.default_rng(1)
    y2 = rng.integers(0, 2, 50)
    p2 = rng.dirichlet([1, 1], 50)
    classes2 = np.array([0, 1])
    assert ev.score_predictions("auroc", y2, proba=p2, classes=classes2) == pytest.approx(
        roc_auc_score(y2, p2[:, 1]), abs=1e-15)
    y3 = rng.integers(0, 4, 80)
    p3 = rng.dirichlet([1, 1, 1, 1], 80)
    assert ev.score_predictions("auroc", y3, proba=p3, classes=np.arange(4)) == pytest.approx(
        roc_auc_score(y3, p3, multi_class="ovr", average="macro"), abs=1e-15)
    yr = rng.normal(size=(40, 3))
    pr = yr + rng.normal(size=(40, 3))
    assert ev.score_predictions("r2", yr, pred=pr) == pytest.approx(
        r2_score(yr, pr, multioutput="uniform_average"), abs=1e-15)


def test_curve_auroc_is_sklearns_on_the_refit(cancer):
    X, y, Xt, yt = cancer
    v = np.random.default_rng(2).normal(size=len(y))
    fr = [0.0, 0.3]
    c = ev.remove_curve(v, X, y, Xt, yt, mode="low", fractions=fr, metric="auroc", selection="quantile")
    for i, f in enumerate(fr):
        keep = np.flatnonzero(v >= np.quantile(v, f))       # the paper's remove-low rule
        est = LogisticRegression(max_iter=500).fit(X[keep], y[keep])
        assert c.scores[i] == pytest.approx(roc_auc_score(yt, est.predict_proba(Xt)[:, 1]), abs=1e-12)
        assert c.n_kept[i] == len(keep)


def test_quantile_selection_keeps_ties_together():
    v = np.array([0.0, 0.0, 0.0, 1.0, 2.0, 3.0, 3.0, 4.0])
    low = ev.removal_subsets(v, [0.0, 0.25, 0.5], "low", "quantile")
    high = ev.removal_subsets(v, [0.0, 0.25, 0.5], "high", "quantile")
    for f, keep in zip([0.0, 0.25, 0.5], low):
        np.testing.assert_array_equal(keep, np.flatnonzero(v >= np.quantile(v, f)))
    for f, keep in zip([0.0, 0.25, 0.5], high):
        np.testing.assert_array_equal(keep, np.flatnonzero(v <= np.quantile(v, 1 - f)))
    assert len(low[1]) == 8 and len(low[2]) == 4    # 25%: the three tied zeros stay together (none go)
    rank = ev.removal_subsets(v, [0.25], "low", "rank", seed=0)
    assert len(rank[0]) == 6                               # rank: exactly floor(0.25 * 8) removed


# ---------------------------------------------------------------------------------------------
# batched refits == sequential torch training
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["mlp", "autoencoder"])
def test_batched_refits_equal_sequential_adam(kind):
    rng = np.random.default_rng(3 if kind == "mlp" else 4)
    n, d = 29, 5
    X = torch.tensor(rng.normal(size=(n, d)))
    if kind == "mlp":
        factory = lambda: mlp(d, 3, 7, 0.5, 2)  # noqa: E731 - the paper's layout, small
        Y = torch.tensor(rng.integers(0, 3, n))
        loss = "ce"
    else:
        factory = lambda: autoencoder(d, 6, 3, 2, 0.25)  # noqa: E731
        Y = X.clone()
        loss = "mse"
    cfg = R.NetSettings(epochs=3, lr=3e-2, batch_size=8, weight_decay=1e-3, loss=loss, dtype=torch.float64)
    chain = R.as_chain(R.init_state(factory, 0), d)
    assert chain is not None and len(chain.dropouts) == (2 if kind == "mlp" else 4)
    sizes = (29, 1, 8, 13, 20)           # all rows, a single row, one full batch, partial batches
    subsets = [np.sort(rng.choice(n, k, replace=False)) for k in sizes]
    nets = [R.init_state(factory, 100 + i).double() for i in range(len(sizes))]
    seeds = [200 + i for i in range(len(sizes))]
    params = R.train_batched(chain, R.stack_inits(nets, chain.names), X, Y, subsets, seeds, cfg)
    outs = R.batched_outputs(chain, params, X)
    for k in range(len(sizes)):
        ref = R.train_sequential(copy.deepcopy(nets[k]), X, Y, subsets[k], seeds[k], cfg, chain)
        ref_p = dict(ref.named_parameters())
        init_p = dict(nets[k].named_parameters())
        for name in chain.names:
            moved = (ref_p[name] - init_p[name]).abs().max().item()
            assert moved > 1e-3, (kind, k, name)                      # training did something
            torch.testing.assert_close(params[name][k], ref_p[name].detach(), rtol=1e-9, atol=1e-11)
        with torch.no_grad():
            torch.testing.assert_close(outs[k], ref(X), rtol=1e-9, atol=1e-11)


def test_batched_and_sequential_curves_agree(cancer):
    X, y, Xt, yt = cancer
    v = np.random.default_rng(5).normal(size=len(y))
    kw = dict(fractions=[0.0, 0.2, 0.45], model=lambda: mlp(X.shape[1], 2, 8, 0.5, 2), metric="auroc",
              repeats=2, selection="quantile", seed=7)
    opts = {"epochs": 2, "lr": 1e-2, "batch_size": 64, "dtype": torch.float64}
    b = ev.remove_curves(v, X, y, Xt, yt, torch_options={**opts, "engine": "batched"}, **kw)
    s = ev.remove_curves(v, X, y, Xt, yt, torch_options={**opts, "engine": "sequential"}, **kw)
    for mode in ("high", "low"):
        np.testing.assert_allclose(b[mode].replicate_scores, s[mode].replicate_scores, rtol=0, atol=1e-12)
        assert b[mode].info["engine"] == "batched" and s[mode].info["engine"] == "sequential"
        # a point is the mean of its replicates, and the replicates are different networks
        np.testing.assert_allclose(b[mode].scores, b[mode].replicate_scores.mean(1), rtol=0, atol=1e-15)
        assert b[mode].replicate_scores.shape == (3, 2)
        assert np.any(b[mode].replicate_scores[:, 0] != b[mode].replicate_scores[:, 1])
    # replicate r of point 0 starts from the same weights in both modes and sees all data, but
    # its batch order / dropout differ: close, not equal (as the paper's two calls)
    assert b["high"].n_kept[0] == b["low"].n_kept[0] == len(y)


def test_regression_r2_path(cancer):
    X, _, Xt, _ = cancer
    X, Xt = X[:, :6], Xt[:, :6]
    v = np.random.default_rng(6).normal(size=len(X))
    c = ev.remove_curve(v, X, X, Xt, Xt, mode="high", fractions=[0.0, 0.5], metric="r2", model=LinearRegression())
    for i, keep in enumerate(ev.removal_subsets(v, [0.0, 0.5], "high", "rank", seed=0)):
        pred = LinearRegression().fit(X[keep], X[keep]).predict(Xt)
        assert c.scores[i] == pytest.approx(r2_score(Xt, pred, multioutput="uniform_average"), abs=1e-12)
    assert c.scores[0] == pytest.approx(1.0, abs=1e-9)          # a linear map reconstructs exactly
    ae = ev.remove_curves(v, X, X, Xt, Xt, fractions=[0.0, 0.5], metric="r2", seed=1,
                          model=lambda: autoencoder(6, 16, 4, 2, 0.0),
                          torch_options={"epochs": 30, "lr": 1e-2, "batch_size": 50})
    for mode in ("high", "low"):
        assert ae[mode].metric_label == "R^2" and ae[mode].info["loss"] == "MSE"
        assert np.all(ae[mode].scores > 0.2) and np.all(ae[mode].scores <= 1.0)
    # 1-D float targets (a plain regressor)
    r = ev.remove_curve(v, X[:, 1:], X[:, 0], Xt[:, 1:], Xt[:, 0], fractions=[0.0], metric="r2",
                        model=lambda: torch.nn.Linear(5, 1), torch_options={"epochs": 20, "lr": 5e-2})
    assert -1.0 < r.scores[0] <= 1.0


def test_validation(cancer):
    X, y, Xt, yt = cancer
    v = np.zeros(len(y))
    with pytest.raises(ValueError, match="repeats"):
        ev.remove_curves(v, X, y, Xt, yt, repeats=0)
    with pytest.raises(ValueError, match="selection"):
        ev.remove_curves(v, X, y, Xt, yt, selection="top")
    with pytest.raises(ValueError, match="y_test"):
        ev.remove_curves(v, X, y, Xt, np.zeros_like(yt), metric="auroc")
    with pytest.raises(ValueError, match="torch_options"):
        ev.remove_curves(v, X, y, Xt, yt, torch_options={"epochs": 2})          # sklearn model
    with pytest.raises(ValueError, match="epochs"):
        ev.remove_curves(v, X, y, Xt, yt, model=lambda: torch.nn.Linear(30, 2), torch_options={"epochs": 0})
    with pytest.raises(ValueError, match="model"):
        ev.remove_curves(v, X, y, Xt, yt, model=lambda: torch.nn.Linear(30, 3))   # 3 outputs, 2 classes
    conv = lambda: torch.nn.Sequential(torch.nn.Linear(30, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))  # noqa: E731
    with pytest.raises(ValueError, match="engine"):
        ev.remove_curves(v, X, y, Xt, yt, model=conv, torch_options={"engine": "batched"})
    # a network that is not a chain falls back to sequential training
    c = ev.remove_curve(v, X, y, Xt, yt, fractions=[0.0], model=conv, metric="auroc",
                        torch_options={"epochs": 2, "batch_size": 64})
    assert c.info["engine"] == "sequential" and 0.0 <= c.scores[0] <= 1.0


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------
BASE = ["--dataset", "breast_cancer", "--n-source", "120", "--n-target", "60", "--n-test", "100",
        "--no-progress", "--threads", "1", "--curve-model", "paper", "--curve-epochs", "2"]


def test_cli_run_with_paper_curves(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["run", "--method", "random", "--out", str(out), *BASE])
    _, err = capsys.readouterr()
    assert rc == 0, err
    met = json.loads((out / "metrics.json").read_text())["metrics"]
    for mode in ("high", "low"):
        c = met[f"remove_{mode}"]
        assert c["metric"] == "auroc" and c["curve_model"] == "paper"
        assert c["epochs"] == 2 and c["repeats"] == 2 and c["selection"] == "quantile"
        assert len(c["fractions"]) == 10 and c["fractions"][-1] == pytest.approx(0.5)
        assert np.allclose(c["scores"], np.mean(c["replicate_scores"], axis=1))
        assert "MLP 30-100-100-2" in c["model"]
    md = (out / "report.md").read_text()
    assert "test AUROC, remove high first (mean of 2 refits)" in md
    assert "the paper's MLP 30-100-100-2" in md and "2 epochs" in md
    assert (out / "plots" / "remove_curves.png").is_file()


def test_cli_compare_with_paper_curves(tmp_path, capsys):
    out = tmp_path / "cmp"
    rc = main(["compare", "--method", "random,knn_shapley", "--seeds", "0", "--out", str(out), *BASE,
               "--curve-repeats", "1"])
    _, err = capsys.readouterr()
    assert rc == 0, err
    doc = json.loads((out / "compare.json").read_text())
    assert "paper's MLP" in doc["curves"] and "1 replicate per point" in doc["curves"]
    for r in doc["runs"]:
        assert r["metrics"]["remove_high"]["metric"] == "auroc"
    assert "test AUROC" in (out / "compare.md").read_text() or "AUROC" in doc["curves"]
    assert "Removal curves: the paper's MLP" in (out / "compare.md").read_text()
    assert (out / "plots" / "remove_curves.png").is_file()


@pytest.mark.parametrize("argv, needle", [
    (["--curve-model", "mlp"], "--curve-model"),
    (["--curve-epochs", "3"], "--curve-epochs"),                     # needs --curve-model paper
    (["--curve-model", "paper", "--curve-repeats", "0"], "--curve-repeats"),
    (["--curve-model", "paper", "--curve-epochs", "x"], "--curve-epochs"),
])
def test_cli_bad_curve_options(tmp_path, capsys, argv, needle):
    rc = main(["run", "--method", "random", "--dataset", "breast_cancer", "--no-progress",
               "--out", str(tmp_path / "bad"), *argv])
    _, err = capsys.readouterr()
    assert rc == 2, err
    assert err.strip().splitlines()[-1].startswith("error: ") and needle in err.strip().splitlines()[-1]
    assert not (tmp_path / "bad").exists()
