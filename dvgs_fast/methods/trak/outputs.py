"""TRAK's model output function for classification and its out-to-loss weights.

For a sample z = (x, y) with logits z and p = softmax(z)_y (Park et al. 2023, section 3.3;
traker 0.3.2's ``ImageClassificationModelOutput``):

    f(z; θ) = log(p / (1 - p)) = z_y - logsumexp_{j ≠ y} z_j        (the margin, "log-odds")
    Q(z)    = 1 - p = -∂ℓ/∂f for the cross-entropy ℓ = log(1 + e^{-f})

TRAK attributes the margin and weights each training sample's term by Q. Both are per-sample
functions (output [N, C], labels [N]) -> [N], so the margin is what the gradient engine
differentiates in place of a loss.
"""
from __future__ import annotations

import torch


def margin(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[N]: z_y - logsumexp_{j≠y} z_j (computed stably: the true class masked to -inf)."""
    y = y.long().reshape(-1, 1)
    zy = out.gather(1, y).squeeze(1)
    others = out.scatter(1, y, float("-inf"))
    return zy - torch.logsumexp(others, 1)


def out_to_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[N]: 1 - p_y, the weight Q of each training sample's term (no gradient)."""
    with torch.no_grad():
        return 1.0 - torch.softmax(out.detach(), 1).gather(1, y.long().reshape(-1, 1)).squeeze(1)


__all__ = ["margin", "out_to_loss"]
