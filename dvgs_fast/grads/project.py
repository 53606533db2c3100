"""Random projections of per-sample gradients, taken from their factored form (factors.py).

A Linear / conv layer's per-sample gradient is G_i = Σ_t δ_t ã_tᵀ ([d_out, d_in], ã = the input
with a 1 appended for the bias). Three structures project it to k numbers, per layer:

* "kronecker" (LoGra, Choe et al. 2024): P = P_out ⊗ P_in, k = k_out·k_in,
      P_out G_i P_inᵀ = Σ_t (P_out δ_t)(P_in ã_t)ᵀ              [k_out, k_in]
  two small products per row, cost ~ √k (d_out + d_in); the coarsest: on a rank-one gradient
  the relative variance of ⟨Pg, Ph⟩ is ~2/k_out + 2/k_in (~4/√k);
* "khatri_rao" (the rows of P are u_r ⊗ v_r, each pair drawn on its own):
      (P g_i)_r = Σ_t (u_rᵀ δ_t)(v_rᵀ ã_t) / √k                  [k]
  cost k (d_out + d_in) per row, still no G_i formed; relative variance ~8/k;
* "dense": G_i formed from the factors and one dense JL matrix applied, cost k·d_out·d_in; ~2/k.

On the digits MLP of bench/bench_trak.py (k = 512, one model) TRAK's LDS is 0.47 (Kronecker),
~0.51 (Khatri-Rao and dense) -- Khatri-Rao keeps the dense projection's quality at the cost of
the Kronecker one's order, so it is the default. An Embedding layer's gradient puts δ_t on row
id_t: Kronecker P_v G P_dᵀ = Σ_t P_v[:, id_t](P_d δ_t)ᵀ, Khatri-Rao Σ_t u_r[id_t](v_rᵀ δ_t).
Every other selected parameter (the engine's DenseGrads) gets a dense Johnson-Lindenstrauss
matrix applied to its explicit per-sample gradients, block by block of parameters (generated
from the seed per block, cached up to ``cache_bytes``); so does any layer whose k reaches its
gradient's size (then the identity: exact).

Conventions (so that the projection is one linear map, reproducible from its description):

* entries are N(0, 1/k) ("gaussian") or ±1/√k ("rademacher") per side (Khatri-Rao: u_r scaled
  1/√k, v_r unscaled), so E⟨Pg, Ph⟩ = ⟨g, h⟩; a Kronecker side whose k is at least its width is
  not projected (the identity: exact and cheaper);
* layer l's side matrices come from a torch.Generator seeded with a 63-bit seed derived from
  (seed, crc32 of the layer's name, side); the dense part's blocks from (seed, crc32, block);
  matrices are drawn in float32 and cast, so float32 and float64 runs use the same numbers;
* a layer's block of the projected vector is P vec(G) with G row-major (columns = input
  features then the bias) -- for Kronecker vec(P_out G P_inᵀ) in row-major (k_out, k_in) order;
  layers in the engine's order (Linear/conv, Embedding, then the dense part).

``Projector(dim)`` splits a total dimension over the layers in proportion to their parameter
counts (no layer beyond its own size; Kronecker: k_out·k_in within 5% of k, split to vary least:
k_out ≈ k_in ≈ √k, or a narrow side whole, see ``_split``); ``layer_dims`` sets any layer's own (an int, or (k_out, k_in): Kronecker). The plan is made
from the first factors projected (``plan``) or from shapes (``plan_layers``), and fingerprinted.
"""
from __future__ import annotations

import hashlib
import json
import math
import zlib
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from dvgs_fast.grads.factors import DenseGrads, RowFactors, SampleFactors, TokenFactors

