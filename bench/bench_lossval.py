"""LossVal: training time with backend="fast" (dvgs_fast.ops.sinkhorn) against backend="reference"
(the dense PyTorch Sinkhorn, as fast as the original geomloss code), interleaved in one run, at
1 thread, CPU and wall time (bench/_timing.py); and flipped-label detection quality (slow).

    pytest bench/bench_lossval.py -m "not slow"   # epoch times, digits and Adult (~3 min)
    pytest bench/bench_lossval.py                 # + quality runs (breast_cancer, Adult; ~5 min)

Epoch workloads: digits (bundled) 1000 source / 300 target, 64 features; Adult (../shared/data or
$DVGS_FAST_DATA; skipped without) 2000 source / 500 and 2000 targets, 108 features. Batch 128,
the LossVal paper's MLP (5 layers x 100, ReLU), 2 epochs per fit; the figure is the CPU time of
the whole fit (setup included) and the ratio reference / fast.
"""
from __future__ import annotations

import numpy as np
import pytest
from torch import nn

from _timing import ALL_CORES, Comparison, measure, record
from dvgs_fast import LossVal


def paper_mlp(d: int, n_classes: int = 2, hidden: int = 100, layers: int = 5):
    """The LossVal paper's classifier MLP: `layers` Linear layers, ReLU, `hidden` units."""
    def make():
        mods = [nn.Linear(d, hidden), nn.ReLU()]
        for _ in range(layers - 2):
            mods += [nn.Linear(hidden, hidden), nn.ReLU()]
        mods.append(nn.Linear(hidden, n_classes))
        return nn.Sequential(*mods)
    return make


def task(name: str, n_source: int, n_target: int, seed: int):
    from dvgs_fast.datasets import flip_labels, load_adult, load_breast_cancer, load_digits
    if name == "adult":
        try:
            ds = load_adult()
        except Exception as exc:  # no data folder
            pytest.skip(f"Adult not available ({exc})")
    elif name == "digits":
        ds = load_digits()
    else:
        ds = load_breast_cancer()
    sp = ds.split(n_source, n_target, 1, seed=seed)
    y_noisy, flipped = flip_labels(sp.y_source, 0.2, seed=seed)
    return ds, sp.x_source, y_noisy, sp.x_target, sp.y_target, flipped


EPOCH_CASES = [("digits", 1000, 300, 1), ("adult", 2000, 500, 1), ("adult", 2000, 2000, 1),
               ("adult", 2000, 500, ALL_CORES)]


@pytest.mark.parametrize("name,n_source,n_target,threads", EPOCH_CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}-t{c[3]}" for c in EPOCH_CASES])
def test_lossval_epoch_time(benchmark, name, n_source, n_target, threads):
    ds, xs, ys, xt, yt, _ = task(name, n_source, n_target, 0)
    make = paper_mlp(xs.shape[1], int(np.max(ys)) + 1)
    per_epoch = {}

    def fit(backend):
        def run():
            res = LossVal(make, epochs=2, batch_size=128, seed=0, progress=False, backend=backend).fit(xs, ys, xt, yt)
            per_epoch[backend] = res.timings.get("per_epoch")
            return res.values
        return run

    fast, ref = 'LossVal(backend="fast")', 'LossVal(backend="reference")'
    cmp = Comparison({fast: fit("fast"), ref: fit("reference")}, threads=threads).run(
        benchmark, 3, f"LossVal 2 epochs, {name} {n_source} source / {n_target} target, batch 128, "
                      f"{threads} thread(s)")
    record(benchmark, cmp, ref, dataset=name, n_source=n_source, n_target=n_target, batch_size=128, epochs=2,
           threads=threads, wall_per_epoch=per_epoch)
    # both backends train the same weights (same seed, same batches): values agree to float32 noise
    assert np.allclose(cmp.results[fast], cmp.results[ref], atol=1e-3)


QUALITY = [
    # name, n_source, n_target, batch_size, model
    ("breast_cancer", 400, 100, 32, dict(hidden=25, layers=3)),
    ("breast_cancer", 300, 200, 128, dict(hidden=100, layers=5)),
    ("adult", 2000, 500, 128, dict(hidden=100, layers=5)),
    ("adult", 1000, 100, 32, dict(hidden=25, layers=3)),
]


@pytest.mark.slow
@pytest.mark.parametrize("name,n_source,n_target,batch_size,model", QUALITY,
                         ids=[f"{q[0]}-{q[1]}-{q[2]}-bs{q[3]}" for q in QUALITY])
def test_lossval_quality(benchmark, name, n_source, n_target, batch_size, model):
    from dvgs_fast.evaluate import detection_auroc, kmeans_f1
    rows = []

    def run_all():
        rows.clear()
        for seed in (0, 1, 2):
            ds, xs, ys, xt, yt, flipped = task(name, n_source, n_target, seed)
            res = LossVal(paper_mlp(xs.shape[1], int(np.max(ys)) + 1, **model), epochs=30, batch_size=batch_size, seed=seed,
                          progress=False).fit(xs, ys, xt, yt)
            rows.append({"seed": seed, "auroc": detection_auroc(res.values, flipped),
                         "kmeans_f1": kmeans_f1(res.values, flipped), "per_epoch": res.timings["per_epoch"]})

    measure(benchmark, "LossVal flipped-label detection (20% flipped, 30 epochs, lr 0.01), 3 seeds",
            f'LossVal(backend="fast") {name} {n_source}/{n_target} bs{batch_size}', run_all)
    aurocs = [r["auroc"] for r in rows]
    f1s = [r["kmeans_f1"] for r in rows]
    benchmark.extra_info.update(method="lossval", dataset=name, n_source=n_source, n_target=n_target,
                                batch_size=batch_size, model=model, runs=rows, auroc=aurocs,
                                auroc_mean=float(np.mean(aurocs)), auroc_std=float(np.std(aurocs)),
                                f1_mean=float(np.mean(f1s)), f1_std=float(np.std(f1s)))
    assert min(aurocs) > 0.6, rows
