"""per_sample_grad_stats and linear_ghost_stats against their torch references (CPU, or GPU
where the CUDA kernels are built). Ratios are taken from medians measured in the same run."""
import pytest
import torch
import torch.nn.functional as F

import dvgs_fast
from dvgs_fast import ops
from _memory import peak_memory

K = 4  # parameters per model: the reference must concatenate them, the fused op does not
CUDA = torch.cuda.is_available() and dvgs_fast.build_info()["with_cuda"]
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])


def stats_reference(grads, target):
    """What the original DVGS does: flatten + concatenate, then torch's cosine."""
    n = grads[0].shape[0]
    flat = torch.cat([g.reshape(n, -1) for g in grads], 1)
    return F.cosine_similarity(flat, torch.cat([t.reshape(-1) for t in target])[None], dim=1)


def stats_fused(grads, target):
    return ops.per_sample_cosine(grads, target)


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


SIZES = [(1_000, 10_000), (10_000, 10_000), pytest.param(1_000, 1_000_000, marks=pytest.mark.slow),
         pytest.param(10_000, 1_000_000, marks=pytest.mark.skip(
             reason="N x P = 1e10 floats = 40 GB of gradients alone: does not fit in 24 GiB"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["reference", "fused"])
@pytest.mark.parametrize("n,p", SIZES)
def test_per_sample_cosine(benchmark, device, impl, n, p):
    benchmark.group = f"per_sample_cosine N={n} P={p} {device}"
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(n, p // K, generator=gen).to(device) for _ in range(K)]
    target = [torch.randn(p // K, generator=gen).to(device) for _ in range(K)]
    fn = stats_reference if impl == "reference" else stats_fused

    def run():
        out = fn(grads, target)
        _sync(device)
        return out

    _, peak = peak_memory(run, device=device)
    benchmark.extra_info.update(impl=impl, device=device, n=n, p=p, peak_mem_bytes=int(peak),
                                bytes_read=int(n * p * 4))
    rounds = 3 if n * p >= 1e9 else 10
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=1)
    benchmark.extra_info["gb_per_s"] = n * p * 4 / benchmark.stats.stats.median / 1e9


def ghost_reference(a, d, w, b):
    """Materialise per-sample gradients (what torch.func gives) and reduce them."""
    per_w = torch.einsum("no,ni->noi", d, a)
    flat = torch.cat([per_w.reshape(a.shape[0], -1), d], 1)
    tgt = torch.cat([w.reshape(-1), b])
    return flat @ tgt, (flat * flat).sum(1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["reference", "fused"])
@pytest.mark.parametrize("n,d_in,d_out", [pytest.param(20_000, 978, 256, marks=pytest.mark.slow), (20_000, 108, 100),
                                          (2_000, 978, 256)])
def test_linear_ghost_stats(benchmark, device, impl, n, d_in, d_out):
    benchmark.group = f"linear_ghost_stats N={n} {d_in}->{d_out} {device}"
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, d_in, generator=gen).to(device)
    d = torch.randn(n, d_out, generator=gen).to(device)
    w = torch.randn(d_out, d_in, generator=gen).to(device)
    b = torch.randn(d_out, generator=gen).to(device)
    if impl == "reference":
        chunk = max(1, (1 << 30) // (4 * d_in * d_out))  # keep the materialised gradients at 1 GB

        def run():
            outs = [ghost_reference(a[s:s + chunk], d[s:s + chunk], w, b) for s in range(0, n, chunk)]
            _sync(device)
            return outs
    else:
        def run():
            out = ops.linear_ghost_stats(a, d, w, b)
            _sync(device)
            return out
    _, peak = peak_memory(run, device=device)
    benchmark.extra_info.update(impl=impl, device=device, n=n, peak_mem_bytes=int(peak))
    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
