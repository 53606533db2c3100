"""Counterfactual ground truth (dvgs_fast.evaluate.counterfactual).

* the batched retrains equal plain ``nn.Module`` + ``torch.optim`` loops written here, float64,
  for every engine (full-batch linear grid, stacked chain networks in both data orders, the
  plain fallback), with masks that empty a batch;
* leave-one-out of a converged L2 logistic / ridge regression agrees with the exact influence
  (Spearman >= 0.99), and exact_linear_influence equals an autograd Hessian computation;
* a known-linear datamodel (a bias-only model: its fit is the subset mean) scores LDS = 1 and
  LOO Spearman = 1, its negation -1, random scores about 0;
* the cache: reuse, another folder for another setting, refusal of a foreign or corrupted
  folder, resume after a kill, the lock; max_time; bad input; two gloo ranks == one process.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from torch import nn

from dvgs_fast.evaluate import counterfactual as cf
from dvgs_fast.evaluate.counterfactual import groundtruth as gt_module
from dvgs_fast.evaluate.counterfactual._data import prepare
from dvgs_fast.evaluate.counterfactual.cache import CacheError, GroundTruthCache
from dvgs_fast.evaluate.counterfactual.retrain import Retrainer

F64 = torch.float64


def _task(n=40, q=7, d=5, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    X, Xq = rng.normal(size=(n, d)), rng.normal(size=(q, d))
    w = rng.normal(size=(d, classes))
    Y = (X @ w + rng.normal(size=(n, classes))).argmax(1)
    Yq = (Xq @ w).argmax(1)
    return X, Y, Xq, Yq


class Residual(nn.Module):
    """Not a chain of layers: trained by the plain engine."""

    def __init__(self, d, k):
        super().__init__()
        self.a, self.b = nn.Linear(d, d), nn.Linear(d, k)

    def forward(self, x):
        return self.b(x + torch.tanh(self.a(x)))


# ---------------------------------------------------------------------------------------------
# batched retrains == plain torch loops
# ---------------------------------------------------------------------------------------------
def _plain_loop(recipe, X, Y, rows, seed, order):
    """The loop a user writes: the seed's network, torch.optim, the documented batch order."""
    torch.manual_seed(seed)
    net = recipe.model().double()
    opt = (torch.optim.SGD if recipe.optimizer == "sgd" else torch.optim.Adam)(
        net.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    g = torch.Generator().manual_seed(seed)
    X, Y = torch.as_tensor(X, dtype=F64), torch.as_tensor(Y)
    keep = torch.zeros(len(X), dtype=torch.bool)
    keep[torch.as_tensor(rows)] = True
    B = recipe.batch_size or len(X)
    lossf = nn.CrossEntropyLoss() if recipe.loss == "cross_entropy" else nn.MSELoss()
    for _ in range(recipe.epochs):
        if order == "shared":            # all rows shuffled, removed ones dropped from their batch
            perm = torch.randperm(len(X), generator=g)
            batches = [b[keep[b]] for b in perm.split(B)]
        else:                            # the kept rows shuffled on their own
            kept = torch.as_tensor(rows)
            batches = list(kept[torch.randperm(len(kept), generator=g)].split(B))
        for b in batches:
            if len(b) == 0:
                continue
            opt.zero_grad()
            out = net(X[b])
            lossf(out if recipe.loss == "cross_entropy" else out.squeeze(-1), Y[b]).backward()
            opt.step()
    return net


CASES = {
    # name: (model factory, loss, optimizer, batch_size, data order, expected engine)
    "logistic_sgd_full": (lambda: nn.Linear(5, 3), "cross_entropy", "sgd", None, "shared", "linear"),
    "logistic_adam_full": (lambda: nn.Linear(5, 3), "cross_entropy", "adam", None, "subset", "linear"),
    "ridge_sgd_full": (lambda: nn.Linear(5, 1), "mse", "sgd", None, "shared", "linear"),
    "mlp_adam_shared": (lambda: nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)), "cross_entropy",
                        "adam", 4, "shared", "chain"),
    "mlp_sgd_subset": (lambda: nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)), "cross_entropy",
                       "sgd", 6, "subset", "chain"),
    "residual_adam_shared": (lambda: Residual(5, 3), "cross_entropy", "adam", 8, "shared", "plain"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_batched_retrains_equal_plain_torch_loops(name):
    factory, loss, opt, bs, order, engine = CASES[name]
    X, Y, Xq, Yq = _task(n=23)
    if loss == "mse":
        Y, Yq = X @ np.arange(1.0, 6.0) + 0.1, Xq @ np.arange(1.0, 6.0)
    rec = cf.TrainingRecipe(factory, loss=loss, optimizer=opt, lr=0.05, epochs=4, batch_size=bs,
                            weight_decay=1e-2, data_order=order, dtype=F64)
    data = prepare(X, Y, Xq, Yq, rec)
    rng = np.random.default_rng(1)
    masks = rng.random((5, 23)) < 0.6
    masks[0] = True                       # every row
    masks[1] = True
    masks[1, 7] = False                   # leave one out
    masks[2] = False
    masks[2, [0, 22]] = True              # two rows: most batches of the shared order are empty
    r = Retrainer(rec, data, order=order, output="margin" if loss != "mse" else "neg_loss")
    assert r.kind == engine
    got = r.outputs(r.fit(torch.as_tensor(masks), 3, r.initial_params(3)))
    init = r.outputs(r.fit(torch.as_tensor(masks[:1]), 3, r.initial_params(3), epochs=1))
    for k, m in enumerate(masks):
        net = _plain_loop(rec, X, Y, np.flatnonzero(m), 3, order)
        with torch.no_grad():
            z = net(torch.as_tensor(Xq, dtype=F64))
        want = cf.query_outputs(z, data.yq, r.output, loss == "cross_entropy").numpy()
        np.testing.assert_allclose(got[k], want, rtol=1e-10, atol=1e-12, err_msg=f"{name} mask {k}")
    assert np.abs(got[0] - init[0]).max() > 1e-3          # training moved the outputs
    assert np.abs(got[0] - got[1]).max() > 1e-8           # one row left out changes them


def test_dropout_networks_equal_the_plain_engine_in_both_orders():
    X, Y, Xq, Yq = _task(n=30)
    factory = lambda: nn.Sequential(nn.Linear(5, 9), nn.Mish(), nn.Dropout(0.3),  # noqa: E731
                                    nn.LayerNorm(9, elementwise_affine=False), nn.Linear(9, 3))
    masks = torch.as_tensor(np.random.default_rng(2).random((4, 30)) < 0.7)
    for order, opt in (("shared", "adam"), ("subset", "sgd")):
        rec = cf.TrainingRecipe(factory, optimizer=opt, lr=0.05, epochs=3, batch_size=7, dtype=F64)
        data = prepare(X, Y, Xq, Yq, rec)
        outs = {}
        for engine in ("auto", "plain"):
            r = Retrainer(rec, data, order=order, output="margin", engine=engine)
            outs[r.kind] = r.outputs(r.fit(masks, 5, r.initial_params(5)))
        np.testing.assert_allclose(outs["chain"], outs["plain"], rtol=1e-10, atol=1e-12)


def test_margin_is_the_log_odds_of_the_true_class():
    z = torch.tensor(np.random.default_rng(3).normal(size=(6, 4)))
    y = torch.tensor([0, 1, 2, 3, 1, 0])
    logp = torch.log_softmax(z, 1).gather(1, y[:, None])[:, 0]
    np.testing.assert_allclose(cf.query_outputs(z, y, "margin", True), logp - torch.log1p(-logp.exp()), rtol=1e-12)
    np.testing.assert_allclose(cf.query_outputs(z, y, "neg_loss", True), logp, rtol=1e-12)
    z2 = z[:, :2]
    y2 = torch.tensor([0, 1, 1, 0, 1, 0])
    np.testing.assert_allclose(cf.query_outputs(z2, y2, "margin", True),
                               z2.gather(1, y2[:, None])[:, 0] - z2.gather(1, 1 - y2[:, None])[:, 0], rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# a known answer: leave-one-out of a converged L2 linear model = the exact influence
# ---------------------------------------------------------------------------------------------
def _autograd_influence(W, b, X, Y, Xq, Yq, lam, loss):
    """-grad f_q^T H^-1 grad l_i / (n - 1) with torch.autograd's Hessian of the whole objective."""
    X, Xq = torch.as_tensor(X, dtype=F64), torch.as_tensor(Xq, dtype=F64)
    o, d = W.shape
    theta0 = torch.cat([W.reshape(-1), b]).detach()

    def unpack(t):
        return t[:o * d].view(o, d), t[o * d:]

    def per_row(t, x, y):
        Wt, bt = unpack(t)
        z = x @ Wt.T + bt
        if loss == "cross_entropy":
            return nn.functional.cross_entropy(z, torch.as_tensor(y), reduction="none")
        return (z[:, 0] - torch.as_tensor(y, dtype=F64)) ** 2

    def objective(t):
        return per_row(t, X, Y).mean() + lam / 2 * (t * t).sum()

    def out_q(t):
        if loss == "cross_entropy":
            Wt, bt = unpack(t)
            return cf.query_outputs(Xq @ Wt.T + bt, torch.as_tensor(Yq), "margin", True)
        return -per_row(t, Xq, Yq)

    H = torch.autograd.functional.hessian(objective, theta0)
    G = torch.autograd.functional.jacobian(lambda t: per_row(t, X, Y), theta0)
    Fq = torch.autograd.functional.jacobian(out_q, theta0)
    return (-(Fq @ torch.linalg.solve(H, G.T)) / (len(X) - 1)).numpy()


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_loo_of_l2_linear_model_matches_exact_influence(loss):
    X, Y, Xq, Yq = _task(n=60, q=12, d=4, classes=3, seed=4)
    if loss == "mse":
        rng = np.random.default_rng(5)
        Y, Yq = X @ rng.normal(size=4) + rng.normal(size=60), Xq @ rng.normal(size=4)
    lam = 0.05
    rec = cf.TrainingRecipe(lambda: nn.Linear(4, 3 if loss == "cross_entropy" else 1), loss=loss, optimizer="sgd",
                            lr=0.5 if loss == "cross_entropy" else 0.1, epochs=1500, weight_decay=lam, dtype=F64)
    gt = cf.loo_ground_truth(rec, X, Y, Xq, Yq, seeds=1, warm_start_epochs=600, progress=False)
    assert gt.complete and gt.info["engine"] == "linear" and gt.effects.shape == (12, 60)
    full = cf.reference_model(rec, X, Y, seed=0)                 # the model LOO retrains compare with
    np.testing.assert_allclose(cf.query_outputs(full(torch.as_tensor(Xq)), torch.as_tensor(Yq), gt.output,
                                                loss == "cross_entropy").detach().numpy(),
                               cf.loo_ground_truth(rec, X, Y, Xq, Yq, indices=[0, 1, 2], seeds=1,
                                                   progress=False).full_outputs[0], rtol=1e-12, atol=1e-12)
    W, b = full.weight.detach(), full.bias.detach()
    infl = cf.exact_linear_influence(W, b, X, Y, Xq, Yq, weight_decay=lam, loss=loss)
    np.testing.assert_allclose(infl, _autograd_influence(W, b, X, Y, Xq, Yq, lam, loss), rtol=1e-7, atol=1e-12)
    corr = cf.loo_correlation(infl, gt)
    assert corr.spearman.mean >= 0.99 and corr.pearson.mean >= 0.99, corr
    assert corr.spearman.per_query.min() >= 0.95
    # the callable (blockwise) source gives the same numbers
    blockwise = cf.loo_correlation(lambda rows: infl[rows], gt, query_block=5)
    np.testing.assert_allclose(blockwise.spearman.per_query, corr.spearman.per_query, rtol=0, atol=1e-15)


# ---------------------------------------------------------------------------------------------
# a known-linear datamodel: a bias-only model's fit is the mean target of its subset
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mean_model():
    """Features all zero, MSE, full-batch SGD with lr 0.5: one step lands on the subset mean.
    The queries' targets lie above every source target, so their output -(mean - y_q)^2 rises
    with the mean: the sum of y_i over a subset (of fixed size) predicts it exactly."""
    rng = np.random.default_rng(6)
    n, q = 30, 5
    y = rng.normal(size=n)
    yq = 10.0 + rng.random(q)
    rec = cf.TrainingRecipe(lambda: nn.Linear(3, 1), loss="mse", optimizer="sgd", lr=0.5, epochs=1, dtype=F64)
    args = (np.zeros((n, 3)), y, np.zeros((q, 3)), yq)
    lds_gt = cf.lds_ground_truth(rec, *args, n_subsets=40, alpha=0.5, seeds=2, progress=False)
    loo_gt = cf.loo_ground_truth(rec, *args, seeds=1, progress=False)
    return y, yq, lds_gt, loo_gt


def test_known_linear_datamodel_scores_one(mean_model):
    y, yq, lds_gt, loo_gt = mean_model
    means = np.array([y[m].mean() for m in lds_gt.masks])
    np.testing.assert_allclose(lds_gt.actual, -(means[:, None] - yq[None]) ** 2, rtol=1e-12)
    fit_without = (y.sum() - y) / 29
    np.testing.assert_allclose(loo_gt.outputs[0, 1:], -(fit_without[:, None] - yq[None]) ** 2, rtol=1e-12)
    scores = np.tile(y, (5, 1))
    res = cf.lds(scores, lds_gt)
    assert res.mean == pytest.approx(1.0, abs=1e-12) and res.per_query.shape == (5,)
    assert cf.lds(-scores, lds_gt).mean == pytest.approx(-1.0, abs=1e-12)
    noise = cf.lds(np.random.default_rng(7).normal(size=(5, 30)), lds_gt)
    assert abs(noise.mean) < 0.5 and noise.stderr > 0
    corr = cf.loo_correlation(torch.as_tensor(scores), loo_gt)
    assert corr.spearman.mean == pytest.approx(1.0, abs=1e-12) and corr.pearson.mean > 0.999
    # per query, the Spearman correlation over subsets as scipy computes it
    pred = np.random.default_rng(7).normal(size=(5, 30)) @ lds_gt.masks.T.astype(float)
    ref = [spearmanr(pred[j], lds_gt.actual[:, j])[0] for j in range(5)]
    np.testing.assert_allclose(noise.per_query, ref, rtol=1e-12)
    assert noise.stderr == pytest.approx(np.std(ref, ddof=1) / np.sqrt(5))
    block = cf.lds(lambda rows: scores[rows], lds_gt, query_block=2)          # blockwise source
    assert block.mean == res.mean and np.array_equal(block.per_query, res.per_query)
    from dvgs_fast.attribution import AttributionResult                         # what attribute() returns
    att = AttributionResult(n_query=5, n_source=30, method="x", scores=scores.astype(np.float32))
    assert cf.lds(att, lds_gt, query_block=3).mean == pytest.approx(1.0, abs=1e-12)


def test_constant_scores_count_as_zero_with_a_warning(mean_model):
    _, _, lds_gt, _ = mean_model
    with pytest.warns(UserWarning, match="5 of 5 queries have constant"):
        res = cf.lds(np.zeros((5, 30)), lds_gt)
    assert res.mean == 0.0 and np.all(res.per_query == 0.0)


# ---------------------------------------------------------------------------------------------
# seed noise; reproducibility
# ---------------------------------------------------------------------------------------------
def test_seed_noise_and_rerun_identity():
    X, Y, Xq, Yq = _task(n=40, q=8)
    mlp = cf.TrainingRecipe(lambda: nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3)), optimizer="adam",
                            lr=0.02, epochs=6, batch_size=8)
    a = cf.lds_ground_truth(mlp, X, Y, Xq, Yq, n_subsets=12, seeds=4, block_size=5, progress=False)
    b = cf.lds_ground_truth(mlp, X, Y, Xq, Yq, n_subsets=12, seeds=4, block_size=5, progress=False)
    assert np.array_equal(a.outputs, b.outputs)                       # identical on a rerun
    noise = cf.seed_noise(a)
    assert -1 <= noise.split_half.mean < 0.999 and noise.split_half.per_query.shape == (8,)
    r = noise.split_half.mean
    assert noise.reliability == pytest.approx(2 * r / (1 + r))
    # a convex model trained to convergence does not depend on its seed
    lr = cf.TrainingRecipe(lambda: nn.Linear(5, 3), lr=0.5, epochs=800, weight_decay=0.1, dtype=F64)
    conv = cf.loo_ground_truth(lr, X, Y, Xq, Yq, indices=10, seeds=2, progress=False)
    assert cf.seed_noise(conv).split_half.mean > 0.999
    with pytest.raises(ValueError, match="two or more seeds"):
        cf.seed_noise(cf.loo_ground_truth(lr, X, Y, Xq, Yq, indices=5, seeds=[3], progress=False))


