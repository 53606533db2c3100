"""per_sample_grad_stats / per_sample_cosine: dot and squared norm of per-sample gradients
against a target gradient, fused over a list of parameter tensors (no concatenation)."""
from __future__ import annotations

from typing import Sequence

import torch

from ._checks import check_grad_stats_inputs, stats_out_dtype

__all__ = ["per_sample_grad_stats", "per_sample_cosine"]


def per_sample_grad_stats(grads: Sequence[torch.Tensor], target: Sequence[torch.Tensor]
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (dot, squared norm) of flattened per-sample gradients against a target.

    grads:  K tensors [N, *s_k] (e.g. from torch.func.vmap(grad(...))), any strides.
    target: K tensors of shapes s_k.
    Returns two [N] tensors: float32 (float64 if any gradient is float64). fp16/bf16/fp32
    inputs accumulate in fp32. Each gradient tensor is read once; nothing is copied.
    """
    check_grad_stats_inputs(grads, target, "per_sample_grad_stats")
    return torch.ops.dvgs_fast.per_sample_grad_stats(list(grads), list(target))


def per_sample_cosine(grads: Sequence[torch.Tensor], target: Sequence[torch.Tensor], eps: float = 1e-8
                      ) -> torch.Tensor:
    """Cosine similarity of each sample's gradient with the target gradient.

    Equal to F.cosine_similarity(cat(flat grads), cat(flat target)[None], dim=1, eps=eps):
    dot / (max(|g|, eps) * max(|G|, eps)), so a zero gradient gives 0, never NaN.
    """
    check_grad_stats_inputs(grads, target, "per_sample_cosine")
    if not eps >= 0:
        raise ValueError(f"eps: must be >= 0, got {eps!r}")
    return torch.ops.dvgs_fast.per_sample_cosine(list(grads), list(target), float(eps))


@torch.library.register_fake("dvgs_fast::per_sample_grad_stats")
def _grad_stats_fake(grads, target):
    n = check_grad_stats_inputs(grads, target, "per_sample_grad_stats")
    dt = stats_out_dtype(grads)
    return grads[0].new_empty((n,), dtype=dt), grads[0].new_empty((n,), dtype=dt)


def _grad_stats_setup(ctx, inputs, output):
    grads, target = inputs
    ctx.save_for_backward(*grads, *target)
    ctx.k = len(grads)


def _grad_stats_backward(ctx, ddot, dsq):
    saved = ctx.saved_tensors
    grads, target = saved[: ctx.k], saved[ctx.k:]
    g_grads, g_target = [], []
    for g, t in zip(grads, target):
        shape = (-1,) + (1,) * t.dim()
        gg = None
        if ddot is not None:
            gg = ddot.to(g.dtype).view(shape) * t.to(g.dtype)
        if dsq is not None:
            term = 2 * dsq.to(g.dtype).view(shape) * g
            gg = term if gg is None else gg + term
        g_grads.append(gg)
        g_target.append(None if ddot is None else torch.tensordot(ddot.to(g.dtype), g, dims=([0], [0])).to(t.dtype))
    return g_grads, g_target


torch.library.register_autograd("dvgs_fast::per_sample_grad_stats", _grad_stats_backward,
                                setup_context=_grad_stats_setup)
