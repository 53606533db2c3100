"""In-Run Data Shapley: against a brute-force float64 replay of the training (per-sample gradients
one by one, explicit Hessians), against exact Shapley values of a step's game, fast vs
reference, plain-training equivalence, budgets and input errors."""
from __future__ import annotations

import copy
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from dvgs_fast import InRunShapley
from dvgs_fast._utils import seed_everything
from dvgs_fast.methods.base import BudgetWarning
from dvgs_fast.grads import SlowRouteWarning


def _data(n=12, m=7, d=4, classes=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    xs, xt = torch.randn(n, d, generator=g, dtype=dtype), torch.randn(m, d, generator=g, dtype=dtype)
    w = torch.randn(d, classes, generator=g, dtype=dtype)
    ys, yt = (xs @ w).argmax(1), (xt @ w).argmax(1)
    ys[: n // 4] = (ys[: n // 4] + 1) % classes
    return xs, ys, xt, yt


def _mlp(d=4, h=5, out=3, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, out)).double()


def _ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


def _brute_force(model, xs, ys, xt, yt, *, epochs, batch_size, lr, optimizer="sgd", order=1, seed=0, loss=_ce):
    """Replay the training with torch's own optimizer; every value term from scratch in float64:
    per-sample gradients one autograd call each, G and the full Hessian of the target loss over
    the flattened parameters, P read from the optimizer's state after its step."""
    model = copy.deepcopy(model)
    gen = seed_everything(seed)
    params = dict(model.named_parameters())
    names = list(params)
    shapes = [params[k].shape for k in names]
    sizes = [params[k].numel() for k in names]
    opt = (torch.optim.SGD if optimizer == "sgd" else torch.optim.Adam)(model.parameters(), lr=lr)
    n = xs.shape[0]
    values = np.zeros(n)

    def unflat(v):
        return {k: t.reshape(s) for k, t, s in zip(names, v.split(sizes), shapes)}

    def target_loss(v):
        return loss(functional_call(model, unflat(v), (xt,)), yt).mean()

    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for idx in perm.split(batch_size):
            theta = torch.cat([p.detach().reshape(-1) for p in params.values()])
            G = torch.autograd.functional.jacobian(target_loss, theta)
            g = torch.stack([torch.autograd.functional.jacobian(
                lambda v, i=i: loss(functional_call(model, unflat(v), (xs[i:i + 1],)), ys[i:i + 1]).sum(), theta)
                for i in idx.tolist()])                                     # [B, P]
            opt.zero_grad()
            loss(model(xs[idx]), ys[idx]).mean().backward()
            opt.step()
            if optimizer == "sgd":
                P = torch.full_like(theta, lr)
            else:
                st = [opt.state[params[k]] for k in names]
                t = int(st[0]["step"])
                v = torch.cat([s["exp_avg_sq"].reshape(-1) for s in st])
                P = lr / ((v / (1 - 0.999 ** t)).sqrt() + 1e-8)
            vec = P * G
            if order == 2:
                H = torch.autograd.functional.hessian(target_loss, theta)
                u = P * g.mean(0)
                vec = P * (G - 0.5 * H @ u)
            values[idx.numpy()] += (g @ vec / len(idx)).numpy()
    return values


def _fit(model, data, **kw):
    kw = {"epochs": 2, "batch_size": 5, "lr": 0.1, "optimizer": "sgd", "seed": 0, "progress": False, **kw}
    return InRunShapley(model, **kw).fit(*data)


# ------------------------------------------------------------------------- vs brute force
def test_one_full_batch_sgd_step_is_proportional_to_grad_dot():
    """One full-batch SGD step: value_i = (η/N) <g_i, G> exactly."""
    data = _data()
    xs, ys, xt, yt = data
    model = _mlp()
    res = _fit(model, data, epochs=1, batch_size=len(xs), lr=0.3)
    params = list(model.parameters())
    G = torch.autograd.grad(_ce(model(xt), yt).mean(), params)
    want = []
    for i in range(len(xs)):
        gi = torch.autograd.grad(_ce(model(xs[i:i + 1]), ys[i:i + 1]).sum(), params)
        want.append(sum(float((a * b).sum()) for a, b in zip(gi, G)) * 0.3 / len(xs))
    np.testing.assert_allclose(res.values, want, rtol=1e-10, atol=1e-13)
    assert np.std(want) > 1e-4
    np.testing.assert_array_equal(res.counts, 1)
    assert np.isnan(res.stderr).all()                 # one contribution each: no spread


@pytest.mark.parametrize("optimizer,lr", [("sgd", 0.2), ("adam", 0.05)])
@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("backend", ["fast", "reference"])
def test_several_steps_match_brute_force(optimizer, lr, order, backend):
    data = _data(n=11)
    model = _mlp(seed=1)
    res = _fit(model, data, epochs=3, batch_size=4, lr=lr, optimizer=optimizer, order=order, backend=backend)
    want = _brute_force(model, *data, epochs=3, batch_size=4, lr=lr, optimizer=optimizer, order=order)
    np.testing.assert_allclose(res.values, want, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(res.counts, 3)      # every sample once per epoch
    assert res.info["steps"] == 9 and res.status == "completed"
    if backend == "fast" and optimizer == "sgd" and order == 1:     # the fused pass vs brute force
        assert res.info["target_pass"] == "fused"


def test_order_two_is_the_exact_shapley_value_of_a_quadratic_step():
    """Linear regression, squared error: the target loss is exactly quadratic in θ, so the
    second-order values are the exact Shapley values of the step's game
    U(S) = L_T(θ) - L_T(θ - (η/B) Σ_{j in S} g_j), computed here by enumerating all subsets;
    and they add up to the step's actual target-loss decrease (efficiency)."""
    g = torch.Generator().manual_seed(3)
    b = 5
    xs, xt = torch.randn(b, 3, generator=g, dtype=torch.float64), torch.randn(6, 3, generator=g, dtype=torch.float64)
    ys, yt = torch.randn(b, 1, generator=g, dtype=torch.float64), torch.randn(6, 1, generator=g, dtype=torch.float64)
    torch.manual_seed(0)
    model = nn.Linear(3, 1).double()
    eta = 0.4
    res = InRunShapley(model, loss="mse", epochs=1, batch_size=b, lr=eta, optimizer="sgd", order=2, seed=0,
                       progress=False).fit(xs, ys, xt, yt)
    params = list(model.parameters())
    grads = [torch.autograd.grad(((model(xs[i:i + 1]) - ys[i:i + 1]) ** 2).mean(), params) for i in range(b)]

    def utility(S):
        with torch.no_grad():
            w = [p - eta / b * sum((grads[j][k] for j in S), torch.zeros_like(p)) for k, p in enumerate(params)]
            after = ((xt @ w[0].t() + w[1] - yt) ** 2).mean()
            return float(((model(xt) - yt) ** 2).mean() - after)

    shapley = np.zeros(b)
    for i in range(b):
        others = [j for j in range(b) if j != i]
        for k in range(b):
            for S in itertools.combinations(others, k):
                weight = math.factorial(k) * math.factorial(b - k - 1) / math.factorial(b)
                shapley[i] += weight * (utility(S + (i,)) - utility(S))
    np.testing.assert_allclose(res.values, shapley, rtol=1e-9, atol=1e-12)
    decrease = res.info["target_loss_start"] - res.info["target_loss_end"]
    assert res.values.sum() == pytest.approx(decrease, rel=1e-9)
    first = InRunShapley(model, loss="mse", epochs=1, batch_size=b, lr=eta, optimizer="sgd", order=1, seed=0,
                         progress=False).fit(xs, ys, xt, yt)
    assert not np.allclose(first.values, shapley, rtol=1e-3)      # the second-order term matters here


def test_adam_first_step_credit_equals_the_update():
    """On Adam's first step the preconditioned direction IS the update: the values' sum is the
    first-order decrease <G, θ_0 - θ_1>."""
    data = _data(n=8)
    model = _mlp(seed=2)
    res = _fit(model, data, epochs=1, batch_size=8, lr=0.01, optimizer="adam")
    moved = copy.deepcopy(model)
    opt = torch.optim.Adam(moved.parameters(), lr=0.01)
    _ce(moved(data[0]), data[1]).mean().backward()
    opt.step()
    G = torch.autograd.grad(_ce(model(data[2]), data[3]).mean(), list(model.parameters()))
    first_order = sum(float((gk * (p0 - p1)).sum().detach()) for gk, p0, p1 in zip(G, model.parameters(), moved.parameters()))
    assert res.values.sum() == pytest.approx(first_order, rel=1e-9)


# ------------------------------------------------------------------------ fast == reference
class _ToLong(nn.Module):
    def forward(self, x):
        return x.round().long().clamp(0, 9)


def _conv_net():
    torch.manual_seed(4)
    return nn.Sequential(nn.Unflatten(1, (2, 6)), nn.Conv1d(2, 3, 3, padding=1), nn.GroupNorm(1, 3), nn.Tanh(),
                         nn.Flatten(), nn.Linear(18, 8), nn.LayerNorm(8), nn.Mish(), nn.Linear(8, 3))


class _TextNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.ids = _ToLong()
        self.emb = nn.Embedding(10, 4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.emb(self.ids(x))).mean(1))


@pytest.mark.parametrize("make", [_conv_net, _TextNet], ids=["conv", "text"])
@pytest.mark.parametrize("optimizer,order", [("sgd", 1), ("adam", 2)])
def test_fast_equals_reference(make, optimizer, order):
    g = torch.Generator().manual_seed(6)
    if make is _TextNet:
        xs, xt = torch.randint(0, 10, (20, 6), generator=g).float(), torch.randint(0, 10, (9, 6), generator=g).float()
    else:
        xs, xt = torch.randn(20, 12, generator=g), torch.randn(9, 12, generator=g)
    ys, yt = torch.randint(0, 3, (20,), generator=g), torch.randint(0, 3, (9,), generator=g)
    kw = dict(epochs=2, batch_size=6, lr=0.05 if optimizer == "sgd" else 0.01, optimizer=optimizer, order=order)
    fast = _fit(make(), (xs, ys, xt, yt), backend="fast", **kw)
    ref = _fit(make(), (xs, ys, xt, yt), backend="reference", **kw)
    scale = np.abs(ref.values).max()
    assert scale > 0 and np.std(ref.values) > 1e-3 * scale
    np.testing.assert_allclose(fast.values, ref.values, rtol=1e-5, atol=1e-5 * scale)
    assert fast.info["target_loss_end"] == pytest.approx(ref.info["target_loss_end"], rel=1e-6)
    assert fast.info["per_layer_func"] == [] and fast.info["reference_route_params"] == []


def _plain_sgd(model, xs, ys, *, epochs, batch_size, lr):
    """Plain training as the method's seed-0 run does it: the same shuffles, mean CE, SGD."""
    gen = seed_everything(0)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(xs.shape[0], generator=gen).split(batch_size):
            opt.zero_grad()
            _ce(model(xs[idx]), ys[idx]).mean().backward()
            opt.step()
    return model


def test_training_is_plain_training_dropout_included():
    """Valuing does not change the training: same batches, same dropout masks, same model."""
    data = _data(n=30, dtype=torch.float32)
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.3), nn.ReLU(), nn.Linear(16, 3))
    res = _fit(model, data, epochs=3, batch_size=8, lr=0.1)
    plain = _plain_sgd(copy.deepcopy(model), data[0], data[1], epochs=3, batch_size=8, lr=0.1)
    plain.eval()
    with torch.no_grad():
        end = float(_ce(plain(data[2]), data[3]).mean())
    assert res.info["target_loss_end"] == pytest.approx(end, rel=1e-6)
    again = _fit(model, data, epochs=3, batch_size=8, lr=0.1)
    np.testing.assert_array_equal(res.values, again.values)


