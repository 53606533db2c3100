"""per_sample_grad_stats / per_sample_cosine / similarity against float64 torch references."""
import pytest
import torch
import torch.nn.functional as F

from dvgs_fast import ops
from _devices import DEVICES, TOL


def reference_stats(grads, target):
    n = grads[0].shape[0]
    g = torch.cat([x.double().reshape(n, x[0].numel() if n else x.shape[1:].numel()) for x in grads], 1)
    t = torch.cat([x.double().reshape(-1) for x in target])
    return g @ t, (g * g).sum(1)


def make_case(n, shapes, dtype, device, gen, layout="contiguous"):
    """Random grads/targets; views are taken *after* the dtype/device cast so they stay views."""
    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)

    grads, target = [], []
    for s in shapes:
        if layout == "transposed" and len(s) >= 2:
            # per-sample slices that are transposed views (strided, not mergeable)
            g = rnd(n, *s[:-2], s[-1], s[-2]).transpose(-1, -2)
        elif layout == "sliced":
            # every other sample and an offset inner slice: non-unit row stride + offset
            big = rnd(2 * n + 1, *[d + 1 for d in s])
            g = big[1::2][:n][(slice(None),) + tuple(slice(1, None) for _ in s)]
        elif layout == "expanded":
            g = rnd(1, *s).expand(n, *s)
        else:
            g = rnd(n, *s)
        grads.append(g)
        target.append(rnd(*s))
    return grads, target


