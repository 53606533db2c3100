"""solver="cg" and solver="lissa": (H + λI)⁻¹ g from Hessian-vector products only (hvp.py),
for all the queries of a block at once (one HVP pass over the data per iteration serves every
query still running). Neither keeps any curvature beyond λ_max(H), which sets the default
damping (0.01·λ_max, see direct.py) and LiSSA's default scale.

CG: conjugate gradients per query column (each column its own step sizes), stopping a column at
‖r‖ ≤ rtol·‖g‖ (default 1e-6). Many queries on a small model: (H + λI) is applied to the
iterates by matrix products once the explicit Hessian (p HVPs) is cheaper than the HVPs the
iterations would take (p < 10·queries, p ≤ 8,000) -- the same iterates, fewer backward passes;
info["hessian"] says which; a non-positive pᵀ(H + λI)p is negative curvature -- the damped
Hessian is not positive definite -- and stops that column with a CurvatureWarning (the iterate
so far is kept). max_iterations (default p) without convergence warns too.

LiSSA (Agarwal et al. 2017, as pyDVL and Koh & Liang): h ← g + h − (H_B + λI)h / s over random
mini-batches B of ``hessian_batch_size`` rows, result h / s; stops when every column's update is
below rtol (default 1e-4) relative to h, or after max_iterations (default 1000). It converges
when s exceeds the batch Hessians' eigenvalues: scale "auto" is 2·(λ_max + λ); a non-finite or
exploding iterate is a ValueError naming scale.
"""
from __future__ import annotations

import torch

from dvgs_fast.methods.base import derive_seed
from dvgs_fast.methods.influence.direct import exact_damping, hessian_columns
from dvgs_fast.methods.influence.hvp import HessianOperator
from dvgs_fast.methods.influence.problem import Problem, Saver
from dvgs_fast.methods.influence.solver import Solver, fixed_damping

CG_RTOL = 1e-6
EXPLICIT_AFTER = 10                  # CG's iterations assumed when choosing explicit products (at least)
EXPLICIT_MAX_PARAMS = 8000           # p x p float64: 0.5 GB
LISSA_RTOL = 1e-4
LISSA_ITERATIONS = 1000
LISSA_AUTO_SCALE = 2.0


class _HvpSolver(Solver):
    """What CG and LiSSA share: λ_max for the default damping (and scale), kept in the state."""

    def needs_lambda_max(self) -> bool:
        return fixed_damping(self.cfg) is None

    def fit(self, prob: Problem, saved: dict | None, saver: Saver) -> None:
        st = dict(saved or {})
        self.op = HessianOperator(prob)
        if "lam_max" not in st and self.needs_lambda_max():
            st["lam_max"] = self.op.top_eigenvalue()
        self.state = st
        if "lam_max" in st:
            self.details["lambda_max"] = st["lam_max"]

    def damping(self) -> float:
        lam = exact_damping(self.cfg, self.state.get("lam_max", 0.0))
        self.details["damping"] = lam
        return lam