# ---------------------------------------------------------------------------------------------
# cache, resume, lock, max_time
# ---------------------------------------------------------------------------------------------
def _small_lds(tmp_path, **kw):
    X, Y, Xq, Yq = _task(n=30, q=6)
    rec = cf.TrainingRecipe(lambda: nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)), optimizer="adam",
                            lr=kw.pop("lr", 0.02), epochs=3, batch_size=8)
    opts = {"n_subsets": 9, "seeds": 2, "block_size": 4, "cache_dir": tmp_path, "progress": False, **kw}
    return cf.lds_ground_truth(rec, X, Y, Xq, Yq, **opts)


def test_cache_reuses_and_never_mixes(tmp_path):
    first = _small_lds(tmp_path)
    assert first.timings["retrains_computed"] == 18 and first.timings["retrains_cached"] == 0
    again = _small_lds(tmp_path)
    assert again.timings["retrains_computed"] == 0 and again.timings["retrains_cached"] == 18
    assert np.array_equal(again.outputs, first.outputs) and again.info["cache"] == first.info["cache"]
    other = _small_lds(tmp_path, lr=0.03)                        # another setting: another folder
    assert other.info["cache"] != first.info["cache"] and other.timings["retrains_computed"] == 18
    assert not np.array_equal(other.outputs, first.outputs)
    manifest = json.loads((tmp_path / first.info["cache"].split("/")[-1] / "manifest.json").read_text())
    assert manifest["fingerprint"]["settings"]["recipe"]["lr"] == 0.02
    assert len(list(tmp_path.iterdir())) == 2


