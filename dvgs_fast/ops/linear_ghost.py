"""linear_ghost_stats: per-sample Linear-layer gradient stats without per-sample gradients.

For a Linear layer, sample i's weight gradient is d_i a_i^T (d_i: gradient at the layer's
output, a_i: its input), so against a target gradient (G, g_b)
    dot_i    = d_i^T G a_i + d_i . g_b
    sqnorm_i = |d_i|^2 (|a_i|^2 + 1)
cost O(N (d_in + d_out)) memory instead of O(N d_in d_out). Sequences [N, T, .] sum over T.
"""
from __future__ import annotations

import torch

from ._checks import check_linear_ghost_inputs

__all__ = ["linear_ghost_stats"]


def linear_ghost_stats(inputs: torch.Tensor, output_grads: torch.Tensor, target_weight: torch.Tensor,
                       target_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(dot [N], sqnorm [N]) of each sample's Linear weight (+ bias) gradient vs the target.

    inputs [N, d_in] or [N, T, d_in]; output_grads [N, d_out] or [N, T, d_out];
    target_weight [d_out, d_in]; target_bias [d_out] or None (layer without bias).
    float32 out (float64 for float64 inputs); fp16/bf16 accumulate in fp32.
    """
    check_linear_ghost_inputs(inputs, output_grads, target_weight, target_bias)
    return torch.ops.dvgs_fast.linear_ghost_stats(inputs, output_grads, target_weight, target_bias)


@torch.library.register_fake("dvgs_fast::linear_ghost_stats")
def _linear_ghost_fake(inputs, output_grads, target_weight, target_bias=None):
    check_linear_ghost_inputs(inputs, output_grads, target_weight, target_bias)
    dt = torch.float64 if inputs.dtype == torch.float64 else torch.float32
    n = inputs.shape[0]
    return inputs.new_empty((n,), dtype=dt), inputs.new_empty((n,), dtype=dt)


def _setup(ctx, inputs, output):
    a, d, w, b = inputs
    ctx.save_for_backward(a, d, w, b)
    ctx.has_bias = b is not None


def _backward(ctx, ddot, dsq):
    a, d, w, b = ctx.saved_tensors
    dt = torch.float64 if a.dtype == torch.float64 else torch.float32
    A, D, W = a.to(dt), d.to(dt), w.to(dt)
    gb = b.to(dt) if ctx.has_bias else None
    hb = 1.0 if ctx.has_bias else 0.0
    seq = A.dim() == 3
    ddot = torch.zeros(A.shape[0], dtype=dt, device=A.device) if ddot is None else ddot.to(dt)
    dsq = torch.zeros(A.shape[0], dtype=dt, device=A.device) if dsq is None else dsq.to(dt)
    if not seq:
        a2 = (A * A).sum(1, keepdim=True)
        d2 = (D * D).sum(1, keepdim=True)
        lin = A @ W.t() + (gb if gb is not None else 0)
        g_a = ddot[:, None] * (D @ W) + 2 * dsq[:, None] * d2 * A
        g_d = ddot[:, None] * lin + 2 * dsq[:, None] * (a2 + hb) * D
        g_w = (ddot[:, None] * D).t() @ A
        g_b = (ddot[:, None] * D).sum(0) if gb is not None else None
    else:
        per_w = torch.bmm(D.transpose(1, 2), A)          # [N, d_out, d_in]: sum_t d_t a_t^T
        s = D.sum(1)                                       # [N, d_out]
        lin = A @ W.t() + (gb if gb is not None else 0)    # [N, T, d_out]
        g_a = ddot[:, None, None] * (D @ W) + 2 * dsq[:, None, None] * torch.bmm(D, per_w)
        g_d = (ddot[:, None, None] * lin
               + 2 * dsq[:, None, None] * (torch.bmm(A, per_w.transpose(1, 2)) + hb * s[:, None, :]))
        g_w = torch.einsum("n,nto,nti->oi", ddot, D, A)
        g_b = (ddot[:, None] * s).sum(0) if gb is not None else None
    return (g_a.to(a.dtype), g_d.to(d.dtype), g_w.to(w.dtype), None if g_b is None else g_b.to(b.dtype))


torch.library.register_autograd("dvgs_fast::linear_ghost_stats", _backward, setup_context=_setup)