def test_slow_routes_warn_and_still_match():
    """A bare parameter on a container has no per-layer route: named once, values still right."""
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(8)
            self.body = _mlp()
            self.scale = nn.Parameter(torch.tensor([1.2, 0.8, 1.0], dtype=torch.float64))

        def forward(self, x):
            return self.body(x) * self.scale

    data = _data(n=10)
    with pytest.warns(SlowRouteWarning, match=r"<model> \(Scaled\)"):
        fast = _fit(Scaled(), data, backend="fast")
    ref = _fit(Scaled(), data, backend="reference")
    np.testing.assert_allclose(fast.values, ref.values, rtol=1e-9, atol=1e-12)
    assert fast.info["reference_route_params"] == ["scale"]


# ---------------------------------------------------------------------- options and budgets
def test_target_minibatches_and_grad_params():
    data = _data(n=16, m=10)
    model = _mlp(seed=9)
    full = _fit(model, data)
    same = _fit(model, data, target_batch_size=10)          # >= N_target: the whole target set
    np.testing.assert_array_equal(full.values, same.values)
    mini = _fit(model, data, target_batch_size=3)
    assert not np.allclose(mini.values, full.values)
    np.testing.assert_array_equal(mini.values, _fit(model, data, target_batch_size=3).values)
    assert np.corrcoef(mini.values, full.values)[0, 1] > 0.3
    # grad_params: only the last layer's moves are credited; the brute force restricted likewise
    head = _fit(model, data, grad_params=["2"], epochs=1, batch_size=16)
    xs, ys, xt, yt = data
    p = list(model[2].parameters())
    G = torch.autograd.grad(_ce(model(xt), yt).mean(), p)
    want = [0.1 / 16 * sum(float((a * b).sum()) for a, b in zip(
        torch.autograd.grad(_ce(model(xs[i:i + 1]), ys[i:i + 1]).sum(), p), G)) for i in range(16)]
    np.testing.assert_allclose(head.values, want, rtol=1e-10, atol=1e-13)


