"""Ghost routes for Conv1d/Conv2d, Embedding and norm-layer affines.

Each route turns what one batched forward/backward records for a layer (its input and the
gradient δ at its output) into the layer's per-sample (dot, sqnorm) against a target gradient,
without a per-sample vmap:

* Conv1d / Conv2d: the weight gradient of sample i is Σ_t δ_t a_tᵀ over the output positions t,
  with a_t the unfolded input patch (C_in/groups · prod(kernel) values). That is exactly the
  sequence form of ``ops.linear_ghost_stats`` ([N, T, d_in], [N, T, d_out]), which already picks
  the cheaper of the Gram (T²) and materialised (d_in · d_out) forms for the norm. Grouped
  convolutions materialise the (small) per-group gradients with one einsum instead.
* Embedding: sample i's weight gradient scatters its δ rows to the rows of its token ids. The
  dot is Σ_t ⟨δ_t, G[id_t]⟩ (gathered rows); the norm sums δ rows of repeated ids first (one
  index_add over (sample, id) keys), so it never forms a [vocab, dim] tensor per sample.
  Tokens equal to ``padding_idx`` get no gradient (as in nn.Embedding's backward).
* LayerNorm / RMSNorm / GroupNorm / InstanceNorm / eval-mode BatchNorm: y = x̂ ⊙ γ + β, so the
  per-sample affine gradients are reductions of δ ⊙ x̂ and δ over the non-parameter dims; x̂ is
  recomputed from the recorded input with the functional norm without affine (same statistics:
  per sample, or BatchNorm's running statistics in eval mode). The per-sample gradients are
  [N, C]-sized, so they are formed and reduced by ``ops.per_sample_grad_stats``.

A route returns None when a call cannot be split by sample (no leading sample dim, BatchNorm
using batch statistics, an unbatched input): the layer's parameters then take a slower route.
Composition of existing ops was measured to be enough here (bench/bench_ghost_methods.py): the
heavy part is a BLAS GEMM in every case.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dvgs_fast import ops

_CONV = (nn.Conv1d, nn.Conv2d)
# The norm classes whose forward we reproduce (subclasses such as BatchNorm2d inherit it).
_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm,
          nn.modules.batchnorm._BatchNorm) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def _plain(m: nn.Module, base: type) -> bool:
    # A subclass that overrides forward computes something else; only the stock forward is routed.
    return type(m).forward is base.forward


def ghost_kind(m: nn.Module) -> str | None:
    """The ghost route for module m ("conv1d", "conv2d", "embedding", "norm"), or None."""
    for cls in _CONV:
        if isinstance(m, cls) and _plain(m, cls):
            return cls.__name__.lower()
    if isinstance(m, nn.Embedding) and _plain(m, nn.Embedding):
        # scale_grad_by_freq scales by the token counts of the whole batch (samples interact);
        # sparse gradients are fine (G is densified), but keep the routes simple and exact.
        return None if m.scale_grad_by_freq else "embedding"
    if isinstance(m, _NORMS):
        base = next(c for c in type(m).__mro__ if c in _NORMS)
        if _plain(m, base):
            return "norm"
    return None


# ------------------------------------------------------------------------------------- conv
def conv_rows(m: nn.Conv1d | nn.Conv2d, x: torch.Tensor, d: torch.Tensor, n: int):
    """(a [N, T, C_in/g · K], δ [N, T, C_out]) of one conv call, or None if not per-sample."""
    nd = 1 if isinstance(m, nn.Conv1d) else 2
    if x.dim() != nd + 2 or x.shape[0] != n or d.shape[0] != n:
        return None                              # unbatched input: dim 0 is channels, not samples
    pad = list(getattr(m, "_reversed_padding_repeated_twice", []))
    if not pad:
        return None
    if any(pad):
        x = F.pad(x, pad, mode="constant" if m.padding_mode == "zeros" else m.padding_mode)
    if nd == 1:                                  # treat as a 2-D conv over a height-1 image
        x = x.unsqueeze(2)
        k, dil, st = (1, m.kernel_size[0]), (1, m.dilation[0]), (1, m.stride[0])
    else:
        k, dil, st = m.kernel_size, m.dilation, m.stride
    a = F.unfold(x, k, dilation=dil, padding=0, stride=st)          # [N, C_in·K, T]
    t = a.shape[-1]
    dd = d.reshape(n, d.shape[1], -1)                                # [N, C_out, T]
    if dd.shape[-1] != t:
        return None
    return a.transpose(1, 2), dd.transpose(1, 2)


def conv_stats(m, pieces, G_w, G_b):
    """(dot, sq) for a conv from its calls' (a, δ) rows, concatenated along T (shared layers)."""
    n = pieces[0][0].shape[0]
    a = pieces[0][0] if len(pieces) == 1 else torch.cat([p[0] for p in pieces], 1)
    d = pieces[0][1] if len(pieces) == 1 else torch.cat([p[1] for p in pieces], 1)
    if m.groups == 1:
        if G_w is not None:
            return ops.linear_ghost_stats(a, d, G_w.reshape(G_w.shape[0], -1), G_b)
        return ops.per_sample_grad_stats([d.sum(1)], [G_b])
    # Grouped / depthwise: per-group gradients [N, g, C_out/g, C_in/g·K] are small; form them.
    g = m.groups
    grads, targets = [], []
    if G_w is not None:
        t = a.shape[1]
        w = torch.einsum("ntgo,ntgi->ngoi", d.reshape(n, t, g, -1), a.reshape(n, t, g, -1))
        grads.append(w.reshape(n, G_w.shape[0], -1))
        targets.append(G_w.reshape(G_w.shape[0], -1))
    if G_b is not None:
        grads.append(d.sum(1))
        targets.append(G_b)
    return ops.per_sample_grad_stats(grads, targets)


