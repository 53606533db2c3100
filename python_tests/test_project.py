"""grads.Projector: random projections of per-sample gradients from the engine's factors.

The factored route (P_out δ)(P_in ã)ᵀ per Linear / conv / Embedding layer and the dense JL of
the rest must equal the explicit Kronecker matrix applied to explicit per-sample gradients
(float64, torch.func), on several models, shapes and dimensions; the projection is
reproducible from its seed and fingerprint; the dimension split and the errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from dvgs_fast import grads
from dvgs_fast.grads import Projector

LOSS = grads.make_sample_loss("cross_entropy")


class _Tokens(nn.Module):
    def __init__(self, vocab=11, dim=4, t=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=0)
        self.lin = nn.Linear(dim * t, 3)

    def forward(self, x):
        return self.lin(self.emb(x).flatten(1))


def _mlp():
    return nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3))


def _cnn():
    return nn.Sequential(nn.Unflatten(1, (1, 6)), nn.Conv1d(1, 3, 2), nn.ReLU(), nn.Flatten(),
                         nn.Linear(15, 3, bias=False))


def _case(make, n, seed=0):
    torch.manual_seed(seed)
    model = make().double()
    g = torch.Generator().manual_seed(seed + 1)
    if make is _Tokens:
        x = torch.randint(0, 11, (n, 3), generator=g)
    else:
        x = torch.randn(n, 6 if make is _cnn else 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return model, x, y


def _explicit_kron(P: Projector, g: dict, n: int) -> torch.Tensor:
    """Each layer's explicit gradient [d_out, d_in] (bias as the last column), flattened
    row-major, times the layer's Kronecker matrix P_out ⊗ P_in (the dense matrix for the rest)."""
    parts = []
    for p in P.layers:
        if p.kind == "dense":
            G = torch.cat([g[nm].reshape(n, -1) for nm in p.params], 1)
        else:
            cols = ([g[p.weight].reshape(n, p.d_out, -1)] if p.weight else []) + \
                   ([g[p.bias].reshape(n, p.d_out, 1)] if p.bias else [])
            G = torch.cat(cols, 2).reshape(n, -1)
        parts.append(G @ P.kron_matrix(p).t())
    return torch.cat(parts, 1)


