"""Ghost routes for Conv1d/Conv2d, Embedding and norm affines (dvgs/ghost_layers.py), recurrent
layers, and the slow-route warning: every route against explicit per-sample gradients."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dvgs_fast.grads import FastScorer, SlowRouteWarning


def _ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


def _brute(model, names, x, y, G):
    """float64 (dot, sqnorm) from per-sample gradients, one autograd call per sample."""
    params = dict(model.named_parameters())
    rows = []
    for i in range(x.shape[0]):
        loss = _ce(model(x[i:i + 1]), y[i:i + 1]).sum()
        gi = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(params[n]) if t is None else t).reshape(-1)
                               for n, t in zip(names, gi)]))
    flat = torch.stack(rows).double()
    Gf = torch.cat([G[n].reshape(-1) for n in names]).double()
    return flat @ Gf, flat.square().sum(1)


def _check(model, x, y, names=None, seed=0, rtol=1e-9):
    """fast (dot, sq) == brute force; returns the scorer's describe() and the warnings."""
    names = names or [n for n, _ in model.named_parameters()]
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    G = {n: torch.randn(params[n].shape, generator=g, dtype=params[n].dtype) for n in names}
    scorer = FastScorer(model, names, _ce, "dot")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dot, sq = scorer.stats(x, y, G)
        dot_only, _ = scorer.stats(x, y, G, need_sq=False)      # the dot-only path (TracIn, In-Run)
    rd, rs = _brute(model, names, x, y, G)
    scale_d, scale_s = float(rd.abs().max()), float(rs.abs().max())
    assert scale_d > 0 and scale_s > 0                      # not trivially equal
    np.testing.assert_allclose(dot.double().numpy(), rd.numpy(), rtol=rtol, atol=rtol * scale_d)
    np.testing.assert_allclose(sq.double().numpy(), rs.numpy(), rtol=rtol, atol=rtol * scale_s)
    np.testing.assert_allclose(dot_only.double().numpy(), rd.numpy(), rtol=rtol, atol=rtol * scale_d)
    slow = [w for w in caught if issubclass(w.category, SlowRouteWarning)]
    return scorer.describe(), slow


def _img(n, c=3, h=7, w=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, h, w, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


# ----------------------------------------------------------------------------------- conv
_CONVS = [
    dict(),
    dict(padding=1),
    dict(padding=1, stride=2),
    dict(padding="same", dilation=2),
    dict(padding="valid", bias=False),
    dict(padding=(2, 1), padding_mode="reflect"),
    dict(padding=1, padding_mode="circular", stride=(1, 2)),
    dict(padding=1, padding_mode="replicate"),
    dict(padding=1, groups=3),                      # grouped: materialised per group
]


@pytest.mark.parametrize("kw", _CONVS, ids=[str(k) for k in _CONVS])
@pytest.mark.parametrize("n", [1, 5])
def test_conv2d_route(kw, n):
    x, y = _img(n)
    out_c = 6
    net = nn.Sequential(nn.Conv2d(3, out_c, 3, **kw), nn.Tanh(), nn.Flatten()).double()
    feat = net(x).shape[1]
    net.append(nn.Linear(feat, 3).double())
    info, slow = _check(net, x, y)
    assert info["routes"]["0"].startswith("conv2d_ghost")
    assert not slow and info["slow_route_layers"] == []


@pytest.mark.parametrize("kw", [dict(), dict(padding=2, stride=2), dict(padding="same", dilation=3, bias=False),
                                dict(padding=1, padding_mode="circular"), dict(groups=2, padding=1)])
def test_conv1d_route(kw):
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(4, 4, 11, generator=g, dtype=torch.float64), torch.randint(0, 3, (4,), generator=g)
    net = nn.Sequential(nn.Conv1d(4, 6, 3, **kw), nn.Mish(), nn.Flatten()).double()
    net.append(nn.Linear(net(x).shape[1], 3).double())
    info, _ = _check(net, x, y)
    assert info["routes"]["0"].startswith("conv1d_ghost")


def test_conv_gram_and_materialised_forms_are_named():
    # Few output positions and wide layers: the Gram form; many positions, narrow: materialised.
    x, y = _img(3, c=8, h=3, w=3)
    wide = nn.Sequential(nn.Conv2d(8, 16, 2), nn.Flatten(), nn.Linear(16 * 4, 3)).double()
    info, _ = _check(wide, x, y)
    assert info["routes"]["0"] == "conv2d_ghost (gram)"
    x, y = _img(3, c=2, h=12, w=12)
    narrow = nn.Sequential(nn.Conv2d(2, 2, 2), nn.Flatten(), nn.Linear(2 * 121, 3)).double()
    info, _ = _check(narrow, x, y)
    assert info["routes"]["0"] == "conv2d_ghost (materialised)"


@pytest.mark.parametrize("names", [["0.bias"], ["0.weight"], ["0.bias", "3.weight"]])
def test_conv_parameter_subsets(names):
    x, y = _img(4)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 4, 3)).double()
    _check(net, x, y, names=names)


