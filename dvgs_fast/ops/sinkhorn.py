"""sinkhorn: entropic optimal transport between two weighted point clouds, without N x M memory.

``sinkhorn(x, y, a, b, blur=0.05, p=2, scaling=0.5, diameter=None, debias=True)`` computes the
same number as geomloss's ``SamplesLoss("sinkhorn", p=p, blur=blur, scaling=scaling,
diameter=diameter, debias=debias)(a, x, b, y)`` (tensorized backend), unnormalised masses
included: log-domain Sinkhorn with epsilon-scaling from diameter^p down to blur^p, symmetric
updates, and a final extrapolation step whose potentials give the cost and its gradients.
The kernels evaluate the costs on the fly inside an online log-sum-exp (CPU: blocked and
vectorised over row chunks in parallel; CUDA: FlashAttention-style tiles), so memory is
O((N + M) d) instead of the O(N M) of a tensorized implementation.

Gradients (envelope theorem, as geomloss: no backprop through the iterations):
d cost / d a = f, d cost / d b = g, and d cost / d x_i = a_i * sum_j P_ij grad_1 C(x_i, y_j)
(minus the same for the x-x problem when debiased), recomputed on the fly from the potentials.
"""
from __future__ import annotations

import math
import numbers

import torch

from ._sinkhorn_reference import SinkhornResult, sinkhorn_reference

__all__ = ["sinkhorn", "SinkhornResult", "sinkhorn_reference"]

_OP = "sinkhorn"


def _is_tracing(*ts: torch.Tensor) -> bool:
    if torch.compiler.is_compiling():
        return True
    from torch._subclasses.fake_tensor import is_fake
    return any(is_fake(t) for t in ts)


def _check_number(value, name: str, *, low: float | None = None, high: float | None = None,
                  open_low: bool = True, open_high: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.Tensor)):
        raise ValueError(f"{_OP}: {name} must be a number, got {value!r}")
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{_OP}: {name} must be a number, got a tensor of shape {list(value.shape)}")
        value = value.item()
    v = float(value)
    bad = not math.isfinite(v)
    if low is not None:
        bad = bad or (v <= low if open_low else v < low)
    if high is not None:
        bad = bad or (v >= high if open_high else v > high)
    if bad:
        lo = "" if low is None else f"{'>' if open_low else '>='} {low}"
        hi = "" if high is None else f"{'<' if open_high else '<='} {high}"
        rng = " and ".join(s for s in (lo, hi) if s)
        raise ValueError(f"{_OP}: {name} must be finite{' and ' + rng if rng else ''}, got {value!r}")
    return v