def test_budget_stops_after_a_step():
    data = _data(n=20)
    with pytest.warns(BudgetWarning, match="stopped early by max_time"):
        res = _fit(_mlp(), data, max_time=1e-9, batch_size=6)
    assert res.status == "stopped" and res.info["stopped_by"] == "max_time"
    assert res.counts.sum() == 6 and res.info["steps"] == 1
    assert (res.values[res.counts == 0] == 0).all()


def test_stderr_and_counts():
    data = _data(n=9)
    res = _fit(_mlp(), data, epochs=4, batch_size=4)
    np.testing.assert_array_equal(res.counts, 4)
    assert np.isfinite(res.stderr).all() and (res.stderr > 0).all()
    df = res.to_dataframe()
    assert len(df) == 9


def test_autoencoder_without_labels_and_float32():
    g = torch.Generator().manual_seed(10)
    xs, xt = torch.randn(12, 5, generator=g), torch.randn(6, 5, generator=g)
    torch.manual_seed(0)
    ae = nn.Sequential(nn.Linear(5, 2), nn.Tanh(), nn.Linear(2, 5))
    res = InRunShapley(ae, loss="mse", epochs=2, batch_size=4, lr=0.1, seed=1, progress=False).fit(xs, None, xt, None)
    assert res.values.dtype == np.float64 and np.isfinite(res.values).all() and np.std(res.values) > 0


