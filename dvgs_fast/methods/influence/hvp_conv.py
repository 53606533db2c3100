"""The R-operator's rules for convolution, pooling and eval-mode batch-norm layers (hvp_sequential.py
does the rest of a Sequential model: Linear layers, elementwise activations, Flatten).

Why: a small CNN's Hessian-vector product by double backward runs through autograd's convolution
double-backward, which on this project's CPU (1 thread; digits CNN, 1,000 rows, conv 1->8->16 with
max-pools) spent ~0.42 s a product, most of it in oneDNN convolutions on layouts they reorder and
in the zero fills and masks of the saved graph. Written out, the same product took ~0.13 s (CNN
Arnoldi against pyDVL's: 4.3 vs 24 CPU s, bench/results/influence.md). The rules, for K directions
(dW, db) at once, g the loss's gradient at the layer's output from the block's own backward:

    forward   Rz = conv(a, dW) + db + conv(Ra, W)
    backward  R∇W = wgrad(a, Rg) + wgrad(Ra, g)          (wgrad: the weight-gradient of a conv)
              R∇b = Σ_rows,positions Rg
              Rg_a = igrad(Rg, W) + igrad(g, dW)          (igrad: the input-gradient)

An R-quantity is [n, K, c, *spatial]: "n rows of K·c channels" for the K stacked weights dW_k
(conv(a, dW) as one convolution with K·o outputs; wgrad(Ra, g) and igrad(g, dW) grouped by k) and
"n·K rows of c channels" for the layer's own weight. Max-pooling is piecewise linear: its R-forward
gathers at the window maxima's indices, its R-backward scatter-adds there. Average pools are
linear: the layer itself forward, its aten backward as the adjoint. BatchNorm1d / 2d in eval mode is
a per-channel affine map y = γ·x̂ + β of its running statistics (x̂ = (x − μ)/√(σ² + ε)):
Rz = s·Rx + dγ·x̂ + dβ with s = γ/√(σ² + ε), R∇γ = Σ (Rg·x̂ + g·Rx/√(σ² + ε)), R∇β = Σ Rg,
Rg_x = s·Rg + dγ·g/√(σ² + ε) (in training mode it couples the rows: refused). Only Conv1d / Conv2d with zero
padding given as numbers and one group take this route (stacked K·o output channels would mix
groups); anything else falls back to double backward (hvp.py).

What makes it fast on a CPU (each measured on the CNN above, 1 thread):
- Conv2d's inputs and gradients are kept channels-last (layout()): oneDNN then runs without
  reordering them (8->16 layer: forward 9-12 ms, weight-gradient 10, input-gradient 13, against
  16-44, 15-19 and 21-47 ms from the default layout).
- A first scored layer with fewer than 8 input channels (oneDNN's blocked kernels: forward 63-86
  ms, weight-gradient 59-78 ms on 1x32x32 inputs) takes its products as GEMMs on its input's patches
  (9-14 and 12-15 ms), cut once per block: that input is the same for every direction and pass.
- A piecewise-linear activation just below a max-pool is applied at the maxima only (fold_slope).
- The stem -- that first layer, such an activation, a max-pool -- is taken at the pooled positions
  alone (stem_patches): no full-size R-quantity at the largest maps.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dvgs_fast import grads

CONVS = (nn.Conv1d, nn.Conv2d)
MAX_POOLS = (nn.MaxPool1d, nn.MaxPool2d)
AVG_POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
POOLS = MAX_POOLS + AVG_POOLS

_FORWARD = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d}
_MAX_POOL = {nn.MaxPool1d: F.max_pool1d, nn.MaxPool2d: F.max_pool2d}


def takes(m: nn.Module) -> bool:
    """Whether this layer (exactly one of these classes) has a rule here."""
    t = type(m)
    if t in CONVS:
        return m.groups == 1 and m.padding_mode == "zeros" and not isinstance(m.padding, str)
    if t in MAX_POOLS:
        return not m.return_indices
    if t in NORMS:                                  # running statistics, not the batch's
        return not m.training and m.running_mean is not None and m.running_var is not None
    return t in AVG_POOLS


# A constant input with fewer channels than this is cut into patches (see the module doc).
PATCH_CHANNELS = 8


def patches(m: nn.Module, a: torch.Tensor) -> torch.Tensor | None:
    """[n, c·kernel, positions]: the patches of a convolution's input (grads.conv_patches), when it
    has fewer than PATCH_CHANNELS channels; else None."""
    if type(m) not in CONVS or m.in_channels >= PATCH_CHANNELS:
        return None
    return grads.conv_patches(m, a)


# ------------------------------------------------------- the stem: patches -> activation -> max-pool
# Pooled patches at most this many times the patches (o·positions' ≤ STEM_GROWTH·positions).
STEM_GROWTH = 2


def stem_patches(P: torch.Tensor, idx: torch.Tensor) -> torch.Tensor | None:
    """[o, c·kernel, n·positions']: the patches under each output channel's window maxima, for a
    first layer (patches P [n, c·kernel, positions]) followed by a piecewise-linear activation
    and a max-pool (indices idx [n, o, *spatial']); None when they would hold more than
    STEM_GROWTH times the patches.

    Why: the first layer's R-output is read only at the maxima (fold_slope), and its R-gradient is
    zero elsewhere, so its two products can be taken at the pooled positions alone -- no
    full-size R-quantity, zero fill or scatter (digits CNN, 1,000 rows, 1x32x32 -> 8 x 16x16: ~75
    of ~185 ms a product were these passes over the 8 x 32x32 maps)."""
    n, ckk, L = P.shape
    o, Lp = idx.shape[1], idx[0, 0].numel()
    if o * Lp > STEM_GROWTH * L:
        return None
    i = idx.reshape(n, o, 1, Lp).expand(n, o, ckk, Lp)
    return P.unsqueeze(1).expand(n, o, ckk, L).gather(3, i).permute(1, 2, 0, 3).reshape(o, ckk, n * Lp)


def stem_forward(Pg: torch.Tensor, dW: torch.Tensor | None, db: torch.Tensor | None, slope: torch.Tensor,
                 pooled_shape, K: int) -> torch.Tensor:
    """R at the max-pool's output [n, K, o, *spatial'] (pooled_shape [n, o, *spatial'])."""
    o, _, nL = Pg.shape
    n = pooled_shape[0]
    if dW is not None:                              # per channel: [K, c·kernel] @ [c·kernel, n·positions']
        Rz = torch.bmm(dW.reshape(K, o, -1).transpose(0, 1), Pg)
        if db is not None:
            Rz += db.t().unsqueeze(2)
    else:
        Rz = db.t().unsqueeze(2).expand(o, K, nL)
    out = _empty((n * K, *pooled_shape[1:]), Pg).view(n, K, o, -1)
    torch.mul(Rz.view(o, K, n, -1).permute(2, 1, 0, 3), slope, out=out)
    return out.view(n, K, *pooled_shape[1:])


def stem_backward(m: nn.Module, Pg: torch.Tensor, Rg: torch.Tensor, slope: torch.Tensor,
                  scored: tuple[bool, bool]) -> tuple:
    """(R∇W, R∇b) of the first layer from Rg [n, K, o, *spatial'] at the max-pool's output."""
    n, K, o = Rg.shape[:3]
    Rgs = Rg.reshape(n, K, o, -1) * slope
    RW = Rb = None
    if scored[0]:
        RW = torch.bmm(Rgs.permute(2, 1, 0, 3).reshape(o, K, -1), Pg.transpose(1, 2))
        RW = RW.transpose(0, 1).reshape(K, *m.weight.shape)
    if scored[1]:
        Rb = Rgs.sum((0, 3))
    return RW, Rb


# ---------------------------------------------------------------------------------- convolutions
def layout(m: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """t channels-last when it is a Conv2d's 4-D input or output gradient (see the module doc)."""
    return t.contiguous(memory_format=torch.channels_last) if type(m) is nn.Conv2d and t.dim() == 4 else t


def _conv_args(m: nn.Module) -> dict:
    return {"stride": m.stride, "padding": m.padding, "dilation": m.dilation}


def _wgrad(m: nn.Module, a: torch.Tensor, go: torch.Tensor, weight_shape) -> torch.Tensor:
    return torch.ops.aten.convolution_backward(
        layout(m, go), layout(m, a), go.new_empty(1).expand(weight_shape), None, m.stride, m.padding, m.dilation, False,
        [0] * len(m.stride), 1, (False, True, False))[1]


def _igrad(m: nn.Module, input_shape, go: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    # (the input only gives its shape; a channels-last weight makes oneDNN keep that layout: with
    # the default one it copies the gradient into it and returns its result in it)
    return torch.ops.aten.convolution_backward(
        layout(m, go), go.new_empty(1).expand(input_shape), layout(m, w), None, m.stride, m.padding, m.dilation, False,
        [0] * len(m.stride), 1, (True, False, False))[0]


def conv_input_grad(m: nn.Module, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The loss's gradient at the layer's input from the one at its output (the block's backward)."""
    return _igrad(m, a.shape, g, m.weight)


def conv_r_forward(m: nn.Module, a: torch.Tensor, Ra: torch.Tensor | None, dW: torch.Tensor | None,
                   db: torch.Tensor | None, out_shape, K: int, P: torch.Tensor | None = None) -> torch.Tensor | None:
    """Rz [n, K, o, *spatial'] for directions dW [K, o, c, *kernel], db [K, o] (None: not scored);
    P: the input's patches (patches()) when it has no R-input."""
    n, o = a.shape[0], m.out_channels
    conv = _FORWARD[type(m)]
    Rz = None
    if dW is not None and P is not None:            # [K·o, c·kernel] @ [n, c·kernel, positions]
        Rz = torch.matmul(dW.reshape(K * o, -1), P)
        if db is not None:
            Rz += db.reshape(1, K * o, 1)
        Rz = Rz.view(n, K, o, *out_shape[2:])
    elif dW is not None:                            # all K directions as K·o stacked output channels
        Rz = conv(layout(m, a), dW.reshape(K * o, *dW.shape[2:]), None if db is None else db.reshape(-1),
                  **_conv_args(m)).view(n, K, o, *out_shape[2:])
    elif db is not None:
        Rz = db.view(1, K, o, *([1] * (len(out_shape) - 2))).expand(n, K, o, *out_shape[2:])
    if Ra is not None:                              # the layer's own weight on n·K rows
        t = conv(layout(m, Ra.reshape(n * K, *Ra.shape[2:])), m.weight, None,
                 **_conv_args(m)).view(n, K, o, *out_shape[2:])
        Rz = t if Rz is None else (Rz.add_(t) if dW is not None else Rz + t)   # (in place: a fresh 16 MB
    return Rz                                       # sum cost ~10 ms on the digits CNN, most of it page faults)


def conv_r_backward(m: nn.Module, a: torch.Tensor, Ra: torch.Tensor | None, g: torch.Tensor, Rg: torch.Tensor,
                    dW: torch.Tensor | None, scored: tuple[bool, bool], below: bool,
                    P: torch.Tensor | None = None) -> tuple:
    """(R∇W [K, o, c, *kernel] or None, R∇b [K, o] or None, Rg at the input [n, K, c, *spatial] or
    None when nothing below is scored) from Rg [n, K, o, *spatial'] at the output; P as in
    conv_r_forward (then Ra is None)."""
    n, K, o = Rg.shape[:3]
    c, kernel = m.in_channels, m.kernel_size
    RW = Rb = Rg_a = None
    if scored[0] and P is not None:                 # Σ_i P_i @ Rg_iᵀ [positions, K·o] (a view if channels-last)
        RW = torch.bmm(P, Rg.reshape(n, K * o, -1).transpose(1, 2)).sum(0).t().reshape(K, o, c, *kernel)
    elif scored[0]:
        RW = _wgrad(m, a, Rg.reshape(n, K * o, *Rg.shape[3:]), (K * o, c, *kernel)).view(K, o, c, *kernel)
        if Ra is not None:                          # Σ_i wgrad(Ra_ik, g_i): the K directions' inputs
            # as K·c input channels of one convolution; a grouped one on g repeated K times took 2-2.5x
            # as long (the digits CNN's 8->16 layer, 100 rows x 10 directions: 64 vs 32 ms)
            RW += _wgrad(m, Ra.reshape(n, K * c, *Ra.shape[3:]), g, (o, K * c, *kernel)).reshape(
                o, K, c, *kernel).transpose(0, 1)
    if scored[1]:
        Rb = Rg.sum(dim=(0, *range(3, Rg.dim())))
    if below:
        Rg_a = _igrad(m, (n * K, *a.shape[1:]), Rg.reshape(n * K, *Rg.shape[2:]), m.weight).view(n, K, *a.shape[1:])
        if dW is not None:                          # igrad(g_i, dW_k): the K directions' weights as
            # K·c input channels of one convolution's weight (grouped on g repeated K times: 61 vs 15 ms)
            Rg_a += _igrad(m, (n, K * c, *a.shape[2:]), g, dW.transpose(0, 1).reshape(o, K * c, *kernel)
                           ).view(n, K, *a.shape[1:])
    return RW, Rb, Rg_a


# ------------------------------------------------------------------------------ eval batch-norm
def _channel(v: torch.Tensor, ndim: int, at: int = 1) -> torch.Tensor:
    """A per-channel vector [.., C] shaped to broadcast over a tensor of ndim dims whose channel
    axis is `at` (leading axes of v kept: [K, C] -> [1, K, C, 1, ...] for at = 2)."""
    lead = v.shape[:-1]
    return v.reshape(*([1] * (at - len(lead))), *lead, v.shape[-1], *([1] * (ndim - at - 1)))


def norm_inv_std(m: nn.Module) -> torch.Tensor:
    return torch.rsqrt(m.running_var + m.eps)


def norm_scale(m: nn.Module) -> torch.Tensor:
    """s = γ/√(σ² + ε) per channel: the layer's slope."""
    inv = norm_inv_std(m)
    return inv * m.weight if m.weight is not None else inv


def norm_normalised(m: nn.Module, a: torch.Tensor) -> torch.Tensor:
    """x̂ = (x − μ)/√(σ² + ε) [n, C, *spatial]: what the R-passes read of the layer's input."""
    return (a - _channel(m.running_mean, a.dim())) * _channel(norm_inv_std(m), a.dim())


def norm_input_grad(m: nn.Module, g: torch.Tensor) -> torch.Tensor:
    return g * _channel(norm_scale(m), g.dim())


def norm_r_forward(m: nn.Module, xh: torch.Tensor, Ra: torch.Tensor | None, dg: torch.Tensor | None,
                   db: torch.Tensor | None, K: int) -> torch.Tensor | None:
    """Rz [n, K, C, *spatial] (x̂ from norm_normalised; dγ, dβ [K, C] or None)."""
    d = xh.dim() + 1
    Rz = None if Ra is None else Ra * _channel(norm_scale(m), d, 2)
    if dg is not None:
        t = xh.unsqueeze(1) * _channel(dg, d, 2)
        Rz = t if Rz is None else Rz.add_(t)
    if db is not None:
        t = _channel(db, d, 2)
        Rz = t.expand(xh.shape[0], K, *xh.shape[1:]) if Rz is None else Rz + t
    return Rz


def norm_r_backward(m: nn.Module, xh: torch.Tensor, Ra: torch.Tensor | None, g: torch.Tensor | None,
                    Rg: torch.Tensor, dg: torch.Tensor | None, scored: tuple[bool, bool], below: bool) -> tuple:
    """(R∇γ [K, C] or None, R∇β [K, C] or None, Rg at the input or None) from Rg [n, K, C, *spatial]."""
    d = Rg.dim()
    over = (0, *range(3, d))                        # rows and positions
    inv = _channel(norm_inv_std(m), d, 2)
    RW = Rb = Rg_a = None
    if scored[0]:
        RW = (Rg * xh.unsqueeze(1)).sum(over)
        if Ra is not None:
            RW += (Ra * g.unsqueeze(1) * inv).sum(over)
    if scored[1]:
        Rb = Rg.sum(over)
    if below:
        Rg_a = Rg * _channel(norm_scale(m), d, 2)
        if dg is not None:
            Rg_a += g.unsqueeze(1) * (_channel(dg, d, 2) * inv)
    return RW, Rb, Rg_a


# ---------------------------------------------------------------------------------------- pools
def pool_prepare(m: nn.Module, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(the layer's output, the window maxima's flat indices for a max-pool, else None)."""
    if type(m) in MAX_POOLS:
        return _MAX_POOL[type(m)](a, m.kernel_size, m.stride, m.padding, m.dilation, ceil_mode=m.ceil_mode,
                                  return_indices=True)
    return m(a), None


def fold_slope(idx: torch.Tensor, s1: torch.Tensor) -> torch.Tensor:
    """A piecewise-linear activation's σ' [n, 1, c, *spatial] just below a max-pool, taken at the
    window maxima [n, 1, c, positions']: the pool's R-passes multiply by it on the pooled size
    (a quarter of the elements for 2x2 windows), and the activation's own two passes over the
    full-size R-quantities are dropped (gather(σ' ⊙ R) = gather(σ') ⊙ gather(R); its adjoint
    alike)."""
    n, c = idx.shape[:2]
    return s1.reshape(n, 1, c, -1).gather(3, idx.reshape(n, 1, c, -1))


def pool_forward(m: nn.Module, idx: torch.Tensor | None, Ra: torch.Tensor,
                 slope: torch.Tensor | None = None) -> torch.Tensor:
    """R at the output [n, K, c, *spatial'] from R at the input [n, K, c, *spatial]; slope: a
    folded activation's (fold_slope)."""
    n, K, c = Ra.shape[:3]
    if idx is not None:
        flat = Ra.reshape(n, K, c, -1)
        i = idx.reshape(n, 1, c, -1).expand(n, K, c, idx[0, 0].numel())
        out = _empty((n * K, *idx.shape[1:]), Ra).view(n, K, c, -1)
        torch.gather(flat, 3, i, out=out)
        return (out if slope is None else out.mul_(slope)).view(n, K, *idx.shape[1:])
    out = m(Ra.reshape(n * K, *Ra.shape[2:]))
    return out.view(n, K, *out.shape[1:])


def pool_backward(m: nn.Module, idx: torch.Tensor | None, in_shape, Rg: torch.Tensor,
                  slope: torch.Tensor | None = None) -> torch.Tensor:
    """The adjoint of pool_forward: [n, K, c, *spatial'] at the output -> [n, K, *in_shape[1:]]."""
    n, K, c = Rg.shape[:3]
    if idx is not None:                            # windows may overlap: add, not assign
        i = idx.reshape(n, 1, c, -1).expand(n, K, c, idx[0, 0].numel())
        space = 1
        for s in in_shape[2:]:
            space *= s
        src = Rg.reshape(n, K, c, -1)
        out = _empty((n * K, *in_shape[1:]), Rg).zero_().view(n, K, c, space)
        out.scatter_add_(3, i, src if slope is None else src * slope)
        return out.view(n, K, *in_shape[1:])
    return _avg_adjoint(m, (n * K, *in_shape[1:]), Rg.reshape(n * K, *Rg.shape[2:])).view(n, K, *in_shape[1:])


def _avg_adjoint(m: nn.Module, in_shape, go: torch.Tensor) -> torch.Tensor:
    """An average pool's adjoint by its aten backward (the input only gives its shape and layout;
    autograd through the pool would cost its forward, and its first call imports ~1 s of
    symbolic-shape machinery). A 1-d pool is the 2-d one on height-1 maps, as torch computes it."""
    one = type(m) in (nn.AvgPool1d, nn.AdaptiveAvgPool1d)
    like = _empty((*in_shape[:2], 1, in_shape[2]) if one else in_shape, go)
    go4 = go.unsqueeze(2) if one else go
    if type(m) in (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d):
        got = torch.ops.aten._adaptive_avg_pool2d_backward(go4, like)
    else:
        kernel, stride, padding = (_two(v, one, fill) for v, fill in
                                   ((m.kernel_size, 1), (m.stride or m.kernel_size, 1), (m.padding, 0)))
        got = torch.ops.aten.avg_pool2d_backward(go4, like, kernel, stride, padding, m.ceil_mode, m.count_include_pad,
                                                 None if one else m.divisor_override)
    return got.squeeze(2) if one else got


def _two(v, one: bool, fill: int) -> list[int]:
    """A pool's int-or-tuple setting as the 2-d op's pair (a 1-d pool's: (fill, v))."""
    v = list(v) if isinstance(v, (tuple, list)) else [v]
    return [fill, v[0]] if one else (v * 2 if len(v) == 1 else v)


def _empty(shape, like: torch.Tensor) -> torch.Tensor:
    """An empty tensor of like's dtype and device, channels-last when 4-D (the pools' R-quantities
    feed or come from a Conv2d's, which layout() keeps channels-last)."""
    fmt = torch.channels_last if len(shape) == 4 else torch.contiguous_format
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=fmt)


def pool_input_grad(m: nn.Module, idx: torch.Tensor | None, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The loss's gradient at the pool's input from the one at its output (the block's backward)."""
    return pool_backward(m, idx, a.shape, g.unsqueeze(1)).squeeze(1)


__all__ = ["AVG_POOLS", "CONVS", "MAX_POOLS", "NORMS", "PATCH_CHANNELS", "POOLS", "STEM_GROWTH", "conv_input_grad",
           "conv_r_backward", "conv_r_forward", "fold_slope", "layout", "norm_input_grad", "norm_normalised",
           "norm_r_backward", "norm_r_forward", "norm_scale", "patches", "pool_backward",
           "pool_forward", "pool_input_grad", "pool_prepare", "stem_backward", "stem_forward", "stem_patches",
           "takes"]
