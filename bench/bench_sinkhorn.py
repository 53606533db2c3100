"""dvgs_fast.ops.sinkhorn (CPU kernel) against geomloss's tensorized backend (same algorithm,
same result) and the pure-PyTorch tensorized reference, float32, blur 0.05, scaling 0.5,
debiased; plus LossVal's shapes and the kernel's floor. Every comparison is measured in one run,
interleaved, at a pinned thread count, in CPU and wall time (bench/_timing.py).

    pytest bench/bench_sinkhorn.py -m "not slow"   # N = M = 1k..4k, LossVal shapes, floor (~20 min)
    pytest bench/bench_sinkhorn.py                 # + N = 16k (geomloss: 4 GB of cost matrices), 50k (ours)

Rows named "(avx2)" force the kernel's AVX2 variant (DVGS_FAST_CPU_ISA=avx2) on a CPU that has
AVX-512: what a machine without AVX-512 runs. The floor of a case is
    passes x (dot products x d / peak FMA rate + exp2 count / exp2 rate)
with the per-core rates measured by bench/sinkhorn_floor.cpp (the kernel's own code, compiled
with the extension's flags) and passes = n_iter + 1 (the final extrapolation). Per pass the
kernel forms N M + N^2/2 + M^2/2 dot products (symmetric self terms) and (N + M)^2 exp2 (each
dot product serves a row and a column log-sum-exp), before block skipping.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

import dvgs_fast  # noqa: F401
from dvgs_fast.ops import sinkhorn
from dvgs_fast.ops._sinkhorn_reference import sinkhorn_reference
from _memory import peak_memory
from _timing import ALL_CORES, Comparison, pinned_threads, record

try:
    import geomloss
except ImportError:  # pragma: no cover - geomloss is a test dependency
    geomloss = None

KW = dict(blur=0.05, p=2, scaling=0.5, debias=True)
ROOT = Path(__file__).resolve().parents[1]
HAS_AVX512 = torch.backends.cpu.get_cpu_capability() == "AVX512"
OURS = "dvgs_fast.ops.sinkhorn"
GEOMLOSS = f"geomloss {getattr(geomloss, '__version__', '?')} SamplesLoss tensorized"
TORCH_REF = "torch tensorized (dvgs_fast sinkhorn_reference)"


def clouds(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(n, d, generator=g) + 0.5


def _with_isa(isa, fn):
    def run():
        old = os.environ.get("DVGS_FAST_CPU_ISA")
        os.environ["DVGS_FAST_CPU_ISA"] = isa
        try:
            return fn()
        finally:
            if old is None:
                os.environ.pop("DVGS_FAST_CPU_ISA", None)
            else:
                os.environ["DVGS_FAST_CPU_ISA"] = old
    return run


def _impls(x, y, *, torch_ref: bool):
    def ours():
        with torch.no_grad():
            r = sinkhorn(x, y, **KW)
        return float(r.cost), r.n_iter

    def geo():
        with torch.no_grad():
            return float(geomloss.SamplesLoss("sinkhorn", backend="tensorized", **KW)(x, y)), None

    def ref():
        with torch.no_grad():
            return float(sinkhorn_reference(x, y, **KW).cost), None

    impls = {f"{OURS} ({torch.backends.cpu.get_cpu_capability().lower()})": ours}
    if HAS_AVX512:
        impls[f"{OURS} (avx2)"] = _with_isa("avx2", ours)
    impls[GEOMLOSS] = geo
    if torch_ref:
        impls[TORCH_REF] = ref
    return impls


# ------------------------------------------------------------------------------ floor
@functools.lru_cache(maxsize=None)
def floor_rates(isa: str) -> dict | None:
    """Per-core throughputs of the kernel's code (bench/sinkhorn_floor.cpp), or None without g++."""
    gxx = shutil.which("g++")
    if gxx is None:
        return None
    flags = {"avx2": ["-mavx2", "-mfma", "-DFLOOR_BYTES=32"],
             "avx512": ["-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-mavx2", "-mfma",
                        "-DFLOOR_BYTES=64"]}[isa]
    exe = Path(tempfile.mkdtemp(prefix="sinkhorn_floor_")) / "floor"
    subprocess.run([gxx, "-O3", "-std=gnu++20", "-I", str(ROOT / "csrc"), *flags,
                    str(ROOT / "bench" / "sinkhorn_floor.cpp"), "-o", str(exe)], check=True, timeout=300)
    out = subprocess.run([str(exe), "8", "30", "64", "978"], check=True, capture_output=True, text=True, timeout=300)
    rates = json.loads(out.stdout)
    # the micro-kernel at large d shows the FMA pipes' peak at least as well as the synthetic loop
    rates["fma_peak_per_s"] = max(rates["fma_per_s"], *rates["dot_tile_fma_per_s"].values())
    return rates


