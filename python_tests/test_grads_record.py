"""The engine's forward recorder: which recorded outputs need a copy (grads.record.fresh_output_modules).

A routed module's output is handed on as a copy so that an in-place op downstream cannot change the
tensor whose gradient is the layer's δ; the copy is skipped where the only reader of the output is a
module that cannot change it (the next child of a plain nn.Sequential that returns a new tensor),
and any change of an uncopied output during the forward is an error.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dvgs_fast import grads
from dvgs_fast.grads.record import fresh_output_modules

LOSS = grads.make_sample_loss("cross_entropy")


def _mlp():
    return nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(inplace=True), nn.Linear(6, 4),
                         nn.Tanh(), nn.Linear(4, 6), nn.Dropout(0.0), nn.Linear(6, 3))


def _case(n, seed=0):
    torch.manual_seed(seed)
    model = _mlp().double()
    g = torch.Generator().manual_seed(seed + 1)
    return model, torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize("n", [7, 1])
def test_outputs_read_only_by_a_fresh_module_are_not_copied_and_stats_are_exact(n):
    """Linear -> ReLU() and Linear -> Tanh(): handed on as they are (the next module's input is
    the recorded tensor); Linear -> ReLU(inplace=True), -> Dropout (may return its input) and the
    last layer: copied. The per-sample (dot, sqnorm) equal explicit per-sample gradients (float64)."""
    model, x, y = _case(n)
    names = [nm for nm, _ in model.named_parameters()]
    scorer = grads.FastScorer(model, names, LOSS, "dot", owner="test")
    linears = [model[i] for i in (0, 2, 4, 6, 8)]
    assert fresh_output_modules(model, linears) == {model[0], model[4]}
    seen = {}
    for i in (1, 3, 5, 7):      # hooks added after the scorer was built: they only look
        model[i].register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(i, args[0]))
    with scorer.recorder() as rec:
        model(x)
    seen = dict(seen)
    assert rec.calls[model[0]][0].output is seen[1] and rec.calls[model[4]][0].output is seen[5]
    assert rec.calls[model[2]][0].output is not seen[3] and rec.calls[model[6]][0].output is not seen[7]
    G = {nm: torch.randn_like(p) for nm, p in model.named_parameters()}
    dot, sq = scorer.stats(x, y, G)
    ps = list(model.parameters())               # explicit per-sample gradients, one sample at a time
    per = [torch.autograd.grad(LOSS(model(x[i:i + 1]), y[i:i + 1]).sum(), ps) for i in range(n)]
    g_G = torch.cat([t.reshape(-1) for t in G.values()])
    flat = torch.stack([torch.cat([t.reshape(-1) for t in gi]) for gi in per])
    want_dot, want_sq = flat @ g_G, flat.square().sum(1)
    torch.testing.assert_close(dot.double(), want_dot, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sq.double(), want_sq, rtol=1e-10, atol=1e-12)


def test_shared_custom_or_hooked_readers_keep_the_copy():
    """A module called twice, a Sequential subclass with its own forward, a next module with a
    hook, a view (Flatten), Identity, an in-place activation: each keeps the copy."""
    lin = nn.Linear(4, 4)
    assert fresh_output_modules(nn.Sequential(lin, nn.Tanh(), lin, nn.Tanh()), [lin]) == frozenset()

    class Doubled(nn.Sequential):
        def forward(self, x):
            return super().forward(x) * 2

    a = nn.Linear(4, 4)
    assert fresh_output_modules(Doubled(a, nn.Tanh()), [a]) == frozenset()
    hooked = nn.Tanh()
    hooked.register_forward_hook(lambda m, i, o: None)
    for nxt in (hooked, nn.Flatten(), nn.Identity(), nn.SiLU(inplace=True), nn.Dropout(0.1)):
        b = nn.Linear(4, 4)
        assert fresh_output_modules(nn.Sequential(b, nxt, nn.Linear(4, 2)), [b]) == frozenset(), nxt
    c = nn.Linear(4, 4)
    assert fresh_output_modules(nn.Sequential(nn.Sequential(c, nn.GELU()), nn.Linear(4, 2)), [c]) == {c}


def test_uncopied_output_changed_in_place_is_an_error():
    """A hook added later on the next module that changes its input in place: the recorder's
    version check names it as an error instead of recording a wrong δ."""
    model, x, y = _case(4)
    names = [nm for nm, _ in model.named_parameters()]
    scorer = grads.FastScorer(model, names, LOSS, "dot", owner="test")
    model[1].register_forward_pre_hook(lambda m, args: args[0].mul_(2.0))
    with pytest.raises(RuntimeError, match="output of a Linear was modified in place during the forward"):
        scorer.record(x, y)
