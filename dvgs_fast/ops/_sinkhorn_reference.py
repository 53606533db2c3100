"""Pure-PyTorch, tensorized log-domain Sinkhorn: the reference the fast op is tested against.

It builds the four dense cost matrices (N x M, M x N, N x N, M x M) once and runs the same
algorithm as :func:`dvgs_fast.ops.sinkhorn` (and geomloss's tensorized backend): epsilon-scaling
from diameter^p down to blur^p, symmetric (averaged) updates of the four dual potentials, and a
final un-averaged update whose potentials carry the gradient. Memory is O(N M): it is the
baseline the benchmarks compare with, and the Sinkhorn of ``LossVal(backend="reference")``.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

LOG_ZERO = -100000.0  # log of a zero weight, as in geomloss (finite: no inf - inf later)


class SinkhornResult(NamedTuple):
    """cost: 0-d tensor (debiased Sinkhorn divergence, or raw entropic OT with debias=False);
    f [N], g [M]: the dual potentials on x and y (debiased: f_xy - f_xx, g_xy - g_yy), so that
    cost = <a, f> + <b, g> and d cost / d a = f; n_iter: symmetric iterations run."""

    cost: torch.Tensor
    f: torch.Tensor
    g: torch.Tensor
    n_iter: int


def epsilon_schedule(p: int, diameter: float, blur: float, scaling: float) -> list[float]:
    """diameter^p, exp(p log diameter + k p log scaling) while above blur^p, then blur^p.

    The middle part has numpy.arange's length, ceil((stop - start) / step), so the number of
    iterations equals geomloss's for the same arguments."""
    start, stop, step = p * math.log(diameter), p * math.log(blur), p * math.log(scaling)
    count = max(0, math.ceil((stop - start) / step))
    return [diameter ** p] + [math.exp(start + k * step) for k in range(count)] + [blur ** p]


def bounding_box_diameter(x: torch.Tensor, y: torch.Tensor) -> float:
    """Diagonal of the joint bounding box (an upper bound on every |x_i - y_j|)."""
    lo = torch.minimum(x.detach().amin(0), y.detach().amin(0))
    hi = torch.maximum(x.detach().amax(0), y.detach().amax(0))
    return float((hi - lo).double().norm())


def log_weights(w: torch.Tensor) -> torch.Tensor:
    w = w.detach()
    return torch.where(w > 0, w.clamp_min(torch.finfo(w.dtype).tiny).log(), torch.full_like(w, LOG_ZERO))


def cost_matrix(u: torch.Tensor, v: torch.Tensor, p: int) -> torch.Tensor:
    """C(u_i, v_j) = |u_i - v_j|^2 / 2 (p = 2) or |u_i - v_j| (p = 1), dense [len(u), len(v)]."""
    sq = (u * u).sum(1, keepdim=True) - 2 * (u @ v.t()) + (v * v).sum(1)[None, :]
    if p == 2:
        return sq / 2
    return sq.clamp_min(1e-8).sqrt()


def _softmin(eps: float, C: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    # f_i = -eps log sum_j exp(h_j - C_ij / eps)
    return -eps * torch.logsumexp(h[None, :] - C / eps, dim=1)


def sinkhorn_reference(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor | None = None,
                       b: torch.Tensor | None = None, *, blur: float = 0.05, p: int = 2,
                       scaling: float = 0.5, diameter: float | None = None, debias: bool = True,
                       max_iter: int | None = None, tol: float | None = None) -> SinkhornResult:
    """Same arguments and result as :func:`dvgs_fast.ops.sinkhorn`, with dense matrices."""
    n, m = x.shape[0], y.shape[0]
    if a is None:
        a = torch.full((n,), 1.0 / n, dtype=x.dtype, device=x.device)
    if b is None:
        b = torch.full((m,), 1.0 / m, dtype=y.dtype, device=y.device)
    if diameter is None:
        diameter = bounding_box_diameter(x, y)
        if not diameter > 0:
            diameter = blur
    eps_list = epsilon_schedule(p, float(diameter), blur, scaling)

    # The right-hand clouds are detached: a potential on x_i only depends on x_i through the
    # first argument of the cost, which is exactly the envelope-theorem gradient.
    C_xy, C_yx = cost_matrix(x, y.detach(), p), cost_matrix(y, x.detach(), p)
    if debias:
        C_xx, C_yy = cost_matrix(x, x.detach(), p), cost_matrix(y, y.detach(), p)
    la, lb = log_weights(a), log_weights(b)

    with torch.no_grad():
        e = eps_list[0]
        f_ba, g_ab = _softmin(e, C_xy, lb), _softmin(e, C_yx, la)
        if debias:
            f_aa, g_bb = _softmin(e, C_xx, la), _softmin(e, C_yy, lb)

        def step(e):
            nonlocal f_ba, g_ab, f_aa, g_bb
            ft, gt = _softmin(e, C_xy, lb + g_ab / e), _softmin(e, C_yx, la + f_ba / e)
            res = max(float((ft - f_ba).abs().max()), float((gt - g_ab).abs().max()))
            f_ba, g_ab = 0.5 * (f_ba + ft), 0.5 * (g_ab + gt)
            if debias:
                ft, gt = _softmin(e, C_xx, la + f_aa / e), _softmin(e, C_yy, lb + g_bb / e)
                res = max(res, float((ft - f_aa).abs().max()), float((gt - g_bb).abs().max()))
                f_aa, g_bb = 0.5 * (f_aa + ft), 0.5 * (g_bb + gt)
            return res

        if not debias:
            f_aa = g_bb = None
        n_iter = 0
        for e in eps_list:
            step(e)
            n_iter += 1
        cap = max(max_iter, len(eps_list)) if max_iter is not None else (
            len(eps_list) + 1000 if tol is not None else len(eps_list))
        e = eps_list[-1]
        while n_iter < cap:
            res = step(e)
            n_iter += 1
            if tol is not None and res <= tol:
                break

    # Final extrapolation, with gradients (through the costs' first arguments only).
    f_fin = _softmin(e, C_xy, (lb + g_ab / e).detach())
    g_fin = _softmin(e, C_yx, (la + f_ba / e).detach())
    if debias:
        f_fin = f_fin - _softmin(e, C_xx, (la + f_aa / e).detach())
        g_fin = g_fin - _softmin(e, C_yy, (lb + g_bb / e).detach())
    cost = torch.dot(a, f_fin) + torch.dot(b, g_fin)
    return SinkhornResult(cost, f_fin, g_fin, n_iter)