def test_breast_cancer_flipped_labels_are_found():
    from dvgs_fast.datasets import flip_labels, load_dataset
    from dvgs_fast.evaluate import detection_auroc
    sp = load_dataset("breast_cancer").split(n_source=200, n_target=80, n_test=50, seed=0)
    y_noisy, flipped = flip_labels(sp.y_source, 0.2, seed=0)
    d = sp.x_source.shape[1]
    torch.manual_seed(0)
    res = InRunShapley(nn.Sequential(nn.Linear(d, 32), nn.ReLU(), nn.Linear(32, 2)), epochs=15, batch_size=32, optimizer="sgd",
                       lr=0.1, seed=0, progress=False).fit(sp.x_source, y_noisy, sp.x_target, sp.y_target)
    assert detection_auroc(res.values, flipped) > 0.65


# ------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("kw,match", [
    (dict(order=3), "order"), (dict(order=True), "order"), (dict(optimizer="rmsprop"), "optimizer"),
    (dict(batch_size=0), "batch_size"), (dict(target_batch_size=0), "target_batch_size"),
    (dict(lr=-1), "lr"), (dict(backend="magic"), "backend"), (dict(loss="hinge"), "loss"),
    (dict(grad_params=[]), "grad_params"),
])
def test_bad_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        InRunShapley(_mlp(), **kw)


