"""dvgs_fast.compat.DVGS: the original DVGS class's interface on our engine.

* a script shaped like the original's run_valuation.py runs with only its import changed and
  gives the native API's values (same initial weights, shuffle and seed), dropout off and on;
* the engine route and the compat loop against a float64 brute-force reference of the original
  algorithm (per-sample gradients one sample at a time);
* agg's reductions against direct computations (scipy's percentileofscore for 'quantile'), in
  both snapshot layouts;
* similarity / criteria / optimizer / reset identification, use_cuda, and bad arguments.
"""
from __future__ import annotations

import copy
import runpy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dvgs_fast.compat import DVGS, SlowSimilarityWarning
from dvgs_fast.compat import _identify as I
from dvgs_fast.compat import _storage as S
from dvgs_fast.methods.dvgs import DVGS as Native


# ---------------------------------------------------------------------------------------- data
def _classification(n_source=120, n_target=60, d=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, generator=g)
    def draw(n):
        x = torch.randn(n, d, generator=g, dtype=torch.float64)
        y = ((x @ w.double()) > 0.6).long()          # imbalanced: about 30% class 1
        return x.to(dtype), y
    xs, ys = draw(n_source)
    flip = torch.rand(n_source, generator=g) < 0.2
    ys = torch.where(flip, 1 - ys, ys)
    xt, yt = draw(n_target)
    return xs, ys.unsqueeze(1), xt, yt.unsqueeze(1)         # the original's [N, 1] labels


