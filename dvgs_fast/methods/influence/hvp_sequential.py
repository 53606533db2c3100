"""Exact Hessian-vector products of a Sequential model by Pearlmutter's R-operator, written out
as matrix products: the route the exact solvers (direct, CG, LiSSA, Arnoldi) take when the model
is an ``nn.Sequential`` of Linear layers, elementwise activations, Flatten and (hvp_conv.py: their
rules) Conv1d / Conv2d, max / average pools and eval-mode BatchNorm (hvp.py falls back to
autograd's double backward for anything else).

Why: double backward through autograd (vmapped over a chunk of vectors) recomputes what a
Sequential MLP does not need -- the input's gradient, the first layer's R-backward, vmap's
per-op batching rules -- and was 1.5x slower than pyDVL's torch.func LiSSA on the digits MLP.
Written out, K directions V = (dW_l, db_l) over n rows cost per layer (o x d):

    forward   Rz_l = a_{l-1} dW_lᵀ + Ra_{l-1} W_lᵀ + db_l,     Ra_l = σ'(z_l) ⊙ Rz_l
    output    Rg_L = H_out Rz_L                (the loss's per-row Hessian, by autograd on [n, C])
    backward  Rg_z = σ''(z) ⊙ Rz ⊙ g_a + σ'(z) ⊙ Rg_a
              R∇W_l = Σ_i Rg_z,i a_iᵀ + g_z,i Ra_iᵀ,   R∇b_l = Σ_i Rg_z,i
              Rg_a_{l-1} = Rg_z W_l + g_z dW_l

each a single GEMM over K·n rows; Ra_0 = 0 drops two of them in the first layer and nothing is
propagated below the first layer with scored parameters. The result is the true Hessian
(residual terms included, σ'' for smooth activations), equal to double backward to rounding
(python_tests/test_influence_hvp.py, float64).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from dvgs_fast.methods.influence import hvp_conv
from dvgs_fast.methods.influence.hvp_conv import CONVS, NORMS

# Elementwise activations whose σ', σ'' autograd gives on the pre-activation (no parameters).
_ELEMENTWISE = (nn.ReLU, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.SiLU, nn.Softplus, nn.ELU,
                nn.Hardtanh, nn.ReLU6, nn.Mish, nn.Identity)
# R-pass temporaries [n, K, width]: directions per chunk so that n·K·width stays about this (apply()).
_ELEMENTS = 1 << 18
# The layers with parameters (and a direction's dW, db): Linear, the convolutions, eval BatchNorm.
_PARAMETRIC = (nn.Linear,) + CONVS + NORMS
# Piecewise-linear activations: σ'' = 0 almost everywhere.
_PIECEWISE = (nn.ReLU, nn.LeakyReLU, nn.ReLU6, nn.Hardtanh)


def _layers(model: nn.Module) -> list[nn.Module] | None:
    """The modules in order if the model is a (nested) Sequential of Linear layers, elementwise
    activations, Flatten, inactive Dropout and the convolutions and pools of hvp_conv.takes --
    exactly these classes, not subclasses (whose forward may be anything) -- with at least one
    Linear or convolution; None otherwise."""
    if type(model) is nn.Linear:                 # a bare linear model (logistic regression)
        return [model]
    out = _flatten(model) if isinstance(model, nn.Sequential) else None
    return out if out is not None and any(type(m) in _PARAMETRIC for m in out) else None


def _flatten(seq: nn.Sequential) -> list[nn.Module] | None:
    out: list[nn.Module] = []
    for m in seq:
        if type(m) is nn.Sequential:
            sub = _flatten(m)
            if sub is None:
                return None
            out += sub
        elif type(m) in (nn.Linear,) + _ELEMENTWISE:
            out.append(m)
        elif type(m) is nn.Flatten and m.start_dim == 1 and m.end_dim == -1:
            out.append(m)
        elif type(m) is nn.Dropout and (not m.training or m.p == 0):
            out.append(nn.Identity())
        elif hvp_conv.takes(m):
            out.append(m)
        else:
            return None
    return out


class SequentialHVP:
    """v ↦ H_block v for a Sequential model (see the module doc); ``of(model, names)`` is None when
    the model does not qualify."""

    def __init__(self, layers: list[nn.Module], names: dict[int, tuple[str | None, str | None]]):
        self.layers = layers
        self.names = names                  # id(layer) -> (weight's name or None, bias's name or None)

    @classmethod
    def of(cls, model: nn.Module, names: list[str]) -> "SequentialHVP | None":
        layers = _layers(model)
        if layers is None:
            return None
        wanted = set(names)
        by_param = {id(p): n for n, p in model.named_parameters()}
        found: dict[int, tuple[str | None, str | None]] = {}
        for m in layers:
            if type(m) in _PARAMETRIC:
                w = by_param.get(id(m.weight))
                b = by_param.get(id(m.bias)) if m.bias is not None else None
                found[id(m)] = (w if w in wanted else None, b if b in wanted else None)
        covered = {n for pair in found.values() for n in pair if n is not None}
        if covered != wanted:                # a scored parameter outside the Linear / conv layers
            return None
        return cls(layers, found)

    def block(self, x: torch.Tensor, y: torch.Tensor, sample_loss: Callable, scale: float,
              V: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """{name: [K, *shape]} = scale · Σ_rows H_row v for each of the K directions in V
        ({name: [K, *shape]}, the model's dtype). None when a layer cannot take the rows' shape
        (a Linear more than 2-D input, a convolution other than a batch of feature maps)."""
        st = self.prepare(x, y, sample_loss, scale)
        return None if st is None else self.apply(st, V)

    @torch.no_grad()
    def prepare(self, x: torch.Tensor, y: torch.Tensor, sample_loss: Callable, scale: float) -> dict | None:
        """What does not depend on the directions, once per block of rows (and kept by the caller
        while the same rows come back, as every full pass over the Hessian's data does): the
        forward, each row's loss Hessian, the gradient at every layer, σ' and σ'', the max-pools'
        indices. None when a layer cannot take the rows' shape (see block())."""
        return self._prepare(x, y, sample_loss, scale)

    @torch.no_grad()
    def apply(self, st: dict, V: dict[str, torch.Tensor],
              out: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The R-passes for the directions V, in chunks whose [n, k, width] temporaries hold
        about _ELEMENTS numbers (1 MB in float32: they stay in a core's cache), written into
        `out` ({name: [K, *shape]}, e.g. views of one flat result) when given. Measured
        interleaved on this project's CPU, 1 thread, digits MLP 64-64-10: 100 rows x 300
        directions 30 ms in chunks of 2^17-2^18 elements, 52 ms in one chunk; 1,000 rows x 64
        directions 52 ms against 104 ms."""
        K = next(iter(V.values())).shape[0]
        k = self.chunk(st["n"], st["width"])
        if out is None:
            out = {n: torch.empty_like(v) for n, v in V.items()}
        for j in range(0, K, k):                 # out: [K, *shape] views of the caller's result
            for n, t in self._directions(st, {n: v[j:j + k] for n, v in V.items()}).items():
                out[n][j:j + k].copy_(t)
        return out

    @staticmethod
    def nbytes(st: dict) -> int:
        """Memory a prepared block holds (to bound what the caller keeps)."""
        seen = [t for key in ("saved", "grads", "pool", "folded") for t in st[key] if isinstance(t, torch.Tensor)]
        seen += [t for t in (st["patches"], st["stem"]) if t is not None]
        seen += [t for pair in st["slopes"] if pair is not None for t in pair if t is not None]
        if isinstance(st["H"], torch.Tensor):
            seen.append(st["H"])
        elif isinstance(st["H"], _SoftmaxHessian):
            seen.append(st["H"].p)
        return sum(t.numel() * t.element_size() for t in seen)

    def _prepare(self, x, y, sample_loss, scale) -> dict | None:
        h, saved, pool = x, [], [None] * len(self.layers)
        for i, m in enumerate(self.layers):        # each layer's input: a Linear's a, an activation's z
            if isinstance(m, nn.Linear) and h.dim() != 2:
                return None
            if type(m) in CONVS and h.dim() != m.weight.dim():       # [n, c, *spatial] only
                return None
            h = hvp_conv.layout(m, h)
            saved.append(h)
            if type(m) in hvp_conv.POOLS:
                h, pool[i] = hvp_conv.pool_prepare(m, h)
            else:
                h = m(h)
        out = h.detach().requires_grad_(True)
        with torch.enable_grad():
            g_out, = torch.autograd.grad(sample_loss(out, y).sum() * scale, out, create_graph=True)
        first = next(i for i, m in enumerate(self.layers) if type(m) in _PARAMETRIC and any(self.names[id(m)]))
        # the gradient w.r.t. each layer's output, and σ', σ'' of each activation, top down; the
        # R-passes read it at the outputs of the Linear / conv layers above the first and of the
        # smooth activations (σ''·g), so it is carried down only while a layer below needs it
        # (a CNN's stem: not through its largest maps)
        grads: list = [None] * len(self.layers)
        slopes: list = [None] * len(self.layers)
        reads = [i > first and (type(m) in _PARAMETRIC or (_activation(m) and type(m) not in _PIECEWISE))
                 for i, m in enumerate(self.layers)]
        g = g_out.detach()
        for i in range(len(self.layers) - 1, first - 1, -1):
            m, a = self.layers[i], saved[i]
            grads[i] = g
            if i == first:
                break
            if not any(reads[first:i]):            # nothing below reads g: the slopes, g not carried down
                if _activation(m):
                    s1, s2 = _slopes(m, a)
                    slopes[i] = (s1.unsqueeze(1), None if s2 is None else (s2 * g).unsqueeze(1))
                continue
            if isinstance(m, nn.Linear):
                g = g @ m.weight
            elif type(m) in CONVS:
                g = grads[i] = hvp_conv.layout(m, g)
                g = hvp_conv.conv_input_grad(m, a, g)
            elif type(m) in NORMS:
                g = hvp_conv.norm_input_grad(m, g)
            elif isinstance(m, nn.Flatten):
                g = g.reshape(a.shape)
            elif type(m) in hvp_conv.POOLS:
                g = hvp_conv.pool_input_grad(m, pool[i], a, g)
            elif not isinstance(m, nn.Identity):
                s1, s2 = _slopes(m, a)
                slopes[i] = (s1.unsqueeze(1), None if s2 is None else (s2 * g).unsqueeze(1))
                g = s1 * g
        softmax = getattr(sample_loss, "kind", None) == "cross_entropy" and out.dim() == 2 and y.dim() == 1 \
            and not y.is_floating_point()
        folded: list = [None] * len(self.layers)    # a max-pool's folded activation slope (hvp_conv.fold_slope)
        for i in range(first + 1, len(self.layers) - 1):
            if pool[i + 1] is not None and slopes[i] is not None and slopes[i][1] is None:
                folded[i + 1], slopes[i] = hvp_conv.fold_slope(pool[i + 1], slopes[i][0]), None
        P = hvp_conv.patches(self.layers[first], saved[first]) if x.shape[0] else None
        stem = None                                # first layer, activation, max-pool: at the maxima only
        if P is not None and first + 2 < len(self.layers) and folded[first + 2] is not None:
            stem = hvp_conv.stem_patches(P, pool[first + 2])
            P = None if stem is not None else P
        # the R-passes read the inputs of the Linear / conv layers and the gradients at their
        # outputs above the first; of the others only shapes (a CNN's largest maps: kept blocks
        # hold half as much)
        shapes = [t.shape for t in saved] + [out.shape]
        keep = [type(m) in _PARAMETRIC for m in self.layers]
        saved = [(hvp_conv.norm_normalised(m, t) if type(m) in NORMS else t) if k else None
                 for m, t, k in zip(self.layers, saved, keep)]      # (eval BatchNorm: x̂)
        grads = [t if k and i > first else None for i, (t, k) in enumerate(zip(grads, keep))]
        return {"saved": saved, "in_shape": shapes[:-1], "out_shape": shapes[1:], "first": first, "grads": grads,
                "slopes": slopes, "pool": pool, "folded": folded, "patches": P, "stem": stem, "n": int(x.shape[0]),
                "width": max(int(torch.Size(t[1:]).numel()) for t in shapes),
                "H": _SoftmaxHessian(out.detach(), scale) if softmax else _output_hessians(g_out, out)}

    def _directions(self, st: dict, V: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The R-forward and R-backward of one chunk of directions. The R-quantities are
        [n, K, features], so every product is one GEMM on views (a row-major [n, K·o] is both
        "n rows of K·o" and "n·K rows of o") and nothing [K, n, ...]-sized is transposed."""
        K = next(iter(V.values())).shape[0]
        saved, first, grads, slopes, n = st["saved"], st["first"], st["grads"], st["slopes"], st["n"]
        Rh = None                                  # [n, K, ...] or None (= 0)
        R_in: list[torch.Tensor | None] = []
        stem, first_pool = st["stem"], first + 2       # (stem: hvp_conv.stem_patches)
        for i, (m, a) in enumerate(zip(self.layers, saved)):
            R_in.append(Rh)
            if stem is not None and first <= i <= first_pool:
                if i == first:                     # R at the max-pool's output, the stem's three layers at once
                    wn, bn = self.names[id(m)]
                    Rh = hvp_conv.stem_forward(stem, None if wn is None else V[wn], None if bn is None else V[bn],
                                               st["folded"][first_pool], st["out_shape"][first_pool], K)
            elif isinstance(m, nn.Linear):
                wn, bn = self.names[id(m)]
                o = m.out_features
                Rz = None
                if wn is not None:                 # a dWᵀ for all K at once: [n, K·o]
                    # [d, K·o] in one copy (V is usually a strided view of a flat [K, p]); a
                    # transposed B would be a 2x slower GEMM
                    dWt = V[wn].permute(2, 0, 1).reshape(-1, K * o)
                    Rz = torch.addmm(V[bn].reshape(-1), a, dWt) if bn is not None else a @ dWt
                    Rz = Rz.view(n, K, o)
                elif bn is not None:
                    Rz = V[bn].unsqueeze(0).expand(n, K, o)
                if Rh is not None:
                    t = (Rh.reshape(n * K, -1) @ m.weight.t()).view(n, K, o)
                    Rz = t if Rz is None else Rz + t
                Rh = Rz
            elif type(m) in CONVS:
                wn, bn = self.names[id(m)]
                Rh = hvp_conv.conv_r_forward(m, a, Rh, None if wn is None else V[wn], None if bn is None else V[bn],
                                             st["out_shape"][i], K, st["patches"] if i == first else None)
            elif type(m) in NORMS:
                wn, bn = self.names[id(m)]
                Rh = hvp_conv.norm_r_forward(m, a, Rh, None if wn is None else V[wn], None if bn is None else V[bn], K)
            elif isinstance(m, nn.Flatten):
                Rh = None if Rh is None else Rh.reshape(n, K, -1)
            elif Rh is not None and type(m) in hvp_conv.POOLS:
                Rh = hvp_conv.pool_forward(m, st["pool"][i], Rh, st["folded"][i])
            elif Rh is not None and slopes[i] is not None:
                Rh = slopes[i][0] * Rh
        if Rh is None:
            return {k: torch.zeros_like(v) for k, v in V.items()}
        H = st["H"]
        if isinstance(H, torch.Tensor):            # [n, C, C]: Rg_i = Rz_i H_iᵀ
            Rg = torch.bmm(Rh, H.transpose(1, 2))
        else:
            Rg = H(Rh)
        res: dict[str, torch.Tensor] = {}
        for i in range(len(self.layers) - 1, first - 1, -1):
            m, a, Ra, g = self.layers[i], saved[i], R_in[i], grads[i]
            if stem is not None and first <= i <= first_pool:
                if i == first:                     # from R at the max-pool's output
                    wn, bn = self.names[id(m)]
                    RW, Rb = hvp_conv.stem_backward(m, stem, Rg, st["folded"][first_pool],
                                                    (wn is not None, bn is not None))
                    res.update({k: t for k, t in ((wn, RW), (bn, Rb)) if k is not None})
            elif isinstance(m, nn.Linear):
                wn, bn = self.names[id(m)]
                o, d = m.out_features, m.in_features
                if wn is not None:
                    RW = (Rg.reshape(n, K * o).t() @ a).view(K, o, d)           # Σ_i Rg_i a_iᵀ
                    if Ra is not None:                                         # + Σ_i g_i Ra_iᵀ
                        RW = RW + (g.t() @ Ra.reshape(n, K * d)).view(o, K, d).transpose(0, 1)
                    res[wn] = RW
                if bn is not None:
                    res[bn] = Rg.sum(0)
                if i > first:
                    Rg_new = (Rg.reshape(n * K, o) @ m.weight).view(n, K, d)
                    if wn is not None:
                        Rg_new += (g @ V[wn].transpose(0, 1).reshape(o, K * d)).view(n, K, d)
                    Rg = Rg_new
            elif type(m) in CONVS:
                wn, bn = self.names[id(m)]
                RW, Rb, Rg = hvp_conv.conv_r_backward(m, a, Ra, g, Rg, None if wn is None else V[wn],
                                                      (wn is not None, bn is not None), i > first,
                                                      st["patches"] if i == first else None)
                if wn is not None:
                    res[wn] = RW
                if bn is not None:
                    res[bn] = Rb
            elif type(m) in NORMS:
                wn, bn = self.names[id(m)]
                RW, Rb, Rg = hvp_conv.norm_r_backward(m, a, Ra, g, Rg, None if wn is None else V[wn],
                                                      (wn is not None, bn is not None), i > first)
                res.update({k: t for k, t in ((wn, RW), (bn, Rb)) if k is not None})
            elif isinstance(m, nn.Flatten):
                Rg = Rg.reshape(n, K, *st["in_shape"][i][1:])
            elif type(m) in hvp_conv.POOLS:
                Rg = hvp_conv.pool_backward(m, st["pool"][i], st["in_shape"][i], Rg, st["folded"][i])
            elif slopes[i] is not None:
                s1, s2g = slopes[i]
                Rg_new = s1 * Rg
                if Ra is not None and s2g is not None:
                    Rg_new += s2g * Ra
                Rg = Rg_new
        for k, v in V.items():
            if k not in res:                       # (setdefault would allocate the zeros for every key)
                res[k] = torch.zeros_like(v)
        return res

    # ------------------------------------------------------------------ one layer's Hessian block
    def largest_layer(self) -> int | None:
        """Index (in the flattened layers) of the Linear with the most scored parameters whose
        weight is scored and with no convolution, pool or batch-norm above it
        (_output_jacobian_hessian's R-passes know only Linear layers, Flatten and activations): the
        block worth building by kron_block() rather than by columns."""
        best, size = None, 0
        top = max([i for i, m in enumerate(self.layers) if hvp_conv.takes(m)], default=-1)   # (convs included)
        # (a block's flat indices: weight row-major, then the bias -- see HessianOperator.kron_block)
        for i, m in enumerate(self.layers):
            if type(m) is nn.Linear and i > top and self.names[id(m)][0] is not None:
                s = m.out_features * (m.in_features + (self.names[id(m)][1] is not None))
                if s > size:
                    best, size = i, s
        return best

    @torch.no_grad()
    def kron_block(self, st: dict, layer: int) -> torch.Tensor:
        """Σ_rows of this block of the Hessian's block for Linear `layer`'s (weight, bias):
        [o·d', o·d'] indexed (output unit, input column) with column d the bias when it is scored.

        Perturbing only this layer's parameters moves its output by Rz_i = dW a_i (+ db) and
        nothing below it, so its own block is exactly Σ_i (a_i a_iᵀ) ⊗ Q_i with Q_i = ∂²ℓ_i/∂z²
        the row's Hessian w.r.t. the layer's output (every layer above, residual terms included):
        o R-passes for the Q_i, then one GEMM over the rows -- n·d'²·o² multiply-adds instead of
        the o·d' Hessian-vector products that its columns would cost (digits MLP, 64 x 65 block,
        1,000 rows: 0.5 CPU s against ~4 s)."""
        m = self.layers[layer]
        n, o = st["n"], m.out_features
        a = st["saved"][layer]
        if self.names[id(m)][1] is not None:
            a = torch.cat([a, torch.ones(n, 1, dtype=a.dtype, device=a.device)], 1)
        d = a.shape[1]
        Q = self._output_jacobian_hessian(st, layer)                     # [n, o, o]
        pairs = (a.unsqueeze(2) * a.unsqueeze(1)).reshape(n, d * d)        # a_i a_iᵀ flattened
        G = pairs.t() @ Q.reshape(n, o * o)                                # [d·d, o·o]
        return G.view(d, d, o, o).permute(2, 0, 3, 1).reshape(o * d, o * d)

    def _output_jacobian_hessian(self, st: dict, layer: int) -> torch.Tensor:
        """Q [n, o, o]: each row's Hessian of its (scaled) loss w.r.t. Linear `layer`'s output,
        by R-passes along the o unit directions of that output in every row."""
        saved, slopes, n = st["saved"], st["slopes"], st["n"]
        o = self.layers[layer].out_features
        Rh = torch.eye(o, dtype=saved[layer].dtype, device=saved[layer].device).unsqueeze(0).expand(n, o, o)
        R_in: dict[int, torch.Tensor] = {}
        for i in range(layer + 1, len(self.layers)):                   # R-forward above the layer
            m = self.layers[i]
            R_in[i] = Rh
            if type(m) is nn.Linear:
                Rh = (Rh.reshape(n * o, -1) @ m.weight.t()).view(n, o, -1)
            elif type(m) is nn.Flatten:
                Rh = Rh.reshape(n, o, -1)
            elif slopes[i] is not None:
                Rh = slopes[i][0] * Rh
        H = st["H"]
        Rg = torch.bmm(Rh, H.transpose(1, 2)) if isinstance(H, torch.Tensor) else H(Rh)
        for i in range(len(self.layers) - 1, layer, -1):                 # R-backward down to it
            m = self.layers[i]
            if type(m) is nn.Linear:
                Rg = (Rg.reshape(n * o, -1) @ m.weight).view(n, o, -1)
            elif type(m) is nn.Flatten:
                Rg = Rg.reshape(n, o, *st["in_shape"][i][1:])
            elif slopes[i] is not None:
                s1, s2g = slopes[i]
                Rg = s1 * Rg + (s2g * R_in[i] if s2g is not None else 0)
        return Rg                                                       # [n, o (direction), o]

    @staticmethod
    def chunk(n_rows: int, width: int) -> int:
        """Directions per pass for n_rows rows and a widest layer of `width`."""
        return max(1, _ELEMENTS // max(1, n_rows * width))


class _SoftmaxHessian:
    """Rz [n, K, C] -> H Rz for the per-row Hessians of (scaled) cross-entropy on logits [n, C]
    with class labels: H_i = scale·(diag(p_i) − p_i p_iᵀ), p_i = softmax. Applied elementwise, not
    formed: C autograd backward passes per block of rows (what _output_hessians does for any loss)
    cost more than the products they feed at LiSSA's 100-row blocks (~3 of its ~50 ms per
    iteration on the digits MLP), and a bmm with [C, C] matrices runs far below GEMM speed."""

    def __init__(self, out: torch.Tensor, scale: float):
        self.p = torch.softmax(out, 1).unsqueeze(1)                     # [n, 1, C]
        self.scale = scale

    def __call__(self, Rz: torch.Tensor) -> torch.Tensor:
        pr = Rz * self.p
        return pr.sub_(self.p * pr.sum(-1, keepdim=True)).mul_(self.scale)


def _output_hessians(g_out: torch.Tensor, out: torch.Tensor):
    """Each row's loss Hessian w.r.t. its output, as [n, C, C], or (outputs wider than 128 or
    not [n, C]) a function Rz [n, K, ...] -> H Rz by a batched backward. Rows are independent
    (per-sample losses), so backward of g_out along the c-th unit vector in every row gives
    row c of every row's Hessian: C backward passes build all of them. (vmap of cross-entropy's
    double backward falls back to a loop over the directions.)"""
    if out.dim() != 2 or out.shape[1] > 128:
        def apply(Rz: torch.Tensor) -> torch.Tensor:
            Rt = Rz.transpose(0, 1).reshape(Rz.shape[1], *out.shape)
            with torch.enable_grad():
                got = torch.autograd.grad(g_out, out, grad_outputs=Rt, is_grads_batched=True, retain_graph=True)[0]
            return got.reshape(Rz.shape[1], out.shape[0], -1).transpose(0, 1)
        return apply
    C = out.shape[1]
    rows = []
    with torch.enable_grad():
        for c in range(C):
            e = torch.zeros_like(out)
            e[:, c] = 1
            rows.append(torch.autograd.grad(g_out, out, grad_outputs=e, retain_graph=c < C - 1)[0])
    return torch.stack(rows, 1)                                       # [n, C, C]: H[i, c, :]


def _activation(m: nn.Module) -> bool:
    """An elementwise activation with slopes (nn.Identity has none)."""
    return type(m) in _ELEMENTWISE and type(m) is not nn.Identity


def _slope(m: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """σ'(z) of an elementwise activation (autograd on a copy: exact for any of _ELEMENTWISE)."""
    if isinstance(m, nn.ReLU):
        return (z > 0).to(z.dtype)
    with torch.enable_grad():
        zz = z.detach().requires_grad_(True)
        s1, = torch.autograd.grad(m(zz).sum(), zz)
    return s1


def _slopes(m: nn.Module, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(σ'(z), σ''(z)); elementwise, so the gradient of Σσ' is σ''. None for σ'' = 0."""
    if isinstance(m, _PIECEWISE):
        return _slope(m, z), None                 # piecewise linear: σ'' = 0 almost everywhere
    with torch.enable_grad():
        zz = z.detach().requires_grad_(True)
        s1, = torch.autograd.grad(m(zz).sum(), zz, create_graph=True)
        s2, = torch.autograd.grad(s1.sum(), zz, allow_unused=True)
    return s1.detach(), s2


__all__ = ["SequentialHVP"]
