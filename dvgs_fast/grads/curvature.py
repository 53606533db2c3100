"""Curvature from the engine's recordings: Gauss-Newton pseudo-gradients of a batch, and the
K-FAC / EK-FAC factors built from them per Linear / Conv1d / Conv2d / Embedding layer.

Pseudo-gradients (``fisher_factors``). The Gauss-Newton matrix of a loss ℓ(f(x; θ), y) is
(1/N) Σ_i J_iᵀ H_i J_i with H_i = ∇²_out ℓ_i. Writing H_i = M_i M_iᵀ, it is (1/N) Σ_i Σ_c g_ic g_icᵀ
where g_ic is the gradient backpropagated from the output vector M_i[:, c] -- so each column is
one ordinary backward to the recorded layers, and the engine's factored form (a, δ per row)
holds every g_ic without forming it. ``fisher`` picks the columns:

* "ggn": all of them, exact: cross-entropy on [N, C] logits M = (√p_c (e_c − p))_c; "mse"
  (the mean over k output elements) √(2/k)·I; a callable loss, or cross-entropy over extra
  output dims, the symmetric square root of its output Hessian by torch.func. k backward passes.
* "sampled": one column drawn so that E[u uᵀ] = H_i -- e_ỹ − p with ỹ drawn from the model's
  predictive distribution (scaled by 1/√T for a mean over T positions), √(2/k)·ε for "mse": the
  true Fisher's one-sample estimate, Kronfluence's default. Seeded by the caller's generator.
* "empirical": the gradient of the loss at the true labels (the empirical Fisher; Kronfluence's
  ``use_empirical_fisher=True``, and what DataInf uses).

K-FAC factors (``KroneckerFactors``), for a layer whose per-sample gradient (one column) is
G_i = Σ_t δ_it ā_itᵀ, ā = [a, 1] when the layer has a bias (Kronfluence's convention), t over the
sample's L rows (1 for a plain input; sequence positions; conv output positions, a the unfolded
patch):

    A = (1/(N·L)) Σ_{i,t} ā_it ā_itᵀ,      S = (1/N) Σ_{i,t,c} δ_itc δ_itcᵀ,

the "K-FAC-expand" convention (Eschenhagen et al. 2023; Grosse & Martens' KFC for convolutions),
which makes A ⊗ S the Gauss-Newton block exactly when L = 1 and a, δ are independent (a single
Linear layer under MSE: the output Hessian is constant). Kronfluence divides S by N·L as well,
so its K-FAC differs from this one by the factor L on layers with L > 1 (a pure rescaling); the
eigenbases and EK-FAC's corrected eigenvalues are the same. Embedding: a is the one-hot token, so
A = diag(token counts)/(N·T) and its eigenbasis is the identity.

EK-FAC (George et al. 2018) keeps the eigenbases Q_A, Q_S and replaces the eigenvalues by
Λ_kl = (1/N) Σ_{i,c} ((Q_Sᵀ G_ic Q_A)_kl)², from the per-sample gradients projected into the
eigenbasis one block at a time and never stored: with L = 1 the square of the outer product is
the outer product of the squares, Λ += (δ̃²)ᵀ(ã²) -- one GEMM, no per-sample gradient at all.

Sums are kept (``state()``), so blocks can be added in any order, across ranks (all-reduce) and
across a resumed run.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from dvgs_fast.grads.factors import RowFactors, SampleFactors, TokenFactors
from dvgs_fast.grads.pairwise import pairwise_kind

FISHERS = ("ggn", "sampled", "empirical")

# Elements of the largest temporary of a block (projected per-sample gradients for L > 1).
_BLOCK = 1 << 23


def kfac_routes(scorer) -> tuple[list, list[str]]:
    """(routes K-FAC covers, selected parameters it leaves out): plain Linear, ungrouped
    Conv1d/Conv2d and Embedding layers are covered; norms, other layers and tied weights are not."""
    covered, left = [], []
    for r in scorer.layer_routes():
        if r.weight is not None and (pairwise_kind(r.module, r.route) is not None or r.route == "embedding"):
            covered.append(r)
        else:
            left.extend(r.params)
    return covered, left


def _output_hessian_sqrt(loss, sample_loss, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """M [N, k, r] with M_i M_iᵀ = ∇²_out ℓ_i (k = output elements per sample)."""
    n = out.shape[0]
    o = out.detach()
    if loss == "cross_entropy" and o.dim() == 2:
        p = torch.softmax(o, 1)
        eye = torch.eye(o.shape[1], dtype=o.dtype, device=o.device)
        return (eye.unsqueeze(0) - p.unsqueeze(2)) * p.sqrt().unsqueeze(1)        # [i, k, c] = √p_c (δ_kc − p_k)
    if loss == "mse":
        k = o[0].numel()
        eye = torch.eye(k, dtype=o.dtype, device=o.device) * math.sqrt(2.0 / k)
        return eye.unsqueeze(0).expand(n, k, k)
    from torch.func import hessian, vmap

    def one(oi, yi):
        return sample_loss(oi.unsqueeze(0), yi.unsqueeze(0)).sum()

    h = vmap(hessian(one))(o, y).reshape(n, o[0].numel(), o[0].numel())
    h = 0.5 * (h + h.transpose(1, 2))
    e, v = torch.linalg.eigh(h)
    return v * e.clamp_min(0).sqrt().unsqueeze(1)


def _sampled_column(loss, out: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """u [N, *out] with E[u uᵀ] = ∇²_out ℓ_i (one draw)."""
    o = out.detach()
    if loss == "cross_entropy":
        logits = o.movedim(1, -1)                                   # [N, ..., C]
        p = torch.softmax(logits, -1)
        flat = p.reshape(-1, p.shape[-1])
        draw = torch.multinomial(flat.cpu().double(), 1, generator=gen).reshape(-1).to(o.device)
        u = -flat
        u[torch.arange(flat.shape[0], device=o.device), draw] += 1.0
        positions = flat.shape[0] // o.shape[0]
        return (u / math.sqrt(positions)).reshape(logits.shape).movedim(-1, 1)
    if loss == "mse":
        k = o[0].numel()
        eps = torch.randn(o.shape, generator=gen, dtype=torch.float64).to(device=o.device, dtype=o.dtype)
        return eps * math.sqrt(2.0 / k)
    raise ValueError("fisher: 'sampled' needs loss 'cross_entropy' or 'mse' (the model's predictive "
                     "distribution); use fisher='ggn' or 'empirical' with a custom loss")


def fisher_factors(scorer, x: torch.Tensor, y: torch.Tensor, fisher: str, loss,
                   gen: torch.Generator | None = None) -> Iterator[SampleFactors]:
    """The batch's pseudo-gradients in factored form, one SampleFactors per column (see the
    module doc): their outer products summed over the columns are the Gauss-Newton (fisher="ggn"),
    its one-sample estimate ("sampled") or the empirical Fisher ("empirical"). One forward; one
    backward per column. The scorer's model must be in the mode to be measured (eval)."""
    from dvgs_fast.grads.scorer import Recording
    if fisher == "empirical":
        yield scorer.record(x, y).factors()
        return
    with scorer.recorder() as rec:
        out = scorer.model(x)
    outputs = scorer.grad_outputs(rec)
    if not outputs:
        return
    if fisher == "sampled":
        cols = [_sampled_column(loss, out, gen)]
    else:
        m = _output_hessian_sqrt(loss, scorer.sample_loss, out, y)
        cols = [m[:, :, c].reshape(out.shape) for c in range(m.shape[2])]
    for j, u in enumerate(cols):
        deltas = torch.autograd.grad(out, outputs, grad_outputs=u, retain_graph=j + 1 < len(cols), allow_unused=True)
        yield Recording(scorer, x, y, rec, deltas, []).factors()