@pytest.mark.parametrize("make", [_mlp, _cnn, _Tokens])
@pytest.mark.parametrize("n", [7, 1])
@pytest.mark.parametrize("dim,kind", [(30, "gaussian"), (12, "rademacher"), (10_000, "gaussian")])
@pytest.mark.parametrize("structure", ["khatri_rao", "kronecker", "dense"])
def test_factored_projection_equals_kronecker_matrix_on_explicit_gradients(make, n, dim, kind, structure):
    model, x, y = _case(make, n)
    names = [nm for nm, _ in model.named_parameters()]
    f = grads.FastScorer(model, names, LOSS, "dot", owner="test").record(x, y).factors()
    P = Projector(dim, kind=kind, seed=3, structure=structure)
    z = P.project(f)
    assert all(p.structure == ("dense" if p.kind == "dense" or p.dim == p.width else structure) for p in P.layers)
    assert z.dtype == torch.float64 and z.shape == (n, P.dim)
    g = {k: v.detach() for k, v in grads.per_sample_grads(model, names, x, y, LOSS).items()}
    ref = _explicit_kron(P, g, n)
    torch.testing.assert_close(z, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(P.project_gradients(g), ref, rtol=1e-10, atol=1e-12)
    total = sum(p.numel() for p in model.parameters())
    if dim >= total:                           # every side the identity: the gradient itself
        assert P.dim == total and all(not p.projects("in") and not p.projects("out") for p in P.layers)
        torch.testing.assert_close(ref.norm(dim=1), torch.cat([g[k].reshape(n, -1) for k in g], 1).norm(dim=1))
    else:
        assert P.dim <= dim and P.dim >= 0.8 * dim


def test_selected_parameters_bias_only_and_weight_only():
    model, x, y = _case(_mlp, 6)
    names = ["0.bias", "3.weight"]            # a bias without its weight, a weight without its bias
    f = grads.FastScorer(model, names, LOSS, "dot", owner="test").record(x, y).factors()
    P = Projector(9, seed=0)
    z = P.project(f)
    g = grads.per_sample_grads(model, names, x, y, LOSS)
    torch.testing.assert_close(z, _explicit_kron(P, g, 6), rtol=1e-10, atol=1e-12)
    plans = {p.name: p for p in P.layers}
    assert plans["3"].d_in == 8 and plans["3"].bias is None and plans["<dense>"].params == ("0.bias",)
    # factors of a bias alone (L = 2 rows per sample): its gradient Σ_t δ_t, through P_out
    g_ = torch.Generator().manual_seed(0)
    d = torch.randn(6 * 2, 5, generator=g_, dtype=torch.float64)
    rf = grads.RowFactors("b", nn.Linear(3, 5), torch.randn(12, 3, dtype=torch.float64), d, 2, None, "b.bias")
    for structure in ("khatri_rao", "kronecker", "dense"):
        Pb = Projector(3, seed=1, structure=structure)
        zb = Pb.project(grads.SampleFactors(6, rows=[rf], dtype=torch.float64))
        assert Pb.layers[0].d_in == 1 and Pb.layers[0].structure == structure
        torch.testing.assert_close(zb, d.reshape(6, 2, 5).sum(1) @ Pb.kron_matrix(Pb.layers[0]).t())


def test_dense_vectors_blockwise_and_reproducible():
    g = torch.randn(3, 20_000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))   # > one block
    P = Projector(7, seed=5)
    z = P.project_vectors(g)
    M = P.kron_matrix(P.layers[0])
    assert M.shape == (7, 20_000)
    torch.testing.assert_close(z, g @ M.t(), rtol=1e-10, atol=1e-10)
    P_nocache = Projector(7, seed=5, cache_bytes=0)
    torch.testing.assert_close(P_nocache.project_vectors(g), z, rtol=0, atol=0)
    assert not P_nocache._cache                                  # regenerated per call, same numbers
    assert Projector(7, seed=6).project_vectors(g).sub(z).abs().max() > 1e-3


def test_reproducible_from_seed_and_fingerprint():
    model, x, y = _case(_mlp, 5)
    names = [nm for nm, _ in model.named_parameters()]
    f = grads.FastScorer(model, names, LOSS, "dot", owner="test").record(x, y).factors()
    a, b, c = Projector(20, seed=1), Projector(20, seed=1), Projector(20, seed=2)
    za, zb, zc = a.project(f), b.project(f), c.project(f)
    torch.testing.assert_close(za, zb, rtol=0, atol=0)
    assert (za - zc).abs().max() > 1e-6
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    assert Projector(20, seed=1, kind="rademacher").plan(f).fingerprint() != a.fingerprint()
    # float32 factors use the same matrices (drawn in float32)
    m32 = model.float()
    f32 = grads.FastScorer(m32, names, LOSS, "dot", owner="test").record(x.float(), y).factors()
    d = Projector(20, seed=1)
    torch.testing.assert_close(d.project(f32).double(), za, rtol=1e-4, atol=1e-5)
    assert d.fingerprint() == a.fingerprint()
    desc = a.describe()
    assert desc["dim"] == a.dim and [l["name"] for l in desc["layers"]] == ["0", "3", "<dense>"]


def test_inner_products_are_preserved_on_average():
    """E⟨Pg, Ph⟩ = ⟨g, h⟩ for every structure, Gaussian and Rademacher (over seeds)."""
    model, x, y = _case(_mlp, 2)
    names = [nm for nm, _ in model.named_parameters()]
    f = grads.FastScorer(model, names, LOSS, "dot", owner="test").record(x, y).factors()
    exact = float(grads.cross_gram(f, f)[0, 1].detach())
    scale = float(grads.sqnorms(f).detach().prod().sqrt())
    for kind, structure in (("gaussian", "khatri_rao"), ("rademacher", "khatri_rao"), ("gaussian", "kronecker"),
                            ("rademacher", "dense")):
        est = []
        for s in range(200):
            z = Projector(20, kind=kind, seed=s, structure=structure).project(f)
            est.append(float(z[0] @ z[1]))
        est = np.asarray(est)
        assert abs(est.mean() - exact) < 4 * est.std() / np.sqrt(len(est)) + 1e-3 * scale, (kind, structure)


