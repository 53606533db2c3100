"""per_sample_cosine and linear_ghost_stats against their torch references (CPU, or GPU where
the CUDA kernels are built): each pair measured in one run, interleaved, at a pinned thread count
(1; all cores as a separate row), CPU and wall time, load average (bench/_timing.py). Peak memory
above the start (bench/_memory.py) of one call of each goes into extra_info."""
import pytest
import torch
import torch.nn.functional as F

import dvgs_fast
from dvgs_fast import ops
from _memory import peak_memory
from _timing import ALL_CORES, Comparison, record

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


SIZES = [(1_000, 10_000, 1), (10_000, 10_000, 1), (10_000, 10_000, ALL_CORES),
         pytest.param(1_000, 1_000_000, 1, marks=pytest.mark.slow),
         pytest.param(10_000, 1_000_000, 1, marks=pytest.mark.skip(
             reason="N x P = 1e10 floats = 40 GB of gradients alone: does not fit in 24 GiB"))]

REF_COS = "reference: torch.cat + F.cosine_similarity (the original DVGS)"
FUSED_COS = "dvgs_fast.ops.per_sample_cosine (fused)"


def _peaks(impls, device):
    return {k: int(peak_memory(fn, device=device)[1]) for k, fn in impls.items()}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,p,threads", SIZES)
def test_per_sample_cosine(benchmark, device, n, p, threads):
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(n, p // K, generator=gen).to(device) for _ in range(K)]
    target = [torch.randn(p // K, generator=gen).to(device) for _ in range(K)]

    def wrap(fn):
        def run():
            out = fn(grads, target)
            _sync(device)
            return out
        return run

    impls = {REF_COS: wrap(stats_reference), FUSED_COS: wrap(stats_fused)}
    peaks = _peaks(impls, device)
    cmp = Comparison(impls, threads=threads).run(benchmark, 3 if n * p >= 1e9 else 10,
                                                 f"per_sample_cosine N={n} P={p} {device}, {threads} thread(s)")
    record(benchmark, cmp, REF_COS, device=device, n=n, p=p, threads=threads, peak_mem_bytes_by_impl=peaks,
           bytes_read=int(n * p * 4))
    assert torch.allclose(cmp.results[REF_COS], cmp.results[FUSED_COS], atol=1e-4)


def ghost_reference(a, d, w, b):
    """Materialise per-sample gradients (what torch.func gives) and reduce them."""
    per_w = torch.einsum("no,ni->noi", d, a)
    flat = torch.cat([per_w.reshape(a.shape[0], -1), d], 1)
    tgt = torch.cat([w.reshape(-1), b])
    return flat @ tgt, (flat * flat).sum(1)


REF_GHOST = "reference: materialised per-sample gradients (einsum), 1 GB chunks"
FUSED_GHOST = "dvgs_fast.ops.linear_ghost_stats (fused)"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,d_in,d_out,threads", [pytest.param(20_000, 978, 256, 1, marks=pytest.mark.slow),
                                                  (20_000, 108, 100, 1), (2_000, 978, 256, 1),
                                                  (2_000, 978, 256, ALL_CORES)])
def test_linear_ghost_stats(benchmark, device, n, d_in, d_out, threads):
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, d_in, generator=gen).to(device)
    d = torch.randn(n, d_out, generator=gen).to(device)
    w = torch.randn(d_out, d_in, generator=gen).to(device)
    b = torch.randn(d_out, generator=gen).to(device)
    chunk = max(1, (1 << 30) // (4 * d_in * d_out))  # keep the materialised gradients at 1 GB

    def ref():
        outs = [ghost_reference(a[s:s + chunk], d[s:s + chunk], w, b) for s in range(0, n, chunk)]
        _sync(device)
        return torch.cat([o[0] for o in outs])

    def fused():
        out = ops.linear_ghost_stats(a, d, w, b)
        _sync(device)
        return out

    impls = {REF_GHOST: ref, FUSED_GHOST: fused}
    peaks = _peaks(impls, device)
    cmp = Comparison(impls, threads=threads).run(benchmark, 3,
                                                 f"linear_ghost_stats N={n} {d_in}->{d_out} {device}, {threads} thread(s)")
    record(benchmark, cmp, REF_GHOST, device=device, n=n, threads=threads, peak_mem_bytes_by_impl=peaks)