@dataclass
class LayerFactors:
    """One layer's Kronecker factors (sums) and, once decomposed, its eigenbases.

    kind "rows" (Linear/conv: A [d_in(+1), d_in(+1)]) or "tokens" (Embedding: A diagonal, [vocab]);
    S [d_out, d_out] (Embedding: [dim, dim]); lam: EK-FAC's corrected eigenvalues (sums),
    [d_out, d_in(+1)] for rows, [vocab, dim] for tokens."""

    name: str
    kind: str
    weight: str
    bias: str | None
    A: torch.Tensor
    S: torch.Tensor
    a_count: float = 0.0            # rows seen (N·L): A's normaliser
    s_count: float = 0.0            # samples seen (N): S's normaliser
    lam: torch.Tensor | None = None
    lam_count: float = 0.0
    QA: torch.Tensor | None = None  # eigenvectors (None for tokens: the identity)
    eA: torch.Tensor | None = None
    QS: torch.Tensor | None = None
    eS: torch.Tensor | None = None

    def covariances(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, S) normalised (A diagonal as a vector for tokens)."""
        return self.A / max(self.a_count, 1.0), self.S / max(self.s_count, 1.0)

    def kfac_eigenvalues(self) -> torch.Tensor:
        """eS ⊗ eA in the gradient's matrix layout: [d_out, d_in(+1)] rows, [vocab, dim] tokens."""
        if self.kind == "rows":
            return self.eS.unsqueeze(1) * self.eA.unsqueeze(0)
        return self.eA.unsqueeze(1) * self.eS.unsqueeze(0)

    def ekfac_eigenvalues(self) -> torch.Tensor:
        return self.lam / max(self.lam_count, 1.0)