class CG(_HvpSolver):
    name = "cg"

    def _products(self, prob: Problem, q: int):
        """V -> (H + weight_decay·I) V: Hessian-vector products, or -- when p is small next to the
        products the solve will take (p < q·EXPLICIT_AFTER, p ≤ EXPLICIT_MAX_PARAMS) -- the explicit
        Hessian from p of them, then matrix products. The CG iterates are the same either way."""
        if "H" not in self.state and prob.p <= EXPLICIT_MAX_PARAMS and prob.p < q * EXPLICIT_AFTER:
            st: dict = {}
            hessian_columns(prob, st, desc="cg")
            self.state["H"] = st["H"]
        if "H" in self.state:
            H = self.state["H"].to(prob.device)
            self.details["hessian"] = f"explicit ({prob.p} Hessian-vector products, then matrix products)"
            return lambda V: V @ H
        self.details["hessian"] = "Hessian-vector products"
        return self.op.matmat

    def precondition(self, prob: Problem, G: dict) -> dict:
        lam = self.damping()
        rtol = self.cfg.rtol if self.cfg.rtol is not None else CG_RTOL
        maxiter = self.cfg.max_iterations or prob.p
        B = prob.flat(G)                                   # [Q, p]
        apply = self._products(prob, B.shape[0])
        X = torch.zeros_like(B)
        R = B.clone()
        P = R.clone()
        rr = (R * R).sum(1)
        bnorm = rr.sqrt()
        active = bnorm > 0
        negative = torch.zeros_like(active)
        it = 0
        bar = prob.progress(maxiter, "influence (cg): iterations")
        try:
            while bool(active.any()) and it < maxiter:
                prob.check_time()
                idx = active.nonzero().reshape(-1)
                Pa = P[idx]
                AP = apply(Pa) + lam * Pa
                pap = (Pa * AP).sum(1)
                bad = pap <= 0
                if bool(bad.any()):
                    negative[idx[bad]] = True
                    active[idx[bad]] = False
                ok = ~bad
                idx, Pa, AP, pap = idx[ok], Pa[ok], AP[ok], pap[ok]
                alpha = rr[idx] / pap
                X[idx] += alpha.unsqueeze(1) * Pa
                R[idx] -= alpha.unsqueeze(1) * AP
                new = (R[idx] * R[idx]).sum(1)
                P[idx] = R[idx] + (new / rr[idx]).unsqueeze(1) * Pa
                rr[idx] = new
                done = new.sqrt() <= rtol * bnorm[idx]
                active[idx[done]] = False
                it += 1
                bar.update(1)
        finally:
            bar.close()
        rel = (rr.sqrt() / bnorm.clamp_min(1e-300)).max().item() if B.shape[0] else 0.0
        d = self.details
        d["iterations"] = max(d.get("iterations", 0), it)
        d["relative_residual"] = max(d.get("relative_residual", 0.0), rel)
        d["rtol"] = rtol
        d["hessian_vector_products"] = self.op.products
        if bool(negative.any()):
            d["negative_curvature_queries"] = d.get("negative_curvature_queries", 0) + int(negative.sum())
            self.warn(f"negative curvature: pᵀ(H + {lam:.3g}·I)p ≤ 0 for {int(negative.sum())} of {B.shape[0]} "
                      f"queries -- the damped Hessian is not positive definite; raise damping")
        elif bool(active.any()):
            self.warn(f"did not converge in {maxiter} iterations (relative residual {rel:.2g} > rtol {rtol:g}); "
                      f"raise max_iterations or damping")
        return prob.unflat(X)


class LiSSA(_HvpSolver):
    name = "lissa"

    def needs_lambda_max(self) -> bool:
        return fixed_damping(self.cfg) is None or self.cfg.lissa_scale is None

    def precondition(self, prob: Problem, G: dict) -> dict:
        lam = self.damping()
        scale = self.cfg.lissa_scale or LISSA_AUTO_SCALE * (self.state["lam_max"] + lam)
        rtol = self.cfg.rtol if self.cfg.rtol is not None else LISSA_RTOL
        maxiter = self.cfg.max_iterations or LISSA_ITERATIONS
        self.details.update({"scale": scale, "rtol": rtol})
        B = prob.flat(G)
        h = B.clone()
        n, b = prob.n_hessian, min(prob.block, prob.n_hessian)
        start = float(B.norm()) or 1.0
        it, converged = 0, False
        bar = prob.progress(maxiter, "influence (lissa): iterations")
        try:
            while it < maxiter:
                prob.check_time()
                # The same rows on every rank (seeded by the iteration), each rank taking its slice.
                g = torch.Generator().manual_seed(derive_seed(prob.run.seed, 29, it))
                rows = torch.randperm(n, generator=g)[:b].to(prob.device)
                lo, hi = prob.ctx.shard(b)
                mine = rows[lo:hi]
                Hh = self.op.matmat_rows(prob.xh[mine], prob.yh[mine], h, b)
                step = B - (Hh + lam * h) / scale                   # new h − h
                h = h + step
                it += 1
                bar.update(1)
                if not bool(torch.isfinite(h).all()) or float(h.norm()) > 1e12 * start * scale:
                    raise ValueError(f"lissa_scale: LiSSA diverged after {it} iterations with scale {scale:.3g}; "
                                     f"raise lissa_scale (or damping)")
                if bool((step.norm(dim=1) <= rtol * h.norm(dim=1)).all()):
                    converged = True
                    break
        finally:
            bar.close()
        self.details["iterations"] = max(self.details.get("iterations", 0), it)
        self.details["hessian_vector_products"] = self.op.products
        if not converged:
            self.details["converged"] = False
        return prob.unflat(h / scale)


__all__ = ["CG", "LiSSA"]