def test_shared_conv_called_twice():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 3, 3, padding=1)
            self.fc = nn.Linear(3 * 7 * 6, 3)

        def forward(self, x):
            return self.fc(torch.tanh(self.c(torch.tanh(self.c(x)))).flatten(1))

    x, y = _img(4)
    info, _ = _check(Twice().double(), x, y)
    assert info["routes"]["c"].startswith("conv2d_ghost")


# ------------------------------------------------------------------------------ embedding
class _Text(nn.Module):
    def __init__(self, vocab=13, dim=5, padding_idx=None, max_norm=None, twice=False):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=padding_idx, max_norm=max_norm)
        self.fc = nn.Linear(dim, 3)
        self.twice = twice

    def forward(self, t):
        z = self.emb(t)
        if self.twice:                          # the same table used for a second lookup
            z = z + torch.tanh(self.emb(t.flip(1)))
        return self.fc(torch.tanh(z).reshape(t.shape[0], -1, z.shape[-1]).mean(1))


@pytest.mark.parametrize("kw", [dict(), dict(padding_idx=0), dict(twice=True), dict(max_norm=1.0)],
                         ids=["plain", "padding_idx", "twice", "max_norm"])
@pytest.mark.parametrize("shape", [(6, 5), (1, 4), (4, 3, 2)])
def test_embedding_route(kw, shape):
    g = torch.Generator().manual_seed(3)
    t = torch.randint(0, 13, shape, generator=g)
    t.view(-1)[::3] = 2                          # repeated ids inside each sample
    t.view(-1)[1] = 0                            # the padding token (when padding_idx=0)
    y = torch.randint(0, 3, (shape[0],), generator=g)
    net = _Text(**kw).double()
    info, _ = _check(net, t, y)
    assert info["routes"]["emb"] == "embedding_ghost"


def test_embedding_scale_grad_by_freq_takes_the_slow_route():
    g = torch.Generator().manual_seed(4)
    t, y = torch.randint(0, 13, (5, 4), generator=g), torch.randint(0, 3, (5,), generator=g)
    net = _Text().double()
    net.emb.scale_grad_by_freq = True
    info, slow = _check(net, t, y)
    assert info["routes"]["emb"] == "per_layer_func"
    assert slow and "emb (Embedding)" in str(slow[0].message)


# ---------------------------------------------------------------------------------- norms
_NORMS = {
    "layer": lambda: nn.LayerNorm(6),
    "layer2d": lambda: nn.LayerNorm((4, 6)),
    "layer_nobias": lambda: nn.LayerNorm(6, bias=False),
    "rms": lambda: nn.RMSNorm(6),
    "group": lambda: nn.GroupNorm(2, 4),
    "instance": lambda: nn.InstanceNorm1d(4, affine=True),
    "instance_running": lambda: nn.InstanceNorm1d(4, affine=True, track_running_stats=True),
    "batch": lambda: nn.BatchNorm1d(4),
}


@pytest.mark.parametrize("kind", list(_NORMS))
@pytest.mark.parametrize("n", [1, 6])
def test_norm_routes(kind, n):
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(n, 4, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)
    norm = _NORMS[kind]()
    if isinstance(norm, (nn.BatchNorm1d, nn.InstanceNorm1d)) and norm.track_running_stats:
        with torch.no_grad():                   # non-trivial running statistics, then eval mode
            norm.running_mean.uniform_(-1, 1)
            norm.running_var.uniform_(0.5, 2)
        norm.eval()
    with torch.no_grad():
        for p in norm.parameters():
            p.uniform_(0.5, 1.5)                # not the (1, 0) initialisation
    net = nn.Sequential(nn.Linear(6, 6), norm, nn.Tanh(), nn.Flatten(), nn.Linear(24, 3)).double()
    net[0].train()
    info, slow = _check(net, x, y)
    assert info["routes"]["1"] == "norm_ghost"
    assert not slow