_SUMS = ("A", "S", "lam")
_COUNTS = ("a_count", "s_count", "lam_count")
_EIGEN = ("QA", "eA", "QS", "eS")


class KroneckerFactors:
    """K-FAC / EK-FAC factors of every covered layer, accumulated blockwise (module doc).

    layers: {name: LayerFactors}. ``add_covariances(columns)`` with the SampleFactors of one
    batch (all columns of ``fisher_factors``), ``eigendecompose()``, ``add_lambda(columns)``;
    ``state()`` / ``from_state()`` to save and resume; ``reduce(fn)`` applies an all-reduce to
    every sum."""

    def __init__(self, dtype: torch.dtype = torch.float64):
        self.dtype = dtype
        self.layers: dict[str, LayerFactors] = {}

    # -------------------------------------------------------------------- covariances
    def add_covariances(self, columns: list[SampleFactors]) -> None:
        if not columns:
            return
        first = columns[0]
        for f in first.rows:
            lay = self._layer_rows(f)
            lay.A += _row_covariance(f.a3(), f.bias is not None, self.dtype)
            lay.a_count += f.n * f.rows
            lay.s_count += first.n
        for f in first.tokens:
            lay = self._layer_tokens(f)
            ids = f.ids.reshape(-1)
            lay.A.index_add_(0, ids, torch.ones(ids.shape[0], dtype=self.dtype, device=ids.device))
            lay.a_count += ids.shape[0]
            lay.s_count += first.n
        for col in columns:
            for f in col.rows:
                self.layers[f.name].S += _row_covariance(f.d3(), False, self.dtype)
            for f in col.tokens:
                d = f.d.to(self.dtype).reshape(-1, f.d.shape[-1])
                self.layers[f.name].S += d.t() @ d

    def _layer_rows(self, f: RowFactors) -> LayerFactors:
        if f.name not in self.layers:
            d_in = f.d_in + (1 if f.bias is not None else 0)
            z = dict(dtype=self.dtype, device=f.device())
            self.layers[f.name] = LayerFactors(f.name, "rows", f.weight, f.bias, torch.zeros(d_in, d_in, **z),
                                               torch.zeros(f.d_out, f.d_out, **z))
        return self.layers[f.name]

    def _layer_tokens(self, f: TokenFactors) -> LayerFactors:
        if f.name not in self.layers:
            vocab, dim = f.module.num_embeddings, f.d.shape[-1]
            z = dict(dtype=self.dtype, device=f.d.device)
            self.layers[f.name] = LayerFactors(f.name, "tokens", f.weight, None, torch.zeros(vocab, **z),
                                               torch.zeros(dim, dim, **z))
        return self.layers[f.name]

    # -------------------------------------------------------------------- eigenbases
    def eigendecompose(self) -> None:
        """Q_A, e_A, Q_S, e_S of the normalised factors (eigenvalues clipped at 0: PSD up to rounding)."""
        for lay in self.layers.values():
            A, S = lay.covariances()
            if lay.kind == "rows":
                eA, QA = torch.linalg.eigh(0.5 * (A + A.t()))
                lay.QA, lay.eA = QA, eA.clamp_min(0)
            else:
                lay.QA, lay.eA = None, A.clamp_min(0)
            eS, QS = torch.linalg.eigh(0.5 * (S + S.t()))
            lay.QS, lay.eS = QS, eS.clamp_min(0)

    # -------------------------------------------------------------------- EK-FAC eigenvalues
    def add_lambda(self, columns: list[SampleFactors]) -> None:
        """Add Σ_i Σ_c ((Q_Sᵀ G_ic Q_A)_kl)² of this batch (eigendecompose() first)."""
        for ci, col in enumerate(columns):
            for f in col.rows:
                lay = self.layers[f.name]
                if lay.lam is None:
                    lay.lam = torch.zeros(lay.S.shape[0], lay.A.shape[0], dtype=self.dtype, device=lay.A.device)
                lay.lam += _projected_square_sum(f, lay, self.dtype)
                if ci == 0:
                    lay.lam_count += col.n
            for f in col.tokens:
                lay = self.layers[f.name]
                if lay.lam is None:
                    lay.lam = torch.zeros(lay.A.shape[0], lay.S.shape[0], dtype=self.dtype, device=lay.A.device)
                lay.lam += _token_square_sum(f, lay, self.dtype)
                if ci == 0:
                    lay.lam_count += col.n

    # -------------------------------------------------------------------- persistence
    def state(self) -> dict:
        out = {}
        for name, lay in self.layers.items():
            out[name] = {"kind": lay.kind, "weight": lay.weight, "bias": lay.bias,
                         **{k: getattr(lay, k) for k in _SUMS + _COUNTS + _EIGEN}}
        return {"dtype": str(self.dtype).replace("torch.", ""), "layers": out}

    @classmethod
    def from_state(cls, state: dict) -> "KroneckerFactors":
        kf = cls(getattr(torch, state["dtype"]))
        for name, s in state["layers"].items():
            kf.layers[name] = LayerFactors(name, s["kind"], s["weight"], s["bias"],
                                           **{k: s[k] for k in _SUMS + _COUNTS + _EIGEN})
        return kf

    def reduce(self, fn: Callable[[torch.Tensor], torch.Tensor], what: str = "covariances") -> None:
        """Replace every sum (and count) of `what` ("covariances" or "lambda") by fn(sum): an
        all-reduce over ranks, each of which added its own blocks."""
        for lay in self.layers.values():
            keys = (("A", "a_count"), ("S", "s_count")) if what == "covariances" else (("lam", "lam_count"),)
            for t, c in keys:
                setattr(lay, t, fn(getattr(lay, t)))
                setattr(lay, c, float(fn(torch.tensor([getattr(lay, c)], dtype=torch.float64))[0]))


