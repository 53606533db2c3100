"""Gradient similarities of the original DVGS, all derived from (dot, sqnorm, target sqnorm)."""
from __future__ import annotations

import torch

__all__ = ["similarity", "SIMILARITIES"]

SIMILARITIES = ("cosine", "dot", "projection", "distance")


def similarity(dot: torch.Tensor, sqnorm: torch.Tensor, target_sqnorm: torch.Tensor | float, kind: str = "cosine",
               eps: float = 1e-8) -> torch.Tensor:
    """Per-sample similarity of g_i to the target gradient G from their stats.

    cosine      dot / (max(|g|, eps) * max(|G|, eps))   (== F.cosine_similarity)
    dot         dot
    projection  dot / max(|G|, eps)                     (scalar projection of g_i onto G)
    distance    -|g_i - G| = -sqrt(max(|g|^2 - 2 dot + |G|^2, 0))
    """
    if kind not in SIMILARITIES:
        raise ValueError(f"kind: unknown similarity {kind!r}; choose one of {', '.join(map(repr, SIMILARITIES))}")
    if dot.shape != sqnorm.shape:
        raise ValueError(f"sqnorm: shape {list(sqnorm.shape)} differs from dot's {list(dot.shape)}")
    tsq = torch.as_tensor(target_sqnorm, dtype=dot.dtype, device=dot.device)
    if kind == "cosine":
        return dot / (sqnorm.clamp_min(0).sqrt().clamp_min(eps) * tsq.clamp_min(0).sqrt().clamp_min(eps))
    if kind == "dot":
        return dot.clone()
    if kind == "projection":
        return dot / tsq.clamp_min(0).sqrt().clamp_min(eps)
    return -(sqnorm - 2 * dot + tsq).clamp_min(0).sqrt()
