"""solver="cg" and solver="lissa": (H + λI)⁻¹ g from Hessian-vector products only (hvp.py),
for all the queries of a block at once (one HVP pass over the data per iteration serves every
query still running). Neither keeps any curvature beyond λ_max(H), which sets the default
damping (0.01·λ_max, see direct.py) and LiSSA's default scale.

CG: block conjugate gradients over the queries of a block (``block_cg``: one Krylov space for
all of them, as pyDVL's solve_simultaneously), stopping when every query has ‖r‖ ≤ rtol·‖g‖
(default 1e-6); with one query (fit()) it is plain CG. A non-positive Rayleigh quotient in the
search block is negative curvature -- the damped Hessian is not positive definite -- and stops
with a CurvatureWarning (the iterate so far is kept); max_iterations (default p) without
convergence warns too. On a small model (p ≤ 8,000), once the next iteration would bring the
HVPs taken above p, the explicit Hessian is built (direct.py: p HVPs, or on a Sequential MLP the
columns outside its largest layer) and applied by matrix products from then on: the same
iterates, at most about twice the work of the better way in hindsight (info["hessian"] says
which). Not earlier, though building it got cheaper: one product with the explicit H (2p²
per vector) costs about what an R-operator HVP does on 1,000 rows of the digits MLP -- switching
after 2 of its 13 block iterations took 8.1 CPU s against 5.9 s without.

LiSSA (Agarwal et al. 2017, as pyDVL and Koh & Liang): h ← g + h − (H_B + λI)h / s over random
mini-batches B of ``hessian_batch_size`` rows, result h / s; stops when every column's update is
below rtol (default 1e-4) relative to h, or after max_iterations (default 1000). It converges
when s exceeds the batch Hessians' eigenvalues: scale "auto" is 2·(λ_max + λ); a non-finite or
exploding iterate is a ValueError naming scale.
"""
from __future__ import annotations

import math

import torch

from dvgs_fast.methods.base import derive_seed
from dvgs_fast.methods.influence.direct import exact_damping, hessian_columns
from dvgs_fast.methods.influence.hvp import HessianOperator
from dvgs_fast.methods.influence.problem import Problem, Saver
from dvgs_fast.methods.influence.solver import Solver, fixed_damping

CG_RTOL = 1e-6
EXPLICIT_MAX_PARAMS = 8000           # p x p float64: 0.5 GB
EXPLICIT_SWITCH = 1.0                # ... once the HVPs taken would exceed this × p
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

    def _explicit(self, prob: Problem):
        """V -> V (H + weight_decay·I) by the explicit Hessian (built once, direct.hessian_columns)."""
        if "H" not in self.state:
            st: dict = {}
            built = hessian_columns(prob, st, desc="cg")
            self.state["H"] = st["H"]
            self.state["explicit_products"] = built.products
            self.op.products += built.products
        H = self.state["H"].to(prob.device)
        self.details["hessian"] = (f"explicit ({self.state.get('explicit_products', prob.p)} Hessian-vector "
                                   f"products, then matrix products)")
        return lambda V: V @ H

    def precondition(self, prob: Problem, G: dict) -> dict:
        lam = self.damping()
        rtol = self.cfg.rtol if self.cfg.rtol is not None else CG_RTOL
        maxiter = self.cfg.max_iterations or prob.p
        B = prob.flat(G).t()                               # [p, Q]: one right-hand side per column
        self.details.setdefault("hessian", "Hessian-vector products")
        products = [self._explicit(prob) if "H" in self.state else self.op.matmat, 0]

        def apply(P):                                      # (H + λI) P, P [p, r]
            if "H" not in self.state and prob.p <= EXPLICIT_MAX_PARAMS and \
                    products[1] + P.shape[1] > EXPLICIT_SWITCH * prob.p:
                products[0] = self._explicit(prob)         # the products so far would have built it: switch
            products[1] += P.shape[1]
            return products[0](P.t()).t() + lam * P

        bar = prob.progress(maxiter, "influence (cg): block iterations")
        try:
            X, it, rel, negative = block_cg(apply, B, rtol, maxiter, prob.check_time, bar.update)
        finally:
            bar.close()
        d = self.details
        d["iterations"] = max(d.get("iterations", 0), it)
        d["relative_residual"] = max(d.get("relative_residual", 0.0), rel)
        d["rtol"] = rtol
        d["hessian_vector_products"] = self.op.products
        d["hessian_vector_route"] = self.op.route
        if negative:
            d["negative_curvature"] = True
            self.warn(f"negative curvature: a direction with pᵀ(H + {lam:.3g}·I)p ≤ 0 -- the damped Hessian is "
                      f"not positive definite; raise damping (the iterate so far is kept)")
        elif rel > rtol:
            self.warn(f"did not converge in {maxiter} iterations (relative residual {rel:.2g} > rtol {rtol:g}); "
                      f"raise max_iterations or damping")
        return prob.unflat(X.t())