def _row_covariance(x: torch.Tensor, bias: bool, dtype) -> torch.Tensor:
    """Σ over every row r of [x_r, 1][x_r, 1]ᵀ (without the 1 when not `bias`), x [n, rows, k]
    in any strides. With one row per sample one GEMM; with several (a conv's positions, whose
    per-sample view is channel-major) Σ_i x_iᵀ x_i by bmm, a block of samples at a time, which
    reads the view as it is instead of copying it to [n·rows, k] first."""
    n, rows, k = x.shape
    x = x.to(dtype)
    if rows == 1:
        x2 = x.reshape(n, k)
        c = x2.t() @ x2
    else:
        step = max(1, _BLOCK // max(1, k * k))
        c = torch.zeros(k, k, dtype=dtype, device=x.device)
        for s in range(0, n, step):
            xs = x[s:s + step]
            c += torch.bmm(xs.transpose(1, 2), xs).sum(0)
    if not bias:
        return c
    tot = x.sum((0, 1))
    out = torch.empty(k + 1, k + 1, dtype=dtype, device=x.device)
    out[:k, :k] = c
    out[:k, k] = tot
    out[k, :k] = tot
    out[k, k] = n * rows
    return out


def _projected_square_sum(f: RowFactors, lay: LayerFactors, dtype) -> torch.Tensor:
    """Σ_i ((Q_Sᵀ G_i Q_A)_kl)² over this layer's samples, G_i = Σ_t δ_t ā_tᵀ."""
    QA, QS = lay.QA, lay.QS
    if f.rows == 1:                                          # per sample: the square of an outer product
        a = f.a3().reshape(f.n, -1).to(dtype)
        a = (a @ QA[:-1] + QA[-1]) if f.bias is not None else a @ QA      # ā @ Q_A without forming ā
        d = f.d3().reshape(f.n, -1).to(dtype) @ QS
        return (d * d).t() @ (a * a)
    # several rows (a conv's positions): the per-sample gradients, projected, a block at a time
    out = torch.zeros(QS.shape[1], QA.shape[1], dtype=dtype, device=QS.device)
    bias = f.bias_grads().to(dtype) if f.bias is not None else None
    for s, g in f.weight_grad_blocks(_BLOCK):
        g = g.to(dtype)
        if bias is not None:
            g = torch.cat([g, bias[s:s + g.shape[0]].unsqueeze(2)], 2)
        p = QS.t() @ g @ QA                                                 # [b, d_out, d_in']
        out += (p * p).sum(0)
    return out


def _token_square_sum(f: TokenFactors, lay: LayerFactors, dtype) -> torch.Tensor:
    """Σ_i ((G_i Q_S)_vk)² for an Embedding, G_i = Σ_t e_{id_t} δ_tᵀ (rows of repeated ids add first)."""
    n, t = f.ids.shape
    vocab, dim = lay.A.shape[0], f.d.shape[-1]
    d = f.d.to(dtype).reshape(n * t, dim) @ lay.QS
    key = (torch.arange(n, device=f.ids.device).unsqueeze(1) * vocab + f.ids).reshape(-1)
    uniq, inv = torch.unique(key, return_inverse=True)
    rows = torch.zeros(uniq.numel(), dim, dtype=dtype, device=d.device).index_add_(0, inv, d)
    return torch.zeros(vocab, dim, dtype=dtype, device=d.device).index_add_(0, uniq % vocab, rows * rows)


__all__ = ["FISHERS", "KroneckerFactors", "LayerFactors", "fisher_factors", "kfac_routes"]