def test_dimension_split_and_layer_dims():
    model, x, y = _case(_mlp, 4)
    names = [nm for nm, _ in model.named_parameters()]
    f = grads.FastScorer(model, names, LOSS, "dot", owner="test").record(x, y).factors()
    P = Projector(40, layer_dims={"0": (2, 3), "3": 6}).plan(f)
    plans = {p.name: p for p in P.layers}
    assert (plans["0"].k_out, plans["0"].k_in) == (2, 3)
    assert plans["3"].dim == 6 and plans["<dense>"].dim == 16          # 28 left, capped at its width
    assert [p.offset for p in P.layers] == [0, 6, 12]
    only = Projector(None, layer_dims={"0": 4, "3": 4, "<dense>": 2}).plan(f)
    assert only.dim == 10
    with pytest.raises(ValueError, match="layer_dims: 'nope'"):
        Projector(10, layer_dims={"nope": 3}).plan(f)
    with pytest.raises(ValueError, match="dim: is None"):
        Projector(None, layer_dims={"0": 4}).plan(f)
    other = grads.FastScorer(model, ["0.weight"], LOSS, "dot", owner="test").record(x, y).factors()
    with pytest.raises(ValueError, match="other layers"):
        P.project(other)


def _kron_plan(k, d_out, d_in):
    p = Projector(k, structure="kronecker").plan_layers([{"name": "l", "kind": "rows", "d_out": d_out, "d_in": d_in}])
    return p.layers[0].k_out, p.layers[0].k_in


def test_kronecker_split_balances_the_sides_or_keeps_a_narrow_one_whole():
    """k over a Kronecker layer's two sides: k_out ≈ k_in ≈ √k on a wide layer (not its aspect:
    100 x 2049 at 1024 once gave 7 x 146); 971 is prime, its only exact split 1 x 971 -- the
    product may fall up to 5% short instead; a side narrower than √k is kept whole (the identity:
    exact) with the rest of k on the other side."""
    assert _kron_plan(1024, 100, 2049) == (32, 32)
    assert _kron_plan(971, 100, 2049) == (31, 31)
    assert _kron_plan(1024, 10, 2049) == (10, 102)
    assert _kron_plan(1024, 2049, 10) == (102, 10)
    assert _kron_plan(70, 10, 33) == (10, 7)
    assert _kron_plan(24, 5, 6) == (4, 6)                              # ties: the larger product
    assert _kron_plan(7, 1, 30) == (1, 7)


def test_balanced_kronecker_split_estimates_inner_products_better_than_the_aspect_split():
    """The reason for the split rule: for two aligned rank-one gradients of a 100 x 2049 layer
    (the pairs whose scores matter most: a sample close to the query), the relative error of the
    projected inner product over 300 projection seeds is smaller at 32 x 32 (the rule's) than at
    7 x 146 (the layer's aspect, the rule before): ~2/32 + 2/32 against 2/7 + 2/146 in relative
    variance. (For near-orthogonal pairs it is ~1/k whichever the split.)"""
    g = torch.Generator().manual_seed(3)
    d = torch.randn(100, generator=g, dtype=torch.float64)
    a = torch.randn(2049, generator=g, dtype=torch.float64).abs()            # post-ReLU-like inputs
    d = torch.stack([d, d + 0.3 * torch.randn(100, generator=g, dtype=torch.float64)])
    a = torch.stack([a, a + 0.3 * torch.randn(2049, generator=g, dtype=torch.float64)])
    f = grads.SampleFactors(2, [grads.RowFactors("l", None, a, d, 1, "w", None)], [], None, torch.float64)
    exact = float((d[0] @ d[1]) * (a[0] @ a[1]))
    errs = {}
    for split in ((32, 32), (7, 146)):
        est = [Projector(None, layer_dims={"l": split}, structure="kronecker", seed=s).project(f) for s in range(300)]
        errs[split] = float(np.mean([(float(z[0] @ z[1]) / exact - 1) ** 2 for z in est]))
    assert _kron_plan(1024, 100, 2049) == (32, 32)
    assert errs[(32, 32)] < 0.6 * errs[(7, 146)], errs
    assert 0.06 < errs[(32, 32)] < 0.25 and 0.15 < errs[(7, 146)] < 0.6, errs       # ~0.125, ~0.30


