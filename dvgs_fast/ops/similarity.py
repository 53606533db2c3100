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
    if not eps >= 0:
        raise ValueError(f"eps: must be >= 0, got {eps!r}")
    tsq = torch.as_tensor(target_sqnorm, dtype=dot.dtype, device=dot.device)
    if tsq.numel() != 1:
        raise ValueError(f"target_sqnorm: must be one number (|G|^2 of the target gradient), got shape "
                         f"{list(tsq.shape)}")
    _check_not_negative(tsq, "target_sqnorm")
    _check_not_negative(sqnorm, "sqnorm")
    tsq = tsq.reshape(())
    if kind == "cosine":
        return dot / (sqnorm.clamp_min(0).sqrt().clamp_min(eps) * tsq.clamp_min(0).sqrt().clamp_min(eps))
    if kind == "dot":
        return dot.clone()
    if kind == "projection":
        return dot / tsq.clamp_min(0).sqrt().clamp_min(eps)
    return -(sqnorm - 2 * dot + tsq).clamp_min(0).sqrt()


def _check_not_negative(sq: torch.Tensor, name: str) -> None:
    """A squared norm below zero is a caller's bug, except for rounding: the Gram form of the
    ghost statistics can return -1e-7-sized values where the true norm is ~0 (those are clamped).
    Refuse values more negative than a few ulps of the largest magnitude (one sync on a GPU)."""
    if sq.numel() == 0:
        return
    lo = float(sq.min())
    if lo < 0:
        tol = 64 * torch.finfo(sq.dtype).eps * float(sq.abs().max())
        if lo < -tol:
            raise ValueError(f"{name}: squared norms must be >= 0, found {lo:g}")
