"""A small linear-datamodeling-score harness for the TRAK bench.

Stands in for ``dvgs_fast.evaluate.counterfactual`` (issue 28's ground truth, on its own branch
and not merged when this was written) with the same definitions: retrain the model on random
subsets S_1..S_m of the training rows (fraction alpha, each subset with `seeds` trainings
averaged), record each query's margin log(p/(1-p)) of its true class; an attribution's LDS is
the mean over queries of the Spearman correlation, across the subsets, between Σ_{i ∈ S_j}
scores[q, i] and the retrained margins (with its standard error over the queries).

Training is a plain torch loop (Adam / SGD, shuffled mini-batches), each run seeded by (subset,
seed): its initialisation and its data order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import rankdata
from torch import nn


@dataclass
class Recipe:
    make_model: Callable[[], nn.Module]
    epochs: int = 30
    batch_size: int = 64
    lr: float = 3e-3
    optimizer: str = "adam"
    weight_decay: float = 0.0


def train(recipe: Recipe, x: torch.Tensor, y: torch.Tensor, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = recipe.make_model()
    cls = torch.optim.Adam if recipe.optimizer == "adam" else torch.optim.SGD
    opt = cls(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(recipe.epochs):
        for idx in torch.randperm(len(x), generator=g).split(recipe.batch_size):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def margins(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        z = model(x).double()
        zy = z.gather(1, y.reshape(-1, 1)).squeeze(1)
        others = z.scatter(1, y.reshape(-1, 1), float("-inf"))
        return (zy - torch.logsumexp(others, 1)).numpy()


@dataclass
class GroundTruth:
    masks: np.ndarray          # [m, N] bool
    outputs: np.ndarray        # [m, Q] margins, averaged over the seeds
    seeds: int


def lds_ground_truth(recipe: Recipe, xs, ys, xq, yq, *, n_subsets: int = 50, seeds: int = 2, alpha: float = 0.5,
                     seed: int = 0) -> GroundTruth:
    rng = np.random.default_rng(seed)
    n = len(xs)
    masks = np.zeros((n_subsets, n), dtype=bool)
    outputs = np.zeros((n_subsets, len(xq)))
    for j in range(n_subsets):
        rows = np.sort(rng.choice(n, int(round(alpha * n)), replace=False))
        masks[j, rows] = True
        idx = torch.from_numpy(rows)
        for s in range(seeds):
            model = train(recipe, xs[idx], ys[idx], seed=10_000 * (seed + 1) + 100 * j + s)
            outputs[j] += margins(model, xq, yq) / seeds
    return GroundTruth(masks, outputs, seeds)


def lds(scores: np.ndarray, gt: GroundTruth) -> tuple[float, float, np.ndarray]:
    """(mean, standard error, per-query) Spearman of predicted subset sums vs actual margins."""
    pred = np.asarray(scores, dtype=np.float64) @ gt.masks.T.astype(np.float64)       # [Q, m]
    per = np.empty(pred.shape[0])
    for q in range(pred.shape[0]):
        a, b = rankdata(pred[q]), rankdata(gt.outputs[:, q])
        a, b = a - a.mean(), b - b.mean()
        den = np.sqrt((a * a).sum() * (b * b).sum())
        per[q] = (a * b).sum() / den if den > 0 else 0.0
    return float(per.mean()), float(per.std(ddof=1) / np.sqrt(len(per))), per
