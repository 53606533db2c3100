"""One functional optimizer for every refit (sequential, vmapped and hand-batched).

The "same permutations, same values" promise of batched Data Shapley / LOO rests on the
sequential reference and the batched grid running the very same update arithmetic. Both call
`run_optimizer` here, on a dict of tensors, so they cannot drift apart. Functional (no
torch.optim state objects) so that it composes with torch.func.vmap.

Adam is torch.optim.Adam's default arithmetic (betas 0.9 / 0.999, eps 1e-8, bias-corrected,
eps added after dividing sqrt(v) by sqrt(1 - b2^t)); SGD is plain gradient descent.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

Params = dict[str, torch.Tensor]
OPTIMIZERS = ("adam", "sgd")
_B1, _B2, _EPS = 0.9, 0.999, 1e-8


class BudgetHit(Exception):
    """`should_stop()` said so between two steps: the refit is abandoned, unfinished."""


def run_optimizer(name: str, params: Params, grad_fn: Callable[[Params], Params], *, steps: int,
                  lr: float, should_stop: Callable[[], bool] | None = None) -> Params:
    """`steps` updates of `params` with gradients from `grad_fn(params)`; returns new params.

    `should_stop` (e.g. a time budget) is asked before every step; True raises BudgetHit, so a
    long batch of refits never overruns a budget by more than one step."""
    if name == "sgd":
        for _ in range(steps):
            if should_stop is not None and should_stop():
                raise BudgetHit
            g = grad_fn(params)
            params = {k: sgd_update(p, g[k], lr) for k, p in params.items()}
        return params
    if name != "adam":
        raise ValueError(f"refit_optimizer: unknown value {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    m = {k: torch.zeros_like(p) for k, p in params.items()}
    v = {k: torch.zeros_like(p) for k, p in params.items()}
    for t in range(1, steps + 1):
        if should_stop is not None and should_stop():
            raise BudgetHit
        g = grad_fn(params)
        new = {}
        for k, p in params.items():
            new[k], m[k], v[k] = adam_update(p, g[k], m[k], v[k], t, lr)
        params = new
    return params


def sgd_update(p: torch.Tensor, g: torch.Tensor, lr) -> torch.Tensor:
    """One plain gradient-descent step (torch.optim.SGD without momentum: p - lr * g, weight decay
    already in g); lr may be a tensor broadcastable against p."""
    return p - lr * g


def adam_update(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, t, lr: float):
    """One Adam step with torch.optim.Adam's arithmetic (moments as its lerp_/addcmul_, bias
    correction, eps after sqrt(v) / sqrt(1 - b2^t)); functional, so it also runs under vmap.

    t is the step number (1 on the first step): an int, or a tensor broadcastable against p when
    stacked networks each keep their own count (the removal curves' batched refits, where
    networks on smaller subsets take fewer steps). Returns (p, m, v) after the step."""
    m = torch.lerp(m, g, 1.0 - _B1)
    v = v * _B2 + (1.0 - _B2) * (g * g)
    if isinstance(t, torch.Tensor):
        c1, c2 = 1.0 - _B1 ** t, torch.sqrt(1.0 - _B2 ** t)
    else:
        c1, c2 = 1.0 - _B1 ** t, math.sqrt(1.0 - _B2 ** t)
    return p - (lr / c1) * m / (v.sqrt() / c2 + _EPS), m, v
