"""Ghost routes for Conv1d/Conv2d, Embedding and norm-layer affines.

Each route turns what one batched forward/backward records for a layer (its input and the
gradient δ at its output) into the layer's per-sample (dot, sqnorm) against a target gradient,
without a per-sample vmap:

* Conv1d / Conv2d: the weight gradient of sample i is Σ_t δ_t a_tᵀ over the output positions t
  (a_t: the unfolded input patch), the sequence form of ``ops.linear_ghost_stats``. The dot needs
  no unfolding at all: the layer is linear in its weight, so ⟨g_i, G⟩ = ⟨conv(x_i; G), δ_i⟩, one
  ordinary batched convolution with G as the kernel. The norm takes the cheaper form by the
  op's rule: the Gram form Σ (a_t·a_s)(δ_t·δ_s) (T² per sample) for layers with few output
  positions and many weights; otherwise materialised per-sample gradients, which torch.func's
  conv batching rule (a grouped convolution) computes faster than an unfold + bmm composition
  (measured: bench/bench_ghost_methods.py), so those layers keep the per-layer route for the
  norm ("conv2d_ghost (materialised)" in result.info) and use the ghost dot when no norm is needed.
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


def ghost_dot(a: torch.Tensor, d: torch.Tensor, G_w: torch.Tensor | None, G_b: torch.Tensor | None) -> torch.Tensor:
    """dot_i = Σ_t d_tᵀ G a_t (+ Σ_t d_t · g_b) alone, for callers that need no norm (TracIn,
    In-Run Shapley, similarity "dot"): the norm is the expensive half of a sequence layer
    (Gram T² or materialised d_in · d_out per sample); the dot is one GEMM with the narrower side."""
    n = a.shape[0]
    acc = torch.float64 if a.dtype == torch.float64 else torch.float32
    A = a.reshape(-1, a.shape[-1]).to(acc)
    D = d.reshape(-1, d.shape[-1]).to(acc)
    r = torch.zeros(A.shape[0], dtype=acc, device=A.device)
    if G_w is not None:
        W = G_w.to(acc)
        r = (A @ W.t()).mul_(D).sum(1) if W.shape[0] <= W.shape[1] else (D @ W).mul_(A).sum(1)
    if G_b is not None:
        r = r + D @ G_b.to(acc)
    return r.view(n, -1).sum(1)


# ------------------------------------------------------------------------------------- conv
def _conv_input(m, x: torch.Tensor, n: int):
    """The conv's input padded as its forward pads it (so the rest runs with padding 0), as a
    2-D image batch (Conv1d: height 1), with the 2-D kernel/dilation/stride; None if unbatched."""
    nd = 1 if isinstance(m, nn.Conv1d) else 2
    if x.dim() != nd + 2 or x.shape[0] != n:
        return None                              # unbatched input: dim 0 is channels, not samples
    pad = list(getattr(m, "_reversed_padding_repeated_twice", []))
    if not pad:
        return None
    if any(pad):
        x = F.pad(x, pad, mode="constant" if m.padding_mode == "zeros" else m.padding_mode)
    if nd == 1:
        return x.unsqueeze(2), (1, m.kernel_size[0]), (1, m.dilation[0]), (1, m.stride[0])
    return x, tuple(m.kernel_size), tuple(m.dilation), tuple(m.stride)


def conv_patches(m: nn.Conv1d | nn.Conv2d, x: torch.Tensor) -> torch.Tensor | None:
    """[n, C_in·kernel, positions]: the patches of a conv's batched input x, padded as its forward
    pads it (channel-major, as unfold gives them); None for an unbatched input."""
    p = _conv_input(m, x, x.shape[0])
    return None if p is None else F.unfold(p[0], p[1], dilation=p[2], padding=0, stride=p[3])


def conv_rows(m: nn.Conv1d | nn.Conv2d, x: torch.Tensor, d: torch.Tensor, n: int):
    """(padded 2-D input, kernel, dilation, stride, δ [N, C_out, T]) of one call, or None."""
    if d.shape[0] != n:
        return None
    p = _conv_input(m, x, n)
    if p is None:
        return None
    return (*p, d.reshape(n, d.shape[1], -1))


def conv_uses_gram(t: int, k: int, c_out: int) -> bool:
    """The norm by the Gram form (T² per sample) rather than materialised gradients (K·C_out),
    the same rule as linear_ghost_stats' sequence form."""
    return 2 * t * t <= k * c_out


def conv_positions(pieces) -> int:
    return sum(p[4].shape[-1] for p in pieces)