class Net(nn.Module):
    """Shaped like the original's NN (Linear, Dropout, Mish per hidden layer) with its reset."""

    def __init__(self, d_in=8, hidden=16, d_out=2, dropout=0.0):
        super().__init__()
        self.f = nn.Sequential(nn.Linear(d_in, hidden), nn.Dropout(dropout), nn.Mish(),
                               nn.Linear(hidden, hidden), nn.Dropout(dropout), nn.Mish(),
                               nn.Linear(hidden, d_out))

    def forward(self, x):
        return self.f(x)

    def reset_parameters(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                m.reset_parameters()


def _init(model: nn.Module, seed: int) -> nn.Module:
    """The compat layer's restart-0 initialisation: torch.manual_seed(seed); reset_parameters()."""
    torch.manual_seed(seed)
    model.reset_parameters()
    return model


# -------------------------------------------------------------- run_valuation-shaped script
SCRIPT = '''\
"""Shaped like the original DVGS repository's scripts/run_valuation.py (written for this test)."""
import copy
import sys
import uuid

import numpy as np
import torch
from sklearn.utils.class_weight import compute_class_weight

{IMPORT}


class NN(torch.nn.Module):
    def __init__(self, in_channels, out_channels, num_layers, hidden_channels, dropout=0.0, act=torch.nn.Mish):
        super().__init__()
        seq = [torch.nn.Linear(in_channels, hidden_channels), torch.nn.Dropout(dropout), act()]
        for _ in range(num_layers - 1):
            seq += [torch.nn.Linear(hidden_channels, hidden_channels), torch.nn.Dropout(dropout), act()]
        seq.append(torch.nn.Linear(hidden_channels, out_channels))
        self.f = torch.nn.Sequential(*seq)

    def forward(self, x):
        return self.f(x)

    def reset_parameters(self):
        for m in self.modules():
            if isinstance(m, torch.nn.Linear):
                m.reset_parameters()


class config:
    out_dir = sys.argv[2]
    model = NN(in_channels=8, out_channels=2, num_layers=2, hidden_channels=16, dropout=float(sys.argv[3]))
    dvgs_balance_class_weights = True
    dvgs_clean_gradient_sims = True
    dvgs_kwargs = {{"target_crit": None, "source_crit": None, "num_restarts": 2,
                   "save_dir": f"{{out_dir}}/dvgs/", "similarity": torch.nn.CosineSimilarity(dim=1),
                   "optim": torch.optim.Adam, "lr": 1e-3, "num_epochs": 5, "compute_every": 2,
                   "source_batch_size": 50, "target_batch_size": 25, "grad_params": None,
                   "verbose": False, "use_cuda": True}}


if __name__ == "__main__":
    torch.manual_seed(0)
    x_train, y_train, x_valid, y_valid = torch.load(sys.argv[1])
    uid = uuid.uuid4()
    dvgs = DVGS(x_source=x_train, y_source=y_train, x_target=x_valid, y_target=y_valid,
                model=copy.deepcopy(config.model))
    if config.dvgs_balance_class_weights:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        class_weights = torch.tensor(compute_class_weight(class_weight="balanced",
                                                          classes=np.sort(np.unique(y_train.detach().numpy())),
                                                          y=y_valid.detach().numpy().ravel()),
                                     dtype=torch.float).to(device)
        CEL = torch.nn.CrossEntropyLoss(weight=class_weights)
        config.dvgs_kwargs["target_crit"] = lambda x, y: CEL(x, y.squeeze(1).type(torch.long))
        config.dvgs_kwargs["source_crit"] = lambda x, y: torch.nn.functional.cross_entropy(x, y.squeeze(1).type(torch.long))
    run_id = dvgs.run(**config.dvgs_kwargs, uid=uid)
    vals = dvgs.agg(f"{{config.out_dir}}/dvgs/{{run_id}}/").ravel()
    quantiles = dvgs.agg(f"{{config.out_dir}}/dvgs/{{run_id}}/", reduction="quantile")
    if config.dvgs_clean_gradient_sims:
        dvgs.clean(f"{{config.out_dir}}/dvgs/{{run_id}}/")
'''
ORIGINAL_IMPORT = "from DVGS import DVGS"
OUR_IMPORT = "from dvgs_fast.compat import DVGS"


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_run_valuation_script_with_only_the_import_changed_matches_native(tmp_path, monkeypatch, dropout):
    original = SCRIPT.format(IMPORT=ORIGINAL_IMPORT)
    ours = SCRIPT.format(IMPORT=OUR_IMPORT)
    diff = [(a, b) for a, b in zip(original.splitlines(), ours.splitlines()) if a != b]
    assert diff == [(ORIGINAL_IMPORT, OUR_IMPORT)]            # the one-line change
    script = tmp_path / "run_valuation.py"
    script.write_text(ours)
    xs, ys, xt, yt = _classification()
    torch.save((xs, ys, xt, yt), tmp_path / "data.pt")
    monkeypatch.setattr("sys.argv", [str(script), str(tmp_path / "data.pt"), str(tmp_path / "out"), str(dropout)])
    g = runpy.run_path(str(script), run_name="__main__")
    vals, dvgs = g["vals"], g["dvgs"]
    assert vals.shape == (120,) and np.all(np.isfinite(vals))
    assert not (tmp_path / "out" / "dvgs" / str(g["run_id"])).exists()          # clean() removed it
    res = dvgs.result
    assert res.info["route"] == "engine" and res.info["snapshots"] == 15      # 2 x 5 x 3 steps / 2
    seed = res.info["seed"]

    # native API, equivalent settings: balanced class weights of the target, same initial weights
    w = len(yt) / (2 * torch.bincount(yt.ravel()).double())
    model = _init(g["NN"](in_channels=8, out_channels=2, num_layers=2, hidden_channels=16, dropout=dropout), seed)
    nat = Native(model, loss="cross_entropy", class_weight=w.tolist(), epochs=5, restarts=2, lr=1e-3,
                 compute_every=2, target_batch_size=25, source_batch_size=50, seed=seed, progress=False,
                 similarity="cosine").fit(xs, ys.ravel(), xt, yt.ravel())
    np.testing.assert_allclose(vals, nat.values, rtol=0, atol=1e-6)
    np.testing.assert_allclose(res.values, nat.values, rtol=0, atol=1e-6)
    # quantile: mean per-snapshot percentile rank, a different ordering than the mean but related
    q = g["quantiles"]
    assert q.shape == (120,) and q.min() > 0 and q.max() <= 100
    # the model was trained in place (as in the original): it is no longer the initial state
    trained, initial = dvgs.model.state_dict(), model.state_dict()
    assert all(trained[k].shape == v.shape for k, v in initial.items())
    assert any(not torch.equal(trained[k], v) for k, v in initial.items())


# -------------------------------------------------------------- float64 brute-force reference
def _reference(model, xs, ys, xt, yt, *, target_crit, source_crit, sim, epochs, tbs, compute_every, lr, wd,
               optim_cls, seed, names=None):
    """The original algorithm, restarts=1, from the model's current weights: per-sample gradients
    one sample at a time; the target order from torch.Generator().manual_seed(seed)."""
    gen = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    names = names or list(params)
    chosen = [params[n] for n in names]
    opt = optim_cls(model.parameters(), lr=lr, weight_decay=wd)
    snaps, step = [], 0
    for _ in range(epochs):
        for idx in torch.randperm(len(xt), generator=gen).split(tbs):
            model.train()
            loss = target_crit(model(xt[idx]), yt[idx])
            G = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, chosen, retain_graph=True)])
            if step % compute_every == 0:
                rows = []
                for i in range(len(xs)):
                    li = source_crit(model(xs[i:i + 1]), ys[i:i + 1])
                    rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(li, chosen)]))
                gi = torch.stack(rows)
                snaps.append(sim(G.unsqueeze(0).expand_as(gi), gi).detach())
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
    return torch.stack(snaps, 1).numpy()


