"""DVGS: fast vs reference backend, end to end and per snapshot, plus the fast snapshot's
overhead over one plain batched forward+backward of the same source samples (CPU).

    pytest bench/bench_dvgs.py -m "not slow"     # fast backend, short reference runs (~3 min)
    pytest bench/bench_dvgs.py                   # + full Adult reference run, autoencoder reference

Configurations (the issue's):
  adult  1000 source / 400 target, 108 features, MLP 108-100-100-2 (Mish, dropout 0.25),
         3 restarts x 100 epochs (300 snapshots). Real UCI Adult when ../shared/data has it
         (AUROC of the flipped labels goes into extra_info), else generated data of that shape.
  ae     autoencoder 978-256-64-256-978, MSE, N = 20,000 generated source samples (LINCS-shaped),
         400 target samples: one target step = one snapshot per epoch.
Ratios are computed from medians measured in the same session and stored in extra_info.
Threads: 1 intra-op thread unless DVGS_BENCH_THREADS says otherwise (same for both backends).
On the shared 2-core container, 2 OpenMP threads spin-waiting against other jobs made every
figure 3-10x slower and erratic; one thread gave stable, reproducible medians.
"""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _memory import peak_memory
from dvgs_fast import DVGS
from dvgs_fast.methods.dvgs.fast import FastScorer

torch.set_num_threads(int(os.environ.get("DVGS_BENCH_THREADS", "1")))

_MEDIANS: dict[str, float] = {}     # same-session figures for the ratios


# ------------------------------------------------------------------------------ workloads
def adult_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(108, 100), nn.Dropout(0.25), nn.Mish(),
                         nn.Linear(100, 100), nn.Dropout(0.25), nn.Mish(), nn.Linear(100, 2))


def ae_model() -> nn.Module:
    return nn.Sequential(nn.Linear(978, 256), nn.ReLU(), nn.Linear(256, 64), nn.ReLU(),
                         nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 978))


def _adult_data():
    """Real Adult task when available (with the flipped-label mask), else generated data."""
    try:
        from dvgs_fast.datasets import flip_labels, load_adult, make_split
        ds = load_adult()
        sp = make_split(ds.X, ds.y, 1000, 400, 0, seed=0, train_idx=np.arange(ds.meta["n_train"]))
        ys, flipped = flip_labels(sp.y_source, 0.2, seed=0)
        return sp.x_source, ys, sp.x_target, sp.y_target, flipped
    except Exception:   # no data folder: same shapes, generated
        g = np.random.default_rng(0)
        x = (g.random((1400, 108)) < 0.15).astype(np.float32)
        y = (x[:, :10].sum(1) > 1.5).astype(np.int64)
        return x[:1000], y[:1000], x[1000:], y[1000:], None


_ADULT = None


def adult_data():
    global _ADULT
    if _ADULT is None:
        _ADULT = _adult_data()
    return _ADULT


def ae_data(n=20_000, m=400):
    g = torch.Generator().manual_seed(0)
    basis = torch.randn(32, 978, generator=g) / 6
    xs = torch.randn(n, 32, generator=g) @ basis + 0.1 * torch.randn(n, 978, generator=g)
    xt = torch.randn(m, 32, generator=g) @ basis + 0.1 * torch.randn(m, 978, generator=g)
    return xs, xt


def _record(benchmark, key, **info):
    med = benchmark.stats.stats.median
    _MEDIANS[key] = med
    benchmark.extra_info.update(threads=torch.get_num_threads(), **info)
    return med


def _run_measured(benchmark, fn, rounds):
    peaks = []

    def wrapped():
        out, peak = peak_memory(fn)
        peaks.append(peak)
        return out

    out = benchmark.pedantic(wrapped, rounds=rounds, iterations=1, warmup_rounds=0)
    benchmark.extra_info["peak_rss_extra_mb"] = round(max(peaks) / 2**20, 1)
    return out


