"""Per-sample gradients in factored form, taken from one recorded forward/backward.

A Linear layer's per-sample weight gradient is Σ_t δ_t a_tᵀ (t over the sample's rows: 1 for a
plain [N, d] input, the positions of a sequence, the output positions of a convolution with a_t
the unfolded input patch). Keeping (a, δ) instead of the d_out × d_in product is what lets every
question about per-sample gradients -- dots with a target, dots between two sets of samples,
projections, K-FAC factors -- be answered without forming them:

* ``RowFactors``: Linear and ungrouped Conv1d/Conv2d layers: a [n·L, d_in], δ [n·L, d_out], L rows
  per sample (and the bias, whose gradient is Σ_t δ_t);
* ``TokenFactors``: Embedding layers: token ids [n, T] and δ [n, T, dim] (the gradient scatters
  each δ_t to the row of its id; ``padding_idx`` tokens carry a zero δ);
* ``DenseGrads``: every other selected parameter (norm affines from their per-sample reductions,
  other layers and whole-model routes by torch.func), as explicit per-sample gradients [n, P].

``SampleFactors`` holds one set for a batch of n samples, detached from autograd, so it can be
kept (e.g. the query side of an attribution) while other batches are recorded. The algebra on
factors is in gram.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from dvgs_fast._utils import own_rng
from dvgs_fast.grads.ghost_layers import conv_rows, embedding_rows, norm_grads
from dvgs_fast.grads.pairwise import call_rows, pairwise_kind, rows_of
from dvgs_fast.grads.reference import per_sample_grads


class ConvInput:
    """A conv call's input as the patches are cut from it: the input padded as the forward pads
    it, as a 2-D image batch [n, C_in, H, W] (Conv1d: height 1), and the 2-D kernel, dilation and
    stride (the rest runs with padding 0)."""

    __slots__ = ("x", "kernel", "dilation", "stride")

    def __init__(self, x: torch.Tensor, kernel, dilation, stride):
        self.x, self.kernel, self.dilation, self.stride = x, tuple(kernel), tuple(dilation), tuple(stride)

    def patches(self) -> torch.Tensor:
        """[n, C_in·kh·kw, L] channel-major, as unfold gives them."""
        return F.unfold(self.x, self.kernel, dilation=self.dilation, padding=0, stride=self.stride)

    def out_size(self) -> tuple[int, int]:
        return tuple((self.x.shape[2 + i] - self.dilation[i] * (self.kernel[i] - 1) - 1) // self.stride[i] + 1
                     for i in range(2))

    def weight_grads(self, d: torch.Tensor) -> torch.Tensor:
        """[n, C_out, C_in·kh·kw]: Σ_t δ_t a_tᵀ per sample, d [n, C_out, L], by ONE convolution's
        weight gradient with the samples as groups (what torch.func's batching rule does) -- no
        patch matrix: on the digits CNN (1,000 samples of 1x32x32 and 8x16x16) 37 and 25 ms
        against 80 and 174 ms by unfold + bmm (1 thread)."""
        n, c_in = self.x.shape[:2]
        c_out = d.shape[1]
        grad_out = d.reshape(1, n * c_out, *self.out_size())
        g = torch.nn.grad.conv2d_weight(self.x.reshape(1, n * c_in, *self.x.shape[2:]), (n * c_out, c_in, *self.kernel),
                                        grad_out, stride=self.stride, padding=0, dilation=self.dilation, groups=n)
        return g.reshape(n, c_out, -1)

    def map(self, fn) -> "ConvInput":
        return ConvInput(fn(self.x), self.kernel, self.dilation, self.stride)


class RowFactors:
    """One Linear / conv layer: sample i's weight gradient is Σ_t d[i·rows + t] ⊗ a[i·rows + t].

    a and d are given flat ([n·rows, d_in], [n·rows, d_out]) or per sample ([n, rows, d_in],
    [n, rows, d_out], any strides): a conv's δ comes channel-major, so its per-sample form is a
    free transposed view while the flat one is a copy. A conv's a is given as its ConvInput
    (a=None, conv=...): the patches are cut (unfold, channel-major) only when a consumer asks for
    the rows, and the per-sample gradients come from one grouped convolution without them.
    ``a`` / ``d`` give the flat form (copied once, on first use); ``a3()`` / ``d3()`` the
    per-sample form (a view once formed), which the per-sample (bmm) consumers use. The
    per-sample gradients are kept once formed when they are smaller than the rows (a conv's
    many positions), so the norms, dots and sums of one batch form them once."""

    __slots__ = ("name", "module", "rows", "weight", "bias", "_a", "_d", "_wg", "_conv")

    def __init__(self, name: str, module: nn.Module, a: torch.Tensor | None, d: torch.Tensor, rows: int,
                 weight: str | None, bias: str | None, conv: ConvInput | None = None):
        if a is None and conv is None:
            raise ValueError("RowFactors: give a (the rows) or conv (the conv input they are cut from)")
        self.name = name                   # the layer's path in the model
        self.module = module
        self.rows = rows
        self.weight = weight               # the full parameter names this layer contributes (None: not selected)
        self.bias = bias
        self._a, self._d, self._wg, self._conv = a, d, None, conv

    def __repr__(self) -> str:
        return (f"RowFactors(name={self.name!r}, n={self.n}, rows={self.rows}, d_in={self.d_in}, "
                f"d_out={self.d_out}, weight={self.weight!r}, bias={self.bias!r})")

    @property
    def n(self) -> int:
        return self._d.shape[0] if self._d.dim() == 3 else self._d.shape[0] // self.rows

    @property
    def d_in(self) -> int:
        if self._a is None:
            c = self._conv
            return c.x.shape[1] * c.kernel[0] * c.kernel[1]
        return self._a.shape[-1]

    @property
    def d_out(self) -> int:
        return self._d.shape[-1]

    def _patches(self) -> torch.Tensor:
        if self._a is None:
            self._a = self._conv.patches().transpose(1, 2)                 # [n, L, d_in], a view
        return self._a

    @property
    def a(self) -> torch.Tensor:
        """[n·rows, d_in]."""
        a = self._patches()
        if a.dim() == 3:
            self._a = a = a.reshape(-1, a.shape[-1])
        return a

    @property
    def d(self) -> torch.Tensor:
        """[n·rows, d_out]."""
        if self._d.dim() == 3:
            self._d = self._d.reshape(-1, self._d.shape[-1])
        return self._d

    def a3(self) -> torch.Tensor:
        """[n, rows, d_in] (a view)."""
        a = self._patches()
        return a if a.dim() == 3 else a.view(-1, self.rows, a.shape[-1])

    def d3(self) -> torch.Tensor:
        """[n, rows, d_out] (a view)."""
        return self._d if self._d.dim() == 3 else self._d.view(-1, self.rows, self._d.shape[-1])

    def device(self) -> torch.device:
        return self._d.device

    def tensors(self) -> list[torch.Tensor]:
        """What the factors hold (for memory accounting)."""
        held = [self._d] + [t for t in (self._a, self._wg) if t is not None]
        return held + ([self._conv.x] if self._conv is not None else [])

    def samples(self, lo: int, hi: int) -> "RowFactors":
        """Samples [lo, hi) of the layer (views; a conv's patches still not cut)."""
        conv = None if self._a is not None else self._conv.map(lambda t: t[lo:hi])
        a = None if self._a is None else self.a3()[lo:hi]
        return RowFactors(self.name, self.module, a, self.d3()[lo:hi], self.rows, self.weight, self.bias, conv)

    def map(self, fn) -> "RowFactors":
        """The same layer with fn applied to a and d in their stored form (a device or dtype move)."""
        a = None if self._a is None else fn(self._a)
        conv = None if self._conv is None or a is not None else self._conv.map(fn)
        return RowFactors(self.name, self.module, a, fn(self._d), self.rows, self.weight, self.bias, conv)

    def _keeps_grads(self) -> bool:
        """The per-sample gradients are smaller than the rows (a conv's many positions)."""
        return self.rows > 1 and self.rows * (self.d_in + self.d_out) >= self.d_in * self.d_out

    def weight_grads(self, shared: bool = False) -> torch.Tensor:
        """[n, d_out, d_in]: the per-sample weight gradients, formed (for the materialised routes).
        shared=True: the caller only reads the result, which is then kept for the next shared call
        when it is smaller than the rows (a conv's many positions); otherwise a tensor of its own."""
        if self._wg is not None:
            return self._wg if shared else self._wg.clone()
        if self._a is None:                                  # a conv's patches not cut: no need to
            g = self._conv.weight_grads(self.d3().transpose(1, 2))
        else:
            g = torch.bmm(self.d3().transpose(1, 2), self.a3())
        if shared and self._keeps_grads():
            self._wg = g
        return g

    def weight_grad_blocks(self, max_elements: int):
        """(first sample, [b, d_out, d_in]) over the samples: the kept per-sample gradients when
        they are smaller than the rows (formed once, shared), else formed a block of at most
        `max_elements` at a time (a layer whose gradients would outweigh its rows). Read only."""
        if self._wg is not None or self._keeps_grads():
            g = self.weight_grads(shared=True)
            step = max(1, max_elements // max(1, self.d_in * self.d_out))
            for s in range(0, self.n, step):
                yield s, g[s:s + step]
            return
        a, d = self.a3(), self.d3()
        step = max(1, max_elements // max(1, self.d_out * self.d_in + self.rows * (self.d_in + self.d_out)))
        for s in range(0, self.n, step):
            yield s, torch.bmm(d[s:s + step].transpose(1, 2), a[s:s + step])

    def bias_grads(self) -> torch.Tensor:
        return self.d3().sum(1)


@dataclass
class TokenFactors:
    """One Embedding layer: sample i's weight gradient puts d[i, t] on row ids[i, t]."""

    name: str
    module: nn.Module
    ids: torch.Tensor              # [n, T] int64
    d: torch.Tensor                # [n, T, dim]
    weight: str


@dataclass
class DenseGrads:
    """Explicit per-sample gradients of the remaining selected parameters, flattened: g [n, P]
    with the parameters in ``names`` order (``sizes`` elements each)."""

    names: list[str]
    sizes: list[int]
    g: torch.Tensor


@dataclass
class SampleFactors:
    """Per-sample gradients of n samples, layer by layer in factored form (see the module doc)."""

    n: int
    rows: list[RowFactors] = field(default_factory=list)
    tokens: list[TokenFactors] = field(default_factory=list)
    dense: DenseGrads | None = None
    dtype: torch.dtype = torch.float32

    def layer_names(self) -> list[str]:
        return ([f.name for f in self.rows] + [f.name for f in self.tokens]
                + (list(self.dense.names) if self.dense is not None else []))

    def nbytes(self) -> int:
        """Memory the factors hold (by storage: a view counts its whole base once), for callers
        that keep them under a budget."""
        ts = [t for f in self.rows for t in f.tensors()]
        ts += [t for f in self.tokens for t in (f.ids, f.d)]
        if self.dense is not None:
            ts.append(self.dense.g)
        seen = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in ts}
        return sum(seen.values())

    def to(self, device) -> "SampleFactors":
        """A copy on `device` (e.g. a query set's factors kept on the CPU between blocks)."""
        rows = [f.map(lambda t: t.to(device)) for f in self.rows]
        toks = [TokenFactors(f.name, f.module, f.ids.to(device), f.d.to(device), f.weight) for f in self.tokens]
        dense = None if self.dense is None else DenseGrads(self.dense.names, self.dense.sizes, self.dense.g.to(device))
        return SampleFactors(self.n, rows, toks, dense, self.dtype)


def factors_of(recording) -> SampleFactors:
    """The SampleFactors of a FastScorer Recording (see scorer.Recording.factors).

    Each layer takes its factored form when its recorded calls allow (every call split by sample);
    otherwise its parameters join the dense part. Dense gradients of norm layers come from their
    per-sample reductions (no vmap); everything else dense from one torch.func pass over the
    model for just those parameters."""
    sc, n = recording.scorer, recording.n
    acc = torch.float64 if recording.x.dtype == torch.float64 or sc.has_float64_parameters() else torch.float32
    out = SampleFactors(n, dtype=acc)
    dense_names: list[str] = []
    norm_parts: list[tuple[str, torch.Tensor]] = []
    usable = recording.rec is not None
    for r in sc.layer_routes():
        calls = recording.calls(r.module) if usable else []
        deltas = recording.deltas(r.module) if usable else []
        usable_calls = bool(calls) and len(deltas) == len(calls) and r.module not in recording.rec.unsupported \
            if usable else False
        kind = pairwise_kind(r.module, r.route) if r.route not in ("per_layer_func", "reference") else None
        if kind == "conv" and r.weight is not None and usable_calls and len(calls) == 1 and deltas[0] is not None \
                and call_rows(r.module, kind, calls[0], n) is not None:
            p = conv_rows(r.module, calls[0].input.detach(), deltas[0], n)
            if p is not None:                                    # the patches cut only if asked for
                xp, k, dil, st, dd = p
                out.rows.append(RowFactors(r.name, r.module, None, dd.to(acc).transpose(1, 2), dd.shape[-1],
                                           r.weight, r.bias, conv=ConvInput(xp.to(acc), k, dil, st)))
                continue
        if kind is not None and r.weight is not None and usable_calls:
            got = rows_of(r.module, kind, calls, deltas, n, flat=False)
            if got is False:
                continue                                         # no call reached the loss: zero gradient
            if got is not None:
                a, d, rows = got
                out.rows.append(RowFactors(r.name, r.module, a.to(acc), d.to(acc), rows, r.weight, r.bias))
                continue
        if r.route == "embedding" and usable_calls:
            pieces = [embedding_rows(r.module, c.input, dd, n) for c, dd in zip(calls, deltas) if dd is not None]
            if pieces and all(p is not None for p in pieces):
                ids = torch.cat([p[0] for p in pieces], 1)
                d = torch.cat([p[1] for p in pieces], 1).to(acc)
                out.tokens.append(TokenFactors(r.name, r.module, ids, d, r.weight))
                continue
            if not pieces:
                continue
        if r.route == "norm" and usable_calls:
            parts = [norm_grads(r.module, c.input, dd, n) for c, dd in zip(calls, deltas) if dd is not None]
            if parts and all(p is not None for p in parts):
                for local, full in (("weight", r.weight), ("bias", r.bias)):
                    if full is None:
                        continue
                    i = 0 if local == "weight" else 1
                    g = sum(p[i] for p in parts)
                    norm_parts.append((full, g.reshape(n, -1).detach().to(acc)))   # built from live inputs
                continue
            if not parts:
                continue
        dense_names.extend(r.params)
    names, blocks = [], []
    for full, g in norm_parts:
        names.append(full)
        blocks.append(g)
    dense_names = [nm for nm in dict.fromkeys(dense_names) if nm not in names]
    if dense_names:
        dev = recording.x.device
        with own_rng(dev):                                        # the caller's stream untouched
            g = per_sample_grads(sc.model, dense_names, recording.x, recording.y, sc.sample_loss)
        for nm in dense_names:
            names.append(nm)
            b = g[nm].reshape(n, -1).to(acc)
            blocks.append(b if recording.grad_scale == 1.0 else b * recording.grad_scale)
    if blocks:
        out.dense = DenseGrads(names, [b.shape[1] for b in blocks], torch.cat(blocks, 1))
    return out


def materialise(f: SampleFactors, shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """{parameter name: [n, *shape]}: the per-sample gradients the factors stand for, formed
    (for preconditioning them one by one: Adam's update map, an inverse-Hessian solve)."""
    out: dict[str, torch.Tensor] = {}
    for x in f.rows:
        if x.weight is not None:
            out[x.weight] = x.weight_grads().reshape(f.n, *shapes[x.weight])
        if x.bias is not None:
            out[x.bias] = x.bias_grads().reshape(f.n, *shapes[x.bias])
    for x in f.tokens:
        vocab, dim = shapes[x.weight]
        g = torch.zeros(f.n * vocab, dim, dtype=x.d.dtype, device=x.d.device)
        key = (torch.arange(f.n, device=x.ids.device).unsqueeze(1) * vocab + x.ids).reshape(-1)
        out[x.weight] = g.index_add_(0, key, x.d.reshape(-1, dim)).reshape(f.n, vocab, dim)
    if f.dense is not None:
        for nm, block in zip(f.dense.names, f.dense.g.split(f.dense.sizes, 1)):
            out[nm] = block.reshape(f.n, *shapes[nm])
    return out


def dense_factors(model: nn.Module, names: list[str], x: torch.Tensor, y: torch.Tensor, sample_loss) -> SampleFactors:
    """SampleFactors holding explicit per-sample gradients only (torch.func over the whole model):
    the reference route, for checking the factored one and for ``backend="reference"``."""
    g = per_sample_grads(model, names, x, y, sample_loss)
    n = int(x.shape[0])
    blocks = [g[nm].reshape(n, -1) for nm in names]
    acc = torch.float64 if any(b.dtype == torch.float64 for b in blocks) else torch.float32
    return SampleFactors(n, dense=DenseGrads(list(names), [b.shape[1] for b in blocks],
                                             torch.cat([b.to(acc) for b in blocks], 1)), dtype=acc)


__all__ = ["DenseGrads", "RowFactors", "SampleFactors", "TokenFactors", "dense_factors", "factors_of", "materialise"]