def _ce(o, y):
    return F.cross_entropy(o, y.squeeze(1).long())


def _ce_sum(o, y):
    return F.cross_entropy(o, y.squeeze(1).long(), reduction="sum")


def _cos(G, g):
    return F.cosine_similarity(G, g, dim=1, eps=1e-8)


def _odd_similarity(G, g):          # no similarity the engine knows
    return (G * g).sum(1) / (G.norm(dim=1) + g.norm(dim=1) + 1.0)


LOOP_CASES = {
    "custom similarity": dict(sim=_odd_similarity, target_crit=_ce, optim=torch.optim.Adam),
    "sum-reduced target loss": dict(sim=_cos, target_crit=_ce_sum, optim=torch.optim.Adam),
    "RMSprop": dict(sim=_cos, target_crit=_ce, optim=torch.optim.RMSprop),
}


@pytest.mark.parametrize("case", list(LOOP_CASES))
def test_compat_loop_matches_float64_reference(tmp_path, case):
    c = LOOP_CASES[case]
    xs, ys, xt, yt = _classification(n_source=30, n_target=20, dtype=torch.float64, seed=3)
    model = Net().double()
    seed = 11
    d = DVGS(xs, ys, xt, yt, model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rid = d.run(c["target_crit"], _ce, similarity=c["sim"], optim=c["optim"], lr=1e-2, num_epochs=3,
                    compute_every=2, target_batch_size=7, source_batch_size=8, wd=1e-3, save_dir=tmp_path,
                    verbose=False, use_cuda=False, seed=seed)
    assert d.result.info["route"] == "compat loop"
    assert any(issubclass(w.category, SlowSimilarityWarning) for w in caught) == (case == "custom similarity")
    got = d.agg(tmp_path / str(rid), "none")
    ref = _reference(_init(Net().double(), seed), xs, ys, xt, yt, target_crit=c["target_crit"], source_crit=_ce,
                     sim=c["sim"], epochs=3, tbs=7, compute_every=2, lr=1e-2, wd=1e-3, optim_cls=c["optim"], seed=seed)
    assert got.shape == ref.shape == (30, 5)                 # 3 epochs x 3 steps, every 2nd
    np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(d.result.values, ref.mean(1), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("sim_name", ["cosine", "dot", "projection", "distance"])
def test_engine_route_matches_float64_reference(tmp_path, sim_name):
    # One target batch per epoch, so the engine's shuffle only permutes the batch (same loss).
    xs, ys, xt, yt = _classification(n_source=25, n_target=16, dtype=torch.float64, seed=4)
    seed = 5
    d = DVGS(xs, ys, xt, yt, Net().double())
    rid = d.run(_ce, _ce, similarity=sim_name, lr=1e-2, num_epochs=3, compute_every=1, target_batch_size=16,
                source_batch_size=10, grad_params=["f.3.weight", "f.6.bias"], save_dir=tmp_path, verbose=False,
                use_cuda=False, seed=seed)
    assert d.result.info["route"] == "engine"
    sims = {"cosine": _cos, "dot": lambda G, g: (G * g).sum(1),
            "projection": lambda G, g: (G * g).sum(1) / G.norm(dim=1), "distance": lambda G, g: -(G - g).norm(dim=1)}
    ref = _reference(_init(Net().double(), seed), xs, ys, xt, yt, target_crit=_ce, source_crit=_ce, sim=sims[sim_name],
                     epochs=3, tbs=16, compute_every=1, lr=1e-2, wd=0.0, optim_cls=torch.optim.Adam, seed=seed,
                     names=["f.3.weight", "f.6.bias"])
    np.testing.assert_allclose(d.agg(tmp_path / str(rid), "none"), ref, rtol=1e-7, atol=1e-9)


# -------------------------------------------------------------- similarities of the original
def dot_product():                      # the original's factory names (our own bodies)
    return lambda A, B: torch.bmm(A.view(A.size(0), 1, A.size(1)), B.view(B.size(0), B.size(1), 1)).squeeze()


def scalar_projection():
    return lambda B, A: torch.bmm(A.view(A.size(0), 1, A.size(1)), B.view(B.size(0), B.size(1), 1)).squeeze() \
        / torch.norm(B, p=2, dim=1)


def C_dist(L=2, unit_norm=False):  # noqa: N802
    dist = torch.nn.PairwiseDistance(p=L)
    if unit_norm:
        return lambda x, y: -dist(x / torch.norm(x, p=L, dim=1, keepdim=True), y / torch.norm(y, p=L, dim=1, keepdim=True))
    return lambda x, y: -dist(x, y)


def test_similarity_recognition():
    from dvgs_fast.compat import similarities as ours
    assert I.resolve_similarity(torch.nn.CosineSimilarity(dim=1)) == "cosine"
    assert I.resolve_similarity(F.cosine_similarity) == "cosine"
    assert I.resolve_similarity(dot_product()) == "dot"
    assert I.resolve_similarity(scalar_projection()) == "projection"
    assert I.resolve_similarity(C_dist()) == "distance"
    assert I.resolve_similarity(C_dist(L=1)) is None
    assert I.resolve_similarity(C_dist(unit_norm=True)) is None
    for name, kind in (("cosine", "cosine"), ("dot_product", "dot"), ("scalar_projection", "projection"),
                       ("distance", "distance"), ("C_dist", "distance")):
        assert I.resolve_similarity(name) == kind
    assert I.resolve_similarity(ours.cosine_similarity()) == "cosine"
    assert I.resolve_similarity(ours.dot_product()) == "dot"
    assert I.resolve_similarity(ours.scalar_projection()) == "projection"
    assert I.resolve_similarity(ours.C_dist()) == "distance"
    assert I.resolve_similarity(lambda G, g: F.cosine_similarity(G, g)) == "cosine"   # by what it computes
    # a look-alike: named like the original's factory, computes something else -> not trusted
    def dot_product_fake():
        return lambda A, B: 2 * (A * B).sum(1)
    fake = dot_product_fake()
    fake.__qualname__ = "dot_product.<locals>.<lambda>"
    assert I.resolve_similarity(fake) is None
    assert I.resolve_similarity(torch.nn.CosineSimilarity(dim=0)) is None
    with pytest.raises(ValueError, match="similarity"):
        I.resolve_similarity("manhattan")
    with pytest.raises(ValueError, match="similarity"):
        I.resolve_similarity(3)


@pytest.mark.parametrize("factory,kind", [(dot_product, "dot"), (scalar_projection, "projection"),
                                          (C_dist, "distance")])
def test_original_similarities_run_fast_and_match_native(tmp_path, factory, kind):
    xs, ys, xt, yt = _classification(seed=6)
    d = DVGS(xs, ys, xt, yt, Net())
    with warnings.catch_warnings():
        warnings.simplefilter("error", SlowSimilarityWarning)
        rid = d.run(_ce, _ce, similarity=factory(), lr=1e-3, num_epochs=3, target_batch_size=25, source_batch_size=64,
                    save_dir=tmp_path, verbose=False, use_cuda=False, seed=9)
    assert d.result.info["route"] == "engine"
    nat = Native(_init(Net(), 9), loss="cross_entropy", epochs=3, lr=1e-3, target_batch_size=25, source_batch_size=64,
                 similarity=kind, seed=9, progress=False).fit(xs, ys.ravel(), xt, yt.ravel())
    np.testing.assert_allclose(d.agg(tmp_path / str(rid)), nat.values, rtol=0, atol=1e-6)


# -------------------------------------------------------------- criteria, optimizer, reset
def test_autoencoder_mse_weight_decay_and_grad_params_match_native(tmp_path):
    g = torch.Generator().manual_seed(2)
    xs, xt = torch.randn(90, 12, generator=g), torch.randn(40, 12, generator=g)
    ae = nn.Sequential(nn.Linear(12, 6), nn.Mish(), nn.Linear(6, 12))      # no top-level reset_parameters
    d = DVGS(xs, xs, xt, xt, ae)                                            # y = x, as the original's AE runs
    rid = d.run(torch.nn.MSELoss(), torch.nn.MSELoss(), num_restarts=2, lr=3e-3, num_epochs=4, compute_every=3,
                target_batch_size=16, source_batch_size=32, grad_params=["0.weight", "2.bias"], wd=1e-2,
                optim=torch.optim.AdamW, save_dir=tmp_path, verbose=False, use_cuda=False, seed=4)
    assert d.result.info["route"] == "engine"
    init = nn.Sequential(nn.Linear(12, 6), nn.Mish(), nn.Linear(6, 12))
    torch.manual_seed(4)
    for m in init:
        if isinstance(m, nn.Linear):
            m.reset_parameters()
    nat = Native(init, loss="mse", restarts=2, lr=3e-3, epochs=4, compute_every=3, target_batch_size=16,
                 source_batch_size=32, grad_params=["0.weight", "2.bias"], weight_decay=1e-2, optimizer="adamw",
                 seed=4, progress=False).fit(xs, None, xt, None)
    np.testing.assert_allclose(d.agg(tmp_path / str(rid)), nat.values, rtol=0, atol=1e-6)
    assert d.agg(tmp_path / str(rid), "none").shape == (90, 8)             # ceil(2 * 4 * 3 / 3)


def test_plan_losses_identifies_what_the_engine_can_run():
    y = torch.tensor([0, 1, 1, 2, 0, 2, 1, 0]).unsqueeze(1)
    out = (3,)
    dev = torch.device("cpu")
    p = I.plan_losses(_ce, _ce, out, torch.float32, dev, y, False)
    assert p.engine and p.loss == "cross_entropy" and p.class_weight is None
    w = torch.tensor([0.5, 2.0, 3.0])
    cel = nn.CrossEntropyLoss(weight=w)
    p = I.plan_losses(lambda o, t: cel(o, t.squeeze(1)), _ce, out, torch.float32, dev, y, False)
    assert p.engine and p.loss == "cross_entropy"
    np.testing.assert_allclose(p.class_weight.numpy() / float(p.class_weight[0]), (w / w[0]).numpy(), rtol=1e-5)
    # a bare CrossEntropyLoss module with the original's [N, 1] labels is used as given
    p = I.plan_losses(nn.CrossEntropyLoss(weight=w), nn.CrossEntropyLoss(), out, torch.float32, dev, y, False)
    assert p.engine and p.class_weight is not None
    # a sum-reduced target, a label-smoothed target: the compat loop
    assert not I.plan_losses(_ce_sum, _ce, out, torch.float32, dev, y, False).engine
    ls = nn.CrossEntropyLoss(label_smoothing=0.1)
    assert not I.plan_losses(lambda o, t: ls(o, t.squeeze(1)), _ce, out, torch.float32, dev, y, False).engine
    # a criterion vmap cannot run (.item()) still works, looped per sample
    def itemized(o, t):
        return F.cross_entropy(o, t.squeeze(1)) * (1.0 + 0.0 * float(o.sum().item()))
    p = I.plan_losses(itemized, itemized, out, torch.float32, dev, y, False)
    assert p.engine and p.sample_loss.loop
    with pytest.raises(ValueError, match="target_crit"):
        I.plan_losses(lambda o, t: F.nll_loss(o, t), _ce, out, torch.float32, dev, y, False)   # [N, 1] targets


def test_optimizer_and_reset_identification():
    assert I.optimizer_name(torch.optim.Adam) == "adam" and I.optimizer_name(torch.optim.SGD) == "sgd"
    assert I.optimizer_name(torch.optim.RMSprop) is None
    assert I.engine_reset_matches(Net())
    assert I.engine_reset_matches(nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)))

    class HeadOnly(Net):                # resets only its head (fine-tuning style)
        def reset_parameters(self):
            self.f[6].reset_parameters()
    assert not I.engine_reset_matches(HeadOnly())

    class WithNorm(Net):                # the original's weight_reset leaves LayerNorm's affine alone
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(2)

        def forward(self, x):
            return self.norm(self.f(x))
    assert not I.engine_reset_matches(WithNorm())