# ------------------------------------------------------------------------------ Adult
ADULT_FULL = {"epochs": 100, "restarts": 3}
ADULT_SHORT = {"epochs": 10, "restarts": 1}


def _adult_fit(backend, cfg):
    xs, ys, xt, yt, _ = adult_data()
    return DVGS(adult_mlp, backend=backend, seed=0, progress=False, **cfg).fit(xs, ys, xt, yt)


@pytest.mark.parametrize("backend", ["fast", "reference"])
def test_adult_short(benchmark, backend):
    """10 snapshots each: the end-to-end ratio in the quick subset."""
    benchmark.group = "dvgs adult, 1 restart x 10 epochs (10 snapshots)"
    _adult_fit(backend, ADULT_SHORT)                        # warm-up (imports, allocator)
    res = _run_measured(benchmark, lambda: _adult_fit(backend, ADULT_SHORT), rounds=3 if backend == "fast" else 1)
    med = _record(benchmark, f"adult_short_{backend}", backend=backend, n_snapshots=res.info["snapshots"],
                  score_s_per_snapshot=res.timings["score"] / res.info["snapshots"],
                  train_s=res.timings["train"])
    _MEDIANS[f"adult_snap_{backend}"] = res.timings["score"] / res.info["snapshots"]
    if backend == "reference" and "adult_short_fast" in _MEDIANS:
        benchmark.extra_info["speedup_end_to_end"] = med / _MEDIANS["adult_short_fast"]
        benchmark.extra_info["speedup_per_snapshot"] = _MEDIANS["adult_snap_reference"] / _MEDIANS["adult_snap_fast"]


@pytest.mark.parametrize("backend", ["fast", pytest.param("reference", marks=pytest.mark.slow)])
def test_adult_full(benchmark, backend):
    """The issue's configuration, 300 snapshots; AUROC on real data in extra_info."""
    benchmark.group = "dvgs adult, 3 restarts x 100 epochs (300 snapshots)"
    xs, ys, xt, yt, flipped = adult_data()
    if backend == "fast":
        _adult_fit(backend, ADULT_SHORT)
    res = _run_measured(benchmark, lambda: _adult_fit(backend, ADULT_FULL), rounds=3 if backend == "fast" else 1)
    info = {"backend": backend, "n_snapshots": res.info["snapshots"],
            "score_s_per_snapshot": res.timings["score"] / res.info["snapshots"], "train_s": res.timings["train"]}
    if flipped is not None:
        from dvgs_fast.evaluate import detection_auroc
        info["auroc_seed0"] = detection_auroc(res.values, flipped)
    med = _record(benchmark, f"adult_full_{backend}", **info)
    if backend == "reference" and "adult_full_fast" in _MEDIANS:
        benchmark.extra_info["speedup_end_to_end"] = med / _MEDIANS["adult_full_fast"]


# ------------------------------------------------------------------------------ autoencoder
def _ae_fit(backend, epochs, xs, xt):
    return DVGS(ae_model, loss="mse", backend=backend, epochs=epochs, seed=0, progress=False,
                source_batch_size=1024).fit(xs, None, xt, None)


@pytest.mark.parametrize("backend", ["fast", pytest.param("reference", marks=pytest.mark.slow)])
def test_ae_snapshot(benchmark, backend):
    """One epoch = one snapshot over N=20k (end to end, 1 target step)."""
    benchmark.group = "dvgs autoencoder 978-256-64-256-978, N=20k, 1 snapshot"
    xs, xt = ae_data()
    if backend == "fast":
        _ae_fit(backend, 1, xs[:2048], xt)
    res = _run_measured(benchmark, lambda: _ae_fit(backend, 1, xs, xt), rounds=3 if backend == "fast" else 1)
    med = _record(benchmark, f"ae_{backend}", backend=backend, n_source=xs.shape[0],
                  score_s_per_snapshot=res.timings["score"] / res.info["snapshots"])
    _MEDIANS[f"ae_snap_{backend}"] = res.timings["score"] / res.info["snapshots"]
    if backend == "reference" and "ae_fast" in _MEDIANS:
        benchmark.extra_info["speedup_end_to_end"] = med / _MEDIANS["ae_fast"]
        benchmark.extra_info["speedup_per_snapshot"] = _MEDIANS["ae_snap_reference"] / _MEDIANS["ae_snap_fast"]


