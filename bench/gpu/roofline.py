"""Each CUDA kernel against its floor (METHOD: count bytes and FLOPs, measure the ceilings).

Ceilings, measured once per run: device-to-device copy bandwidth (bytes read + written) and
the fp32 / tf32 matmul rate. Floors: minimal bytes moved / bandwidth and FLOPs / rate; the
larger is the floor, measured median / floor is the gap. Prints a table; --json writes it.
Targets (H100, issue): per_sample_grad_stats at 4096 x 1M fp32 >= 70% of copy bandwidth;
linear_ghost_stats + DVGS fast snapshot for the LINCS autoencoder at N=720k <= 50 ms.
"""
from __future__ import annotations

import argparse
import json

import torch

import dvgs_fast
from dvgs_fast import ops


def median_ms(fn, warmup=3, reps=20) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    times.sort()
    return times[len(times) // 2]


def ceilings():
    x = torch.randn(1 << 30 >> 2, device="cuda")  # 1 GiB
    y = torch.empty_like(x)
    t = median_ms(lambda: y.copy_(x))
    bw = 2 * x.numel() * 4 / (t / 1e3)  # read + write
    a = torch.randn(8192, 8192, device="cuda")
    b = torch.randn(8192, 8192, device="cuda")
    rates = {}
    for tf32 in (False, True):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        tm = median_ms(lambda: a @ b, reps=10)
        rates["tf32" if tf32 else "fp32"] = 2 * 8192**3 / (tm / 1e3)
    torch.backends.cuda.matmul.allow_tf32 = False
    return bw, rates


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--check", action="store_true",
                    help="no GPU needed: check that everything this script calls exists, then exit")
    args = ap.parse_args()
    if args.check:  # run_gpu_check.sh --dry-run: a renamed op must not cost the one device call
        for name in ("per_sample_grad_stats", "linear_ghost_stats"):
            assert callable(getattr(ops, name, None)), f"dvgs_fast.ops.{name} is gone"
        print("roofline.py: ops found; sinkhorn", "found" if hasattr(ops, "sinkhorn") else "absent (skipped)")
        print("build:", dvgs_fast.build_info())
        return
    assert torch.cuda.is_available() and dvgs_fast.build_info()["with_cuda"], "needs CUDA kernels and a GPU"
    bw, rates = ceilings()
    rows = []

    # per_sample_grad_stats: N x P fp32, read once (+ target, negligible)
    for n, p in [(4096, 1 << 20), (1024, 1 << 20), (65536, 1024)]:
        g = [torch.randn(n, p // 4, device="cuda") for _ in range(4)]
        t = [torch.randn(p // 4, device="cuda") for _ in range(4)]
        ms = median_ms(lambda: ops.per_sample_grad_stats(g, t))
        ref_ms = median_ms(lambda: torch.nn.functional.cosine_similarity(
            torch.cat(g, 1), torch.cat(t)[None], dim=1), reps=5)
        bytes_ = n * p * 4
        floor = bytes_ / bw * 1e3
        rows.append(dict(kernel="per_sample_grad_stats", shape=f"{n}x{p}", ms=ms, floor_ms=floor,
                         pct_of_copy_bw=100 * floor / ms, gbps=bytes_ / ms / 1e6, reference_ms=ref_ms))
        del g, t

    # linear_ghost_stats for the LINCS autoencoder's layers at N = 720k
    n = 720_000
    layers = [(978, 256), (256, 64), (64, 256), (256, 978)]
    total = 0.0
    for d_in, d_out in layers:
        a = torch.randn(n, d_in, device="cuda")
        d = torch.randn(n, d_out, device="cuda")
        w = torch.randn(d_out, d_in, device="cuda")
        b = torch.randn(d_out, device="cuda")
        ms = median_ms(lambda: ops.linear_ghost_stats(a, d, w, b), reps=10)
        bytes_ = n * (d_in + d_out) * 4
        flops = 2 * n * d_in * d_out
        floor = max(bytes_ / bw, flops / rates["fp32"]) * 1e3
        total += ms
        rows.append(dict(kernel="linear_ghost_stats", shape=f"{n}x{d_in}->{d_out}", ms=ms, floor_ms=floor,
                         pct_of_floor=100 * floor / ms))
        del a, d, w, b
    rows.append(dict(kernel="linear_ghost_stats (AE, 4 layers)", shape=f"{n}", ms=total, target_ms=50.0))

    # Sinkhorn (if built): N = M, d = 64; floor = FLOPs of the iterations (exp per pair dominates)
    if hasattr(torch.ops.dvgs_fast, "sinkhorn") and hasattr(ops, "sinkhorn"):
        for nn_ in (10_000, 100_000):
            x = torch.randn(nn_, 64, device="cuda")
            y = torch.randn(nn_, 64, device="cuda")
            ms = median_ms(lambda: ops.sinkhorn(x, y), warmup=1, reps=3)
            rows.append(dict(kernel="sinkhorn", shape=f"{nn_}x{nn_}x64", ms=ms))

    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  CUDA {torch.version.cuda}")
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s (read+write); matmul fp32 {rates['fp32'] / 1e12:.1f} TFLOP/s, "
          f"tf32 {rates['tf32'] / 1e12:.1f} TFLOP/s")
    print(f"{'kernel':40s} {'shape':22s} {'ms':>9s} {'floor ms':>9s} {'% floor':>8s}")
    for r in rows:
        pct = 100 * r["floor_ms"] / r["ms"] if "floor_ms" in r else float("nan")
        print(f"{r['kernel']:40s} {r['shape']:22s} {r['ms']:9.3f} {r.get('floor_ms', float('nan')):9.3f} {pct:8.1f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(device=torch.cuda.get_device_name(), copy_bw=bw, matmul=rates, rows=rows), fh, indent=1)


if __name__ == "__main__":
    main()
