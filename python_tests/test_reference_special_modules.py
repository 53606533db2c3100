"""Models the reference backends (torch.func per-sample gradients) must handle or refuse plainly.

A module registered under two names (an nn.Linear used twice in a Sequential, the way tied
embeddings are shared): torch.func.functional_call (torch 2.13) used to leave such a module holding
plain tensors instead of its nn.Parameters, so every reference backend (and the fast backend's
per-layer route) trained orphans and drifted from plain training without a word. Each method's
reference backend must equal its fast backend here, and the model must keep its parameter objects.
An Embedding with max_norm writes its weight during the forward, which vmap cannot batch: refused
up front with the way out.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from dvgs_fast import DVGS, InRunShapley, TracIn
from dvgs_fast._utils import functional_call
from dvgs_fast.grads import per_sample_grads


def _shared_model(seed=23, d=6):
    torch.manual_seed(seed)
    lin = nn.Linear(5, 5)
    return nn.Sequential(nn.Linear(d, 5), lin, nn.Tanh(), lin, nn.Linear(5, 3)).double()


def _data(n=11, m=7, d=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(n, d, generator=g, dtype=torch.float64)
    xt = torch.randn(m, d, generator=g, dtype=torch.float64)
    return xs, torch.randint(0, 3, (n,), generator=g), xt, torch.randint(0, 3, (m,), generator=g)


def _ce(out, y):
    return nn.functional.cross_entropy(out, y, reduction="none")


def test_functional_call_keeps_parameter_objects():
    model = _shared_model()
    before = {n: p for n, p in model.named_parameters(remove_duplicate=False)}
    swapped = {n: p.detach() * 2 for n, p in model.named_parameters()}
    functional_call(model, swapped, (torch.randn(2, 6, dtype=torch.float64),))
    after = dict(model.named_parameters(remove_duplicate=False))
    assert all(after[n] is p for n, p in before.items())
    assert all(isinstance(p, nn.Parameter) for p in after.values())


@pytest.mark.parametrize("n", [1, 5])
def test_per_sample_grads_of_a_module_used_twice_equal_brute_force(n):
    model = _shared_model()
    x, y, _, _ = _data(n=n)
    names = [nm for nm, _ in model.named_parameters()]
    g = per_sample_grads(model, names, x, y, _ce)
    for i in range(n):
        model.zero_grad()
        _ce(model(x[i:i + 1]), y[i:i + 1]).sum().backward()
        for nm, p in model.named_parameters():      # both uses of the shared Linear accumulate
            np.testing.assert_allclose(g[nm][i].numpy(), p.grad.numpy(), rtol=1e-12, atol=1e-14, err_msg=nm)


@pytest.mark.parametrize("method, kw", [
    (InRunShapley, dict(epochs=2, batch_size=4, lr=0.2, optimizer="sgd", target_batch_size=3)),
    (TracIn, dict(epochs=2, batch_size=4, lr=0.2, optimizer="sgd", n_checkpoints=3)),
    (DVGS, dict(epochs=3, restarts=1, lr=0.05, target_batch_size=4)),
], ids=["inrun_shapley", "tracin", "dvgs"])
def test_reference_backend_equals_fast_on_a_module_used_twice(method, kw):
    data = _data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = method(_shared_model(), backend="fast", seed=0, progress=False, **kw).fit(*data)
        ref = method(_shared_model(), backend="reference", seed=0, progress=False, **kw).fit(*data)
    scale = np.abs(fast.values).max()
    assert scale > 0 and np.std(fast.values) > 1e-3 * scale
    np.testing.assert_allclose(ref.values, fast.values, rtol=1e-8, atol=1e-10 * scale)


class _MaxNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.out = nn.Embedding(30, 4, max_norm=1.0), nn.Linear(4, 2)

    def forward(self, ids):
        return self.out(self.emb(ids.long()).mean(1))


@pytest.mark.parametrize("method, kw", [
    (InRunShapley, dict(epochs=1, batch_size=4, optimizer="sgd")),
    (TracIn, dict(epochs=1, batch_size=4, n_checkpoints=1)),
    (DVGS, dict(epochs=1, restarts=1)),
], ids=["inrun_shapley", "tracin", "dvgs"])
def test_reference_backend_refuses_embedding_max_norm_before_work(method, kw):
    """Embedding(max_norm) writes its weight in the forward, which vmap cannot batch: the reference
    backend says so up front, naming the layer; the fast backend runs it."""
    g = torch.Generator().manual_seed(3)
    xs, xt = torch.randint(0, 30, (12, 5), generator=g).float(), torch.randint(0, 30, (6, 5), generator=g).float()
    ys, yt = torch.randint(0, 2, (12,), generator=g), torch.randint(0, 2, (6,), generator=g)
    with pytest.raises(ValueError, match=r"model: emb \(Embedding, max_norm=1.0\).*backend='fast'"):
        method(_MaxNormNet(), backend="reference", seed=0, progress=False, **kw).fit(xs, ys, xt, yt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = method(_MaxNormNet(), backend="fast", seed=0, progress=False, **kw).fit(xs, ys, xt, yt)
    assert np.isfinite(res.values).all()