def test_bad_inputs_fail_before_training():
    xs, ys, xt, yt = _data()
    with pytest.raises(ValueError, match="y_source"):
        _fit(_mlp(), (xs, ys[:-1], xt, yt))
    with pytest.raises(ValueError, match="y_target"):
        _fit(_mlp(), (xs, ys, xt, yt + 5))
    with pytest.raises(ValueError, match="grad_params"):
        _fit(_mlp(), (xs, ys, xt, yt), grad_params=["nope"])
    with pytest.raises(ValueError, match=r"1 \(BatchNorm1d\)"):
        _fit(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).double(), (xs, ys, xt, yt))
    with pytest.raises(ValueError, match="x_target"):
        _fit(_mlp(d=5), (xs, ys, xt, yt))


def test_diverging_training_names_the_step():
    g = torch.Generator().manual_seed(11)
    xs, xt = torch.randn(10, 4, generator=g, dtype=torch.float64), torch.randn(6, 4, generator=g, dtype=torch.float64)
    ae = nn.Sequential(nn.Linear(4, 4)).double()
    with pytest.raises(ValueError, match=r"lr: training diverged in InRunShapley: .* at epoch \d+, step \d+"):
        InRunShapley(ae, loss="mse", epochs=50, batch_size=5, lr=1e3, optimizer="sgd", progress=False).fit(
            xs, None, xt, None)


# ------------------------------------------------------------- pairwise ghost dot (SGD, order 1)
class _SeqNet(nn.Module):
    """Linear layers on [N, 3, 4] token rows (the sequence form), mean-pooled, and a head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(12)
        self.tok = nn.Linear(4, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.tok(x.reshape(x.shape[0], 3, 4))).mean(1))


def _conv_pair_net():
    torch.manual_seed(13)                         # two conv calls' worth of positions, GroupNorm keeps its route
    return nn.Sequential(nn.Unflatten(1, (2, 6)), nn.Conv1d(2, 3, 3, padding=1), nn.GroupNorm(1, 3), nn.Tanh(),
                         nn.Conv1d(3, 2, 2, stride=2), nn.Flatten(), nn.Linear(6, 3))


@pytest.mark.parametrize("make,d", [(lambda: _mlp(seed=14), 4), (_SeqNet, 12), (_conv_pair_net, 12)],
                         ids=["mlp", "sequence", "conv"])
@pytest.mark.parametrize("n,target_batch_size", [(11, None), (11, 3), (11, 1), (1, None)],
                         ids=["full_target", "target_batch_3", "target_batch_1", "n1"])
def test_pairwise_equals_materialised_equals_reference(make, d, n, target_batch_size):
    """SGD order 1: the pairwise route == the materialised route == explicit per-sample gradients
    (float64, 1e-9), with the whole target set, target mini-batches, a target batch of one and
    a single source sample; each layer's route is reported."""
    g = torch.Generator().manual_seed(15)
    xs, xt = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(7, d, generator=g, dtype=torch.float64)
    ys, yt = torch.randint(0, 3, (n,), generator=g), torch.randint(0, 3, (7,), generator=g)
    data = (xs, ys, xt, yt)
    kw = dict(epochs=2, batch_size=4, lr=0.2, target_batch_size=target_batch_size)
    model = make().double()
    pair = _fit(model, data, dot_route="pairwise", **kw)
    mat = _fit(model, data, dot_route="materialised", **kw)
    ref = _fit(model, data, backend="reference", **kw)
    scale = np.abs(ref.values).max()
    assert scale > 1e-6
    np.testing.assert_allclose(pair.values, ref.values, rtol=1e-9, atol=1e-12 * scale)
    np.testing.assert_allclose(mat.values, ref.values, rtol=1e-9, atol=1e-12 * scale)
    np.testing.assert_array_equal(pair.counts, ref.counts)
    # same training (the MLP's pairwise run takes the fused pass: its hand-made weight gradients
    # may differ from autograd's in the last bit)
    assert pair.info["target_loss_end"] == pytest.approx(mat.info["target_loss_end"], rel=1e-12)
    weighted = [nm for nm, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d))]
    assert weighted and all(pair.info["dot_routes"][nm] == "pairwise" for nm in weighted)
    assert all(mat.info["dot_routes"][nm].startswith("materialised") for nm in weighted)
    assert all(pair.info["routes"][nm].endswith("dot: pairwise") for nm in weighted)
    for nm, m in model.named_modules():
        if isinstance(m, nn.GroupNorm):
            assert pair.info["dot_routes"][nm] == "materialised (no pairwise route for this layer)"


