"""Per-sample losses and label casting, the same for every gradient method.

A per-sample loss maps (model output [N, ...], labels [N, ...]) to losses [N]. The engine
differentiates their sum: with samples independent in the forward, d(Σ_j ℓ_j)/d out_i is sample
i's own output gradient, so one backward gives every sample's δ.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

SampleLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def make_sample_loss(loss: Any) -> SampleLoss:
    """Per-sample losses [N]: "cross_entropy" (mean over any extra output dims, e.g. tokens),
    "mse" (mean over the output's elements), or the user's callable, used as given."""
    if loss == "cross_entropy":
        def per_sample(out, y):
            ce = F.cross_entropy(out, y, reduction="none")
            # [N, C] logits give [N] already (a mean over one element would only add two ops per step)
            return ce if out.dim() == 2 else ce.reshape(out.shape[0], -1).mean(1)
        per_sample.kind = "cross_entropy"          # lets a consumer use its closed forms (the softmax Hessian)
    elif loss == "mse":
        def per_sample(out, y):
            return (out - y.reshape(out.shape)).square().reshape(out.shape[0], -1).mean(1)
    else:
        per_sample = loss
    return per_sample


def cast_labels(y: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Float labels take the model's dtype; integer labels become int64 (class indices)."""
    if y is None:
        return None
    return y.to(dtype) if y.is_floating_point() else y.long()