def test_project_into_given_rows():
    """project(out=) writes the same numbers into the caller's rows (a view into a bigger array,
    as DVEmb's steps in memory) and refuses rows of another shape, dtype or layout."""
    model, x, y = _case(_mlp, 5)
    names = [nm for nm, _ in model.named_parameters()]
    f = grads.FastScorer(model, names, LOSS, "dot", owner="test").record(x, y).factors()
    for structure in ("kronecker", "khatri_rao", "dense"):
        P = Projector(30, structure=structure, seed=1)
        want = P.project(f)
        big = torch.full((9, P.dim), float("nan"), dtype=want.dtype)
        got = P.project(f, out=big[2:7])
        assert got.data_ptr() == big[2:7].data_ptr()
        torch.testing.assert_close(big[2:7], want, rtol=0, atol=0)
        assert torch.isnan(big[:2]).all() and torch.isnan(big[7:]).all()
    with pytest.raises(ValueError, match="^out: expected rows"):
        P.project(f, out=torch.empty(4, P.dim, dtype=want.dtype))
    with pytest.raises(ValueError, match="^out: expected rows"):
        P.project(f, out=torch.empty(5, P.dim, dtype=torch.float16))
    with pytest.raises(ValueError, match="^out: expected rows"):
        P.project(f, out=torch.empty(P.dim, 5, dtype=want.dtype).t())


def _linear_mlp():
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3, bias=False), nn.ReLU(), nn.Linear(3, 4))


@pytest.mark.parametrize("n", [6, 1, 0])
@pytest.mark.parametrize("dim", [20, 60])
def test_sides_expand_to_the_kronecker_projection(n, dim):
    """project_sides keeps per layer [P_out δ | P_in ã] (k_out + k_in numbers); expand_sides of
    them equals project() and the explicit Kronecker matrix on explicit gradients (float64, a
    layer without bias, identity sides (dim 60: one layer's outputs, another's inputs), zero
    rows); in float32 into given rows too."""
    from torch.func import functional_call, grad, vmap
    model, x, y = _case(_linear_mlp, max(n, 1))
    x, y = x[:n], y[:n]
    names = [nm for nm, _ in model.named_parameters()]
    f = grads.FastScorer(model, names, LOSS, "dot", owner="test").record(x, y).factors()
    P = Projector(dim, structure="kronecker", seed=4)
    assert P.projects_sides(f)
    sides = P.project_sides(f)
    assert sides.shape == (n, sum(p.k_out + p.k_in for p in P.layers)) == (n, P.side_dim)
    assert P.side_dim < P.dim
    assert dim == 20 or (not P.layers[0].projects("out") and not P.layers[1].projects("in"))
    got = P.expand_sides(sides)
    torch.testing.assert_close(got, P.project(f), rtol=1e-12, atol=1e-12)
    if n:
        params = {k: v.detach() for k, v in model.named_parameters()}
        g = vmap(grad(lambda p, xi, yi: LOSS(functional_call(model, p, (xi[None],)), yi[None]).sum()),
                 in_dims=(None, 0, 0))(params, x, y)
        torch.testing.assert_close(got, _explicit_kron(P, g, n), rtol=1e-9, atol=1e-10)
    m32 = _linear_mlp().float()
    f32 = grads.FastScorer(m32, names, LOSS, "dot", owner="test").record(x.float(), y).factors()
    P32 = Projector(dim, structure="kronecker", seed=4)
    rows = torch.full((n + 2, P32.plan(f32).side_dim), float("nan"))
    P32.project_sides(f32, out=rows[1:n + 1])
    big = torch.full((n, P32.dim), float("nan"))
    P32.expand_sides(rows[1:n + 1], out=big)
    torch.testing.assert_close(big, P32.project(f32), rtol=1e-5, atol=1e-6)


