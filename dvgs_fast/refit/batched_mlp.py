"""The "mlp" engine of the batched refit grid (`batched.GridTrainer`): a one-hidden-layer ReLU
network (``nn.Sequential(Linear, ReLU, Linear)``, what ``model="mlp"`` builds) trained as
batched GEMMs with hand-derived gradients, like the "linear" engine for a bare nn.Linear.

The maths is exactly the refit of `refit.models.Refitter` (the same loss, mask weighting,
weight decay and the shared optimizer of `refit.optim`), so it computes the same models as the
vmap engine up to float summation order; without torch.func's per-model dispatch it is several
times faster on a CPU (bench/bench_semivalues.py). Layout: the slot's rows are shared by its C
prefixes (Xp [P, L, d]), the hidden pre-activations are [P, C, h, L].
"""
from __future__ import annotations

import torch
from torch import nn

from dvgs_fast.refit.optim import run_optimizer

KEYS = ("0.weight", "0.bias", "2.weight", "2.bias")


def is_relu_mlp(module: nn.Module) -> bool:
    """Linear -> ReLU -> Linear, both Linear layers with a bias (the engine's model)."""
    return (isinstance(module, nn.Sequential) and len(module) == 3 and isinstance(module[0], nn.Linear)
            and isinstance(module[1], nn.ReLU) and isinstance(module[2], nn.Linear)
            and module[0].bias is not None and module[2].bias is not None)


def train_mlp_grid(r, theta0: dict[str, torch.Tensor], Xp: torch.Tensor, Yp: torch.Tensor,
                   M: torch.Tensor) -> dict[str, torch.Tensor]:
    """Xp [P, L, ...], Yp [P, L], M [P, C, L] (0/1 row masks) -> params with leading dims [P, C]."""
    P, C, L = M.shape
    h, d = theta0["0.weight"].shape
    o = theta0["2.weight"].shape[0]
    X2 = Xp.reshape(P, L, d)
    XT = X2.transpose(1, 2).contiguous()                                   # [P, d, L]
    wk = (M / M.sum(-1, keepdim=True)).unsqueeze(2)                        # [P, C, 1, L]
    if r.classification:
        target = torch.nn.functional.one_hot(Yp, o).to(Xp.dtype).transpose(1, 2).unsqueeze(1)   # [P, 1, o, L]
    else:
        target = Yp.reshape(P, 1, 1, L)
    params = {k: theta0[k].expand(P, C, *theta0[k].shape).clone() for k in KEYS}

    def grad_fn(ps):
        W1, b1, W2, b2 = (ps[k] for k in KEYS)
        Z1 = torch.bmm(W1.reshape(P, C * h, d), XT).view(P, C, h, L) + b1.unsqueeze(-1)
        A = torch.relu(Z1)
        Z2 = torch.matmul(W2, A) + b2.unsqueeze(-1)                          # [P, C, o, L]
        if r.classification:
            G2 = (torch.softmax(Z2, dim=2) - target) * wk
        else:
            G2 = 2.0 * (Z2 - target) * wk
        dZ1 = torch.matmul(W2.transpose(-1, -2), G2) * (Z1 > 0)               # [P, C, h, L]
        g = {"0.weight": torch.bmm(dZ1.reshape(P, C * h, L), X2).view(P, C, h, d), "0.bias": dZ1.sum(-1),
             "2.weight": torch.matmul(G2, A.transpose(-1, -2)), "2.bias": G2.sum(-1)}
        if r.weight_decay:
            g = {k: g[k] + r.weight_decay * ps[k] for k in KEYS}
        return g

    return run_optimizer(r.optimizer, params, grad_fn, steps=r.steps, lr=r.lr, should_stop=r.should_stop)


def mlp_outputs(flat: dict[str, torch.Tensor], Xt: torch.Tensor) -> torch.Tensor:
    """Outputs [B, n, o] of B networks (params with one leading dim) on the target rows."""
    x = Xt.reshape(Xt.shape[0], -1)
    a = torch.relu(torch.matmul(x, flat["0.weight"].transpose(-1, -2)) + flat["0.bias"].unsqueeze(1))
    return torch.matmul(a, flat["2.weight"].transpose(-1, -2)) + flat["2.bias"].unsqueeze(1)