# -------------------------------------------------------------------------------- embedding
def embedding_rows(m: nn.Embedding, ids: torch.Tensor, d: torch.Tensor, n: int):
    """(ids [N, T], δ [N, T, D]) of one embedding call, padding tokens dropped (zero δ)."""
    if ids.dim() < 2 or ids.shape[0] != n or d.shape[0] != n:
        return None                              # a 1-D id vector is one sequence, not N samples
    ids = ids.reshape(n, -1)
    d = d.reshape(n, ids.shape[1], d.shape[-1])
    if m.padding_idx is not None:
        d = d * (ids != m.padding_idx).unsqueeze(-1).to(d.dtype)
    return ids, d


def embedding_stats(m: nn.Embedding, pieces, G_w):
    n = pieces[0][0].shape[0]
    ids = torch.cat([p[0] for p in pieces], 1) if len(pieces) > 1 else pieces[0][0]
    d = torch.cat([p[1] for p in pieces], 1) if len(pieces) > 1 else pieces[0][1]
    acc = torch.float64 if d.dtype == torch.float64 else torch.float32
    d = d.to(acc)
    G = (G_w.to_dense() if G_w.is_sparse else G_w).to(acc)
    dim = d.shape[-1]
    dot = (d * G[ids]).reshape(n, -1).sum(1)
    # Rows of repeated ids add up before the norm: key (sample, id) -> one summed row each.
    key = torch.arange(n, device=ids.device).unsqueeze(1) * m.num_embeddings + ids
    uniq, inv = torch.unique(key.reshape(-1), return_inverse=True)
    rows = torch.zeros(uniq.numel(), dim, dtype=acc, device=d.device).index_add_(0, inv, d.reshape(-1, dim))
    sq = torch.zeros(n, dtype=acc, device=d.device).index_add_(0, uniq // m.num_embeddings,
                                                                rows.square().sum(1))
    return dot, sq


