"""dvgs_fast.ops.sinkhorn against the float64 tensorized reference and against geomloss;
gradients (geomloss's, and gradcheck at convergence), opcheck, input errors, CPU instruction-set
variants, and the CUDA kernels where a GPU is present."""
import math

import pytest
import torch

import dvgs_fast  # noqa: F401  (registers the ops)
from dvgs_fast.ops import SinkhornResult, sinkhorn
from dvgs_fast.ops._sinkhorn_reference import epsilon_schedule, sinkhorn_reference

from _devices import DEVICES

geomloss = pytest.importorskip("geomloss", reason="geomloss is a test dependency (pip install geomloss)")


def clouds(n, m, d, *, seed=0, dtype=torch.float64, weights="rand", device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = 0.8 * torch.randn(m, d, generator=g, dtype=torch.float64) + 0.3
    if weights == "rand":      # unnormalised masses, as LossVal uses them
        a = torch.rand(n, generator=g, dtype=torch.float64) + 0.05
        b = torch.rand(m, generator=g, dtype=torch.float64) + 0.05
    elif weights == "ones":
        a, b = torch.ones(n, dtype=torch.float64), torch.ones(m, dtype=torch.float64)
    else:                      # probability vectors
        a, b = torch.full((n,), 1.0 / n, dtype=torch.float64), torch.full((m,), 1.0 / m, dtype=torch.float64)
    return [t.to(dtype=dtype, device=device) for t in (x, y, a, b)]


def geomloss_run(x, y, a, b, *, potentials=False, **kw):
    loss = geomloss.SamplesLoss("sinkhorn", backend="tensorized", potentials=potentials, **kw)
    return loss(a, x, b, y)


def rel(u, v):
    return float((u - v).abs().max() / v.abs().max().clamp_min(1e-300))


# ------------------------------------------------------------------------------ values
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("debias", [True, False])
@pytest.mark.parametrize("n,m,d", [(1, 1, 1), (7, 13, 3), (100, 37, 5), (200, 1100, 2), (1100, 70, 9)])
def test_matches_reference_float64(n, m, d, p, debias):
    x, y, a, b = clouds(n, m, d, seed=n + m)
    out = sinkhorn(x, y, a, b, p=p, debias=debias)
    ref = sinkhorn_reference(x, y, a, b, p=p, debias=debias)
    assert isinstance(out, SinkhornResult)
    assert out.n_iter == ref.n_iter
    assert out.cost.shape == () and out.f.shape == (n,) and out.g.shape == (m,)
    assert math.isclose(float(out.cost), float(ref.cost), rel_tol=1e-10, abs_tol=1e-10)
    scale = max(1.0, float(ref.f.abs().max()), float(ref.g.abs().max()))
    assert float((out.f - ref.f).abs().max()) <= 1e-10 * scale
    assert float((out.g - ref.g).abs().max()) <= 1e-10 * scale


GEOMLOSS_CASES = [
    # (n, m, d, weights, kwargs)
    (200, 150, 3, "rand", dict(p=2, blur=0.05, scaling=0.5)),
    (120, 90, 8, "ones", dict(p=2, blur=0.05, scaling=0.5, diameter=12.0)),   # LossVal's masses
    (150, 150, 2, "prob", dict(p=2, blur=0.1, scaling=0.8)),
    (90, 60, 4, "rand", dict(p=1, blur=0.05, scaling=0.5)),
    (64, 200, 16, "ones", dict(p=2, blur=0.3, scaling=0.7, debias=False)),
]


@pytest.mark.parametrize("n,m,d,weights,kw", GEOMLOSS_CASES)
def test_matches_geomloss_float64(n, m, d, weights, kw):
    x, y, a, b = clouds(n, m, d, seed=3, weights=weights)
    ref = geomloss_run(x, y, a, b, **kw)
    out = sinkhorn(x, y, a, b, **kw)
    assert math.isclose(float(out.cost), float(ref), rel_tol=1e-6)
    F, G = geomloss_run(x, y, a, b, potentials=True, **kw)
    scale = max(1.0, float(F.abs().max()))
    assert float((out.f - F).abs().max()) <= 1e-6 * scale
    assert float((out.g - G).abs().max()) <= 1e-6 * scale


@pytest.mark.parametrize("p", [1, 2])
def test_matches_geomloss_float32(p):
    x, y, a, b = clouds(300, 250, 6, seed=5, dtype=torch.float32)
    ref = geomloss_run(x, y, a, b, p=p)
    out = sinkhorn(x, y, a, b, p=p)
    assert out.cost.dtype == torch.float32 and out.f.dtype == torch.float32
    assert math.isclose(float(out.cost), float(ref), rel_tol=1e-4)
    # and close to the float64 answer for the same (rounded) inputs
    ref64 = sinkhorn_reference(*(t.double() for t in (x, y, a, b)), p=p)
    assert math.isclose(float(out.cost), float(ref64.cost), rel_tol=1e-4)


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("debias", [True, False])
def test_gradients_match_geomloss(p, debias):
    x, y, a, b = clouds(80, 60, 3, seed=11)
    kw = dict(p=p, debias=debias, blur=0.1)
    leaves = [t.clone().requires_grad_() for t in (x, y, a, b)]
    g_ref = torch.autograd.grad(geomloss_run(*leaves, **kw), leaves)
    leaves2 = [t.clone().requires_grad_() for t in (x, y, a, b)]
    g_out = torch.autograd.grad(sinkhorn(*leaves2, **kw).cost, leaves2)
    for name, go, gr in zip("xyab", g_out, g_ref):
        assert rel(go, gr) < 1e-8, name


def test_potential_gradients_follow_geomloss():
    """f and g are differentiable too, with geomloss's convention (dual weights held fixed)."""
    x, y, a, b = clouds(40, 30, 2, seed=4)
    g = torch.Generator().manual_seed(1)
    wf, wg = torch.randn(40, generator=g, dtype=torch.float64), torch.randn(30, generator=g, dtype=torch.float64)
    xr, yr = x.clone().requires_grad_(), y.clone().requires_grad_()
    F, G = geomloss_run(xr, yr, a, b, potentials=True, p=2)
    gx_ref, gy_ref = torch.autograd.grad((F * wf).sum() + (G * wg).sum(), (xr, yr))
    xo, yo = x.clone().requires_grad_(), y.clone().requires_grad_()
    r = sinkhorn(xo, yo, a, b, p=2)
    gx, gy = torch.autograd.grad((r.f * wf).sum() + (r.g * wg).sum(), (xo, yo))
    assert rel(gx, gx_ref) < 1e-8
    assert rel(gy, gy_ref) < 1e-8


def test_epsilon_schedule_matches_geomloss():
    from geomloss._legacy.sinkhorn_divergence import epsilon_schedule as gl_schedule
    for p, diam, blur, scaling in [(2, 3.7, 0.05, 0.5), (1, 10.0, 0.01, 0.9), (2, 0.02, 0.05, 0.5), (2, 1.0, 0.5, 0.3)]:
        ours, theirs = epsilon_schedule(p, diam, blur, scaling), gl_schedule(p, diam, blur, scaling)
        assert len(ours) == len(theirs)
        assert all(math.isclose(u, float(v), rel_tol=1e-12) for u, v in zip(ours, theirs))
    x, y, a, b = clouds(50, 40, 3, seed=2)
    for blur, scaling in [(0.05, 0.5), (0.01, 0.9)]:
        diam = 4.0
        n_expected = len(epsilon_schedule(2, diam, blur, scaling))
        assert sinkhorn(x, y, a, b, blur=blur, scaling=scaling, diameter=diam).n_iter == n_expected


def test_zero_weights_and_coincident_points():
    x, y, a, b = clouds(50, 40, 3, seed=9)
    a[::3] = 0.0          # zero mass: geomloss clamps log(0) to -1e5, so do we
    b[5] = 0.0
    ref = geomloss_run(x, y, a, b, p=2)
    assert math.isclose(float(sinkhorn(x, y, a, b).cost), float(ref), rel_tol=1e-6)
    # every point at one place: diameter 0 must not give NaN
    z = torch.zeros(5, 2, dtype=torch.float64)
    r = sinkhorn(z, z.clone())
    assert math.isfinite(float(r.cost)) and abs(float(r.cost)) < 1e-8


def test_tol_and_max_iter_extend_the_schedule():
    x, y, a, b = clouds(40, 30, 2, seed=1, weights="prob")   # equal masses: a fixed point exists
    kw = dict(blur=0.5)
    base = sinkhorn(x, y, a, b, **kw)
    long = sinkhorn(x, y, a, b, tol=1e-12, max_iter=5000, **kw)
    assert base.n_iter < long.n_iter < 5000
    longer = sinkhorn(x, y, a, b, max_iter=long.n_iter + 20, **kw)
    assert longer.n_iter == long.n_iter + 20
    assert math.isclose(float(long.cost), float(longer.cost), rel_tol=1e-10)
    ref = sinkhorn_reference(x, y, a, b, max_iter=base.n_iter + 20, **kw)
    assert math.isclose(float(sinkhorn(x, y, a, b, max_iter=base.n_iter + 20, **kw).cost), float(ref.cost),
                        rel_tol=1e-12)
    # max_iter below the schedule's length never cuts the annealing short
    assert sinkhorn(x, y, a, b, max_iter=1, **kw).n_iter == base.n_iter


def test_default_weights_are_uniform():
    x, y, _, _ = clouds(30, 20, 2, seed=6)
    a, b = torch.full((30,), 1 / 30, dtype=torch.float64), torch.full((20,), 1 / 20, dtype=torch.float64)
    assert math.isclose(float(sinkhorn(x, y).cost), float(sinkhorn(x, y, a, b).cost), rel_tol=1e-12)
    assert math.isclose(float(sinkhorn(x, y).cost), float(geomloss.SamplesLoss("sinkhorn", backend="tensorized")(x, y)),
                        rel_tol=1e-6)


@pytest.mark.parametrize("isa", ["avx2", "generic"])
def test_cpu_instruction_set_variants_agree(isa, monkeypatch):
    cases = [(clouds(150, 90, 5, seed=1), 2), (clouds(70, 130, 3, seed=2, dtype=torch.float32), 2),
             (clouds(40, 33, 4, seed=3), 1), (clouds(128, 200, 40, seed=4, dtype=torch.float32), 2),
             (clouds(60, 50, 24, seed=5), 1)]
    best = [sinkhorn(*c, p=p) for c, p in cases]
    grads_best = []
    for c, p in cases:
        x = c[0].clone().requires_grad_()
        grads_best.append(torch.autograd.grad(sinkhorn(x, *c[1:], p=p).cost, x)[0])
    monkeypatch.setenv("DVGS_FAST_CPU_ISA", isa)
    for (c, p), r0, g0 in zip(cases, best, grads_best):
        r = sinkhorn(*c, p=p)
        tol = 1e-4 if c[0].dtype == torch.float32 else 1e-11
        assert math.isclose(float(r.cost), float(r0.cost), rel_tol=tol)
        x = c[0].clone().requires_grad_()
        g = torch.autograd.grad(sinkhorn(x, *c[1:], p=p).cost, x)[0]
        # float32: the debiased gradient is a difference of two barycentres (cancellation); ours is
        # within ~3e-3 of float64 on these cases, geomloss's float32 within ~1e-2
        assert rel(g, g0) < (5e-3 if c[0].dtype == torch.float32 else 1e-9)


# The CPU engine keeps the tiles of dot products of a small call (DVGS_FAST_SINKHORN_CACHE_MB,
# d >= 16) and recomputes them otherwise; rows / columns far below their running maximum skip
# their exp2 sweep. Both paths, and heavy skipping, against the float64 reference.
@pytest.mark.parametrize("cache_mb", ["0", "256"])
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("n,m,d", [(128, 300, 40), (130, 49, 16), (50, 200, 130), (97, 97, 20)])
def test_dot_product_cache_and_recompute_match_reference(n, m, d, p, cache_mb, monkeypatch):
    monkeypatch.setenv("DVGS_FAST_SINKHORN_CACHE_MB", cache_mb)
    x, y, a, b = clouds(n, m, d, seed=n * m + d, weights="ones")
    leaves = [t.clone().requires_grad_() for t in (x, y, a, b)]
    out = sinkhorn(*leaves, p=p)
    grads = torch.autograd.grad(out.cost, leaves)
    ref_in = [t.clone().requires_grad_() for t in (x, y, a, b)]
    ref = sinkhorn_reference(*ref_in, p=p)
    ref_grads = torch.autograd.grad(ref.cost, ref_in)
    assert math.isclose(float(out.cost), float(ref.cost), rel_tol=1e-10, abs_tol=1e-10)
    scale = max(1.0, float(ref.f.abs().max()))
    assert float((out.f - ref.f.detach()).abs().max()) <= 1e-10 * scale
    for go, gr in zip(grads, ref_grads):
        assert rel(go, gr) < 1e-8


def test_cache_path_is_bitwise_the_recompute_path(monkeypatch):
    """Same dot products (the micro-kernel's), same sums: the cache changes speed only."""
    x, y, a, b = clouds(128, 500, 64, seed=21, dtype=torch.float32, weights="ones")
    monkeypatch.setenv("DVGS_FAST_SINKHORN_CACHE_MB", "0")
    r0 = sinkhorn(x, y, a, b)
    monkeypatch.setenv("DVGS_FAST_SINKHORN_CACHE_MB", "256")
    r1 = sinkhorn(x, y, a, b)
    assert torch.equal(r0.f, r1.f) and torch.equal(r0.g, r1.g) and float(r0.cost) == float(r1.cost)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_block_skipping_at_small_temperatures(dtype):
    """Spread-out clouds and a small blur: at the end of the schedule nearly every tile of every
    row lies far below the row's maximum and is skipped; the result must not move."""
    x, y, a, b = clouds(700, 650, 3, seed=13, weights="prob")
    x, y = 8 * x, 8 * y
    ref = sinkhorn_reference(x, y, a, b, blur=0.01)
    out = sinkhorn(*(t.to(dtype) for t in (x, y, a, b)), blur=0.01)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    assert math.isclose(float(out.cost), float(ref.cost), rel_tol=tol)
    scale = float(ref.f.abs().max())
    assert float((out.f.double() - ref.f).abs().max()) <= tol * 10 * scale


def test_lossval_shapes_match_geomloss_float32():
    """LossVal's call: a batch of 128 weighted points against unit-mass targets, d up to ~1000,
    fixed diameter; value and the gradient with respect to the weights."""
    for m, d in [(120, 30), (300, 978)]:
        x, y, _, _ = clouds(128, m, d, seed=m + d, dtype=torch.float32)
        w = (torch.rand(128, generator=torch.Generator().manual_seed(d)) + 0.5).float()
        b = torch.ones(m)
        diam = 1.1 * float(torch.cdist(x, y).max())
        kw = dict(p=2, blur=0.05, scaling=0.5, diameter=diam)
        w1, w2 = w.clone().requires_grad_(), w.clone().requires_grad_()
        ref = geomloss_run(x, y, w1, b, **kw)
        out = sinkhorn(x, y, w2, b, **kw).cost
        assert math.isclose(float(out), float(ref), rel_tol=1e-4)
        (g_ref,), (g_out,) = torch.autograd.grad(ref, w1), torch.autograd.grad(out, w2)
        assert rel(g_out, g_ref) < 1e-3


@pytest.mark.parametrize("d,cache_mb", [(3, "64"), (20, "0"), (20, "256")])
def test_result_independent_of_thread_count(d, cache_mb, monkeypatch):
    monkeypatch.setenv("DVGS_FAST_SINKHORN_CACHE_MB", cache_mb)
    x, y, a, b = clouds(2100, 1500, d, seed=8)     # several row chunks per group
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        r1 = sinkhorn(x, y, a, b)
        torch.set_num_threads(max(2, threads))
        r2 = sinkhorn(x, y, a, b)
    finally:
        torch.set_num_threads(threads)
    assert float(r1.cost) == float(r2.cost)
    assert torch.equal(r1.f, r2.f) and torch.equal(r1.g, r2.g)


# ------------------------------------------------------------------------------ autograd checks
def test_gradcheck_at_convergence():
    """At a converged fixed point the envelope-theorem gradients are the exact derivatives.
    Weights are varied along mass-preserving directions (a = u / sum u): with unequal total
    masses the balanced problem has no fixed point."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 2, generator=g, dtype=torch.float64, requires_grad=True)
    y = (torch.randn(6, 2, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    u = (torch.rand(7, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    v = (torch.rand(6, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    for p in (1, 2):
        def fn(x, y, u, v):
            return sinkhorn(x, y, u / u.sum(), v / v.sum(), p=p, blur=0.7, tol=1e-14, max_iter=20000).cost
        assert torch.autograd.gradcheck(fn, (x, y, u, v), atol=1e-6, rtol=1e-5)


def test_opcheck():
    x, y, a, b = clouds(9, 7, 3, seed=12)
    args = tuple(t.requires_grad_() for t in (x, y, a, b)) + (0.1, 2, 0.5, None, True, None, None)
    torch.library.opcheck(torch.ops.dvgs_fast.sinkhorn.default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor",
                                      "test_aot_dispatch_dynamic"))
    x, y, a, b = clouds(9, 7, 3, seed=12)
    fwd = torch.ops.dvgs_fast.sinkhorn(x, y, a, b, 0.1, 2, 0.5, None, True, None, None)
    bargs = (a.clone(), b.clone(), x, y, a, b, fwd[4], fwd[5], 0.01, 2, True, True, True)
    torch.library.opcheck(torch.ops.dvgs_fast.sinkhorn_backward.default, bargs,
                          test_utils=("test_schema", "test_faketensor"))


# ------------------------------------------------------------------------------ input errors
def _good():
    return clouds(5, 4, 3, seed=0)


@pytest.mark.parametrize("mutate,needle", [
    (lambda x, y, a, b, kw: (x, y[:, :2], a, b, kw), "features"),
    (lambda x, y, a, b, kw: (x, y, -a, b, kw), "a has"),
    (lambda x, y, a, b, kw: (x, y, a, torch.zeros_like(b), kw), "b is all zeros"),
    (lambda x, y, a, b, kw: (x.index_fill(0, torch.tensor([1]), float("nan")), y, a, b, kw), "x contains"),
    (lambda x, y, a, b, kw: (x, y.index_fill(0, torch.tensor([0]), float("inf")), a, b, kw), "y contains"),
    (lambda x, y, a, b, kw: (x, y, a.index_fill(0, torch.tensor([0]), float("nan")), b, kw), "a contains"),
    (lambda x, y, a, b, kw: (x[:0], y, None, b, kw), "x is empty"),
    (lambda x, y, a, b, kw: (x, y[:0], a, None, kw), "y is empty"),
    (lambda x, y, a, b, kw: (x[0], y, None, b, kw), "x must be a 2-D"),
    (lambda x, y, a, b, kw: (x.long(), y, None, None, kw), "x must be float32 or float64"),
    (lambda x, y, a, b, kw: (x, y.float(), a, b, kw), "y has dtype"),
    (lambda x, y, a, b, kw: (x, y, a[:3], b, kw), "a must have shape [5]"),
    (lambda x, y, a, b, kw: (x, y, a.float(), b, kw), "a has dtype"),
    (lambda x, y, a, b, kw: (x, y, a, b, dict(blur=0.0)), "blur"),
    (lambda x, y, a, b, kw: (x, y, a, b, dict(blur=float("nan"))), "blur"),
    (lambda x, y, a, b, kw: (x, y, a, b, dict(p=3)), "p must be 1 or 2"),
    (lambda x, y, a, b, kw: (x, y, a, b, dict(scaling=1.0)), "scaling"),
    (lambda x, y, a, b, kw: (x, y, a, b, dict(diameter=-1.0)), "diameter"),
    (lambda x, y, a, b, kw: (x, y, a, b, dict(max_iter=0)), "max_iter"),
    (lambda x, y, a, b, kw: (x, y, a, b, dict(tol=0.0)), "tol"),
])
def test_bad_inputs_raise_value_error(mutate, needle):
    x, y, a, b = _good()
    x, y, a, b, kw = mutate(x, y, a, b, {})
    with pytest.raises(ValueError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        sinkhorn(x, y, a, b, **kw)


def test_direct_op_call_checks_shapes():
    x, y, a, b = _good()
    with pytest.raises(ValueError, match="features"):
        torch.ops.dvgs_fast.sinkhorn(x, y[:, :2], a, b, 0.05, 2, 0.5, None, True, None, None)
    with pytest.raises(ValueError, match="p must be 1 or 2"):
        torch.ops.dvgs_fast.sinkhorn(x, y, a, b, 0.05, 3, 0.5, None, True, None, None)
    with pytest.raises(ValueError, match="empty"):
        torch.ops.dvgs_fast.sinkhorn(x[:0], y, a[:0], b, 0.05, 2, 0.5, None, True, None, None)


# ------------------------------------------------------------------------------ devices
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("p", [1, 2])
def test_device_matches_reference(device, dtype, p):
    for n, m, d in [(1, 3, 1), (129, 77, 5), (300, 520, 40), (200, 100, 130)]:
        x, y, a, b = clouds(n, m, d, seed=n, dtype=dtype, device=device)
        leaves = [t.clone().requires_grad_() for t in (x, y, a, b)]
        out = sinkhorn(*leaves, p=p)
        grads = torch.autograd.grad(out.cost, leaves)
        ref_in = [t.detach().cpu().double().requires_grad_() for t in (x, y, a, b)]
        ref = sinkhorn_reference(*ref_in, p=p)
        ref_grads = torch.autograd.grad(ref.cost, ref_in)
        tol = 1e-9 if dtype == torch.float64 else 2e-3
        assert out.n_iter == ref.n_iter
        assert math.isclose(float(out.cost.detach()), float(ref.cost.detach()), rel_tol=tol, abs_tol=tol)
        for go, gr in zip(grads, ref_grads):
            assert rel(go.cpu().double(), gr) < (1e-7 if dtype == torch.float64 else 2e-2)


# ------------------------------------------------------------------------------ CUDA kernels, emulated
# Without a GPU the torch-free kernel file still runs: compiled by g++ with one std::thread per
# CUDA thread (python_tests/_sinkhorn_cuda_emu.cpp). Checks the device code's logic.
import shutil  # noqa: E402
import subprocess  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cuda_emulator(tmp_path_factory):
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ not found: cannot build the host emulation of the CUDA kernels")
    work = tmp_path_factory.mktemp("sinkhorn_cuda_emu")
    (work / "cuda_runtime.h").write_text("#pragma once\n")   # the emulation defines what it needs
    exe = work / "emu"
    cmd = [gxx, "-std=c++20", "-O1", "-pthread", "-w", "-I", str(work), "-I", str(_ROOT / "csrc"),
           str(_ROOT / "python_tests" / "_sinkhorn_cuda_emu.cpp"), "-o", str(exe)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return exe


def _run_emulator(exe, tmp_path, rows, cols, logw, pot, prev, eps, p):
    dt = rows.dtype
    header = np.array([0 if dt == np.float32 else 1, rows.shape[0], cols.shape[0], rows.shape[1], p,
                       pot is not None, prev is not None, 0], dtype=np.int64)
    inp, outp = tmp_path / "in.bin", tmp_path / "out.bin"
    with open(inp, "wb") as fh:
        fh.write(header.tobytes())
        fh.write(np.array([eps], dtype=np.float64).tobytes())
        for arr in (rows, cols, logw, pot, prev):
            if arr is not None:
                fh.write(np.ascontiguousarray(arr, dtype=dt).tobytes())
    proc = subprocess.run([str(exe), str(inp), str(outp)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    raw = outp.read_bytes()
    n, d, sz = rows.shape[0], rows.shape[1], np.dtype(dt).itemsize
    out = np.frombuffer(raw[:n * sz], dtype=dt)
    lse = np.frombuffer(raw[n * sz:n * sz + 8 * n], dtype=np.float64)
    res = np.frombuffer(raw[n * sz + 8 * n:n * sz + 8 * n + 8], dtype=np.float64)[0]
    grad = np.frombuffer(raw[n * sz + 8 * n + 8:], dtype=dt).reshape(n, d)
    return out, lse, res, grad


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("n,m,d", [(1, 1, 1), (130, 45, 3), (5, 70, 40), (20, 17, 16)])
def test_cuda_kernels_emulated_on_cpu(cuda_emulator, tmp_path, dtype, p, n, m, d):
    g = np.random.default_rng(n * 1000 + m + d)
    rows = g.normal(size=(n, d)).astype(dtype)
    cols = (0.7 * g.normal(size=(m, d)) + 0.2).astype(dtype)
    logw = np.log(g.uniform(0.1, 1.0, size=m)).astype(dtype)
    logw[0] = -1e5                                  # a zero-mass column
    pot = g.normal(size=m).astype(dtype)
    prev = g.normal(size=n).astype(dtype)
    eps = 0.3
    out, lse, res, grad = _run_emulator(cuda_emulator, tmp_path, rows, cols, logw, pot, prev, eps, p)
    # dense float64 truth
    R, C = torch.from_numpy(rows).double().requires_grad_(), torch.from_numpy(cols).double()
    sq = ((R[:, None, :] - C[None, :, :]) ** 2).sum(-1)
    cost = sq / 2 if p == 2 else sq.clamp_min(1e-8).sqrt()
    h = torch.from_numpy(logw).double() + torch.from_numpy(pot).double() / eps
    lse_ref = torch.logsumexp(h[None, :] - cost / eps, dim=1)
    new = -eps * lse_ref
    prev_t = torch.from_numpy(prev).double()
    grad_ref = torch.autograd.grad(new.sum(), R)[0]
    tol = 1e-10 if dtype == np.float64 else 2e-4
    np.testing.assert_allclose(lse, lse_ref.detach().numpy(), rtol=tol, atol=tol * 10)
    np.testing.assert_allclose(out, (0.5 * (prev_t + new)).detach().numpy(), rtol=tol, atol=tol * 10)
    assert abs(res - float((new - prev_t).abs().max().detach())) <= tol * 10 * max(1.0, abs(res))
    np.testing.assert_allclose(grad, grad_ref.numpy(), rtol=tol * 10, atol=tol * 10)