def test_sides_need_one_row_per_sample_kronecker_layers():
    """Conv positions, Embedding tokens, a dense part or another structure: no sides (and a
    one-line error from project_sides); a wrong width for expand_sides is refused."""
    for make, dim in ((_cnn, 20), (_Tokens, 20), (_mlp, 20), (_linear_mlp, 10_000)):
        model, x, y = _case(make, 3)             # _mlp: LayerNorm's dense part; 10,000: identity layers
        names = [nm for nm, _ in model.named_parameters()]
        f = grads.FastScorer(model, names, LOSS, "dot", owner="test").record(x, y).factors()
        P = Projector(dim, structure="kronecker")
        assert not P.projects_sides(f), make
        with pytest.raises(ValueError, match="^factors: project_sides needs"):
            P.project_sides(f)
    model, x, y = _case(_linear_mlp, 3)
    names = [nm for nm, _ in model.named_parameters()]
    f = grads.FastScorer(model, names, LOSS, "dot", owner="test").record(x, y).factors()
    assert not Projector(20, structure="khatri_rao").projects_sides(f)
    P = Projector(20, structure="kronecker")
    P.plan(f)
    with pytest.raises(ValueError, match="^sides: expected rows"):
        P.expand_sides(torch.zeros(3, P.side_dim + 1, dtype=torch.float64))


