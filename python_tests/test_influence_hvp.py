"""The exact solvers' Hessian-vector products on a Sequential MLP (R-operator written out,
methods/influence/hvp_sequential.py) against autograd's double backward of a float64 reference
loss, on fresh random inputs: several depths, activations (piecewise linear and smooth: σ''
terms), losses (cross-entropy, squared error), biases or none, a subset of the parameters, a
Flatten over 3-D input, one row, one direction, non-contiguous directions; and the models the
route must refuse (falling back to double backward) with the solvers' results unchanged."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from dvgs_fast.grads import make_sample_loss
from dvgs_fast.methods.influence import InfluenceFunction
from dvgs_fast.methods.influence.hvp_sequential import SequentialHVP


def _ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


# the library's own cross-entropy: tagged, so the R-operator applies the softmax Hessian in closed form
_ce_closed = make_sample_loss("cross_entropy")


def _sq(out, y):
    return ((out - y) ** 2).sum(1)


def _reference(model, names, x, y, loss, scale, V):
    """{name: [K, *shape]}: scale · ∇²(Σ loss) v by double backward, one direction at a time."""
    params = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    out = functional_call(model, params, (x,))
    L = loss(out, y).sum() * scale
    g = torch.autograd.grad(L, [params[n] for n in names], create_graph=True)
    K = next(iter(V.values())).shape[0]
    res = {n: torch.zeros_like(V[n]) for n in names}
    for k in range(K):
        dot = sum((gi * V[n][k]).sum() for gi, n in zip(g, names))
        h = torch.autograd.grad(dot, [params[n] for n in names], retain_graph=True, allow_unused=True)
        for n, t in zip(names, h):
            if t is not None:
                res[n][k] = t
    return res


CASES = {
    "relu_2": lambda: nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)),
    "tanh_3": lambda: nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4), nn.Sigmoid(), nn.Linear(4, 3)),
    "gelu_nobias": lambda: nn.Sequential(nn.Linear(5, 6, bias=False), nn.GELU(), nn.Dropout(0.0),
                                         nn.Linear(6, 3, bias=False)),
    "softplus_nested": lambda: nn.Sequential(nn.Sequential(nn.Linear(5, 4), nn.Softplus()), nn.Linear(4, 3),
                                             nn.Sequential(nn.Tanh())),
    "flatten": lambda: nn.Sequential(nn.Flatten(), nn.Linear(10, 6), nn.SiLU(), nn.Linear(6, 3)),
    "linear": lambda: nn.Sequential(nn.Linear(5, 3)),
}


def _inputs(shape, n, loss, g):
    x = torch.randn(n, *shape, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g) if loss in (_ce, _ce_closed) else \
        torch.randn(n, 3, generator=g, dtype=torch.float64)
    return x, y


def assert_equals_reference(model, x, y, loss, K, g) -> dict:
    """The route's products for K fresh directions == double backward (float64); the prepared
    block is returned (tests of which inner path it took)."""
    names = [k for k, _ in model.named_parameters()]
    seq = SequentialHVP.of(model, names)
    assert seq is not None
    st = seq.prepare(x, y, loss, 0.37)
    V = {k: torch.randn(K, *p.shape, generator=g, dtype=torch.float64) for k, p in model.named_parameters()}
    kept = {k: v.clone() for k, v in V.items()}
    got = seq.apply(st, V)
    ref = _reference(model, names, x, y, loss, 0.37, V)
    for k in names:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-10, atol=1e-12)
        assert torch.equal(V[k], kept[k]), k                   # the R-passes never write the caller's V
    return st


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("loss", [_ce, _ce_closed, _sq])
@pytest.mark.parametrize("n,K", [(13, 4), (1, 1)])
def test_r_operator_equals_double_backward(case, loss, n, K):
    torch.manual_seed(7)
    model = CASES[case]().double().eval()
    g = torch.Generator().manual_seed(11)
    x, y = _inputs((2, 5) if case == "flatten" else (5,), n, loss, g)
    assert_equals_reference(model, x, y, loss, K, g)


def test_r_operator_on_a_parameter_subset_and_noncontiguous_directions():
    torch.manual_seed(3)
    model = CASES["tanh_3"]().double()
    g = torch.Generator().manual_seed(5)
    x, y = _inputs((5,), 9, _ce, g)
    names = ["2.weight", "4.bias"]                            # middle weight, last bias; first layer unscored
    seq = SequentialHVP.of(model, names)
    params = dict(model.named_parameters())
    V = {k: torch.randn(*params[k].shape[::-1], 3, generator=g, dtype=torch.float64).movedim(-1, 0).transpose(-1, -2)
         if params[k].dim() == 2 else torch.randn(3, *params[k].shape, generator=g, dtype=torch.float64)
         for k in names}
    assert not V["2.weight"].is_contiguous()
    got = seq.block(x, y, _ce, 1.0, V)
    ref = _reference(model, names, x, y, _ce, 1.0, V)
    for k in names:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("n,K", [(9, 3), (1, 1)])
@pytest.mark.parametrize("act", [nn.ReLU, nn.Tanh])
def test_r_operator_with_a_bias_only_first_layer_leaves_the_directions_alone(n, K, act):
    """The first scored parameter a bias (its R-output a broadcast view of the directions) under an
    activation, 1 row and 1 direction too (where that view is contiguous): the products == double
    backward and V is unchanged (an R-pass working in place must not take that view for its own)."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(5, 6), act(), nn.Linear(6, 3)).double()
    g = torch.Generator().manual_seed(8)
    x, y = _inputs((5,), n, _ce, g)
    names = ["0.bias", "2.weight"]
    seq = SequentialHVP.of(model, names)
    params = dict(model.named_parameters())
    V = {k: torch.randn(K, *params[k].shape, generator=g, dtype=torch.float64) for k in names}
    kept = {k: v.clone() for k, v in V.items()}
    got = seq.block(x, y, _ce, 1.0, V)
    ref = _reference(model, names, x, y, _ce, 1.0, V)
    for k in names:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-10, atol=1e-12)
        assert torch.equal(V[k], kept[k]), k