def test_model_resetting_only_its_head_runs_the_loop_with_its_own_reset(tmp_path):
    class HeadOnly(Net):
        def reset_parameters(self):
            self.f[6].reset_parameters()
    xs, ys, xt, yt = _classification(seed=8)
    torch.manual_seed(1)
    model = HeadOnly()
    body = copy.deepcopy(model.f[0].state_dict())
    d = DVGS(xs, ys, xt, yt, model)
    d.run(_ce, _ce, num_restarts=2, num_epochs=2, target_batch_size=60, lr=1e-9, save_dir=tmp_path, verbose=False,
          use_cuda=False, seed=2)
    assert d.result.info["route"] == "compat loop"
    assert "reset_parameters" in " ".join(d.result.info["reasons"])
    # lr ~ 0: the body kept its weights through both restarts (only the head was re-initialised)
    for k, v in body.items():
        torch.testing.assert_close(model.f[0].state_dict()[k], v, rtol=0, atol=1e-6)


# -------------------------------------------------------------- agg and storage
def _write_files(path, cols):
    path.mkdir(parents=True)
    for k, c in enumerate(cols.T, start=1):
        np.save(path / S.file_name(k), c)


def test_agg_reductions_against_direct_computation(tmp_path):
    from scipy.stats import percentileofscore
    rng = np.random.default_rng(0)
    for n, k in ((1, 1), (7, 12), (50, 3)):
        cols = rng.normal(size=(n, k)).astype(np.float32)
        cols[: n // 2, 0] = 0.25                                 # ties
        files = tmp_path / f"files{n}"
        _write_files(files, cols)
        d = DVGS(torch.zeros(n, 2), torch.zeros(n, 1), torch.zeros(2, 2), torch.zeros(2, 1), nn.Linear(2, 2))
        np.testing.assert_array_equal(d.agg(files, "none"), cols)   # K order 1..12 (not 1, 10, 11, 12, 2, ...)
        np.testing.assert_allclose(d.agg(files, "mean"), cols.astype(np.float64).mean(1), rtol=1e-12)
        direct = np.mean([percentileofscore(c, c, kind="rank") for c in cols.T], axis=0)
        np.testing.assert_allclose(d.agg(files, "quantile"), direct, rtol=1e-12)
        mm = tmp_path / f"mm{n}"
        mm.mkdir()
        w = S.MemmapWriter(mm, n, k + 2, np.float32)           # planned more than were taken
        for j in range(k):
            w.write(j, cols[:, j])
        w.close(k)
        np.testing.assert_array_equal(np.asarray(d.agg(mm, "none")), cols)
        np.testing.assert_allclose(d.agg(mm, "mean"), cols.astype(np.float64).mean(1), rtol=1e-12)
        np.testing.assert_allclose(d.agg(mm, "quantile"), direct, rtol=1e-12)
    with pytest.raises(ValueError, match="reduction"):
        d.agg(files, "median")
    with pytest.raises(ValueError, match="path"):
        d.agg(tmp_path / "nothing", "mean")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no snapshot files"):
        d.agg(empty)
    d.clean(files)
    assert not files.exists()


def test_memmap_layout_auto_choice_is_stated_and_equals_files(tmp_path, monkeypatch, capsys):
    xs, ys, xt, yt = _classification(seed=10)
    kw = dict(lr=1e-3, num_epochs=3, target_batch_size=20, compute_every=2, verbose=False, use_cuda=False, seed=3)
    d = DVGS(xs, ys, xt, yt, Net())
    rid_files = d.run(_ce, _ce, save_dir=tmp_path / "a", **kw)
    assert sorted(p.name for p in (tmp_path / "a" / str(rid_files)).iterdir()) == [S.file_name(k) for k in (1, 2, 3, 4, 5)]
    monkeypatch.setattr(S, "MEMMAP_BYTES", 1000)                     # 120 x 5 x 4 bytes > 1000
    capsys.readouterr()
    rid = d.run(_ce, _ce, save_dir=tmp_path / "b", **kw)
    assert "memory-mapped" in capsys.readouterr().out
    folder = tmp_path / "b" / str(rid)
    assert (folder / S.SNAP_FILE).exists() and not list(folder.glob("data_value_*"))
    assert d.result.info["layout"] == "memmap"
    np.testing.assert_allclose(d.agg(folder), d.agg(tmp_path / "a" / str(rid_files)), rtol=0, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(d.agg(folder, "none")), d.agg(tmp_path / "a" / str(rid_files), "none"))
    # the compat loop writes the same layout
    rid = d.run(_ce_sum, _ce, save_dir=tmp_path / "c", storage="memmap", **kw)
    assert d.result.info["route"] == "compat loop" and d.agg(tmp_path / "c" / str(rid), "none").shape == (120, 5)


# -------------------------------------------------------------- device, messages, errors
def test_use_cuda_without_gpu_says_so_once(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    xs, ys, xt, yt = _classification(n_source=20, n_target=10)
    d = DVGS(xs, ys, xt, yt, Net())
    rid = d.run(_ce, _ce, num_epochs=1, save_dir=tmp_path, verbose=False, use_cuda=True, seed=0)
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "no CUDA GPU" in out and "CPU" in out
    assert d.result.info["device"] == "cpu" and rid == d.run_id


def test_bad_arguments_name_the_argument(tmp_path):
    xs, ys, xt, yt = _classification(n_source=20, n_target=10)
    d = DVGS(xs, ys, xt, yt, Net())
    kw = dict(save_dir=tmp_path, verbose=False, use_cuda=False, seed=0, num_epochs=1)
    for bad, name in ((dict(num_epochs=0), "num_epochs"), (dict(num_restarts=-1), "num_restarts"),
                      (dict(lr=0), "lr"), (dict(wd=-1.0), "wd"), (dict(compute_every=1.5), "compute_every"),
                      (dict(similarity="manhattan"), "similarity"), (dict(grad_params=["f.9.weight"]), "grad_params"),
                      (dict(storage="tape"), "storage"), (dict(optim=None), "optim")):
        with pytest.raises(ValueError, match=name):
            d.run(_ce, _ce, **{**kw, **bad})
    with pytest.raises(ValueError, match="target_crit"):
        d.run(None, _ce, **kw)
    with pytest.raises(ValueError, match="x_target"):
        DVGS(xs, ys, torch.zeros(10, 3), yt, Net()).run(_ce, _ce, **kw)
    with pytest.raises(ValueError, match="y_source"):
        DVGS(xs, ys[:5], xt, yt, Net()).run(_ce, _ce, **kw)
    with pytest.raises(ValueError, match="model"):
        DVGS(xs, ys, xt, yt, "net")
    rid = d.run(_ce, _ce, uid="fixed", **kw)
    assert rid == "fixed"
    with pytest.raises(FileExistsError, match="uid"):
        d.run(_ce, _ce, uid="fixed", **kw)
    assert not list(tmp_path.glob("*/data_value_iter=2.npy"))


def test_pretrain_trains_in_place():
    xs, ys, xt, yt = _classification(n_source=40, n_target=10)
    torch.manual_seed(0)
    model = Net()
    before = copy.deepcopy(model.state_dict())
    DVGS(xs, ys, xt, yt, model).pretrain_(_ce, batch_size=16, epochs=2, use_cuda=False, verbose=False)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_memmap_run_interrupted_before_its_end_resumes_with_the_same_uid(tmp_path):
    xs, ys, xt, yt = _classification(seed=12)
    kw = dict(lr=1e-3, num_epochs=3, target_batch_size=20, compute_every=2, verbose=False, use_cuda=False,
              storage="memmap", save_dir=tmp_path, uid="job")
    d = DVGS(xs, ys, xt, yt, Net())
    d.run(_ce, _ce, seed=21, **kw)
    done = d.agg(tmp_path / "job", "none").copy()
    meta = S.read_meta(tmp_path / "job")
    S.write_meta(tmp_path / "job", **{**meta, "complete": False})        # as if killed before the end
    with pytest.raises(ValueError, match="interrupted"):
        d.agg(tmp_path / "job")
    d2 = DVGS(xs, ys, xt, yt, Net())
    d2.run(_ce, _ce, **kw)                       # same uid, no seed: the run's own seed is reused
    assert d2.result.info["seed"] == 21
    np.testing.assert_array_equal(np.asarray(d2.agg(tmp_path / "job", "none")), done)
    with pytest.raises(FileExistsError):         # a completed run is never overwritten
        d2.run(_ce, _ce, **kw)
