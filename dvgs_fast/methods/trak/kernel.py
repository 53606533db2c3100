"""The after-kernel of one model: K = (ΦᵀΦ + λI)⁻¹ from its training features Φ [N, k], and
the rule that sets λ.

The rule looks at the training features only -- never at the queries being scored:

    λ = regularization · tr(ΦᵀΦ) / k          (the mean eigenvalue of ΦᵀΦ, times a factor)

so a factor means the same for any projection dimension, gradient scale or number of rows, and
the scores of a query do not depend on which other queries are scored with it. With λ > 0 the
kernel is applied through a Cholesky factor; λ = 0 (plain TRAK) through the eigendecomposition,
as the pseudo-inverse when ΦᵀΦ is singular (k > N, or a dead direction).
"""
from __future__ import annotations

import torch


def relative_lambda(xtx: torch.Tensor, regularization: float) -> float:
    """λ = regularization × the mean eigenvalue of ΦᵀΦ (its trace / k)."""
    k = xtx.shape[0]
    return float(regularization) * float(torch.diagonal(xtx).sum()) / max(1, k)


class Kernel:
    """(ΦᵀΦ + λI)⁻¹ of one model, applied to row vectors: ``apply(φ) = φ (ΦᵀΦ + λI)⁻¹``."""

    def __init__(self, xtx: torch.Tensor, lam: float):
        self.k, self.lam = int(xtx.shape[0]), float(lam)
        a = xtx.to(torch.float64)
        a = 0.5 * (a + a.t())
        self.chol = None
        self.route = "cholesky"
        if self.lam > 0:
            a = a + self.lam * torch.eye(self.k, dtype=torch.float64)
            chol, info = torch.linalg.cholesky_ex(a)
            if int(info) == 0:
                self.chol = chol
        if self.chol is None:
            e, v = torch.linalg.eigh(a)
            tol = max(float(e.abs().max()), 1e-300) * self.k * torch.finfo(torch.float64).eps
            inv = torch.where(e > tol, 1.0 / e.clamp_min(tol), torch.zeros_like(e))
            self.v, self.inv = v, inv
            self.rank = int((e > tol).sum())
            self.route = "eigh" if self.rank == self.k else "pseudo-inverse"
        else:
            self.rank = self.k

    def apply(self, phi: torch.Tensor) -> torch.Tensor:
        """[n, k] float64 on the CPU: φ (ΦᵀΦ + λI)⁻¹ (the matrix is symmetric: row vectors solve alike)."""
        p = phi.detach().to(device="cpu", dtype=torch.float64)
        if self.chol is not None:
            return torch.cholesky_solve(p.t(), self.chol).t()
        return ((p @ self.v) * self.inv) @ self.v.t()

    def describe(self) -> dict:
        return {"lambda": self.lam, "route": self.route, "rank": self.rank, "k": self.k}


__all__ = ["Kernel", "relative_lambda"]