def test_resume_after_a_kill_computes_only_the_missing_blocks(tmp_path):
    full = _small_lds(tmp_path)
    folder = tmp_path / full.info["cache"].split("/")[-1]
    blocks = sorted(folder.glob("lds_block*_checkpoint.pt"))
    assert len(blocks) == 6                                      # 2 seeds x ceil(9 / 4)
    for p in blocks[2:5]:
        p.unlink()
    (folder / ".lds_block00003_checkpoint.pt.abc123.tmp").write_bytes(b"half a write")   # killed mid-write
    resumed = _small_lds(tmp_path)
    assert resumed.timings["retrains_computed"] == 4 + 1 + 4 and resumed.timings["retrains_cached"] == 9
    assert np.array_equal(resumed.outputs, full.outputs)


def test_cache_refuses_a_foreign_or_corrupted_folder(tmp_path):
    full = _small_lds(tmp_path)
    folder = tmp_path / full.info["cache"].split("/")[-1]
    block = sorted(folder.glob("lds_block*_checkpoint.pt"))[0]
    data = bytearray(block.read_bytes())
    data[-5] ^= 0xFF
    block.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=r"cache_dir: .*checksum"):
        _small_lds(tmp_path)
    manifest = folder / "manifest.json"
    m = json.loads(manifest.read_text())
    m["fingerprint"]["data"] = "something else"
    manifest.write_text(json.dumps(m))
    with pytest.raises(CacheError, match="holds another ground truth .*data"):
        _small_lds(tmp_path)