def block_cg(apply, B: torch.Tensor, rtol: float, maxiter: int, check=lambda: None, tick=lambda n: None):
    """Breakdown-free block conjugate gradients (Ji & Li 2017; O'Leary 1980) for A X = B, A
    symmetric positive definite given by apply(P) = A P, B [p, Q].

    One search block for all right-hand sides: each iteration applies A to an orthonormal block of
    at most Q directions and minimises the A-norm error of every column over the whole block
    Krylov space -- far fewer iterations than Q separate CG runs (exact after ⌈p / Q⌉ in exact
    arithmetic), the same solution. Directions that became linearly dependent are dropped (the
    orthonormalisation's small singular values), so the block never breaks down. Stops when
    every column has ‖r‖ ≤ rtol·‖b‖; a non-positive Rayleigh quotient in the block is negative
    curvature (A not positive definite): it stops with the iterate so far. (An EK-FAC Gauss-Newton
    preconditioner was tried on the digits MLP at the default damping: 23 iterations instead of 13.)

    Returns (X, iterations, max relative residual, negative curvature seen)."""
    eps = torch.finfo(B.dtype).eps ** 0.5
    X = torch.zeros_like(B)
    R = B.clone()
    bnorm = B.norm(dim=0).clamp_min(torch.finfo(B.dtype).tiny)
    nonzero = B.norm(dim=0) > 0

    def orth(Z):
        """An orthonormal basis of Z's columns without its near-dependent directions: from the
        eigenpairs of the small Gram matrix ZᵀZ (2·p·Q² operations, a quarter of an SVD's), done
        twice so that rounding leaves the basis orthonormal to working precision."""
        for _ in range(2):
            if Z.shape[1] == 0:
                return Z
            e, V = torch.linalg.eigh(Z.t() @ Z)
            keep = e > (eps * eps) * e.max().clamp_min(torch.finfo(Z.dtype).tiny)
            if not bool(keep.any()):
                return Z[:, :0]
            Z = Z @ (V[:, keep] / e[keep].sqrt())
        return Z

    def worst():
        return float((R.norm(dim=0) / bnorm)[nonzero].max()) if bool(nonzero.any()) else 0.0

    P = orth(R)
    it, negative = 0, False
    while it < maxiter and worst() > rtol and P.shape[1]:
        check()
        AP = apply(P)
        PAP = P.t() @ AP
        PAP = 0.5 * (PAP + PAP.t())
        if float(torch.linalg.eigvalsh(PAP)[0]) <= 0:
            negative = True
            break
        alpha = torch.linalg.solve(PAP, P.t() @ R)
        X += P @ alpha
        R -= AP @ alpha
        beta = -torch.linalg.solve(PAP, AP.t() @ R)
        P = orth(R + P @ beta)
        it += 1
        tick(1)
    return X, it, worst(), negative


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
                # new h − h = B − (Hh + λh) / s, in two passes over [Q, p] (not four)
                step = torch.add(B, Hh, alpha=-1.0 / scale).add_(h, alpha=-lam / scale)
                h += step
                it += 1
                bar.update(1)
                rows = h.norm(dim=1)
                hn = float(rows.norm())                            # inf / NaN if any element is
                if not math.isfinite(hn) or hn > 1e12 * start * scale:
                    raise ValueError(f"lissa_scale: LiSSA diverged after {it} iterations with scale {scale:.3g}; "
                                     f"raise lissa_scale (or damping)")
                if bool((step.norm(dim=1) <= rtol * rows).all()):
                    converged = True
                    break
        finally:
            bar.close()
        self.details["iterations"] = max(self.details.get("iterations", 0), it)
        self.details["hessian_vector_products"] = self.op.products
        self.details["hessian_vector_route"] = self.op.route
        if not converged:
            self.details["converged"] = False
        return prob.unflat(h / scale)


__all__ = ["CG", "LiSSA"]