class _Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class _ScaledLinear(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


@pytest.mark.parametrize("make", [_Custom, lambda: nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Linear(4, 3)),
                                  lambda: nn.Sequential(nn.Linear(5, 4), nn.Dropout(0.5), nn.Linear(4, 3)),
                                  lambda: nn.Sequential(_ScaledLinear(5, 4), nn.ReLU(), nn.Linear(4, 3)),
                                  lambda: nn.Sequential(nn.Flatten(0), nn.Linear(5, 3)),
                                  lambda: nn.Sequential(nn.ReLU())])
def test_models_outside_the_route_are_refused(make):
    model = make().double()
    model.train()
    assert SequentialHVP.of(model, [k for k, _ in model.named_parameters()]) is None


SOLVER_MODELS = {
    "tanh": (lambda: nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)), {}),
    # two wide layers: the block is the larger (second) one, the rest by columns
    "relu_deep_wd": (lambda: nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 7), nn.Sigmoid(),
                                           nn.Linear(7, 3)), {"weight_decay": 0.03}),
    "nobias_subset": (lambda: nn.Sequential(nn.Linear(4, 6, bias=False), nn.GELU(), nn.Linear(6, 3)),
                      {"grad_params": ["2"]}),
    "bare_linear": (lambda: nn.Linear(4, 3), {}),
}


