"""DVGS at LINCS scale, out of core: time per snapshot streaming the source from a GCTX file vs
from memory, peak RSS, and the projected time of the paper's LINCS run on this machine.

    pytest bench/bench_lincs_scale.py -m "not slow"   # 50,000 x 978 generated GCTX (~0.2 GB)
    pytest bench/bench_lincs_scale.py                 # + 720,000 x 978 (~2.8 GB), a few snapshots

The GCTX files are written by bench/make_lincs_like.py (our GctxWriter, the real Level 5 layout)
under $DVGS_LINCS_DIR (default /tmp), once, and reused. Never into the repository.

Workload: the CLI's LINCS run: autoencoder 978-256-64-256-978 (Mish), MSE, landmark genes
z-scored (statistics computed once, before timing), source_batch_size 4096; a target of
K x 512 rows and one epoch at target batch 512 gives K snapshots (K = $DVGS_LINCS_SNAPS, 2).
Time per snapshot = DVGS's own "score" timing / K (the source pass: read + z-score + per-sample
gradient statistics + the memory-mapped sums).

Projection ("the original LINCS experiment": 720k source, 5,000 target, 500 epochs,
compute_every 1, target batch 512 = our DVGS default, as the original's is not stated in our
sources): snapshots = 500 x ceil(5000 / 512) = 5,000; full run = 5,000 x (time per snapshot at
720k) + the target training (5,000 steps of 512 rows, measured separately, small).
Threads: $DVGS_BENCH_THREADS (default 1, as bench_dvgs.py, for stable figures on the shared box).
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from _timing import Comparison, record
from _memory import current_rss, peak_memory
from dvgs_fast import DVGS


DIR = Path(os.environ.get("DVGS_LINCS_DIR", "/tmp"))
K = int(os.environ.get("DVGS_LINCS_SNAPS", "2"))
FULL_N, FULL_TARGET, FULL_EPOCHS, TARGET_BATCH = 720_000, 5_000, 500, 512
FULL_SNAPSHOTS = FULL_EPOCHS * math.ceil(FULL_TARGET / TARGET_BATCH)
SOURCE_BATCH = 4096


def ae() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(978, 256), nn.Mish(), nn.Linear(256, 64), nn.Mish(),
                         nn.Linear(64, 256), nn.Mish(), nn.Linear(256, 978))


_READERS: dict[int, object] = {}


def reader_for(n: int):
    """A z-scored landmark reader of an n-row LINCS-like GCTX file (written once)."""
    if n not in _READERS:
        from make_lincs_like import make
        from dvgs_fast.datasets import load_lincs
        path = DIR / f"lincs_like_{n // 1000}k.gctx"
        if not path.exists():
            make(path, n, seed=0, progress=False)
        r = load_lincs(path, landmark_only=True, zscore=True, fill_missing=0.0, chunked=True)
        t0 = time.perf_counter()
        r.stats()
        r.zscore_pass_s = time.perf_counter() - t0
        _READERS[n] = r
    return _READERS[n]


def _target(r) -> np.ndarray:
    idx = np.sort(np.random.default_rng(0).choice(r.n_samples, K * TARGET_BATCH, replace=False))
    return r.read_rows(idx)


def _fit(source, xt):
    return DVGS(ae, loss="mse", epochs=1, target_batch_size=TARGET_BATCH, source_batch_size=SOURCE_BATCH,
                seed=0, progress=False).fit(source, None, xt, None)


def _report(benchmark, res, peak, n, where, extra=None):
    k = res.info["snapshots"]
    snap = res.timings["score"] / k
    train_step = res.timings["train"] / res.info["steps"]
    scale = FULL_N / n
    proj_s = FULL_SNAPSHOTS * (snap * scale + train_step)
    info = {"n_source": n, "source": where, "snapshots": k, "snapshot_s": round(snap, 3),
            "per_1k_rows_ms": round(1e3 * snap / (n / 1000), 3), "train_step_s": round(train_step, 4),
            "peak_rss_mb": round(peak / 2**20, 1), "threads": torch.get_num_threads(),
            "projected_full_run_h": round(proj_s / 3600, 1),
            "projection": f"{FULL_SNAPSHOTS} snapshots x 720k source (snapshot time scaled by {scale:.2f})"}
    info.update(extra or {})
    benchmark.extra_info.update(info)
    print(f"\n{where:>6} n={n}: {snap:.2f} s/snapshot, peak RSS +{peak / 2**20:.0f} MiB, "
          f"projected full LINCS run {proj_s / 3600:.1f} h")


def _stream_only(r) -> float:
    """Seconds for one read + z-score pass over the file, no DVGS (the IO share of a snapshot)."""
    from dvgs_fast.sources import GctxSource
    t0 = time.perf_counter()
    for _ in GctxSource(r).iter_chunks(size=SOURCE_BATCH):
        pass
    return time.perf_counter() - t0


def _bench_pair(benchmark, n):
    """The same DVGS run with the source streamed from the GCTX file and held in memory,
    interleaved (one round each)."""
    r = reader_for(n)
    xt = _target(r)
    io_s = _stream_only(r)
    before = current_rss()
    X = torch.from_numpy(r.to_array())
    data_mb = (current_rss() - before) / 2**20
    seen = {}

    def run(src, key):
        def go():
            seen[key] = peak_memory(_fit, src, xt)
            return seen[key][0].values
        return go

    stream, mem = "DVGS source streamed from GCTX (GctxSource)", "DVGS source held in memory (tensor)"
    cmp = Comparison({stream: run(r, "gctx"), mem: run(X, "memory")}, warmup=0).run(
        benchmark, 1, f"lincs-scale N={n}, 1 thread(s)")
    record(benchmark, cmp, mem, threads=1, n=n)
    res, peak = seen["gctx"]
    _report(benchmark, res, peak, n, "gctx",
            {"read_pass_s": round(io_s, 2), "zscore_stats_pass_s": round(r.zscore_pass_s, 2),
             "file_gb": round(r.path.stat().st_size / 1e9, 2)})
    res, peak = seen["memory"]
    benchmark.extra_info["memory_source"] = {"snapshot_s": round(res.timings["score"] / res.info["snapshots"], 3),
                                             "peak_rss_mb": round(peak / 2**20, 1),
                                             "source_in_memory_mb": round(data_mb, 1)}
    del X


def test_snapshot_50k(benchmark):
    _bench_pair(benchmark, 50_000)


@pytest.mark.slow
def test_snapshot_720k(benchmark):
    _bench_pair(benchmark, FULL_N)
