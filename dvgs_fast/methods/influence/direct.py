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
a symmetric indefinite LDLᵀ factorisation instead (the values are then those of an indefinite quadratic, rarely useful).
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
    """Fill st["H"] (p x p, CPU, the solver's dtype) with H + weight_decay·I, symmetrised when
    complete. On a Sequential MLP the largest Linear layer's diagonal block is built at once
    (HessianOperator.kron_block) and only the other parameters' columns are taken, by
    Hessian-vector products, _COLUMNS at a time (each gives a row too: H is symmetric); on any
    other model all p columns. st["col"] counts the columns done (a resume), st["plan"] names
    the block, so a state saved under another plan starts over."""
    p = prob.p
    op = HessianOperator(prob)
    plan = op.kron_plan()
    key = None if plan is None else f"kron:{plan[0]}"
    if st.get("H") is None or st.get("plan") != key:
        st.update(H=torch.zeros(p, p, dtype=prob.dtype), col=0, plan=key, block_done=False)
    H = st["H"]
    if plan is None:
        cols = torch.arange(p)
    else:
        inside = torch.zeros(p, dtype=torch.bool)
        inside[plan[1]] = True
        cols = (~inside).nonzero().flatten()
        if not st.get("block_done"):
            prob.check_time()
            H[plan[1][:, None], plan[1][None, :]] = op.kron_block(plan)
            st["block_done"] = True
            if saver is not None:
                saver(lambda: st)
    n_cols = int(cols.numel())
    bar = prob.progress(n_cols, f"influence ({desc}): Hessian columns", unit="col", initial=int(st["col"]))
    try:
        while st["col"] < n_cols:
            try:
                prob.check_time()
            except Stopped:
                if saver is not None:
                    saver(lambda: st, force=True)
                raise
            c0 = int(st["col"])
            c1 = min(c0 + _COLUMNS, n_cols)
            which = cols[c0:c1]
            E = torch.zeros(c1 - c0, p, dtype=prob.dtype, device=prob.device)
            E[torch.arange(c1 - c0), which.to(prob.device)] = 1.0
            rows = op.matmat(E).cpu()
            H[which] = rows                        # rows = columns: H is symmetric
            H[:, which] = rows.t()
            st["col"] = c1
            bar.update(c1 - c0)
            if saver is not None:
                saver(lambda: st)
        H.copy_(0.5 * (H + H.t()))                 # exact symmetry (rounding of the two products); idempotent
    finally:
        bar.close()
    if plan is not None:
        op.details = {"hessian_block": f"layer {plan[0]}'s {int(plan[1].numel())} x {int(plan[1].numel())} block "
                                       f"by Kronecker sums, {n_cols} columns by products"}
    return op


class Direct(Solver):
    name = "direct"
    _factor_key = None               # (kind, damping) of the factorisation kept for later query blocks

    def fit(self, prob: Problem, saved: dict | None, saver: Saver) -> None:
        st = dict(saved or {})
        op = hessian_columns(prob, st, saver)
        self.state = st
        self.details["hessian_vector_products"] = op.products
        self.details["hessian_vector_route"] = op.route
        self.details.update(op.details)

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
                          f"{low:.3g}); solved by a symmetric indefinite (LDLᵀ) factorisation -- raise damping "
                          f"above {max(0.0, -low + lam):.3g}")
                self.details["positive_definite"] = False
                # Bunch-Kaufman LDLᵀ: stable for symmetric indefinite matrices, half LU's work
                self._factor = ("ldl", torch.linalg.ldl_factor(A))
            else:
                self.details["positive_definite"] = True
                self._factor = ("chol", L)
            self._factor_key = key
        B = prob.flat(G).t()                           # [p, Q]
        kind, f = self._factor
        X = torch.cholesky_solve(B, f) if kind == "chol" else torch.linalg.ldl_solve(*f, B)
        return prob.unflat(X.t())


__all__ = ["Direct", "EXACT_AUTO_DAMPING", "MAX_DIRECT_PARAMS", "exact_damping"]