def test_auto_route_picks_by_cost_and_matches():
    """auto: a wide first layer goes pairwise (B·T·(d_in+d_out) < (T+B)·d_in·d_out), a narrow
    head keeps the materialised dot; the values equal the reference either way."""
    g = torch.Generator().manual_seed(16)
    xs, xt = torch.randn(16, 64, generator=g, dtype=torch.float64), torch.randn(7, 64, generator=g, dtype=torch.float64)
    ys, yt = torch.randint(0, 3, (16,), generator=g), torch.randint(0, 3, (7,), generator=g)
    torch.manual_seed(17)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 3)).double()
    auto = _fit(model, (xs, ys, xt, yt), batch_size=8)
    ref = _fit(model, (xs, ys, xt, yt), batch_size=8, backend="reference")
    assert auto.info["dot_routes"] == {"0": "pairwise", "2": "materialised"}
    np.testing.assert_allclose(auto.values, ref.values, rtol=1e-9, atol=1e-13)
    adam = _fit(model, (xs, ys, xt, yt), batch_size=8, optimizer="adam", lr=0.01)
    assert all(r.startswith("materialised (adam: the update map P is elementwise")
               for r in adam.info["dot_routes"].values())
    two = _fit(model, (xs, ys, xt, yt), batch_size=8, order=2)
    assert all(r.startswith("materialised (order 2") for r in two.info["dot_routes"].values())