# ------------------------------------------------------------------------------ overhead
def _overhead_setup(kind):
    torch.manual_seed(0)
    if kind == "adult":
        model = adult_mlp()
        xs, ys, *_ = adult_data()
        x, y = torch.as_tensor(xs, dtype=torch.float32), torch.as_tensor(ys)

        def loss(o, t):
            return F.cross_entropy(o, t, reduction="none")
    else:
        model = ae_model()
        x, _ = ae_data()
        y = x

        def loss(o, t):
            return (o - t).square().mean(1)
    model.train()
    names = [n for n, _ in model.named_parameters()]
    G = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    return model, x, y, loss, names, G


@pytest.mark.parametrize("kind", ["adult", "ae"])
@pytest.mark.parametrize("impl", ["plain_fwd_bwd", "fast_snapshot"])
def test_snapshot_overhead(benchmark, kind, impl):
    """A fast snapshot vs one plain batched forward+backward (all parameter gradients) over the
    same source samples in the same 1024-sample chunks. Goal: ratio <= 1.5."""
    benchmark.group = f"dvgs snapshot overhead, {kind}"
    model, x, y, loss, names, G = _overhead_setup(kind)
    scorer = FastScorer(model, names, loss, "cosine")
    tgt = scorer.target(G)
    chunks = [(a, min(a + 1024, x.shape[0])) for a in range(0, x.shape[0], 1024)]

    def plain():
        for a, b in chunks:
            model.zero_grad(set_to_none=True)
            loss(model(x[a:b]), y[a:b]).sum().backward()

    def fast():
        for a, b in chunks:
            scorer.score(x[a:b], y[a:b], tgt)

    fn = plain if impl == "plain_fwd_bwd" else fast
    fn()
    rounds = 20 if kind == "adult" else 5
    _run_measured(benchmark, fn, rounds=rounds)
    med = _record(benchmark, f"overhead_{kind}_{impl}", n_source=x.shape[0])
    if impl == "fast_snapshot" and f"overhead_{kind}_plain_fwd_bwd" in _MEDIANS:
        benchmark.extra_info["overhead_ratio"] = med / _MEDIANS[f"overhead_{kind}_plain_fwd_bwd"]


def test_zz_summary(capsys):
    """Print the same-session ratios (also in each benchmark's extra_info)."""
    m = _MEDIANS
    lines = []
    for a, b, label in [("adult_short_reference", "adult_short_fast", "adult end-to-end (10 snapshots)"),
                        ("adult_snap_reference", "adult_snap_fast", "adult per snapshot"),
                        ("adult_full_reference", "adult_full_fast", "adult end-to-end (300 snapshots)"),
                        ("ae_reference", "ae_fast", "ae end-to-end (1 snapshot)"),
                        ("ae_snap_reference", "ae_snap_fast", "ae per snapshot"),
                        ("overhead_adult_fast_snapshot", "overhead_adult_plain_fwd_bwd", "overhead adult"),
                        ("overhead_ae_fast_snapshot", "overhead_ae_plain_fwd_bwd", "overhead ae")]:
        if a in m and b in m and not math.isnan(m[b]) and m[b] > 0:
            lines.append(f"{label}: {m[a]:.4g} s / {m[b]:.4g} s = {m[a] / m[b]:.2f}x")
    with capsys.disabled():
        print("\nDVGS ratios:\n  " + "\n  ".join(lines))