def check_sinkhorn_args(x, y, a, b, blur, p, scaling, diameter, debias, max_iter, tol, *,
                        check_values: bool = True) -> None:
    """ValueError naming the bad argument; values (NaN, signs) only when check_values."""
    for t, name in ((x, "x"), (y, "y")):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{_OP}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{_OP}: {name} must be a 2-D [n_points, n_features] tensor, got shape {list(t.shape)}")
        if t.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"{_OP}: {name} must be float32 or float64, got {t.dtype}")
        if t.shape[0] == 0:
            raise ValueError(f"{_OP}: {name} is empty (0 points)")
        if t.shape[1] == 0:
            raise ValueError(f"{_OP}: {name} has 0 features")
    if y.shape[1] != x.shape[1]:
        raise ValueError(f"{_OP}: y has {y.shape[1]} features but x has {x.shape[1]} (feature dims must match)")
    if y.dtype != x.dtype:
        raise ValueError(f"{_OP}: y has dtype {y.dtype} but x has {x.dtype}")
    if y.device != x.device:
        raise ValueError(f"{_OP}: y is on {y.device} but x is on {x.device}")
    for w, pts, name, pname in ((a, x, "a", "x"), (b, y, "b", "y")):
        if w is None:
            continue
        if not isinstance(w, torch.Tensor):
            raise ValueError(f"{_OP}: {name} must be a torch.Tensor or None, got {type(w).__name__}")
        if w.dim() != 1 or w.shape[0] != pts.shape[0]:
            raise ValueError(f"{_OP}: {name} must have shape [{pts.shape[0]}] (one weight per point of {pname}), "
                             f"got {list(w.shape)}")
        if w.dtype != pts.dtype:
            raise ValueError(f"{_OP}: {name} has dtype {w.dtype} but {pname} has {pts.dtype}")
        if w.device != pts.device:
            raise ValueError(f"{_OP}: {name} is on {w.device} but {pname} is on {pts.device}")
    _check_number(blur, "blur", low=0.0)
    if isinstance(p, bool) or p not in (1, 2):
        raise ValueError(f"{_OP}: p must be 1 or 2, got {p!r}")
    _check_number(scaling, "scaling", low=0.0, high=1.0)
    if diameter is not None:
        _check_number(diameter, "diameter", low=0.0)
    if not isinstance(debias, bool):
        raise ValueError(f"{_OP}: debias must be True or False, got {debias!r}")
    if max_iter is not None and (isinstance(max_iter, bool) or not isinstance(max_iter, numbers.Integral)
                                 or max_iter < 1):
        raise ValueError(f"{_OP}: max_iter must be an integer >= 1 or None, got {max_iter!r}")
    if tol is not None:
        _check_number(tol, "tol", low=0.0)
    if not check_values or _is_tracing(*(t for t in (x, y, a, b) if t is not None)):
        return
    # One pass per tensor; the .item()s are the only host syncs of a call.
    for t, name in ((x, "x"), (y, "y")):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{_OP}: {name} contains {int((~torch.isfinite(t)).sum())} NaN/Inf value(s)")
    for w, name in ((a, "a"), (b, "b")):
        if w is None:
            continue
        w = w.detach()
        if not bool(torch.isfinite(w).all()):
            raise ValueError(f"{_OP}: {name} contains {int((~torch.isfinite(w)).sum())} NaN/Inf weight(s)")
        if bool((w < 0).any()):
            raise ValueError(f"{_OP}: {name} has {int((w < 0).sum())} negative weight(s) (min {float(w.min()):.4g}); "
                             f"weights are masses and must be >= 0")
        if not bool((w > 0).any()):
            raise ValueError(f"{_OP}: {name} is all zeros: a measure needs some positive mass")


def sinkhorn(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor | None = None, b: torch.Tensor | None = None, *,
             blur: float = 0.05, p: int = 2, scaling: float = 0.5, diameter: float | None = None,
             debias: bool = True, max_iter: int | None = None, tol: float | None = None) -> SinkhornResult:
    """Sinkhorn divergence (debias=True) or entropic OT cost between (a, x) and (b, y).

    x [N, d], y [M, d]: point clouds (float32 or float64, same device); a [N], b [M]: nonnegative
    weights (default uniform 1/N, 1/M; unnormalised masses are used as given, like geomloss).
    blur: final entropic scale (eps = blur^p); p: cost |x-y|^2/2 (2) or |x-y| (1);
    scaling: ratio between successive blur values of the epsilon-scaling schedule;
    diameter: starting scale (default: the diagonal of the joint bounding box).
    The schedule alone gives geomloss's result. Optionally tol adds iterations at the final eps
    until the largest potential update is <= tol, and max_iter caps the total number of
    iterations (the schedule itself is never cut short). With unequal total masses the balanced
    problem has no fixed point, so only max_iter stops those extra iterations.

    Returns SinkhornResult(cost, f, g, n_iter); cost is differentiable with respect to x, y, a
    and b, f and g with respect to x and y respectively.
    """
    check_sinkhorn_args(x, y, a, b, blur, p, scaling, diameter, debias, max_iter, tol)
    if a is None:
        a = torch.full((x.shape[0],), 1.0 / x.shape[0], dtype=x.dtype, device=x.device)
    if b is None:
        b = torch.full((y.shape[0],), 1.0 / y.shape[0], dtype=y.dtype, device=y.device)
    if isinstance(diameter, torch.Tensor):
        diameter = diameter.item()
    dtype = x.dtype
    promote = dtype == torch.float32 and not _is_tracing(x, y) and _float32_unsafe(x, y, blur, p, diameter)
    if promote:   # float32 inputs are exact in float64; autograd carries the casts both ways
        x, y, a, b = x.double(), y.double(), a.double(), b.double()
    cost, f, g, n_iter, _, _ = torch.ops.dvgs_fast.sinkhorn(
        x, y, a, b, float(blur), int(p), float(scaling), None if diameter is None else float(diameter),
        bool(debias), None if max_iter is None else int(max_iter), None if tol is None else float(tol))
    if promote:
        if bool(torch.isfinite(cost.detach())) and not bool(torch.isfinite(cost.detach().to(dtype))):
            raise ValueError(f"{_OP}: the cost ({float(cost):.3g}) exceeds float32's range (3.4e38): the points "
                             f"are that far apart; pass float64 x and y")
        cost, f, g = cost.to(dtype), f.to(dtype), g.to(dtype)
    return SinkhornResult(cost, f, g, int(n_iter))


