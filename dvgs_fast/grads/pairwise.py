"""Pairwise ("ghost dot-product") per-sample dots against a target gradient that is itself a
sum of per-row outer products: In-Run Data Shapley's first-order SGD term.

For a Linear layer, sample i's weight gradient is Σ_t δ_it a_itᵀ (t over its rows: 1 for a
plain [N, d] input, the positions of a sequence, the output positions of a convolution with
a_it the unfolded input patch). The target gradient of a mean target loss over T target rows is
G = Σ_j Σ_s δ'_js a'_jsᵀ with δ' the gradient of that MEAN loss at the layer's output. So

    ⟨g_i, G⟩ = Σ_t Σ_(j,s) (a_it · a'_js)(δ_it · δ'_js)        (+ Σ_t δ_it · Σ_(j,s) δ'_js for the bias)

without ever forming G or a per-sample gradient (Wang et al. 2024, "ghost dot-product"). Cost per
layer: B·L·T·L'·(d_in + d_out) for B samples of L rows against T targets of L' rows, against
(T·L' + B·L)·d_in·d_out for the materialised route (the target's weight-gradient GEMM plus one
GEMM of the layer's size for the dots); `pairwise_cheaper` picks the smaller.

Only the target's layer inputs a' and output gradients δ' are needed, so the target backward
can stop at the layers' outputs and skip the weight-gradient matmuls (and, for a first layer
on the data, its whole backward).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from dvgs_fast.grads.ghost_layers import conv_rows

# [rows, target rows] blocks of the pairwise products are formed at most this large (elements):
# a long-sequence layer that the cost rule sends here anyway (forced) does not need B·L·T·L' memory.
_BLOCK = 1 << 22


def pairwise_kind(m: nn.Module, kind: str | None) -> str | None:
    """"linear" / "conv" when module m has a pairwise route (a plain Linear, or an ungrouped
    Conv1d/Conv2d; `kind` is the FastScorer route: "linear" or ghost_kind(m)), else None."""
    if kind == "linear":
        return "linear"
    if kind in ("conv1d", "conv2d") and m.groups == 1:
        return "conv"
    return None


def layer_width(m: nn.Module, kind: str) -> tuple[int, int]:
    """(d_in, d_out) of the layer's weight as a matrix: a conv's d_in is its patch size."""
    if kind == "linear":
        return m.in_features, m.out_features
    return m.in_channels * math.prod(m.kernel_size), m.out_channels


def call_rows(m: nn.Module, kind: str, call, n: int) -> int | None:
    """Rows per sample of one recorded call (positions of a sequence / conv output), or None when
    the call cannot be split by sample (no leading sample dimension)."""
    x = call.input
    out = call.output
    if not isinstance(x, torch.Tensor) or out.dim() < 2 or out.shape[0] != n or x.dim() < 2 or x.shape[0] != n:
        return None
    if kind == "linear":
        return out[0].numel() // out.shape[-1]
    nd = 1 if isinstance(m, nn.Conv1d) else 2
    if x.dim() != nd + 2:
        return None                                   # unbatched conv input: dim 0 is channels
    return out[0, 0].numel()


def pairwise_cheaper(b: int, rows: int, t: int, t_rows: int, d_in: int, d_out: int) -> bool:
    """True when the pairwise dot costs fewer multiply-adds than the materialised route."""
    pair = b * rows * t * t_rows * (d_in + d_out + 1)
    mat = (t * t_rows + b * rows) * d_in * d_out
    return pair < mat


def rows_of(m: nn.Module, kind: str, calls, deltas, n: int, flat: bool = True):
    """(A [n·L, d_in], D [n·L, d_out], L) of the layer's calls (a shared layer's calls concatenated
    along the rows of each sample), None when some call cannot be split by sample, False when no
    call's output reached the loss (the layer's gradient is zero). flat=False: A [n, L, d_in] and
    D [n, L, d_out], views where they can be -- a conv's patches come out of unfold channel-major,
    and their [n·L, d_in] form is a transposing copy as costly as the unfold itself, which
    consumers that work per sample (bmm) never need."""
    if kind == "linear" and len(calls) == 1 and deltas[0] is not None:
        x, d = calls[0].input, deltas[0]
        if isinstance(x, torch.Tensor) and x.dim() == 2 and x.shape[0] == n and d.dim() == 2 and d.shape[0] == n:
            return x.detach(), d, 1               # the common case: [n, d_in] in, [n, d_out] out
    As, Ds = [], []
    for c, d in zip(calls, deltas):
        if call_rows(m, kind, c, n) is None:
            return None
        if d is None:
            continue
        x = c.input
        x = x.detach()
        if kind == "linear":
            As.append(x.reshape(n, -1, x.shape[-1]))
            Ds.append(d.reshape(n, -1, d.shape[-1]))
        else:
            p = conv_rows(m, x, d, n)
            if p is None:
                return None
            xp, k, dil, st, dd = p
            a = torch.nn.functional.unfold(xp, k, dilation=dil, padding=0, stride=st)   # [n, K, L]
            As.append(a.transpose(1, 2))
            Ds.append(dd.transpose(1, 2))
    if not As:
        return False
    a = As[0] if len(As) == 1 else torch.cat(As, 1)
    d = Ds[0] if len(Ds) == 1 else torch.cat(Ds, 1)
    rows = a.shape[1]
    if not flat:
        return a, d, rows
    return a.reshape(n * rows, a.shape[-1]), d.reshape(n * rows, d.shape[-1]), rows


def pairwise_dot(a: torch.Tensor, d: torch.Tensor, rows: int, at: torch.Tensor, dt: torch.Tensor,
                 bias: bool) -> torch.Tensor:
    """Per-sample ⟨g_i, G⟩ [n] of one layer, G = Σ_r δ'_r a'_rᵀ (and the bias's Σ_r δ'_r when
    `bias`) over the target rows (at [R', d_in], dt [R', d_out]); a [n·rows, d_in] and
    d [n·rows, d_out] are the batch's rows. The bias term Σ_t Σ_r δ_t·δ'_r reuses the δ·δ'
    products: Σ_r ((a_t·a'_r) + 1)(δ_t·δ'_r), no extra GEMM."""
    acc = torch.float64 if torch.float64 in (a.dtype, at.dtype) else torch.float32
    a, d, at, dt = a.to(acc), d.to(acc), at.to(acc), dt.to(acc)
    step = max(1, _BLOCK // max(1, at.shape[0]))
    if a.shape[0] <= step:                        # one block (the usual case)
        aa = a @ at.t()
        r = (aa.add_(1.0) if bias else aa).mul_(d @ dt.t()).sum(1)
    else:
        r = torch.empty(a.shape[0], dtype=acc, device=a.device)
        for s in range(0, a.shape[0], step):
            aa = a[s:s + step] @ at.t()
            r[s:s + step] = (aa.add_(1.0) if bias else aa).mul_(d[s:s + step] @ dt.t()).sum(1)
    return r if rows == 1 else r.view(-1, rows).sum(1)


def materialise(m: nn.Module, kind: str, at: torch.Tensor, dt: torch.Tensor, weight: bool, bias: bool):
    """(G_w, G_b) in the parameters' shapes from the target rows (for the rare step where the
    batch's call cannot be split by sample and the layer takes the whole-model route)."""
    gw = (dt.t() @ at).reshape(m.weight.shape) if weight else None
    gb = dt.sum(0) if bias else None
    return gw, gb