def uses_cache(n: int, m: int, d: int, budget_mb: float = 64.0, dtype_bytes: int = 4) -> bool:
    """The CPU engine's dispatch (csrc/cpu/sinkhorn.cpp): keep the dot-product tiles when d >= 16
    and all of them (cross + both upper triangles, in 48-row x 16-column blocks) fit the budget."""
    def chunks(k):
        return -(-k // 48)

    def panels(k):
        return -(-k // 16)

    def self_elems(k):
        return sum((panels(k) - 3 * c) * 16 * 48 for c in range(chunks(k)))

    rows, cols = (m, n) if m > n else (n, m)
    elems = chunks(rows) * panels(cols) * 16 * 48 + self_elems(n) + self_elems(m)
    return d >= 16 and elems * dtype_bytes <= budget_mb * 2**20


def floor_seconds(rates: dict, n: int, m: int, d: int, n_iter: int) -> dict:
    """Lower bound of one call at the measured per-core rates: every pass evaluates (N + M)^2
    exp2; the dot products (N M + N^2/2 + M^2/2 of them, d FMAs each) are paid every pass on the
    recompute path, once on the cached path."""
    passes = n_iter + 1
    dots = n * m + n * n / 2 + m * m / 2
    exps = (n + m) ** 2
    cached = uses_cache(n, m, d)
    fma = (1 if cached else passes) * dots * d / rates["fma_peak_per_s"]
    exp = passes * exps / rates["exp2_per_s"]
    return {"floor_s": fma + exp, "floor_fma_s": fma, "floor_exp2_s": exp, "passes": passes,
            "pairs_per_pass": dots, "exp2_per_pass": exps, "path": "cached dot products" if cached else "recompute"}


def _floors(summ: dict, n: int, m: int, d: int, n_iter: int, benchmark) -> None:
    """Attach the floor to each of our rows (the ISA that row ran)."""
    for name, row in summ["impls"].items():
        if not name.startswith(OURS):
            continue
        isa = "avx2" if "(avx2)" in name else ("avx512" if "(avx512)" in name else None)
        rates = floor_rates(isa) if isa else None
        if rates is None:
            continue
        fl = floor_seconds(rates, n, m, d, n_iter)
        row["floor_s"] = fl["floor_s"]
        row["of_floor"] = row["cpu_median_s"] / fl["floor_s"]
        row["path"] = fl["path"]
        benchmark.extra_info.setdefault("floor", {})[isa] = {**fl, "rates": rates}


# ------------------------------------------------------------------------------ N = M
def _case(benchmark, n, d, threads, rounds, torch_ref):
    if geomloss is None:
        pytest.skip("geomloss not installed")
    x, y = clouds(n, d)
    cmp = Comparison(_impls(x, y, torch_ref=torch_ref), threads=threads).run(
        benchmark, rounds, f"sinkhorn N=M={n} d={d}, float32, {threads} thread(s)")
    summ = record(benchmark, cmp, GEOMLOSS, n=n, d=d, threads=threads)
    costs = {k: v[0] for k, v in cmp.results.items()}
    n_iter = next(v[1] for k, v in cmp.results.items() if k.startswith(OURS))
    benchmark.extra_info.update(costs=costs, n_iter=n_iter)
    if threads == 1:
        _floors(summ, n, n, d, n_iter, benchmark)
    ref_cost = costs[GEOMLOSS]
    assert all(abs(c - ref_cost) <= 1e-3 * abs(ref_cost) for c in costs.values()), costs


@pytest.mark.parametrize("d", [8, 64])
@pytest.mark.parametrize("n", [1000, 2000, 4000])
def test_sinkhorn_cpu(benchmark, n, d):
    _case(benchmark, n, d, 1, rounds=5 if n <= 2000 else 3, torch_ref=n <= 2000)


@pytest.mark.parametrize("d", [8, 64])
def test_sinkhorn_cpu_all_cores(benchmark, d):
    _case(benchmark, 4000, d, ALL_CORES, rounds=3, torch_ref=False)


@pytest.mark.parametrize("d", [8, 64])
def test_sinkhorn_thread_scaling(benchmark, d):
    """The kernel alone at 1 and at all cores, interleaved: CPU time and wall time."""
    x, y = clouds(4000, d)

    def at(k):
        def run():
            with pinned_threads(k), torch.no_grad():
                return float(sinkhorn(x, y, **KW).cost)
        return run

    cmp = Comparison({f"{OURS}, 1 thread": at(1), f"{OURS}, {ALL_CORES} threads": at(ALL_CORES)}).run(
        benchmark, 3, f"sinkhorn N=M=4000 d={d}: thread scaling")
    record(benchmark, cmp, f"{OURS}, 1 thread", n=4000, d=d, threads=f"1 vs {ALL_CORES}")


def test_sinkhorn_backward_cpu(benchmark):
    """Value + gradients for x and the weights, N = M = 4000, d = 8."""
    if geomloss is None:
        pytest.skip("geomloss not installed")
    n = 4000
    x, y = clouds(n, 8)
    a = torch.full((n,), 1.0 / n)

    def ours():
        xr, ar = x.clone().requires_grad_(), a.clone().requires_grad_()
        cost = sinkhorn(xr, y, ar, **KW).cost
        cost.backward()
        return float(cost)

    def geo():
        xr, ar = x.clone().requires_grad_(), a.clone().requires_grad_()
        cost = geomloss.SamplesLoss("sinkhorn", backend="tensorized", **KW)(ar, xr, torch.full((n,), 1.0 / n), y)
        cost.backward()
        return float(cost)

    cmp = Comparison({f"{OURS} value+backward": ours, f"{GEOMLOSS} value+backward": geo}).run(
        benchmark, 3, "sinkhorn value+backward N=M=4000 d=8, float32, 1 thread(s)")
    record(benchmark, cmp, f"{GEOMLOSS} value+backward", n=n, d=8, threads=1)


# ------------------------------------------------------------------------------ LossVal's shapes
LOSSVAL_SHAPES = [(m, d) for m in (120, 300, 1000, 2000, 5000) for d in (30, 64, 978)]


@pytest.mark.parametrize("m,d", LOSSVAL_SHAPES, ids=[f"m{m}-d{d}" for m, d in LOSSVAL_SHAPES])
def test_sinkhorn_lossval_shapes(benchmark, m, d):
    """LossVal's call: a batch of 128 weighted points against m unit-mass targets, diameter
    1.1 x the largest batch-target distance; value and the gradient for the weights (what
    LossVal differentiates). Ours by default (dot-product cache where the call is small) and with
    the cache off (recomputing the dot products every pass), against geomloss."""
    if geomloss is None:
        pytest.skip("geomloss not installed")
    g = torch.Generator().manual_seed(m + d)
    x, y = torch.rand(128, d, generator=g), torch.rand(m, d, generator=g)
    w, b = torch.rand(128, generator=g) + 0.5, torch.ones(m)
    diam = 1.1 * float(torch.cdist(x, y).max())

    def ours():
        wr = w.clone().requires_grad_()
        cost = torch.ops.dvgs_fast.sinkhorn(x, y, wr, b, 0.05, 2, 0.5, diam, True, None, None)[0]
        cost.backward()
        return float(cost)

    def recompute():
        os.environ["DVGS_FAST_SINKHORN_CACHE_MB"] = "0"
        try:
            return ours()
        finally:
            os.environ.pop("DVGS_FAST_SINKHORN_CACHE_MB", None)

    def geo():
        wr = w.clone().requires_grad_()
        loss = geomloss.SamplesLoss("sinkhorn", p=2, blur=0.05, scaling=0.5, diameter=diam, backend="tensorized")
        cost = loss(wr, x, b, y)
        cost.backward()
        return float(cost)

    impls = {f"{OURS} (default dispatch)": ours, f"{OURS} (cache off: recompute)": recompute, GEOMLOSS: geo}
    cmp = Comparison(impls).run(benchmark, 5 if m <= 1000 else 3,
                                f"sinkhorn LossVal shape 128 x {m}, d={d}, value+backward, 1 thread(s)")
    record(benchmark, cmp, GEOMLOSS, n=128, m=m, d=d, threads=1)
    c = cmp.results
    assert abs(c[f"{OURS} (default dispatch)"] - c[GEOMLOSS]) <= 1e-3 * abs(c[GEOMLOSS])


# ------------------------------------------------------------------------------ large (slow)
@pytest.mark.slow
@pytest.mark.parametrize("d", [8, 64])
def test_sinkhorn_cpu_16k(benchmark, d):
    _case(benchmark, 16000, d, 1, rounds=1, torch_ref=False)


@pytest.mark.slow
@pytest.mark.parametrize("d", [8, 64])
def test_sinkhorn_cpu_50k(benchmark, d):
    """Ours only (geomloss would need four 50k x 50k float32 matrices: 40 GB; machine: 24 GiB);
    peak RSS above the start shows the O(N + M) memory."""
    x, y = clouds(50000, d)
    seen = {}

    def run():
        with torch.no_grad():
            cost, peak = peak_memory(lambda: float(sinkhorn(x, y, **KW).cost))
        seen["peak"] = peak
        return cost

    name = f"{OURS} ({torch.backends.cpu.get_cpu_capability().lower()})"
    cmp = Comparison({name: run}, warmup=0).run(benchmark, 1, f"sinkhorn N=M=50000 d={d}, float32, 1 thread(s)")
    record(benchmark, cmp, None, n=50000, d=d, threads=1, peak_mem_bytes=int(seen["peak"]),
           inputs_bytes=int(2 * 50000 * d * 4))
