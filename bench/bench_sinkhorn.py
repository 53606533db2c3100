"""dvgs_fast.ops.sinkhorn vs the pure-PyTorch tensorized log-domain Sinkhorn and vs geomloss's
tensorized backend (same algorithm, same result), CPU, float32, N = M points in d dims, uniform
weights, blur 0.05, scaling 0.5, debiased. Peak RSS of one call goes into extra_info.

    pytest bench/bench_sinkhorn.py -m "not slow"     # N = 1k, 4k (~5 min on 2 busy cores)
    pytest bench/bench_sinkhorn.py                   # + N = 16k for all three, 50k for ours
"""
import math
import os

import pytest
import torch

import dvgs_fast  # noqa: F401
from dvgs_fast.ops import sinkhorn
from dvgs_fast.ops._sinkhorn_reference import sinkhorn_reference
from _memory import peak_memory

try:
    import geomloss
except ImportError:  # pragma: no cover - geomloss is a test dependency
    geomloss = None

IMPLS = ["fast", "torch_tensorized", "geomloss_tensorized"]
KW = dict(blur=0.05, p=2, scaling=0.5, debias=True)


def clouds(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(n, d, generator=g) + 0.5


def run_impl(impl, x, y):
    with torch.no_grad():
        if impl == "fast":
            return float(sinkhorn(x, y, **KW).cost)
        if impl == "torch_tensorized":
            return float(sinkhorn_reference(x, y, **KW).cost)
        loss = geomloss.SamplesLoss("sinkhorn", backend="tensorized", **KW)
        return float(loss(x, y))


def _load():
    try:
        return os.getloadavg()[0]
    except OSError:  # pragma: no cover
        return float("nan")


def _bench(benchmark, impl, n, d, rounds):
    if impl == "geomloss_tensorized" and geomloss is None:
        pytest.skip("geomloss not installed")
    benchmark.group = f"sinkhorn N=M={n} d={d} cpu float32"
    x, y = clouds(n, d)
    seen = {"peak": 0, "cost": float("nan")}

    def measured():  # every round also samples the peak RSS (1 ms polling thread)
        cost, peak = peak_memory(run_impl, impl, x, y)
        seen["peak"], seen["cost"] = max(seen["peak"], peak), cost

    benchmark.pedantic(measured, rounds=rounds, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update(impl=impl, n=n, d=d, threads=torch.get_num_threads(), cost=seen["cost"],
                                peak_rss_bytes=int(seen["peak"]), load_avg=_load())
    assert math.isfinite(seen["cost"])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("d", [8, 64])
@pytest.mark.parametrize("n", [1000, 4000])
def test_sinkhorn_cpu(benchmark, impl, n, d):
    _bench(benchmark, impl, n, d, rounds=5 if n <= 1000 else 3)


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("d", [8, 64])
def test_sinkhorn_cpu_16k(benchmark, impl, d):
    _bench(benchmark, impl, 16000, d, rounds=1)


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("d", [8, 64])
def test_sinkhorn_cpu_50k(benchmark, impl, d):
    if impl != "fast":
        pytest.skip("tensorized: four dense 50k x 50k float32 cost matrices are 40 GB (machine: 24 GiB)")
    _bench(benchmark, impl, 50000, d, rounds=1)


@pytest.mark.parametrize("n", [4000])
def test_sinkhorn_backward_cpu(benchmark, n):
    """One forward + backward (gradients for x and the weights), fast op only."""
    benchmark.group = f"sinkhorn fwd+bwd N=M={n} d=8 cpu float32"
    x, y = clouds(n, 8)
    a = torch.full((n,), 1.0 / n)

    def run():
        xr, ar = x.clone().requires_grad_(), a.clone().requires_grad_()
        cost = sinkhorn(xr, y, ar, **KW).cost
        cost.backward()
        return float(cost)

    benchmark.extra_info.update(impl="fast", n=n, d=8, load_avg=_load())
    benchmark.pedantic(run, rounds=3, iterations=1)
