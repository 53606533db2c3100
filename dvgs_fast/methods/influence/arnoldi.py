"""solver="arnoldi": a low-rank inverse from the Hessian's leading eigenpairs (Schioppa, Zablotskaia,
Vilar, Sokolov 2022, "Scaling Up Influence Functions"; pyDVL's ArnoldiInfluence, Captum's
ArnoldiInfluenceFunction):

    (H + λI)⁻¹ g ≈ U diag(1 / (e + λ)) Uᵀ g

with (e, U) the ``rank`` eigenpairs of largest magnitude of H + weight_decay·I, found by ARPACK's
implicitly restarted Lanczos (scipy's eigsh: Arnoldi's method for a symmetric operator) on
Hessian-vector products -- the directions outside the subspace are dropped, as in the paper and
pyDVL. Damping "auto": 0.01·e_max (direct.py's rule). A direction with e + λ ≤ 0 would flip its
sign and blow up: it is dropped with a CurvatureWarning.

The eigenpairs are the saved state (p × rank numbers), reused for any damping.
"""
from __future__ import annotations

import numpy as np
import torch

from dvgs_fast.methods.influence.direct import exact_damping
from dvgs_fast.methods.influence.hvp import HessianOperator
from dvgs_fast.methods.influence.problem import Problem, Saver
from dvgs_fast.methods.influence.solver import Solver

ARNOLDI_RANK = 10
ARNOLDI_TOL = 1e-6                   # ARPACK's relative accuracy of the eigenpairs (pyDVL's default)


class Arnoldi(Solver):
    name = "arnoldi"

    def fit(self, prob: Problem, saved: dict | None, saver: Saver) -> None:
        st = dict(saved or {})
        rank = min(self.cfg.rank, prob.p)
        if st.get("evecs") is None:
            op = HessianOperator(prob)
            if rank >= prob.p - 1:                   # ARPACK needs k < p: form the (tiny) matrix instead
                H = op.matmat(torch.eye(prob.p, dtype=prob.dtype, device=prob.device))
                e, U = torch.linalg.eigh(0.5 * (H + H.t()))
                keep = e.abs().argsort(descending=True)[:rank]
                e, U = e[keep], U[:, keep]
            else:
                from scipy.sparse.linalg import eigsh
                bar = prob.progress(None, "influence (arnoldi): Lanczos", unit="hvp")
                try:
                    ev, vecs = eigsh(op.linear_operator(lambda: bar.update(1)), k=rank, which="LM", v0=op.v0(),
                                     tol=ARNOLDI_TOL)
                finally:
                    bar.close()
                e = torch.as_tensor(ev, dtype=prob.dtype)
                U = torch.as_tensor(np.ascontiguousarray(vecs), dtype=prob.dtype)
            st = {"evals": e.cpu(), "evecs": U.cpu()}
            saver(lambda: st, force=True)
            self.details["hessian_vector_products"] = op.products
            self.details["hessian_vector_route"] = op.route
        self.state = st
        self.details.update({"rank": int(st["evals"].numel()), "eigenvalues": st["evals"].tolist()})

    def precondition(self, prob: Problem, G: dict) -> dict:
        e, U = self.state["evals"].to(prob.device), self.state["evecs"].to(prob.device)
        lam = exact_damping(self.cfg, float(e.max()))
        self.details["damping"] = lam
        d = e + lam
        keep = d > 0
        if not bool(keep.all()):
            self.warn(f"{int((~keep).sum())} of the {e.numel()} leading eigenvalues are ≤ -{lam:.3g} (the damped "
                      f"Hessian is not positive definite there); those directions are dropped -- raise damping")
        B = prob.flat(G)                                   # [Q, p]
        C = (B @ U[:, keep]) / d[keep]
        return prob.unflat(C @ U[:, keep].t())


__all__ = ["ARNOLDI_RANK", "Arnoldi"]