KINDS = ("gaussian", "rademacher")
STRUCTURES = ("khatri_rao", "kronecker", "dense")
DENSE = "<dense>"
# Parameters per generated block of a dense projection (fixed: the numbers must not depend on memory).
_DENSE_BLOCK = 8192
# Entries of per-sample gradients formed at once for a dense-structure layer.
_FORM_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class LayerPlan:
    """One layer's projection: its gradient [d_out, d_in] -> [k_out, k_in] (a side with k == d is
    the identity). kind: "rows" (Linear/conv), "tokens" (Embedding) or "dense" (d_out = k_out = 1)."""

    name: str
    kind: str
    d_out: int
    d_in: int
    k_out: int
    k_in: int
    seed: int
    offset: int                          # first column of this layer in the projected vector
    weight: str | None = None            # parameter names (rows/tokens)
    bias: str | None = None
    params: tuple[str, ...] = ()         # dense: the parameters, in order
    sizes: tuple[int, ...] = ()
    structure: str = "kronecker"         # "kronecker" | "khatri_rao" (k_out = 1, k_in = k) | "dense" (the same)

    @property
    def dim(self) -> int:
        return self.k_out * self.k_in

    @property
    def width(self) -> int:
        """Entries of the layer's gradient (d_out · d_in)."""
        return self.d_out * self.d_in

    def projects(self, side: str) -> bool:
        if self.structure == "dense":
            return side == "in" and self.k_in < self.width
        if self.structure == "khatri_rao":
            return True
        return (self.k_out < self.d_out) if side == "out" else (self.k_in < self.d_in)


def _derive(seed: int, *salt: int) -> int:
    # Shift a Python int: numpy 1.23 refuses uint64 >> int (no safe common type).
    return int(np.random.SeedSequence([int(seed), *map(int, salt)]).generate_state(1, dtype=np.uint64)[0]) >> 1