def conv_stats(m, pieces, G_w, G_b, need_sq: bool = True):
    """(dot, sq) for a conv from its calls (a shared layer's calls add up); None when the norm is
    cheaper from materialised per-sample gradients (see ghost_module_stats).

    Sample i's weight gradient is Σ_t δ_t a_tᵀ (a_t: the unfolded input patch at output position t).
      dot = <conv(x_i; weight G, no bias), δ_i> + <Σ_t δ_t, g_b>: the layer is linear in its weight,
            so <∂ℓ/∂W, G> is the directional derivative: ONE ordinary batched convolution with G
            as the kernel; no unfolding, no per-sample gradient.
      sq (Gram form, few positions): Σ_{t,s} (a_t·a_s)(δ_t·δ_s) from the unfolded input.
    The materialised form (many positions, few weights) is what torch.func's conv batching rule
    computes well (a grouped convolution), so it is left to the per-layer route."""
    n = pieces[0][4].shape[0]
    c_out = pieces[0][4].shape[1]
    k_in = (m.in_channels // m.groups) * math.prod(m.kernel_size)
    if need_sq and G_w is not None and not (m.groups == 1 and conv_uses_gram(conv_positions(pieces), k_in, c_out)):
        return None
    acc = torch.float64 if pieces[0][4].dtype == torch.float64 else torch.float32
    dot = torch.zeros(n, dtype=acc, device=pieces[0][4].device)
    sq = torch.zeros_like(dot)
    s = None
    for x, k, dil, st, d in pieces:
        d = d.to(acc)
        if G_w is not None:
            W = G_w.to(acc).reshape(c_out, -1, *k)
            z = F.conv2d(x.to(acc), W, None, st, 0, dil, m.groups)
            dot += (z.reshape(n, c_out, -1) * d).sum((1, 2))
        s = d.sum(2) if s is None else s + d.sum(2)
    if G_b is not None:
        dot += s @ G_b.to(acc)
    if not need_sq:
        return dot, sq
    if G_w is not None:                          # Gram form over all positions of all calls
        a = torch.cat([F.unfold(x.to(acc), k, dilation=dil, padding=0, stride=st) for x, k, dil, st, _ in pieces], 2)
        d = torch.cat([p[4].to(acc) for p in pieces], 2)
        sq += torch.bmm(a.transpose(1, 2), a).mul_(torch.bmm(d.transpose(1, 2), d)).sum((1, 2))
    if G_b is not None:
        sq += s.square().sum(1)
    return dot, sq


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


def embedding_stats(m: nn.Embedding, pieces, G_w, need_sq: bool = True):
    n = pieces[0][0].shape[0]
    ids = torch.cat([p[0] for p in pieces], 1) if len(pieces) > 1 else pieces[0][0]
    d = torch.cat([p[1] for p in pieces], 1) if len(pieces) > 1 else pieces[0][1]
    acc = torch.float64 if d.dtype == torch.float64 else torch.float32
    d = d.to(acc)
    G = (G_w.to_dense() if G_w.is_sparse else G_w).to(acc)
    dim = d.shape[-1]
    dot = (d * G[ids]).reshape(n, -1).sum(1)
    if not need_sq:
        return dot, torch.zeros_like(dot)
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
MATERIALISE = "materialise"


def ghost_module_stats(kind: str, m: nn.Module, calls, deltas, n: int, G_w, G_b, need_sq: bool = True):
    """(dot, sq) of module m's selected weight/bias by its ghost route; False if no call reached
    the loss; None if some call cannot be split by sample (the caller takes a slower route);
    MATERIALISE when the norm is cheaper from materialised per-sample gradients (the caller's
    per-layer route forms them)."""
    if kind in ("conv1d", "conv2d") and need_sq and G_w is not None and describe_conv(m, calls) != "gram":
        return MATERIALISE                       # decided from the shapes, before touching the data
    pieces = []
    for c, d in zip(calls, deltas):
        if c.output.shape[0] != n:
            return None
        x = c.input
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
        res = conv_stats(m, pieces, G_w, G_b, need_sq)
        return MATERIALISE if res is None else res
    if kind == "embedding":
        return embedding_stats(m, pieces, G_w, need_sq)
    return norm_stats(pieces, G_w, G_b)


def describe_conv(m, calls) -> str:
    """'gram' or 'materialised': the conv's norm form (for result.info)."""
    try:
        t = sum(int(c.output[0, 0].numel()) for c in calls) if calls else 0
    except Exception:
        return "?"
    k_in = (m.in_channels // m.groups) * math.prod(m.kernel_size)
    return "gram" if m.groups == 1 and conv_uses_gram(t, k_in, m.out_channels) else "materialised"