@pytest.mark.parametrize("case", list(SOLVER_MODELS))
def test_solvers_unchanged_by_the_route(monkeypatch, case):
    """direct (the largest layer's block by Kronecker sums, the other columns by R-passes) and CG
    == the same solvers by double backward (the route switched off), float64."""
    make, extra = SOLVER_MODELS[case]
    torch.manual_seed(0)
    model = make().double()
    g = torch.Generator().manual_seed(1)
    xs, ys = torch.randn(30, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (30,), generator=g)
    xq, yq = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (5,), generator=g)
    kw = dict(progress=False, seed=0, damping=2.0, hessian_batch_size=8, **extra)
    fast = {}
    for s in ("direct", "cg"):
        att = InfluenceFunction(model, solver=s, **kw).attribute(xs, ys, xq, yq, dtype="float64")
        assert att.info["hessian_vector_route"].startswith("R-operator")
        if s == "direct" and case != "nobias_subset":
            assert "Kronecker" in att.info["hessian_block"]
        fast[s] = np.asarray(att)
    from dvgs_fast.methods.influence import hvp
    monkeypatch.setattr(hvp.SequentialHVP, "of", classmethod(lambda cls, *a: None))
    for s, v in fast.items():
        att = InfluenceFunction(model, solver=s, **kw).attribute(xs, ys, xq, yq, dtype="float64")
        assert att.info["hessian_vector_route"] == "double backward"
        np.testing.assert_allclose(v, np.asarray(att), rtol=1e-9, atol=1e-12 * np.abs(v).max())


def test_sequence_input_falls_back_to_double_backward(monkeypatch):
    """A Linear applied to [n, T, d] rows is outside the R-operator route: direct (whose layer
    block would need it first) and CG take double backward and == the route switched off."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    g = torch.Generator().manual_seed(3)
    xs, ys = torch.randn(12, 2, 4, generator=g, dtype=torch.float64), torch.randn(12, 2, 3, generator=g,
                                                                                  dtype=torch.float64)
    xq, yq = torch.randn(3, 2, 4, generator=g, dtype=torch.float64), torch.randn(3, 2, 3, generator=g,
                                                                                dtype=torch.float64)
    kw = dict(progress=False, seed=0, damping=2.0, loss="mse", hessian_batch_size=5)
    got = {}
    for s in ("direct", "cg"):
        att = InfluenceFunction(model, solver=s, **kw).attribute(xs, ys, xq, yq, dtype="float64")
        assert att.info["hessian_vector_route"] == "double backward"
        assert "hessian_block" not in att.info
        got[s] = np.asarray(att)
    from dvgs_fast.methods.influence import hvp
    monkeypatch.setattr(hvp.SequentialHVP, "of", classmethod(lambda cls, *a: None))
    ref = np.asarray(InfluenceFunction(model, solver="direct", **kw).attribute(xs, ys, xq, yq, dtype="float64"))
    np.testing.assert_allclose(got["direct"], ref, rtol=1e-9, atol=1e-12 * np.abs(ref).max())


@pytest.mark.parametrize("keep", [True, False])
def test_double_backward_graph_kept_across_passes(monkeypatch, keep):
    """A CNN outside the R-operator route (an adaptive max-pool): the gradient graph of each block
    of a full pass is kept while it fits in the problem's KEEP_BYTES and reused by the next pass --
    every pass == the float64 reference, kept or not (keep=False: a budget of 0 bytes keeps
    nothing)."""
    from dvgs_fast.methods.influence import hvp
    from dvgs_fast.methods.influence import problem
    from dvgs_fast.methods.influence.problem import Problem
    from dvgs_fast.distributed import context_for
    if not keep:
        monkeypatch.setattr(problem, "KEEP_BYTES", 0)
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(3), nn.Flatten(),
                          nn.Linear(3 * 9, 3)).double().eval()
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(11, 1, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (11,), generator=g)
    names = [n for n, _ in model.named_parameters()]
    prob = Problem(model, names, _ce, "cross_entropy", x, y, 4, torch.float64, 0.0, context_for(False, torch.device("cpu")),
                   None, torch.Generator().manual_seed(0))
    op = hvp.HessianOperator(prob)
    assert op.route == "double backward"
    for k in range(3):                                           # three passes, fresh directions each
        V = torch.randn(2, prob.p, generator=g, dtype=torch.float64)
        got = op.matmat(V)
        ref = _reference(model, names, x, y, _ce, 1.0 / 11, prob.unflat(V))
        torch.testing.assert_close(got, prob.flat(ref), rtol=1e-10, atol=1e-12)
        graphs = [k for k in prob._kept if k[0] == "gradient graph"]
        assert len(graphs) == (3 if keep else 0)                 # 11 rows in blocks of 4
