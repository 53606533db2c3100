"""The R-operator's convolution, pooling and eval batch-norm rules (methods/influence/hvp_conv.py) against
autograd's double backward of a float64 reference loss, on fresh random inputs: Conv1d / Conv2d
with strides, dilation, padding, no bias; the first layer's three routes (the stem at the
max-pool's maxima, GEMMs on patches, oneDNN); max-pools with overlapping windows and ceil mode;
average and adaptive pools; eval-mode BatchNorm (affine or not, first, between a convolution and its
activation, on an MLP); piecewise-linear and smooth activations (σ'' terms); one row, one
direction, several directions at once; a parameter subset whose first scored layer is in the
middle; the models the route must refuse; and the solvers' results unchanged by the route."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from dvgs_fast.methods.influence import InfluenceFunction
from dvgs_fast.methods.influence.hvp_sequential import SequentialHVP

from test_influence_hvp import _ce, _ce_closed, _inputs, _reference, _sq, assert_equals_reference



def _bn(m: nn.Module) -> nn.Module:
    """An eval BatchNorm with running statistics and affine parameters away from their defaults."""
    m.running_mean.normal_()
    m.running_var.uniform_(0.5, 2.0)
    if m.weight is not None:
        m.weight.data.normal_()
        m.bias.data.normal_()
    return m


# name: (model, input shape per row, which first-layer route it takes)
CASES = {
    "stem": (lambda: nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                   nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.AdaptiveAvgPool2d(2),
                                   nn.Flatten(), nn.Linear(16, 3)), (2, 8, 8), "stem"),
    "patches_overlapping": (lambda: nn.Sequential(nn.Conv2d(2, 9, 3, stride=2), nn.ReLU(),
                                                  nn.MaxPool2d(3, stride=1, padding=1), nn.Conv2d(9, 4, 2),
                                                  nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True),
                                                  nn.AdaptiveAvgPool2d((2, 3)), nn.Flatten(), nn.Linear(24, 3)),
                            (2, 13, 15), "patches"),
    "onednn_first": (lambda: nn.Sequential(nn.Conv2d(9, 4, 3, stride=2, padding=1, bias=False), nn.LeakyReLU(0.1),
                                           nn.MaxPool2d(3, stride=1, padding=1), nn.Conv2d(4, 5, 2, dilation=2),
                                           nn.SiLU(),
                                           nn.AvgPool2d(2, padding=1, ceil_mode=True, count_include_pad=False),
                                           nn.Flatten(), nn.Linear(20, 3)), (9, 9, 9), "layers"),
    "avg_divisor": (lambda: nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.AvgPool2d((2, 3), divisor_override=5),
                                          nn.Flatten(), nn.Linear(18, 3)), (1, 8, 9), "patches"),
    "conv1d": (lambda: nn.Sequential(nn.Conv1d(2, 3, 3, stride=2, dilation=2, padding=2), nn.GELU(),
                                     nn.MaxPool1d(3, stride=2, padding=1), nn.Conv1d(3, 4, 2, bias=False),
                                     nn.AvgPool1d(2), nn.Flatten(), nn.Linear(8, 3)), (2, 21), "patches"),
    "conv1d_stem": (lambda: nn.Sequential(nn.Conv1d(1, 4, 5, padding=2), nn.ReLU(), nn.MaxPool1d(2),
                                          nn.AdaptiveAvgPool1d(3), nn.Flatten(), nn.Linear(12, 3)), (1, 16), "stem"),
    "batchnorm_cnn": (lambda: nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), _bn(nn.BatchNorm2d(3)), nn.ReLU(),
                                            nn.MaxPool2d(2), nn.Conv2d(3, 4, 3), _bn(nn.BatchNorm2d(4, affine=False)),
                                            nn.Tanh(), nn.Flatten(), nn.Linear(16, 3)), (2, 8, 8), "patches"),
    "batchnorm_mlp": (lambda: nn.Sequential(nn.Linear(5, 6), _bn(nn.BatchNorm1d(6)), nn.GELU(), nn.Linear(6, 3),
                                            _bn(nn.BatchNorm1d(3))), (5,), "layers"),
    "batchnorm_first": (lambda: nn.Sequential(_bn(nn.BatchNorm1d(2)), nn.Conv1d(2, 3, 3), nn.ReLU(), nn.Flatten(),
                                              nn.Linear(15, 3)), (2, 7), "layers"),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("loss", [_ce, _ce_closed, _sq])
@pytest.mark.parametrize("n,K", [(13, 4), (1, 1)])
def test_r_operator_equals_double_backward(case, loss, n, K):
    make, shape, route = CASES[case]
    torch.manual_seed(7)
    model = make().double().eval()
    g = torch.Generator().manual_seed(11)
    x, y = _inputs(shape, n, loss, g)
    st = assert_equals_reference(model, x, y, loss, K, g)
    assert route == ("stem" if st["stem"] is not None else "patches" if st["patches"] is not None else "layers")


@pytest.mark.parametrize("names", [["3.weight", "7.bias"],          # first scored layer in the middle
                                   ["0.bias", "3.bias"],            # the stem without its weight
                                   ["0.weight"]])                   # the stem alone
def test_r_operator_on_a_parameter_subset_and_noncontiguous_directions(names):
    torch.manual_seed(3)
    model = CASES["stem"][0]().double().eval()
    g = torch.Generator().manual_seed(5)
    x, y = _inputs((2, 8, 8), 9, _ce, g)
    seq = SequentialHVP.of(model, names)
    params = dict(model.named_parameters())
    # [K, *shape] views of a flat [K, p] matrix, as the solvers pass them: strided, not contiguous
    flat = torch.randn(3, sum(params[k].numel() for k in names) + 1, generator=g, dtype=torch.float64)
    V, at = {}, 1
    for k in names:
        V[k] = flat[:, at:at + params[k].numel()].view(3, *params[k].shape)
        at += params[k].numel()
    got = seq.block(x, y, _ce, 1.0, V)
    ref = _reference(model, names, x, y, _ce, 1.0, V)
    for k in names:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("make", [
    lambda: nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Flatten(), nn.Linear(4 * 36, 3)),
    lambda: nn.Sequential(nn.Conv2d(2, 4, 3, padding="same"), nn.Flatten(), nn.Linear(4 * 64, 3)),
    lambda: nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect"), nn.Flatten(), nn.Linear(256, 3)),
    lambda: nn.Sequential(nn.Conv2d(2, 4, 3), nn.AdaptiveMaxPool2d(2), nn.Flatten(), nn.Linear(16, 3)),
    lambda: nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.Flatten(),
                          nn.Linear(4 * 36, 3)),
    lambda: nn.Sequential(nn.Conv2d(2, 4, 3), nn.ConvTranspose2d(4, 2, 3), nn.Flatten(), nn.Linear(128, 3)),
])
def test_models_outside_the_route_are_refused(make):
    model = make().double().eval()
    assert SequentialHVP.of(model, [k for k, _ in model.named_parameters()]) is None


def test_batchnorm_in_training_mode_is_refused():
    """Batch statistics couple the rows: not a per-channel affine map."""
    model = CASES["batchnorm_cnn"][0]().double()
    names = [k for k, _ in model.named_parameters()]
    assert SequentialHVP.of(model.train(), names) is None
    assert SequentialHVP.of(model.eval(), names) is not None


def test_unbatched_conv_input_falls_back():
    """A Conv2d handed 3-D rows (no channel axis) is not a batch of feature maps: prepare refuses."""
    model = nn.Sequential(nn.Conv1d(4, 2, 3), nn.Flatten(), nn.Linear(2, 3)).double()
    seq = SequentialHVP.of(model, [k for k, _ in model.named_parameters()])
    x = torch.randn(5, 4, 3, 1, dtype=torch.float64)
    assert seq.prepare(x, torch.zeros(5, dtype=torch.long), _ce, 1.0) is None


@pytest.mark.parametrize("case", ["stem", "onednn_first", "conv1d", "batchnorm_cnn"])
def test_solvers_unchanged_by_the_route(monkeypatch, case):
    """direct (the top Linear's block by Kronecker sums, the convolutions' columns by R-passes),
    CG, LiSSA (the same seeded mini-batches) and Arnoldi == the same solvers by double backward
    (the route switched off), float64."""
    make, shape, _ = CASES[case]
    torch.manual_seed(0)
    model = make().double().eval()
    g = torch.Generator().manual_seed(1)
    xs, ys = torch.randn(24, *shape, generator=g, dtype=torch.float64), torch.randint(0, 3, (24,), generator=g)
    xq, yq = torch.randn(4, *shape, generator=g, dtype=torch.float64), torch.randint(0, 3, (4,), generator=g)
    kw = dict(progress=False, seed=0, damping=2.0, hessian_batch_size=10)
    extra = {"lissa": dict(max_iterations=20, lissa_scale=50.0), "arnoldi": dict(rank=3)}
    fast = {}
    for s in ("direct", "cg", "lissa", "arnoldi"):
        att = InfluenceFunction(model, solver=s, **kw, **extra.get(s, {})).attribute(xs, ys, xq, yq, dtype="float64")
        assert att.info["hessian_vector_route"].startswith("R-operator")
        if s == "direct":
            assert "Kronecker" in att.info["hessian_block"]
        fast[s] = np.asarray(att)
    from dvgs_fast.methods.influence import hvp
    monkeypatch.setattr(hvp.SequentialHVP, "of", classmethod(lambda cls, *a: None))
    for s, v in fast.items():
        att = InfluenceFunction(model, solver=s, **kw, **extra.get(s, {})).attribute(xs, ys, xq, yq, dtype="float64")
        assert att.info["hessian_vector_route"] == "double backward"
        np.testing.assert_allclose(v, np.asarray(att), rtol=1e-7 if s == "arnoldi" else 1e-9,
                                   atol=1e-10 * np.abs(v).max())