@pytest.mark.parametrize("structure", ["kronecker", "khatri_rao"])
@pytest.mark.parametrize("n", [6, 1, 0])
def test_input_sides_given_equal_the_projected_inputs(structure, n):
    """input_sides(layer, inputs) is the input side project() / project_sides() compute from the
    factors (float64, a layer with and one without bias, zero rows, non-contiguous inputs), and
    passing it as in_sides gives the same projection; the other layers are projected as before."""
    model, x, y = _case(_linear_mlp, max(n, 1), seed=3)
    x, y = x[:n], y[:n]
    names = [nm for nm, _ in model.named_parameters()]
    f = grads.FastScorer(model, names, LOSS, "dot", owner="test").record(x, y).factors()
    P = Projector(24, structure=structure, seed=2,
                  layer_dims={"0": (3, 4), "2": (2, 5), "4": (2, 2)} if structure == "kronecker" else None)
    want = P.project(f)
    a = {r.name: r.a for r in f.rows}
    assert [P.projected_input(nm) is not None for nm in ("0", "2", "4")] == [True, True, True]
    given = {nm: P.input_sides(nm, a[nm].t().contiguous().t(), torch.float64) for nm in ("0", "2")}
    if structure == "kronecker":
        sides, o = P.project_sides(f), 0
        for p in P.layers:
            if p.name in given:
                torch.testing.assert_close(given[p.name], sides[:, o + p.k_out:o + p.k_out + p.k_in],
                                           rtol=1e-12, atol=1e-12)
            o += p.k_out + p.k_in
        torch.testing.assert_close(P.project_sides(f, in_sides=given), sides, rtol=1e-12, atol=1e-12)
    else:                          # Khatri-Rao: v_rᵀ ã, by hand (ã: the inputs and the bias's 1)
        p = P.layers[0]
        at = torch.cat([a["0"], torch.ones(n, 1, dtype=torch.float64)], 1)
        torch.testing.assert_close(given["0"], at @ P.side_matrix(p, "in", torch.float64).t(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(P.project(f, in_sides=given), want, rtol=1e-12, atol=1e-12)
    # a wrong input side changes exactly that layer's block
    if n:
        bad = dict(given, **{"2": given["2"] + 1.0})
        diff = (P.project(f, in_sides=bad) - want).abs().amax(0) > 1e-9
        p2 = P.layers[1]
        assert bool(diff[p2.offset:p2.offset + p2.dim].all()) and int(diff.sum()) == p2.dim


def test_input_sides_refusals():
    """in_sides / input_sides name a planned layer with a weight and a projected input side, with
    one row per sample, rows [n, k_in] of the factors' dtype; one-line errors otherwise."""
    model, x, y = _case(_linear_mlp, 4)
    names = [nm for nm, _ in model.named_parameters()]
    f = grads.FastScorer(model, names, LOSS, "dot", owner="test").record(x, y).factors()
    P = Projector(60, structure="kronecker").plan(f)           # layer 2's input side kept whole
    assert P.projected_input("2") is None and P.projected_input("nope") is None
    ok = P.input_sides("0", x, torch.float64)
    for kw, match in [({"in_sides": {"2": ok}}, "'2' is not a planned layer"),
                      ({"in_sides": {"nope": ok}}, "'nope' is not a planned layer"),
                      ({"in_sides": {"0": ok[:3]}}, "'0': expected"),
                      ({"in_sides": {"0": ok.float()}}, "'0': expected")]:
        with pytest.raises(ValueError, match="^in_sides: " + match):
            P.project(f, **kw)
    with pytest.raises(ValueError, match="^a: expected inputs"):
        P.input_sides("0", x[:, :3])
    with pytest.raises(ValueError, match="^name: '2' is not a planned layer"):
        P.input_sides("2", x)
    model, x, y = _case(_cnn, 4)                                # conv positions: several rows a sample
    names = [nm for nm, _ in model.named_parameters()]
    f = grads.FastScorer(model, names, LOSS, "dot", owner="test").record(x, y).factors()
    P = Projector(8, structure="kronecker").plan(f)
    conv = next(p for p in P.layers if p.name == "1")
    assert P.projected_input(conv.name) is conv
    with pytest.raises(ValueError, match="^in_sides: layer '1' has 5 rows a sample"):
        P.project(f, in_sides={conv.name: torch.zeros(4, conv.k_in, dtype=torch.float64)})


def test_structures_differ_and_a_full_size_layer_is_the_identity():
    model, x, y = _case(_mlp, 3)
    names = [nm for nm, _ in model.named_parameters()]
    f = grads.FastScorer(model, names, LOSS, "dot", owner="test").record(x, y).factors()
    prints = {Projector(30, structure=st).plan(f).fingerprint() for st in ("khatri_rao", "kronecker", "dense")}
    assert len(prints) == 3
    P = Projector(None, layer_dims={"0": 48, "3": 5, "<dense>": 4}).plan(f)   # layer "0" has 8 x 6 = 48 entries
    plans = {p.name: p for p in P.layers}
    assert plans["0"].structure == "dense" and not plans["0"].projects("in") and plans["3"].structure == "khatri_rao"
    g = grads.per_sample_grads(model, names, x, y, LOSS)
    z = P.project(f)
    torch.testing.assert_close(z[:, :48], torch.cat([g["0.weight"], g["0.bias"].unsqueeze(2)], 2).reshape(3, -1))
    torch.testing.assert_close(z, _explicit_kron(P, g, 3), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kw,match", [({"dim": 0}, "dim"), ({"structure": "tucker"}, "structure"),
                                      ({"dim": 2.5}, "dim"), ({"kind": "sparse"}, "kind"),
                                      ({"seed": -1}, "seed"), ({"layer_dims": {"a": (0, 2)}}, "layer_dims")])
def test_bad_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        Projector(**{"dim": 8, **kw})


def test_unplanned_projector_says_so():
    with pytest.raises(RuntimeError, match="not planned"):
        Projector(8).dim