# ------------------------------------------------------------------------------------- norms
def norm_grads(m: nn.Module, x: torch.Tensor, d: torch.Tensor, n: int):
    """Per-sample (dγ [N, *shape] or None, dβ [N, *shape] or None) of one norm call, or None."""
    if x.shape[0] != n or d.shape != x.shape:
        return None
    if isinstance(m, nn.LayerNorm) or (hasattr(nn, "RMSNorm") and isinstance(m, nn.RMSNorm)):
        shape = tuple(m.normalized_shape)
        if x.dim() <= len(shape):
            return None                          # the whole tensor is one sample's features
        if isinstance(m, nn.LayerNorm):
            xh = F.layer_norm(x, shape, None, None, m.eps)
        else:
            xh = F.rms_norm(x, shape, None, m.eps)
        red = (n, -1) + shape
        gw = (d * xh).reshape(red).sum(1) if m.weight is not None else None
        gb = d.reshape(red).sum(1) if getattr(m, "bias", None) is not None else None
        return gw, gb
    if isinstance(m, nn.GroupNorm):
        if x.dim() < 2:
            return None
        xh = F.group_norm(x, m.num_groups, None, None, m.eps)
    elif isinstance(m, nn.modules.instancenorm._InstanceNorm):
        if x.dim() == m._get_no_batch_dim():
            return None                          # unbatched [C, L...]: dim 0 is channels
        use_input = m.training or not m.track_running_stats
        # With use_input_stats the functional form would update running stats it is given: pass none.
        xh = F.instance_norm(x, None if use_input else m.running_mean, None if use_input else m.running_var,
                             None, None, use_input, 0.0, m.eps)
    elif isinstance(m, nn.modules.batchnorm._BatchNorm):
        # Batch statistics couple the samples: no per-sample gradient. Eval mode with running
        # statistics (how DVGS/TracIn score) normalises each sample on its own.
        if m.training or m.running_mean is None or x.dim() < 2:
            return None
        xh = F.batch_norm(x, m.running_mean, m.running_var, None, None, False, 0.0, m.eps)
    else:
        return None
    c = x.shape[1]
    gw = (d * xh).reshape(n, c, -1).sum(2) if m.weight is not None else None
    gb = d.reshape(n, c, -1).sum(2) if m.bias is not None else None
    return gw, gb


def norm_stats(pieces, G_w, G_b):
    gw = gb = None
    for w, b in pieces:                          # shared norm layer: per-sample gradients add up
        if G_w is not None:
            gw = w if gw is None else gw + w
        if G_b is not None:
            gb = b if gb is None else gb + b
    grads, targets = [], []
    if G_w is not None:
        grads.append(gw)
        targets.append(G_w)
    if G_b is not None:
        grads.append(gb)
        targets.append(G_b)
    return ops.per_sample_grad_stats(grads, targets)


# ------------------------------------------------------------------------------------ driver
def ghost_module_stats(kind: str, m: nn.Module, calls, deltas, n: int, G_w, G_b):
    """(dot, sq) of module m's selected weight/bias by its ghost route; False if no call reached
    the loss; None if some call cannot be split by sample (the caller takes a slower route)."""
    pieces = []
    for c, d in zip(calls, deltas):
        if c.output.shape[0] != n:
            return None
        x = c.args[0] if c.args else c.kwargs.get("input")
        if not isinstance(x, torch.Tensor):
            return None
        if d is None:
            continue                             # this call's output did not reach the loss
        x = x.detach()
        if kind in ("conv1d", "conv2d"):
            p = conv_rows(m, x, d, n)
        elif kind == "embedding":
            p = embedding_rows(m, x, d, n)
        else:
            p = norm_grads(m, x, d, n)
            if p is not None and ((G_w is not None and p[0] is None) or (G_b is not None and p[1] is None)):
                return None
        if p is None:
            return None
        pieces.append(p)
    if not pieces:
        return False
    if kind in ("conv1d", "conv2d"):
        return conv_stats(m, pieces, G_w, G_b)
    if kind == "embedding":
        return embedding_stats(m, pieces, G_w)
    return norm_stats(pieces, G_w, G_b)


def describe_conv(m, calls) -> str:
    """'gram' or 'materialised': which norm form linear_ghost_stats takes (for result.info)."""
    if m.groups != 1:
        return "grouped"
    try:
        t = sum(int(c.output[0, 0].numel()) for c in calls) if calls else 0
    except Exception:
        return "?"
    d_in = m.in_channels * math.prod(m.kernel_size)
    return "gram" if 2 * t * t <= d_in * m.out_channels else "materialised"