def test_cache_folder_in_use_is_refused(tmp_path):
    full = _small_lds(tmp_path)
    fp = json.loads((tmp_path / full.info["cache"].split("/")[-1] / "manifest.json").read_text())["fingerprint"]
    with GroundTruthCache(tmp_path, "lds", fp):
        with pytest.raises(CacheError, match="in use by another"):
            _small_lds(tmp_path)


class _StopAfter:
    """A Budget whose time runs out after `n` checks (deterministic max_time)."""

    n = 2

    def __init__(self, max_time):
        self.calls = 0

    def time_up(self):
        self.calls += 1
        return self.calls > _StopAfter.n


def test_max_time_stops_says_so_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setattr(gt_module, "Budget", _StopAfter)
    part = _small_lds(tmp_path, max_time=5.0)
    assert part.status == "stopped" and part.stopped_by == "max_time" and not part.complete
    assert part.done.sum() == 8 and part.progress == "8 of 18 retrains"
    with pytest.raises(ValueError, match="stopped by max_time after 8 of 18 retrains"):
        cf.lds(np.zeros((6, 30)), part)
    monkeypatch.undo()
    done = _small_lds(tmp_path)
    assert done.complete and done.timings["retrains_cached"] == 8
    assert np.array_equal(done.outputs, _small_lds(tmp_path / "fresh").outputs)


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------
def _args(**change):
    X, Y, Xq, Yq = _task(n=12, q=4)
    a = {"x_source": X, "y_source": Y, "x_query": Xq, "y_query": Yq}
    a.update(change)
    return a