def test_batchnorm2d_eval_and_train_mode():
    x, y = _img(5, c=3)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                        nn.Linear(4 * 5 * 4, 3)).double()
    with torch.no_grad():
        net[1].running_mean.uniform_(-1, 1)
        net[1].weight.uniform_(0.5, 1.5)
    net.eval()
    info, _ = _check(net, x, y)
    assert info["routes"]["1"] == "norm_ghost"
    # Batch statistics (no running statistics to use) couple the samples of a batched forward:
    # every layer then takes the per-sample route (a batch of one each), and the warning says why.
    net[1] = nn.BatchNorm2d(4, track_running_stats=False).double()
    info, slow = _check(net, x, y)
    assert set(info["routes"].values()) == {"reference"}
    assert len(slow) == 1 and "1 (BatchNorm2d) normalise with batch statistics" in str(slow[0].message)


def test_float32_routes_match_to_1e5():
    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(8, 3, 10, 10, generator=g), torch.randint(0, 3, (8,), generator=g)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, stride=2), nn.LayerNorm([8, 4, 4]), nn.ReLU(),
                        nn.Flatten(), nn.Linear(128, 3))
    info, _ = _check(net, x, y, rtol=1e-5)
    assert info["ghost_layers"] == ["0", "1", "3", "4"] and info["per_layer_func"] == []


# ------------------------------------------------------------------------------ recurrent
class _Rnn(nn.Module):
    """A recurrent encoder whose output is indexed (issue: vmap broadcast error)."""

    def __init__(self, kind, **kw):
        super().__init__()
        self.rnn = kind(4, 6, batch_first=True, **kw)
        self.fc = nn.Linear(6 * (2 if kw.get("bidirectional") else 1), 3)

    def forward(self, x):
        out, _ = self.rnn(x.reshape(x.shape[0], 5, 4))
        return self.fc(out[:, -1])


@pytest.mark.parametrize("kind,kw", [(nn.GRU, {}), (nn.LSTM, {}), (nn.RNN, {}), (nn.GRU, {"num_layers": 2}),
                                     (nn.LSTM, {"bidirectional": True})])
def test_recurrent_layers_scored_and_named(kind, kw):
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(4, 20, generator=g, dtype=torch.float64), torch.randint(0, 3, (4,), generator=g)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "There is a performance drop")
        info, slow = _check(_Rnn(kind, **kw).double(), x, y)
    assert info["routes"]["rnn"] == "reference"
    assert info["slow_route_layers"] == [f"rnn ({kind.__name__})"]
    assert len(slow) == 1 and f"rnn ({kind.__name__})" in str(slow[0].message)


def test_recurrent_models_fast_equals_reference_in_dvgs():
    """End to end: both DVGS backends value a GRU classifier, and agree (issue 13 item 4)."""
    from dvgs_fast import DVGS
    g = torch.Generator().manual_seed(8)
    xs, xt = torch.randn(24, 20, generator=g), torch.randn(10, 20, generator=g)
    ys, yt = torch.randint(0, 3, (24,), generator=g), torch.randint(0, 3, (10,), generator=g)
    torch.manual_seed(0)
    model = _Rnn(nn.GRU)
    kw = dict(epochs=2, target_batch_size=5, seed=0, progress=False, lr=1e-2)
    with pytest.warns(SlowRouteWarning, match=r"rnn \(GRU\)"):
        fast = DVGS(model, backend="fast", **kw).fit(xs, ys, xt, yt)
    ref = DVGS(model, backend="reference", **kw).fit(xs, ys, xt, yt)
    np.testing.assert_allclose(fast.values, ref.values, rtol=1e-5, atol=1e-5)
    assert np.std(ref.values) > 1e-4
    assert fast.info["slow_route_layers"] == ["rnn (GRU)"]


def test_slow_route_warning_names_a_layer_when_it_first_falls_back():
    """Once per layer, not once per scorer: a layer that first falls back at a later step is still
    named (a silent fallback would hide a slow run)."""
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    names = [n for n, _ in model.named_parameters()]
    scorer = FastScorer(model, names, lambda out, y: F.cross_entropy(out, y, reduction="none"), "dot")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        scorer._warn_slow([])                      # step 1: every layer on its ghost route
        scorer._warn_slow(["2.weight"])            # a later step: layer 2 falls back
        scorer._warn_slow(["2.weight"])            # said once
        scorer._warn_slow(["0.weight", "2.weight"])
    msgs = [str(r.message) for r in rec if issubclass(r.category, SlowRouteWarning)]
    assert len(msgs) == 2 and "2 (Linear)" in msgs[0] and "0 (Linear)" in msgs[1] and "2 (Linear)" not in msgs[1]