SHAPE_SETS = [
    [(7,)],
    [(3, 4), (5,)],
    [(16, 8), (8,), (2, 3, 4), (1,)],
    [(300, 257)],  # > one CPU chunk per sample
    [(40000,)],    # several chunks per sample
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [0, 1, 5, 33])
@pytest.mark.parametrize("shapes", SHAPE_SETS, ids=lambda s: "x".join("-".join(map(str, t)) for t in s))
def test_grad_stats_matches_reference(device, dtype, n, shapes):
    gen = torch.Generator().manual_seed(hash((n, str(shapes), str(dtype))) % 2**31)
    if n * sum(torch.Size(s).numel() for s in shapes) > 2_000_000:
        pytest.skip("too large for a unit test")
    grads, target = make_case(n, shapes, dtype, device, gen)
    dot, sq = ops.per_sample_grad_stats(grads, target)
    assert dot.shape == (n,) and sq.shape == (n,)
    assert dot.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    rdot, rsq = reference_stats(grads, target)
    scale = max(1.0, float(rsq.max())) if n else 1.0
    torch.testing.assert_close(dot.double().cpu(), rdot.cpu(), rtol=TOL[dtype], atol=TOL[dtype] * scale)
    torch.testing.assert_close(sq.double().cpu(), rsq.cpu(), rtol=TOL[dtype], atol=TOL[dtype] * scale)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["transposed", "sliced", "expanded"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_grad_stats_non_contiguous(device, layout, dtype):
    gen = torch.Generator().manual_seed(7)
    grads, target = make_case(6, [(5, 9), (4, 3, 2), (11,)], dtype, device, gen, layout=layout)
    assert any(not g.is_contiguous() for g in grads)
    dot, sq = ops.per_sample_grad_stats(grads, target)
    rdot, rsq = reference_stats(grads, target)
    torch.testing.assert_close(dot.double().cpu(), rdot.cpu(), rtol=TOL[dtype], atol=TOL[dtype] * 10)
    torch.testing.assert_close(sq.double().cpu(), rsq.cpu(), rtol=TOL[dtype], atol=TOL[dtype] * 10)


def test_grad_stats_many_dims_fallback():
    # 9 unmergeable per-sample dims exceed the kernel's layout descriptor: copied, still right.
    g = torch.randn(3, *([2] * 9), dtype=torch.float64).permute(0, *range(9, 0, -1))
    t = torch.randn(*([2] * 9), dtype=torch.float64)
    dot, sq = ops.per_sample_grad_stats([g], [t])
    rdot, rsq = reference_stats([g], [t])
    torch.testing.assert_close(dot, rdot)
    torch.testing.assert_close(sq, rsq)


def test_grad_stats_deterministic_across_threads():
    g = [torch.randn(4, 100_000), torch.randn(4, 33)]
    t = [torch.randn(100_000), torch.randn(33)]
    n0 = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = ops.per_sample_grad_stats(g, t)
        torch.set_num_threads(max(2, n0))
        b = ops.per_sample_grad_stats(g, t)
    finally:
        torch.set_num_threads(n0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cosine_matches_torch(device, dtype):
    gen = torch.Generator().manual_seed(3)
    grads, target = make_case(9, [(4, 5), (6,)], dtype, device, gen)
    grads[0][2].zero_()
    grads[1][2].zero_()  # a zero gradient: cosine 0, never NaN
    cos = ops.per_sample_cosine(grads, target, eps=1e-8)
    flat = torch.cat([g.reshape(9, -1) for g in grads], 1).double()
    ref = F.cosine_similarity(flat, torch.cat([t.reshape(-1) for t in target])[None], dim=1, eps=1e-8)
    assert cos[2].item() == 0.0
    torch.testing.assert_close(cos.cpu(), ref.cpu().to(cos.dtype), rtol=TOL[dtype], atol=TOL[dtype])


def test_cosine_tiny_norms_follow_torch_eps_rule():
    g = [torch.tensor([[3e-9, 4e-9, 0.0]], dtype=torch.float64)]
    t = [torch.tensor([3e-9, 0.0, 0.0], dtype=torch.float64)]
    ref = F.cosine_similarity(g[0], t[0][None], dim=1, eps=1e-8)
    torch.testing.assert_close(ops.per_sample_cosine(g, t), ref)


@pytest.mark.parametrize("kind", ["cosine", "dot", "projection", "distance"])
def test_similarity_kinds(kind):
    gen = torch.Generator().manual_seed(11)
    g = torch.randn(12, 30, generator=gen, dtype=torch.float64)
    G = torch.randn(30, generator=gen, dtype=torch.float64)
    dot, sq = ops.per_sample_grad_stats([g], [G])
    got = ops.similarity(dot, sq, (G * G).sum(), kind)
    ref = {
        "cosine": F.cosine_similarity(g, G[None], dim=1),
        "dot": g @ G,
        "projection": g @ G / G.norm(),
        "distance": -(g - G).norm(dim=1),
    }[kind]
    torch.testing.assert_close(got, ref)


def test_similarity_rejects_unknown_kind():
    with pytest.raises(ValueError, match="kind"):
        ops.similarity(torch.zeros(2), torch.zeros(2), 1.0, "euclid")


@pytest.mark.parametrize("bad, match", [
    (lambda: ops.per_sample_grad_stats([], []), "empty"),
    (lambda: ops.per_sample_grad_stats([torch.zeros(2, 3)], []), "has 1 tensors but target has 0"),
    (lambda: ops.per_sample_grad_stats([torch.zeros(2, 3), torch.zeros(3, 3)], [torch.zeros(3)] * 2),
     r"grads\[1\] has 3 samples"),
    (lambda: ops.per_sample_grad_stats([torch.zeros(2, 3), torch.zeros(2, 4)], [torch.zeros(3), torch.zeros(5)]),
     r"target\[1\] has shape \[5\].*per-sample shape \[4\]"),
    (lambda: ops.per_sample_grad_stats([torch.zeros(2, 3, dtype=torch.long)], [torch.zeros(3)]), "floating"),
    (lambda: ops.per_sample_grad_stats(torch.zeros(2, 3), torch.zeros(3)), "lists"),
])
def test_grad_stats_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        bad()


def test_grad_stats_cpp_checks_direct_call():
    # the C++ kernel validates too (direct torch.ops call bypasses the Python wrapper)
    with pytest.raises(ValueError, match=r"target\[0\] has shape"):
        torch.ops.dvgs_fast.per_sample_grad_stats([torch.zeros(2, 3)], [torch.zeros(4)])


def test_grad_stats_opcheck():
    gen = torch.Generator().manual_seed(5)
    for n in (0, 1, 4):
        grads, target = make_case(n, [(3, 2), (5,)], torch.float64, "cpu", gen)
        torch.library.opcheck(torch.ops.dvgs_fast.per_sample_grad_stats.default, (grads, target))
        grads = [g.requires_grad_() for g in grads]
        target = [t.requires_grad_() for t in target]
        torch.library.opcheck(torch.ops.dvgs_fast.per_sample_grad_stats.default, (grads, target))
        torch.library.opcheck(torch.ops.dvgs_fast.per_sample_cosine.default, (grads, target, 1e-8))


def test_grad_stats_gradcheck():
    gen = torch.Generator().manual_seed(9)
    grads, target = make_case(3, [(2, 3), (4,)], torch.float64, "cpu", gen)
    inputs = [x.requires_grad_() for x in grads + target]

    def f(*xs):
        d, s = torch.ops.dvgs_fast.per_sample_grad_stats(list(xs[:2]), list(xs[2:]))
        return d, s

    assert torch.autograd.gradcheck(f, inputs)


def test_grad_stats_under_torch_compile():
    gen = torch.Generator().manual_seed(2)
    grads, target = make_case(4, [(3, 5), (5,)], torch.float32, "cpu", gen)

    def f(g0, g1, t0, t1):
        d, s = ops.per_sample_grad_stats([g0, g1], [t0, t1])
        return d / s.sqrt()

    got = torch.compile(f, backend="aot_eager", fullgraph=True)(*grads, *target)
    torch.testing.assert_close(got, f(*grads, *target))