LR = cf.TrainingRecipe(lambda: nn.Linear(5, 3), lr=0.1, epochs=2)


@pytest.mark.parametrize("call, match", [
    (lambda: cf.lds_ground_truth(LR, **_args(y_source=np.zeros(11, int))), "y_source: has 11 rows"),
    (lambda: cf.lds_ground_truth(LR, **_args(x_source=np.full((12, 5), np.nan))), "x_source: contains 60 NaN"),
    (lambda: cf.lds_ground_truth(LR, **_args(x_query=np.zeros((4, 6)))), "x_query: sample shape"),
    (lambda: cf.lds_ground_truth(LR, **_args(x_query=np.zeros((0, 5)), y_query=np.zeros(0, int))), "x_query: is empty"),
    (lambda: cf.lds_ground_truth(LR, **_args(y_query=np.array([0, 1, 2, 7]))), "model: expected output shape"),
    (lambda: cf.lds_ground_truth(LR, **_args(), n_classes=2), "y_source: labels must be in"),
    (lambda: cf.lds_ground_truth(LR, **_args(x_source=np.zeros((1, 5)), y_source=[0])), "at least 2 source rows"),
    (lambda: cf.lds_ground_truth(LR, **_args(), alpha=1.0), "alpha: gives subsets of 12"),
    (lambda: cf.lds_ground_truth(LR, **_args(), n_subsets=2), "n_subsets: .* at least 3"),
    (lambda: cf.lds_ground_truth(LR, **_args(), seeds=[1, 1]), "seeds: lists a seed twice"),
    (lambda: cf.lds_ground_truth(LR, **_args(), seeds=[]), "seeds: is empty"),
    (lambda: cf.lds_ground_truth(LR, **_args(), engine="fast"), "engine: unknown value"),
    (lambda: cf.lds_ground_truth(LR, **_args(), subset_seed=-1), "subset_seed: must be >= 0"),
    (lambda: cf.lds_ground_truth(LR, **_args(), max_time=-1), "max_time: must be > 0"),
    (lambda: cf.lds_ground_truth("logistic", **_args()), "recipe: expected a TrainingRecipe"),
    (lambda: cf.loo_ground_truth(LR, **_args(), indices=[0, 1, 1]), "indices: lists a row twice"),
    (lambda: cf.loo_ground_truth(LR, **_args(), indices=[0, 1, 12]), r"indices: must lie in \[0, 12\)"),
    (lambda: cf.loo_ground_truth(LR, **_args(), indices=2), r"indices: .* \[3, 12\]"),
    (lambda: cf.loo_ground_truth(cf.TrainingRecipe(lambda: nn.Linear(5, 1), loss="mse"),
                                 **_args(y_source=np.zeros(12), y_query=np.zeros(4)), output="margin"),
     "output: 'margin' needs a classification"),
    (lambda: cf.TrainingRecipe(lambda: nn.Linear(5, 3), lr=-1), "lr: must be > 0"),
    (lambda: cf.TrainingRecipe(lambda: nn.Linear(5, 3), optimizer="rmsprop"), "optimizer: unknown value"),
    (lambda: cf.TrainingRecipe(lambda: nn.Linear(5, 3), data_order="random"), "data_order: unknown value"),
    (lambda: cf.TrainingRecipe("mlp"), "model: expected an nn.Module or a zero-argument factory"),
    (lambda: cf.lds_ground_truth(cf.TrainingRecipe(lambda: nn.Sequential(nn.Linear(5, 3), nn.BatchNorm1d(3))),
                                 **_args()), "model: batch norm is not supported"),
    (lambda: cf.exact_linear_influence(np.zeros((3, 5)), None, *_task(n=12, q=4), weight_decay=0),
     "weight_decay: must be > 0"),
])
def test_bad_input_is_one_value_error_naming_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_bad_scores_are_refused(mean_model):
    _, _, lds_gt, loo_gt = mean_model
    with pytest.raises(ValueError, match=r"scores: expected shape \[5, 30\]"):
        cf.lds(np.zeros((30, 5)), lds_gt)
    with pytest.raises(ValueError, match="scores: contains 5 NaN"):
        cf.lds(np.where(np.eye(5, 30) > 0, np.nan, 0.0), lds_gt)
    with pytest.raises(ValueError, match=r"scores\(0:2\): expected shape \[2, 30\]"):
        cf.lds(lambda rows: np.zeros((len(rows), 29)), lds_gt, query_block=2)
    with pytest.raises(ValueError, match="gt: expected a LDSGroundTruth"):
        cf.lds(np.zeros((5, 30)), loo_gt)
    with pytest.raises(ValueError, match="query_block: expected a positive integer"):
        cf.loo_correlation(np.zeros((5, 30)), loo_gt, query_block=0)


