"""LossVal: time per epoch with the fast Sinkhorn op vs the dense PyTorch reference backend, and
flipped-label detection quality (AUROC, k-means F1) over 3 seeds.

    pytest bench/bench_lossval.py -m "not slow"   # epoch times (~3 min)
    pytest bench/bench_lossval.py                 # + quality runs (breast_cancer, Adult; ~5 min)

Adult comes from ../shared/data (or $DVGS_FAST_DATA); without it the Adult cases skip.
Threads: 1 intra-op thread unless DVGS_BENCH_THREADS says otherwise (LossVal's batches are small;
on the shared 2-core container two OpenMP threads mostly wait for each other).
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn

from dvgs_fast import LossVal

torch.set_num_threads(int(os.environ.get("DVGS_BENCH_THREADS", "1")))


def paper_mlp(d: int, hidden: int = 100, layers: int = 5):
    """The LossVal paper's classifier MLP: `layers` Linear layers, ReLU, `hidden` units."""
    def make():
        mods = [nn.Linear(d, hidden), nn.ReLU()]
        for _ in range(layers - 2):
            mods += [nn.Linear(hidden, hidden), nn.ReLU()]
        mods.append(nn.Linear(hidden, 2))
        return nn.Sequential(*mods)
    return make


def task(name: str, n_source: int, n_target: int, seed: int):
    from dvgs_fast.datasets import flip_labels, load_adult, load_breast_cancer
    if name == "adult":
        try:
            ds = load_adult()
        except Exception as exc:  # no data folder
            pytest.skip(f"Adult not available ({exc})")
    else:
        ds = load_breast_cancer()
    sp = ds.split(n_source, n_target, 1, seed=seed)
    y_noisy, flipped = flip_labels(sp.y_source, 0.2, seed=seed)
    return ds, sp.x_source, y_noisy, sp.x_target, sp.y_target, flipped


@pytest.mark.parametrize("backend", ["fast", "reference"])
@pytest.mark.parametrize("n_target", [500, 2000])
def test_lossval_epoch_time(benchmark, backend, n_target):
    """Adult, 2000 source samples (16 batches of 128), one epoch per round."""
    benchmark.group = f"LossVal epoch, Adult 2000 source / {n_target} target, batch 128"
    ds, xs, ys, xt, yt, _ = task("adult", 2000, n_target, 0)
    lv = LossVal(paper_mlp(xs.shape[1]), epochs=1, batch_size=128, seed=0, progress=False, backend=backend)
    res = benchmark.pedantic(lv.fit, args=(xs, ys, xt, yt), rounds=3, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(backend=backend, n_source=2000, n_target=n_target, batch_size=128,
                                threads=torch.get_num_threads(), per_epoch=res.timings["per_epoch"])


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
    benchmark.group = "LossVal flipped-label detection (20% flipped, 30 epochs, lr 0.01)"
    rows = []

    def run_all():
        rows.clear()
        for seed in (0, 1, 2):
            ds, xs, ys, xt, yt, flipped = task(name, n_source, n_target, seed)
            res = LossVal(paper_mlp(xs.shape[1], **model), epochs=30, batch_size=batch_size, seed=seed,
                          progress=False).fit(xs, ys, xt, yt)
            rows.append({"seed": seed, "auroc": detection_auroc(res.values, flipped),
                         "kmeans_f1": kmeans_f1(res.values, flipped), "per_epoch": res.timings["per_epoch"]})

    benchmark.pedantic(run_all, rounds=1, iterations=1)
    aurocs = [r["auroc"] for r in rows]
    f1s = [r["kmeans_f1"] for r in rows]
    benchmark.extra_info.update(dataset=name, n_source=n_source, n_target=n_target, batch_size=batch_size,
                                model=model, runs=rows, auroc_mean=float(np.mean(aurocs)),
                                auroc_std=float(np.std(aurocs)), f1_mean=float(np.mean(f1s)),
                                f1_std=float(np.std(f1s)))
    assert min(aurocs) > 0.6, rows