def _draw(shape: tuple[int, int], kind: str, seed: int, scale_k: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        m = torch.randn(shape, generator=g, dtype=torch.float32)
    else:
        m = torch.randint(0, 2, shape, generator=g, dtype=torch.int8).to(torch.float32).mul_(2).sub_(1)
    return m.div_(math.sqrt(scale_k))


def _split(k: int, d_out: int, d_in: int) -> tuple[int, int]:
    """(k_out, k_in) for a Kronecker layer: among the products k_out·k_in ≤ k within 5% of the
    largest (k_out ≤ d_out, k_in ≤ d_in), the one whose projected inner products vary least
    on aligned pairs of gradients (a query and the samples closest to it: the scores that decide
    a ranking). Each side adds ~2/k_side to the relative variance there, nothing when k_side
    reaches its width (the identity), so the sum is smallest with the sides balanced,
    k_out ≈ k_in ≈ √k, or with a narrow side kept whole and the rest of k on the other. (On
    near-orthogonal pairs the error is ~1/k whatever the split.) Ties: the larger product, then
    fewer output rows.

    The split used to follow the layer's aspect d_out/d_in: a 100 x 2049 layer at k = 1024 got
    7 x 146, relative variance ~0.30 on aligned pairs against 0.125 at 32 x 32 (test_project), and
    2049 x 146 multiply-adds per sample on its input side against 2049 x 32. On the digits MLP
    (bench/results/projection_split.md, 3 projection seeds, same per-layer k): DVEmb's Spearman
    with its trajectory LOO 0.43 -> 0.51 at k = 1024 (0.41 -> 0.46 at 512); TRAK's LDS at k = 512
    unchanged (0.517 -> 0.516 one model, 0.613 -> 0.609 five), LoGra's 0.551 -> 0.544."""
    k = max(1, min(int(k), d_out * d_in))
    cands = []
    for k_out in range(1, d_out + 1):
        k_in = min(d_in, k // k_out)
        if k_in < 1:
            break
        var = (2.0 / k_out if k_out < d_out else 0.0) + (2.0 / k_in if k_in < d_in else 0.0)
        cands.append((k_out * k_in, round(var, 12), k_out, k_in))
    top = max(c[0] for c in cands)
    _, _, k_out, k_in = min((c for c in cands if c[0] >= 0.95 * top), key=lambda c: (c[1], -c[0], c[2]))
    return k_out, k_in


class Projector:
    """A reproducible random projection of per-sample gradients (see the module docstring).

    dim          total projected dimension, split over the layers (None: layer_dims must name each)
    layer_dims   {layer name (or "<dense>"): k or (k_out, k_in)} for layers that set their own
    kind         "gaussian" or "rademacher"
    seed         the base seed; each layer's matrices are derived from it and the layer's name
    structure    for Linear / conv / Embedding layers: "khatri_rao" (default), "kronecker" or
                 "dense" (module docstring; a layer_dims tuple is always Kronecker)
    cache_bytes  dense matrices kept in memory up to this size (else regenerated per call)
    """

    def __init__(self, dim: int | None = 4096, *, layer_dims: dict[str, Any] | None = None, kind: str = "gaussian",
                 seed: int = 0, structure: str = "khatri_rao", cache_bytes: int = 256 << 20):
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1):
            raise ValueError(f"dim: expected a positive integer or None, got {dim!r}")
        if kind not in KINDS:
            raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
        if structure not in STRUCTURES:
            raise ValueError(f"structure: expected one of {STRUCTURES}, got {structure!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed: expected a non-negative integer, got {seed!r}")
        self.layer_dims = {}
        for name, v in (layer_dims or {}).items():
            if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(x, (int, np.integer)) and x > 0
                                                                    for x in v):
                self.layer_dims[str(name)] = (int(v[0]), int(v[1]))
            elif isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0:
                self.layer_dims[str(name)] = int(v)
            else:
                raise ValueError(f"layer_dims: {name!r} -> {v!r}: expected a positive int or (k_out, k_in)")
        self.dim_requested = None if dim is None else int(dim)
        self.kind, self.seed, self.cache_bytes = kind, int(seed), int(cache_bytes)
        self.structure = structure
        self.layers: list[LayerPlan] | None = None
        self._cache: dict[tuple, torch.Tensor] = {}

    # ------------------------------------------------------------------------------ planning
    @property
    def dim(self) -> int:
        """The projected dimension (known once planned)."""
        if self.layers is None:
            raise RuntimeError("Projector: not planned yet (project() or plan() a first batch of factors)")
        return sum(p.dim for p in self.layers)

    def plan(self, f: SampleFactors) -> "Projector":
        """Plan from the layers of a first set of factors (a no-op once planned, after checking
        that these factors have the same layers)."""
        specs = []
        for x in f.rows:
            d_in = (x.d_in if x.weight is not None else 0) + (1 if x.bias is not None else 0)
            specs.append(dict(name=x.name, kind="rows", d_out=int(x.d_out), d_in=int(d_in),
                              weight=x.weight, bias=x.bias))
        for x in f.tokens:
            specs.append(dict(name=x.name, kind="tokens", d_out=int(x.module.num_embeddings), d_in=int(x.d.shape[-1]),
                              weight=x.weight))
        if f.dense is not None:
            specs.append(dict(name=DENSE, kind="dense", d_out=1, d_in=int(sum(f.dense.sizes)),
                              params=tuple(f.dense.names), sizes=tuple(int(s) for s in f.dense.sizes)))
        return self.plan_layers(specs)

    def plan_layers(self, specs: list[dict]) -> "Projector":
        """Plan from layer descriptions: dicts with name, kind ("rows" | "tokens" | "dense"),
        d_out, d_in (and weight / bias / params / sizes as LayerPlan). For any per-sample
        vectors [n, P]: ``plan_layers([{"name": "<dense>", "kind": "dense", "d_out": 1, "d_in": P}])``."""
        if self.layers is not None:
            got = [(s["name"], s["kind"], int(s["d_out"]), int(s["d_in"])) for s in specs]
            have = [(p.name, p.kind, p.d_out, p.d_in) for p in self.layers]
            if got != have:
                raise ValueError(f"factors: these per-sample gradients have other layers than the projector was "
                                 f"planned for ({got[:3]}... vs {have[:3]}...): record them with the same model, "
                                 f"parameters and input shapes")
            return self
        if not specs:
            raise ValueError("factors: no selected parameter has a gradient to project")
        unknown = set(self.layer_dims) - {s["name"] for s in specs}
        if unknown:
            raise ValueError(f"layer_dims: {sorted(unknown)[0]!r} is not a layer of the model's recorded gradients "
                             f"(layers: {', '.join(s['name'] for s in specs)})")
        sizes = [int(s["d_out"]) * int(s["d_in"]) for s in specs]
        free = [i for i, s in enumerate(specs) if s["name"] not in self.layer_dims]
        if free and self.dim_requested is None:
            raise ValueError(f"dim: is None but layer_dims does not name layer {specs[free[0]]['name']!r}")
        budget = {}
        if free:
            fixed = sum(self._fixed_k(specs[i]) for i in range(len(specs)) if i not in free)
            budget = _share(max(len(free), self.dim_requested - fixed), [sizes[i] for i in free])
            budget = dict(zip(free, budget))
        plans, offset = [], 0
        for i, s in enumerate(specs):
            d_out, d_in = int(s["d_out"]), int(s["d_in"])
            want = self.layer_dims.get(s["name"], budget.get(i))
            structure, k_out = self.structure, 1
            if isinstance(want, tuple):
                k_out, k_in = min(want[0], d_out), min(want[1], d_in)
                structure = "kronecker"
            elif s["kind"] == "dense" or int(want) >= d_out * d_in:       # (a k this large: the identity)
                k_in, structure = min(int(want), d_out * d_in), "dense"
            elif structure == "kronecker":
                k_out, k_in = _split(int(want), d_out, d_in)
            else:
                k_in = int(want)
            seed = _derive(self.seed, zlib.crc32(s["name"].encode()))
            plans.append(LayerPlan(s["name"], s["kind"], d_out, d_in, k_out, k_in, seed, offset,
                                   s.get("weight"), s.get("bias"), tuple(s.get("params", ())),
                                   tuple(s.get("sizes", ())), structure))
            offset += k_out * k_in
        self.layers = plans
        return self

    def _fixed_k(self, s: dict) -> int:
        v = self.layer_dims[s["name"]]
        if isinstance(v, tuple):
            return min(v[0], int(s["d_out"])) * min(v[1], int(s["d_in"]))
        return min(v, int(s["d_out"]) * int(s["d_in"]))

    # ------------------------------------------------------------------------------ matrices
    def side_matrix(self, p: LayerPlan, side: str, dtype=torch.float32, device=None) -> torch.Tensor | None:
        """[k, d] matrix of one side of a layer (None: that side is the identity). Khatri-Rao:
        U (out side, rows u_r / √k) and V (in side, rows v_r), both [k, d]."""
        if p.structure == "dense" or not p.projects(side):
            return None
        key = (p.name, side, str(dtype), str(device))
        m = self._cache.get(key)
        if m is None:
            d = p.d_out if side == "out" else p.d_in
            k = p.k_out if side == "out" and p.structure == "kronecker" else p.k_in
            scale = 1 if p.structure == "khatri_rao" and side == "in" else k
            m = _draw((k, d), self.kind, _derive(p.seed, 0 if side == "out" else 1), scale).to(dtype=dtype,
                                                                                                 device=device)
            self._cache[key] = m
        return m

    def _dense_blocks(self, p: LayerPlan, dtype, device):
        """(p0, p1, [k, p1 - p0]) blocks of the dense part's matrix (cached when small enough)."""
        cache = p.k_in * p.width * torch.tensor([], dtype=dtype).element_size() <= self.cache_bytes
        for j, p0 in enumerate(range(0, p.width, _DENSE_BLOCK)):
            p1 = min(p0 + _DENSE_BLOCK, p.width)
            key = (p.name, "dense", j, str(dtype), str(device))
            m = self._cache.get(key)
            if m is None:
                m = _draw((p.k_in, p1 - p0), self.kind, _derive(p.seed, 2, j), p.k_in).to(dtype=dtype, device=device)
                if cache:
                    self._cache[key] = m
            yield p0, p1, m

    def kron_matrix(self, p: LayerPlan, dtype=torch.float64) -> torch.Tensor:
        """[k_out·k_in, d_out·d_in]: the layer's whole projection as one matrix (small layers;
        for checking the factored route)."""
        if p.structure == "dense":
            return torch.cat([m.to(dtype) for _, _, m in self._dense_blocks(p, torch.float32, None)], 1) \
                if p.projects("in") else torch.eye(p.width, dtype=dtype)
        po = self.side_matrix(p, "out")
        pi = self.side_matrix(p, "in")
        if p.structure == "khatri_rao":                                   # rows u_r ⊗ v_r
            return (po.to(dtype).unsqueeze(2) * pi.to(dtype).unsqueeze(1)).reshape(p.k_in, -1)
        po = torch.eye(p.d_out, dtype=dtype) if po is None else po.to(dtype)
        pi = torch.eye(p.d_in, dtype=dtype) if pi is None else pi.to(dtype)
        return torch.kron(po, pi)

    # ------------------------------------------------------------------------------ projecting
    @torch.no_grad()
    def project(self, f: SampleFactors, out_dtype: torch.dtype | None = None,
                out: torch.Tensor | None = None, in_sides: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """[n, dim]: the projected per-sample gradients of the factors (planned on first use);
        written into `out` when given ([n, dim], the factors' dtype and device: e.g. the rows of
        a store in memory, which then need no copy). `in_sides`: {layer: its ``input_sides`` of
        these factors' inputs}, computed earlier, used instead of projecting those inputs again."""
        self.plan(f)
        acc = f.dtype
        rows = {x.name: x for x in f.rows}
        toks = {x.name: x for x in f.tokens}
        device = _device_of(f)
        out = _rows_out(out, f.n, self.dim, acc, device)
        in_sides = self._check_in_sides(in_sides, f.n, acc)
        for p in self.layers:
            blk = out[:, p.offset:p.offset + p.dim]
            if p.kind == "dense":
                blk.copy_(self._dense(p, f.dense.g.to(acc)))
            elif p.structure == "dense":
                self._formed(p, rows.get(p.name) or toks[p.name], f.n, acc, blk)
            elif p.kind == "rows":
                self._rows(p, rows[p.name], f.n, acc, out=blk, ap=in_sides.get(p.name))
            else:
                blk.copy_(self._tokens(p, toks[p.name], f.n, acc))
        return out if out_dtype is None else out.to(out_dtype)

    @torch.no_grad()
    def project_vectors(self, g: torch.Tensor) -> torch.Tensor:
        """[n, dim]: any per-sample vectors [n, P] through a projector planned with one dense
        layer of width P (``plan_layers``; planned here on first use)."""
        if g.dim() != 2:
            raise ValueError(f"g: expected per-sample vectors [n, P], got shape {tuple(g.shape)}")
        self.plan_layers([{"name": DENSE, "kind": "dense", "d_out": 1, "d_in": int(g.shape[1])}])
        return self._dense(self.layers[0], g)

    @torch.no_grad()
    def project_gradients(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        """[n, dim]: the same projection applied to explicit per-sample gradients {parameter
        name: [n, *shape]} (the reference route: each layer's gradient formed, P_out G P_inᵀ)."""
        if self.layers is None:
            raise RuntimeError("Projector: plan it first (plan(factors) or plan_layers(...))")
        n = next(iter(grads.values())).shape[0]
        acc = torch.float64 if any(t.dtype == torch.float64 for t in grads.values()) else torch.float32
        parts = []
        for p in self.layers:
            if p.kind == "dense":
                parts.append(self._dense(p, torch.cat([grads[nm].reshape(n, -1).to(acc) for nm in p.params], 1)))
                continue
            cols = []
            if p.weight is not None:
                cols.append(grads[p.weight].reshape(n, p.d_out, -1).to(acc))
            if p.bias is not None:
                cols.append(grads[p.bias].reshape(n, p.d_out, 1).to(acc))
            G = torch.cat(cols, 2)                                        # [n, d_out, d_in]
            if p.structure == "dense":
                parts.append(self._dense(p, G.reshape(n, -1)))
                continue
            po, pi = self.side_matrix(p, "out", acc, G.device), self.side_matrix(p, "in", acc, G.device)
            if p.structure == "khatri_rao":
                parts.append(torch.einsum("ri,nij,rj->nr", po, G, pi))
                continue
            if po is not None:
                G = torch.matmul(po, G)
            if pi is not None:
                G = torch.matmul(G, pi.t())
            parts.append(G.reshape(n, -1))
        return torch.cat(parts, 1)

    # ------------------------------------------------------------------------------ sides
    # A Kronecker layer with one row per sample (a Linear layer on [n, d] inputs) projects each
    # sample's gradient to an outer product (P_out δ)(P_in ã)ᵀ: k_out + k_in numbers determine its
    # k_out·k_in. A caller that keeps many projected gradients (DVEmb's recorded steps: every
    # sample at every step) keeps the sides and forms the products when it reads them.
    def projects_sides(self, f: SampleFactors) -> bool:
        """Whether every layer of these factors is a Kronecker layer with one row per sample (no
        conv positions, Embedding or dense part; not a layer whose k reaches its size, which is
        kept whole, exactly): then ``project_sides`` applies (planned on first use)."""
        self.plan(f)
        if f.tokens or f.dense is not None:
            return False
        rows = {x.name: x for x in f.rows}
        return all(p.kind == "rows" and p.structure == "kronecker" and rows[p.name].rows == 1 for p in self.layers)

    @property
    def side_dim(self) -> int:
        """Σ (k_out + k_in) over the layers: the width of ``project_sides``' rows."""
        if self.layers is None:
            raise RuntimeError("Projector: not planned yet (project() or plan() a first batch of factors)")
        return sum(p.k_out + p.k_in for p in self.layers)

    @torch.no_grad()
    def project_sides(self, f: SampleFactors, out: torch.Tensor | None = None,
                      in_sides: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """[n, side_dim]: per layer [P_out δ | P_in ã] of each sample (the two sides of its
        projected gradient, see ``projects_sides``); ``expand_sides`` of them == ``project(f)``.
        Written into `out` when given ([n, side_dim] of the factors' dtype); `in_sides` as in project()."""
        if not self.projects_sides(f):
            raise ValueError("factors: project_sides needs a Kronecker projection of layers with one row per "
                             "sample (Linear layers; no conv positions, Embedding or dense part)")
        acc = f.dtype
        rows = {x.name: x for x in f.rows}
        out = _rows_out(out, f.n, self.side_dim, acc, _device_of(f))
        in_sides = self._check_in_sides(in_sides, f.n, acc)
        o = 0
        for p in self.layers:
            dp, ap = self._sides(p, rows[p.name], acc, in_sides.get(p.name))
            out[:, o:o + p.k_out] = dp
            out[:, o + p.k_out:o + p.k_out + p.k_in] = ap
            o += p.k_out + p.k_in
        return out

    @torch.no_grad()
    def expand_sides(self, sides: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """[n, dim]: the projected gradients whose sides are the rows of `sides` [n, side_dim]
        (``project_sides``): per layer the outer products, into `out` when given."""
        n = sides.shape[0]
        if sides.dim() != 2 or sides.shape[1] != self.side_dim:
            raise ValueError(f"sides: expected rows [n, {self.side_dim}], got shape {tuple(sides.shape)}")
        if out is None:
            out = torch.empty(n, self.dim, dtype=sides.dtype, device=sides.device)
        o = 0
        for p in self.layers:
            _outer_rows(sides[:, o:o + p.k_out], sides[:, o + p.k_out:o + p.k_out + p.k_in],
                        out[:, p.offset:p.offset + p.dim])
            o += p.k_out + p.k_in
        return out

    @torch.no_grad()
    def input_sides(self, name: str, a: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[n, k_in] (`dtype`): the input side P_in ã that project() / project_sides() give the
        samples of Linear layer `name` whose inputs are the rows of `a` [n, d_in] (ã: a with the
        bias's 1 appended). It depends on the input alone, so a caller that feeds the same inputs
        again -- a model's first layer over the epochs of a training -- computes it once per sample
        and passes the rows as `in_sides` (DVEmb: that layer's side was most of a step's projection)."""
        p = self._in_side_layer(name, "name")
        if a.dim() != 2 or a.shape[1] != p.d_in - (1 if p.bias is not None else 0):
            raise ValueError(f"a: expected inputs [n, {p.d_in - (1 if p.bias is not None else 0)}] of layer "
                             f"{name!r}, got shape {tuple(a.shape)}")
        return _in_side(self.side_matrix(p, "in", dtype, a.device), a.to(dtype), p.bias is not None)

    def projected_input(self, name: str) -> LayerPlan | None:
        """The plan of `name` when it is a planned Linear / conv layer with a projected input side
        (what ``input_sides`` takes; a side kept whole is ã itself, nothing to compute), else None."""
        p = next((p for p in self.layers or () if p.name == name), None)
        ok = p is not None and p.kind == "rows" and p.weight is not None and \
            p.structure in ("kronecker", "khatri_rao") and p.projects("in")
        return p if ok else None

    def _in_side_layer(self, name: str, arg: str = "in_sides") -> LayerPlan:
        p = self.projected_input(name)
        if p is None:
            raise ValueError(f"{arg}: {name!r} is not a planned layer with a weight and a projected input side")
        return p

    def _check_in_sides(self, in_sides, n: int, acc) -> dict:
        for name, t in (in_sides or {}).items():
            p = self._in_side_layer(name)
            if t.shape != (n, p.k_in) or t.dtype != acc:
                raise ValueError(f"in_sides: {name!r}: expected [{n}, {p.k_in}] of {acc}, got {tuple(t.shape)} "
                                 f"of {t.dtype}")
        return in_sides or {}

    def _rows(self, p: LayerPlan, x: RowFactors, n: int, acc, out: torch.Tensor | None = None,
              ap: torch.Tensor | None = None) -> torch.Tensor:
        """[n, dim] of a rows layer (into `out` when given: Kronecker at one row per sample writes
        its outer products there directly; a training step projects every step, so its few small
        ops are the cost). `ap`: its input side, already computed (``input_sides``)."""
        dp, ap = self._sides(p, x, acc, ap)
        if p.structure == "khatri_rao":                                   # (u_rᵀδ_t)(v_rᵀã_t), summed over t
            if x.rows == 1:
                if out is not None:
                    return torch.mul(dp, ap, out=out)
                return dp * ap
            prod = dp.mul_(ap).reshape(n, x.rows, -1).sum(1)
        elif x.rows == 1:
            if out is not None:
                return _outer_rows(dp, ap, out)
            prod = (dp.unsqueeze(2) * ap.unsqueeze(1)).reshape(n, -1)
        else:
            prod = torch.bmm(dp.reshape(n, x.rows, -1).transpose(1, 2), ap.reshape(n, x.rows, -1)).reshape(n, -1)
        if out is None:
            return prod
        return out.copy_(prod)

    def _sides(self, p: LayerPlan, x: RowFactors, acc, ap: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(P_out δ [n·L, k_out], P_in ã [n·L, k_in]) of a rows layer (Khatri-Rao: both [n·L, k]);
        an identity side is δ / ã itself; `ap` given: the input side, already computed.

        One row per sample: the side products as P Aᵀ, [k, n], used transposed. The same numbers
        as A Pᵀ, but a GEMM whose output width is k (odd, small: 31, 971) runs at half speed or
        less on this project's CPU (1 thread, A [512 x 2049]: k = 31 2.5 -> 1.6 ms, k = 971 55 ->
        34 ms). Several rows (conv positions) keep A Pᵀ, whose rows are then summed or paired."""
        a, d = x.a.to(acc), x.d.to(acc)
        po = self.side_matrix(p, "out", acc, a.device)
        pi = self.side_matrix(p, "in", acc, a.device)                      # [k_in, d_in (+1 bias)]
        if po is None:
            dp = d
        else:                                                              # [n·L, k_out] (Khatri-Rao: [n·L, k])
            dp = (po @ d.t()).t() if x.rows == 1 else d @ po.t()
        if ap is not None:
            if x.rows != 1:
                raise ValueError(f"in_sides: layer {p.name!r} has {x.rows} rows a sample (conv positions): "
                                 f"input sides are for one row a sample")
        elif x.weight is None:                                             # bias only: ã = 1
            ap = torch.ones(a.shape[0], 1, dtype=acc, device=a.device) if pi is None else \
                pi[:, 0].expand(a.shape[0], -1)
        elif pi is None:
            ap = torch.cat([a, torch.ones(a.shape[0], 1, dtype=acc, device=a.device)], 1) if x.bias is not None else a
        elif x.rows == 1:
            ap = _in_side(pi, a, x.bias is not None)
        else:
            ap = a @ pi[:, :a.shape[1]].t()
            if x.bias is not None:
                ap += pi[:, a.shape[1]]                                    # the bias column of P_in
        return dp, ap

    def _tokens(self, p: LayerPlan, x: TokenFactors, n: int, acc) -> torch.Tensor:
        d = x.d.to(acc)                                                    # [n, T, dim]
        pi, po = self.side_matrix(p, "in", acc, d.device), self.side_matrix(p, "out", acc, d.device)
        dp = d if pi is None else d @ pi.t()                               # [n, T, k_in]
        t = x.ids.shape[1]
        if p.structure == "khatri_rao":                                   # Σ_t u_r[id_t] (v_rᵀ δ_t)
            return (po.t()[x.ids.reshape(-1)].reshape(n, t, -1) * dp).sum(1)
        if po is None:                                                     # vocabulary side not projected
            out = torch.zeros(n * p.d_out, p.k_in, dtype=acc, device=d.device)
            key = (torch.arange(n, device=x.ids.device).unsqueeze(1) * p.d_out + x.ids).reshape(-1)
            return out.index_add_(0, key, dp.reshape(n * t, -1)).reshape(n, -1)
        v = po[:, x.ids.reshape(-1)].t().reshape(n, t, -1)                 # [n, T, k_out]: P_v[:, id_t]
        return torch.bmm(v.transpose(1, 2), dp).reshape(n, -1)

    def _formed(self, p: LayerPlan, x, n: int, acc, out: torch.Tensor) -> None:
        """A dense-structure layer: its per-sample gradients formed (a block of samples at a
        time: at most ~_FORM_ELEMENTS entries) and projected into `out`."""
        step = max(1, _FORM_ELEMENTS // max(1, p.width))
        for a in range(0, n, step):
            b = min(a + step, n)
            if isinstance(x, RowFactors):
                sub = x.samples(a, b).map(lambda t: t.to(acc))
                cols = ([sub.weight_grads()] if x.weight is not None else []) + \
                       ([sub.bias_grads().unsqueeze(2)] if x.bias is not None else [])
                G = torch.cat(cols, 2)
            else:
                ids, d = x.ids[a:b], x.d[a:b].to(acc)
                G = torch.zeros((b - a) * p.d_out, p.d_in, dtype=acc, device=d.device)
                key = (torch.arange(b - a, device=ids.device).unsqueeze(1) * p.d_out + ids).reshape(-1)
                G.index_add_(0, key, d.reshape(-1, p.d_in))
            out[a:b] = self._dense(p, G.reshape(b - a, -1))

    def _dense(self, p: LayerPlan, g: torch.Tensor) -> torch.Tensor:
        if g.shape[1] != p.width:
            raise ValueError(f"g: per-sample vectors of width {g.shape[1]}, the projector was planned for {p.width}")
        if not p.projects("in"):
            return g
        out = torch.zeros(g.shape[0], p.k_in, dtype=g.dtype, device=g.device)
        for p0, p1, m in self._dense_blocks(p, g.dtype, g.device):
            out.addmm_(g[:, p0:p1], m.t())
        return out

    # ------------------------------------------------------------------------------ identity
    def describe(self) -> dict:
        """Everything that determines the projection (JSON-serialisable)."""
        return {"kind": self.kind, "seed": self.seed, "structure": self.structure,
                "dim": None if self.layers is None else self.dim,
                "dim_requested": self.dim_requested,
                "layer_dims": {k: list(v) if isinstance(v, tuple) else v for k, v in self.layer_dims.items()},
                "layers": None if self.layers is None else [
                    {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(p).items()} for p in self.layers]}

    def fingerprint(self) -> str:
        """A digest of describe(): two projectors with the same fingerprint give the same numbers."""
        return hashlib.blake2b(json.dumps(self.describe(), sort_keys=True).encode(), digest_size=16).hexdigest()


def _share(total: int, sizes: list[int]) -> list[int]:
    """Integer shares of `total` proportional to `sizes` (the same fraction of every layer, so
    no layer is given more than its size unless all are), at least 1 each; the rounding
    remainder goes to the largest fractional parts."""
    whole = sum(sizes)
    if total >= whole:
        return list(sizes)
    exact = [total * s / whole for s in sizes]
    k = [max(1, int(e)) for e in exact]
    for i in sorted(range(len(sizes)), key=lambda i: int(exact[i]) - exact[i])[:max(0, total - sum(k))]:
        k[i] = min(sizes[i], k[i] + 1)
    return k


def _rows_out(out: torch.Tensor | None, n: int, width: int, dtype, device) -> torch.Tensor:
    """The [n, width] rows a projection writes: `out` checked (dtype, device, unit column stride:
    a view into a caller's larger array is fine), or new ones."""
    if out is None:
        return torch.empty(n, width, dtype=dtype, device=device)
    if out.shape != (n, width) or out.dtype != dtype or out.device != device or (n and width and out.stride(1) != 1):
        raise ValueError(f"out: expected rows [{n}, {width}] of {dtype} on {device} with unit column stride, "
                         f"got {tuple(out.shape)} of {out.dtype} on {out.device}")
    return out


def _in_side(pi: torch.Tensor, a: torch.Tensor, bias: bool) -> torch.Tensor:
    """P_in ã [n, k_in] for inputs a [n, d] (ã = [a, 1] with a bias: the bias column of P_in added),
    computed as P_in aᵀ and used transposed (see Projector._sides)."""
    w = pi[:, :a.shape[1]]
    return (torch.addmm(pi[:, a.shape[1]:a.shape[1] + 1], w, a.t()) if bias else w @ a.t()).t()


def _outer_rows(dp: torch.Tensor, ap: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Row i of `out` [n, k_out·k_in] (a view with unit column stride) = dp_i ⊗ ap_i. The sides
    are made contiguous first: the broadcast product then runs ~2x faster."""
    n = dp.shape[0]
    dp, ap = dp.contiguous(), ap.contiguous()
    torch.mul(dp.unsqueeze(2), ap.unsqueeze(1), out=out.view(n, dp.shape[1], ap.shape[1]))
    return out


def _device_of(f: SampleFactors):
    for x in f.rows:
        return x.device()
    for x in f.tokens:
        return x.d.device
    return f.dense.g.device if f.dense is not None else torch.device("cpu")


__all__ = ["DENSE", "KINDS", "LayerPlan", "Projector"]