def test_a_diverging_recipe_says_so():
    rec = cf.TrainingRecipe(lambda: nn.Linear(5, 1), loss="mse", lr=1e3, epochs=200)
    X, _, Xq, _ = _task(n=12, q=4)
    with pytest.raises(ValueError, match="recipe: a retrain of seed 0 diverged"):
        cf.lds_ground_truth(rec, X, X.sum(1) * 100, Xq, Xq.sum(1), n_subsets=3, seeds=1, progress=False)


# ---------------------------------------------------------------------------------------------
# torchrun: two gloo ranks compute the same ground truth as one process
# ---------------------------------------------------------------------------------------------
def test_two_ranks_equal_one_process(tmp_path):
    from _dist_workers import groundtruth_case, spawn
    ranks = spawn([("lds", "groundtruth", {"cache_dir": str(tmp_path / "ranks")}),
                   ("loo", "groundtruth", {"kind": "loo"})], world=2)
    mp = pytest.MonkeyPatch()
    mp.delenv("WORLD_SIZE", raising=False)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = {"lds": groundtruth_case(), "loo": groundtruth_case(kind="loo")}
    finally:
        torch.set_num_threads(n)
        mp.undo()
    for name in ("lds", "loo"):
        for r, out in enumerate(ranks):
            assert np.array_equal(out[name]["outputs"], single[name]["outputs"]), (name, r)
            assert out[name]["world_size"] == 2 and out[name]["status"] == "completed"
    # each rank wrote its own blocks into the one folder, under its own lock file
    folder = next((tmp_path / "ranks").iterdir())
    assert len(list(folder.glob("lds_block*_checkpoint.pt"))) == 4
    assert {p.name for p in folder.glob("*.lock")} == {"lds.rank0.lock", "lds.rank1.lock"}