# Beyond a ratio of 2^100 between the largest cost and eps = blur^p (or squared coordinates of
# 2^100) the float32 kernels lose accuracy and then overflow to NaN, although the cost itself may
# fit in float32 (coordinates of 1e18: float64 gives 2.9e35). Measured: exact to 3e-8 up to a
# ratio of 4e30 (2^101.6), 1-2% off from 4e32 on, NaN from 4e40. Such calls run in float64.
_F32_LOG2_LIMIT = 100.0


def _float32_unsafe(x: torch.Tensor, y: torch.Tensor, blur, p: int, diameter) -> bool:
    top = max(max(-float(lo), float(hi)) for lo, hi in (torch.aminmax(x.detach()), torch.aminmax(y.detach())))
    if top == 0.0:
        return False
    d = x.shape[1]
    reach = float(diameter) if diameter is not None else 2.0 * top * math.sqrt(d)   # >= the bounding-box diagonal
    if 2.0 * math.log2(top) + math.log2(d) > _F32_LOG2_LIMIT:
        return True
    return reach > 0 and int(p) * (math.log2(reach) - math.log2(float(blur))) > _F32_LOG2_LIMIT


# ---- fake kernels (shapes only: torch.compile, FakeTensor, opcheck) ------------------------
@torch.library.register_fake("dvgs_fast::sinkhorn")
def _sinkhorn_fake(x, y, a, b, blur=0.05, p=2, scaling=0.5, diameter=None, debias=True, max_iter=None, tol=None):
    check_sinkhorn_args(x, y, a, b, blur, p, scaling, diameter, debias, max_iter, tol, check_values=False)
    n, m = x.shape[0], y.shape[0]
    return (x.new_empty(()), x.new_empty((n,)), x.new_empty((m,)), x.new_empty((), dtype=torch.int64),
            x.new_empty((2, n)), x.new_empty((2, m)))


@torch.library.register_fake("dvgs_fast::sinkhorn_backward")
def _sinkhorn_backward_fake(wx, wy, x, y, a, b, state_x, state_y, eps, p, debias, need_x, need_y):
    check_sinkhorn_args(x, y, a, b, 1.0, p, 0.5, None, debias, None, None, check_values=False)
    return x.new_empty(x.shape), y.new_empty(y.shape)


# ---- autograd ------------------------------------------------------------------------------
def _setup_context(ctx, inputs, output):
    x, y, a, b, blur, p, _scaling, _diameter, debias, _max_iter, _tol = inputs
    _cost, f, g, n_iter, state_x, state_y = output
    ctx.save_for_backward(x, y, a, b, f, g, state_x, state_y)
    ctx.eps = float(blur) ** int(p)
    ctx.p = int(p)
    ctx.debias = bool(debias)
    ctx.mark_non_differentiable(n_iter, state_x, state_y)


def _backward(ctx, d_cost, d_f, d_g, _d_n, _d_sx, _d_sy):
    x, y, a, b, f, g, state_x, state_y = ctx.saved_tensors
    need_x, need_y, need_a, need_b = ctx.needs_input_grad[:4]
    if d_cost is None:
        d_cost = torch.zeros((), dtype=x.dtype, device=x.device)
    # geomloss's convention: the final potentials are treated as constants of a and b.
    ga = d_cost * f if need_a else None
    gb = d_cost * g if need_b else None
    gx = gy = None
    if need_x or need_y:
        wx = d_cost * a if d_f is None else d_cost * a + d_f
        wy = d_cost * b if d_g is None else d_cost * b + d_g
        gx, gy = torch.ops.dvgs_fast.sinkhorn_backward(wx, wy, x, y, a, b, state_x, state_y, ctx.eps, ctx.p,
                                                       ctx.debias, bool(need_x), bool(need_y))
        gx = gx if need_x else None
        gy = gy if need_y else None
    return gx, gy, ga, gb, None, None, None, None, None, None, None


torch.library.register_autograd("dvgs_fast::sinkhorn", _backward, setup_context=_setup_context)
