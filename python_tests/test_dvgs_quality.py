"""DVGS quality on real data: finding flipped labels in UCI Adult (the DVGS paper's setting).

1000 source / 400 target samples (DVRL-style preprocessing: one-hot categoricals, min-max
scaling, 108 features), 20% of the source labels flipped, MLP 108-100-100-2 with Mish and
dropout, 3 restarts x 100 epochs, Adam lr 1e-3, cosine. The original reached AUROC 0.83-0.91.
Runs in ~20-40 s with the fast backend on 2 shared cores.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from dvgs_fast import DVGS

from _tasks import flipped_task

SEEDS = (0, 1, 2)


def adult_mlp(dropout: float = 0.25) -> nn.Module:
    return nn.Sequential(nn.Linear(108, 100), nn.Dropout(dropout), nn.Mish(),
                         nn.Linear(100, 100), nn.Dropout(dropout), nn.Mish(),
                         nn.Linear(100, 2))


def adult_task(data_root, seed: int):
    """(x_source, noisy y_source, x_target, y_target, is_flipped) for one seed."""
    from dvgs_fast.datasets import load_adult
    ds = load_adult(data_root)
    n_train = ds.meta["n_train"]
    assert ds.X.shape[1] == 108
    return flipped_task(1000, 400, split_seed=seed, flip_seed=seed, ds=ds, train_idx=np.arange(n_train))


@pytest.mark.slow
def test_adult_flipped_label_detection(data_root):
    from dvgs_fast.evaluate import detection_auroc
    aucs = []
    for seed in SEEDS:
        xs, ys, xt, yt, flipped = adult_task(data_root, seed)
        res = DVGS(adult_mlp, epochs=100, restarts=3, seed=seed, progress=False).fit(xs, ys, xt, yt)
        assert res.info["snapshots"] == 300
        aucs.append(detection_auroc(res.values, flipped))
    print(f"DVGS Adult AUROC per seed: {np.round(aucs, 4).tolist()}, mean {np.mean(aucs):.4f}")
    assert np.mean(aucs) >= 0.85, aucs


@pytest.mark.slow
def test_adult_dropout_backends_agree(data_root):
    """With dropout both backends are valid draws; on a shortened run their AUROCs match within
    noise (the reference is ~25x slower, so the full 300-snapshot run is left to bench/)."""
    from dvgs_fast.evaluate import detection_auroc
    xs, ys, xt, yt, flipped = adult_task(data_root, 0)
    kw = {"epochs": 15, "restarts": 1, "seed": 0, "progress": False}
    fast = DVGS(adult_mlp, backend="fast", **kw).fit(xs, ys, xt, yt)
    ref = DVGS(adult_mlp, backend="reference", **kw).fit(xs, ys, xt, yt)
    a_fast, a_ref = detection_auroc(fast.values, flipped), detection_auroc(ref.values, flipped)
    print(f"AUROC fast {a_fast:.4f} reference {a_ref:.4f}")
    assert a_fast > 0.75 and abs(a_fast - a_ref) < 0.03
