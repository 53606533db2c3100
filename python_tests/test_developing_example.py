"""DEVELOPING.md's worked example of a gradient method ("Adding a gradient method") runs as
printed and gives ⟨gᵢ, G⟩ equal to explicit float64 per-sample gradients."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

DOC = Path(__file__).resolve().parent.parent / "DEVELOPING.md"


def _example_namespace() -> dict:
    text = DOC.read_text()
    section = text.split("## Adding a gradient method", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    ns: dict = {}
    exec(compile(code, str(DOC), "exec"), ns)      # noqa: S102 - our own documentation
    return ns


def _explicit(model, xs, ys, xt, yt):
    params = dict(model.named_parameters())
    G = torch.autograd.grad(F.cross_entropy(model(xt), yt), list(params.values()))
    out = []
    for i in range(xs.shape[0]):
        g = torch.autograd.grad(F.cross_entropy(model(xs[i:i + 1]), ys[i:i + 1]), list(params.values()))
        out.append(sum((a * b).sum() for a, b in zip(g, G)).item())
    return np.array(out)


@pytest.mark.parametrize("n,batch", [(1, 4), (23, 5), (40, 1024)])
def test_developing_example_grad_dot(n, batch):
    GradDot = _example_namespace()["GradDot"]
    g = torch.Generator().manual_seed(n)
    torch.manual_seed(n)
    model = nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Tanh(), nn.Linear(7, 3)).double()
    xs, xt = torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randn(9, 5, generator=g, dtype=torch.float64)
    ys, yt = torch.randint(0, 3, (n,), generator=g), torch.randint(0, 3, (9,), generator=g)
    res = GradDot(model, batch_size=batch, progress=False, seed=0).fit(xs, ys, xt, yt)
    np.testing.assert_allclose(res.values, _explicit(model, xs, ys, xt, yt), rtol=1e-10, atol=1e-12)
    assert res.info["routes"]["0"] == "linear_ghost" and res.info["routes"]["1"].startswith("norm_ghost")
    assert "route_reasons" in res.info