def test_batch_call_that_cannot_be_split_falls_back_exactly():
    """A layer whose batch call has no sample dimension (here: a last batch of one row is fed to
    the head as a 1-D vector) gets its G materialised from the target rows and the whole-model
    route for that step; the values still equal the reference."""
    class Squeezing(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(18)
            self.body, self.head = nn.Linear(4, 5), nn.Linear(5, 3)

        def forward(self, x):
            h = torch.tanh(self.body(x))
            return self.head(h if h.shape[0] > 1 else h[0]).reshape(x.shape[0], -1)

    data = _data(n=9)
    pair = _fit(Squeezing().double(), data, batch_size=4, dot_route="pairwise")    # batches 4, 4, 1
    ref = _fit(Squeezing().double(), data, batch_size=4, backend="reference")
    np.testing.assert_allclose(pair.values, ref.values, rtol=1e-9, atol=1e-13)
    assert pair.info["reference_route_params"] == ["head.weight", "head.bias"]


@pytest.mark.parametrize("kw", [dict(optimizer="adam"), dict(order=2), dict(backend="reference")])
def test_pairwise_route_needs_sgd_order_one_fast(kw):
    with pytest.raises(ValueError, match="dot_route"):
        InRunShapley(_mlp(), dot_route="pairwise", **{"optimizer": "sgd", **kw})
    with pytest.raises(ValueError, match="dot_route"):
        InRunShapley(_mlp(), dot_route="ghost")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_non_finite_inputs_are_named(bad, dtype):
    xs, ys, xt, yt = _data(dtype=dtype)
    xs[3, 1] = bad
    with pytest.raises(ValueError, match=r"x_source: contains 1 NaN/Inf"):
        _fit(_mlp(), (xs, ys, xt, yt))
    xs[3, 1] = 0.0
    xt[0, 0] = bad
    with pytest.raises(ValueError, match=r"x_target: contains 1 NaN/Inf"):
        _fit(_mlp(), (xs, ys, xt, yt))


# ------------------------------------------------------------- fused target pass (SGD, order 1)
def _fused_mlp(d=6, seed=20):
    """Every module kind the fused pass accepts: Flatten, in-place ReLU (right after a recorded
    Linear output), Dropout(p=0), a nested Sequential, LayerNorm without parameters, Mish."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(d, 7), nn.ReLU(inplace=True), nn.Dropout(0.0),
                         nn.Sequential(nn.Linear(7, 5), nn.LayerNorm(5, elementwise_affine=False), nn.Mish()),
                         nn.Linear(5, 3)).double()


def _fit_separate(model, data, **kw):
    kw = {"epochs": 2, "batch_size": 5, "lr": 0.1, "optimizer": "sgd", "seed": 0, "progress": False, **kw}
    method = InRunShapley(model, **kw)
    method._allow_fused = False
    return method.fit(*data)


def _data_fused(n, m=7, d=6, seed=21):
    g = torch.Generator().manual_seed(seed)
    xs, xt = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(m, d, generator=g, dtype=torch.float64)
    return xs, torch.randint(0, 3, (n,), generator=g), xt, torch.randint(0, 3, (m,), generator=g)


@pytest.mark.parametrize("n,target_batch_size", [(11, None), (11, 3), (11, 1), (1, None), (1, 1)],
                         ids=["full_target", "target_batch_3", "target_batch_1", "n1", "n1_target_batch_1"])
@pytest.mark.parametrize("dot_route", ["auto", "pairwise"])
def test_fused_equals_separate_equals_reference(n, target_batch_size, dot_route):
    """The fused pass (target rows in the training forward) == the separate eval-mode target pass
    == explicit per-sample gradients, float64, several steps (batches of 4, a last smaller one);
    same routes, same training."""
    data = _data_fused(n)
    kw = dict(epochs=3, batch_size=4, lr=0.2, target_batch_size=target_batch_size, dot_route=dot_route)
    model = _fused_mlp()
    fused = _fit(model, data, **kw)
    sep = _fit_separate(model, data, **kw)
    ref = _fit(model, data, backend="reference", epochs=3, batch_size=4, lr=0.2, target_batch_size=target_batch_size)
    assert fused.info["target_pass"] == "fused" and "target_pass_reason" not in fused.info
    assert sep.info["target_pass"] == "separate" and "_allow_fused" in sep.info["target_pass_reason"]
    scale = np.abs(ref.values).max()
    assert scale > 1e-6
    np.testing.assert_allclose(fused.values, ref.values, rtol=1e-9, atol=1e-12 * scale)
    np.testing.assert_allclose(sep.values, ref.values, rtol=1e-9, atol=1e-12 * scale)
    np.testing.assert_array_equal(fused.counts, ref.counts)
    assert fused.info["dot_routes"] == sep.info["dot_routes"]
    assert fused.info["target_loss_end"] == pytest.approx(ref.info["target_loss_end"], rel=1e-12)
    if dot_route == "auto" and n > 1 and target_batch_size is None:
        # B·T·(d_in + d_out + 1) vs (B + T)·d_in·d_out, B = 4 or 3, T = 7: the 5->3 head materialises
        assert fused.info["dot_routes"] == {"1": "pairwise", "4.0": "pairwise", "5": "materialised"}


def test_fused_with_partly_credited_layers_and_autoencoder():
    """grad_params: a Linear credited for its bias only / weight only (both routes of each),
    and an autoencoder (MSE, the input is the label) on the fused pass; == reference."""
    data = _data_fused(13)
    for tb in (None, 2):
        kw = dict(epochs=2, batch_size=5, lr=0.2, target_batch_size=tb, grad_params=["1.bias", "4.0.weight", "5"])
        fused = _fit(_fused_mlp(), data, **kw)
        ref = _fit(_fused_mlp(), data, backend="reference", **kw)
        assert fused.info["target_pass"] == "fused"
        np.testing.assert_allclose(fused.values, ref.values, rtol=1e-9, atol=1e-13)
    torch.manual_seed(22)
    ae = nn.Sequential(nn.Linear(6, 3), nn.Tanh(), nn.Linear(3, 6)).double()
    kw = dict(loss="mse", epochs=2, batch_size=5, lr=0.2, target_batch_size=3)
    fused = _fit(ae, (data[0], None, data[2], None), **kw)
    ref = _fit(ae, (data[0], None, data[2], None), backend="reference", **kw)
    assert fused.info["target_pass"] == "fused"
    np.testing.assert_allclose(fused.values, ref.values, rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_training_is_plain_sgd_training(dtype):
    """The hand-made gradients W.grad = δ_Bᵀ a_B, b.grad = Σ δ_B train the model exactly as
    autograd's: parameters after 4 epochs (last batch smaller) vs plain SGD training."""
    xs, ys, xt, yt = (t.to(dtype) if t.is_floating_point() else t for t in _data_fused(30))
    base = _fused_mlp().to(dtype)
    made = []

    def factory():
        made.append(copy.deepcopy(base))
        return made[-1]

    res = _fit(factory, (xs, ys, xt, yt), epochs=4, batch_size=8, lr=0.3, target_batch_size=5)
    assert res.info["target_pass"] == "fused"
    plain = _plain_sgd(copy.deepcopy(base), xs, ys, epochs=4, batch_size=8, lr=0.3)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    moved = 0.0
    for (nm, p), q, p0 in zip(made[-1].named_parameters(), plain.parameters(), base.parameters()):
        np.testing.assert_allclose(p.detach().numpy(), q.detach().numpy(), rtol=0, atol=tol, err_msg=nm)
        moved = max(moved, float((q - p0).detach().abs().max()))
    assert moved > 1e-2                                   # the training did move the weights


@pytest.mark.parametrize("case", ["dropout", "groupnorm", "custom_module", "frozen", "shared", "sequence_input"])
def test_models_outside_the_fused_class_keep_the_separate_pass(case):
    """Dropout p > 0 (train != eval), a parameterised non-Linear (GroupNorm), a custom forward,
    a frozen or shared Linear, and a Linear fed [N, L, d] rows (found at the first step, before
    anything changed) keep the separate eval-mode target pass, with the reason; values == reference."""
    torch.manual_seed(23)
    d = 6
    if case == "dropout":
        model, why = nn.Sequential(nn.Linear(d, 5), nn.Dropout(0.3), nn.Linear(5, 3)), "Dropout, p=0.3"
    elif case == "groupnorm":
        model, why = nn.Sequential(nn.Linear(d, 4), nn.GroupNorm(2, 4), nn.Linear(4, 3)), "GroupNorm"
    elif case == "custom_module":
        model, why = _TanhNet(d), "not an nn.Sequential"
    elif case == "frozen":
        model, why = nn.Sequential(nn.Linear(d, 5), nn.Tanh(), nn.Linear(5, 3)), "frozen"
        model[0].bias.requires_grad_(False)
    elif case == "shared":
        lin = nn.Linear(5, 5)
        model, why = nn.Sequential(nn.Linear(d, 5), lin, nn.Tanh(), lin, nn.Linear(5, 3)), "used twice"
    else:                                                 # samples are [2, 3] token rows
        model, why = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Flatten(), nn.Linear(8, 3)), "not [rows, features]"
    model = model.double()
    data = _data_fused(11)
    if case == "sequence_input":
        data = (data[0].reshape(11, 2, 3), data[1], data[2].reshape(7, 2, 3), data[3])
    kw = dict(epochs=2, batch_size=4, lr=0.2, target_batch_size=3)
    if case == "dropout":
        # the reference draws other dropout masks, so only the route is checked
        res = _fit(model, data, **kw)
        assert res.info["target_pass"] == "separate" and why in res.info["target_pass_reason"]
        return
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SlowRouteWarning)
        res = _fit(model, data, **kw)
        ref = _fit(model, data, backend="reference", **kw)
    assert res.info["target_pass"] == "separate" and why in res.info["target_pass_reason"]
    np.testing.assert_allclose(res.values, ref.values, rtol=1e-9, atol=1e-13)


class _TanhNet(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.a, self.b = nn.Linear(d, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))
