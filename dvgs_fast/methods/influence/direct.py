"""solver="direct": the explicit Hessian H (p × p, from p Hessian-vector products), then
(H + λI)⁻¹ by Cholesky -- exact, for models up to ~20k parameters (p² float64 numbers: 3.2 GB at
20k; the p HVPs cost about p backward passes over the Hessian's data).

Damping ("auto"): λ = 0.01·λ_max(H) (``EXACT_AUTO_DAMPING``), the rule of every exact solver
(direct, CG, LiSSA, Arnoldi). Why relative to the largest eigenvalue rather than to the mean
(trace/p): a network's Hessian at a trained point is indefinite, with negative eigenvalues
far larger than its mean eigenvalue -- on the digits MLP (64-64-64-10, 1,000 rows, Adam 50
epochs) λ_min = -0.026, mean 0.004, λ_max = 7.3; 0.1·mean would leave H + λI indefinite (and
CG then diverges or stalls), 0.01·λ_max = 0.073 does not. Convex models (logistic regression)
need no damping at all; 1% of λ_max regularises them mildly. When H + λI is not positive
definite, the Cholesky fails: a CurvatureWarning names λ_min(H) + λ and the system is solved by
LU instead (the values are then those of an indefinite quadratic, rarely useful).
"""
from __future__ import annotations

import torch

from dvgs_fast.methods.influence.hvp import HessianOperator, dense_bottom_eigenvalue, dense_top_eigenvalue
from dvgs_fast.methods.influence.problem import Problem, Saver, Stopped
from dvgs_fast.methods.influence.solver import Solver, fixed_damping

EXACT_AUTO_DAMPING = 0.01            # λ = this × λ_max(H) for direct / CG / LiSSA / Arnoldi
MAX_DIRECT_PARAMS = 20_000           # p² float64 = 3.2 GB
_COLUMNS = 64                        # Hessian columns per chunk (one checkpoint unit)


def exact_damping(cfg, lam_max: float) -> float:
    fixed = fixed_damping(cfg)
    return fixed if fixed is not None else EXACT_AUTO_DAMPING * max(lam_max, 0.0)


def hessian_columns(prob: Problem, st: dict, saver: Saver | None = None, desc: str = "direct") -> HessianOperator:
    """Fill st["H"] (p x p, CPU, the solver's dtype) with H + weight_decay·I from p Hessian-vector
    products, _COLUMNS at a time, from column st["col"] on (a resume); symmetrised when complete."""
    p = prob.p
    if st.get("H") is None:
        st["H"] = torch.zeros(p, p, dtype=prob.dtype)
        st["col"] = 0
    op = HessianOperator(prob)
    H = st["H"]
    bar = prob.progress(p, f"influence ({desc}): Hessian columns", unit="col", initial=int(st["col"]))
    try:
        while st["col"] < p:
            try:
                prob.check_time()
            except Stopped:
                if saver is not None:
                    saver(lambda: st, force=True)
                raise
            c0 = int(st["col"])
            c1 = min(c0 + _COLUMNS, p)
            E = torch.zeros(c1 - c0, p, dtype=prob.dtype, device=prob.device)
            E[torch.arange(c1 - c0), torch.arange(c0, c1)] = 1.0
            H[c0:c1] = op.matmat(E).cpu()          # rows = columns: H is symmetric
            st["col"] = c1
            bar.update(c1 - c0)
            if saver is not None:
                saver(lambda: st)
            if c1 == p:
                H.copy_(0.5 * (H + H.t()))         # exact symmetry (rounding of the two products)
    finally:
        bar.close()
    return op


class Direct(Solver):
    name = "direct"
    _factor_key = None               # (kind, damping) of the factorisation kept for later query blocks

    def fit(self, prob: Problem, saved: dict | None, saver: Saver) -> None:
        st = dict(saved or {})
        op = hessian_columns(prob, st, saver)
        self.state = st
        self.details["hessian_vector_products"] = op.products

    def precondition(self, prob: Problem, G: dict) -> dict:
        H = self.state["H"].to(prob.device)
        if fixed_damping(self.cfg) is None and "lam_max" not in self.state:    # only the auto rule needs it
            self.state["lam_max"] = dense_top_eigenvalue(H)
        if "lam_max" in self.state:
            self.details["lambda_max"] = self.state["lam_max"]
        lam = exact_damping(self.cfg, self.state.get("lam_max", 0.0))
        self.details["damping"] = lam
        key = ("chol", lam)
        if self._factor_key != key:
            A = H.clone()
            A.diagonal().add_(lam)
            L, info = torch.linalg.cholesky_ex(A)
            if int(info) != 0:
                low = dense_bottom_eigenvalue(A)
                self.warn(f"the damped Hessian H + {lam:.3g}·I is not positive definite (smallest eigenvalue "
                          f"{low:.3g}); solved by LU -- raise damping above {max(0.0, -low + lam):.3g}")
                self.details["positive_definite"] = False
                self._factor = ("lu", torch.linalg.lu_factor(A))
            else:
                self.details["positive_definite"] = True
                self._factor = ("chol", L)
            self._factor_key = key
        B = prob.flat(G).t()                           # [p, Q]
        kind, f = self._factor
        X = torch.cholesky_solve(B, f) if kind == "chol" else torch.linalg.lu_solve(*f, B)
        return prob.unflat(X.t())


__all__ = ["Direct", "EXACT_AUTO_DAMPING", "MAX_DIRECT_PARAMS", "exact_damping"]
