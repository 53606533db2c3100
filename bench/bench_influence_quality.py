"""Quality of InfluenceFunction's solvers: LDS and leave-one-out correlation on digits, and
flipped-label detection AUROC on digits and Adult -- a small local harness (the project's
counterfactual ground truth, dvgs_fast.evaluate.counterfactual, lives on another branch; when it
lands, these rows belong in bench/QUALITY.md's attribution table with its ground truth).

    python bench/bench_influence_quality.py --out runs/influence_quality [--problems logreg,mlp]

Ground truth (one thread, float64, models trained by one recipe: Adam, 60 epochs, batches of 64,
seeded initialisation and batch order; the logistic regression with L2 1e-2, the MLP
64-64-10 ReLU with L2 1e-3):

* LDS (Park et al. 2023): 50 random halves of the 1,000 training rows, each retrained with 2
  seeds (outputs averaged); per query, Spearman between Σ_{i in S} score[j, i] and the query's
  retrained −loss over the subsets; the mean over the 300 queries. The retrains' own split-half
  agreement (seed noise) is reported beside it: no attribution can do much better.
* LOO: 40 random training rows, each left out and the model retrained from the reference's
  initial weights with the same batch order (the row masked out of its batch); per query,
  Spearman between score[j, i] and the change of the query's loss; the mean over queries.
* Detection: 20% of the 1,000 training labels flipped (digits; Adult: 1,000 rows, 2 classes),
  fit() values against 300 clean target rows, AUROC of the low values for the flipped rows.

Every solver scores the reference model (trained on all rows) with its default damping rule.
Results: OUT/influence_quality.json and .md.
"""
from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import nn

SOLVERS = ("direct", "cg", "lissa", "arnoldi", "kfac", "ekfac", "datainf")
RECIPES = {"logreg": {"weight_decay": 1e-2, "lr": 1e-2}, "mlp": {"weight_decay": 1e-3, "lr": 3e-3}}


def model_for(arch: str, d: int = 64, k: int = 10) -> nn.Module:
    if arch == "logreg":
        return nn.Sequential(nn.Linear(d, k))
    return nn.Sequential(nn.Linear(d, 64), nn.ReLU(), nn.Linear(64, k))


def train(arch, x, y, seed: int, keep: np.ndarray | None = None, init: dict | None = None, shared_order=False,
          epochs=60, d=64, k=10) -> nn.Module:
    """The recipe. keep: rows trained on (None: all). shared_order: shuffle all rows and drop the
    left-out ones from their batch (LOO), else shuffle the kept rows alone (subsets)."""
    torch.manual_seed(seed)
    m = model_for(arch, d, k).double()
    if init is not None:
        m.load_state_dict(init)
    r = RECIPES[arch]
    opt = torch.optim.Adam(m.parameters(), lr=r["lr"], weight_decay=r["weight_decay"])
    g = torch.Generator().manual_seed(seed + 1000)
    rows = np.arange(len(x)) if keep is None else np.flatnonzero(keep)
    mask = torch.zeros(len(x), dtype=torch.bool)
    mask[torch.as_tensor(rows)] = True
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g) if shared_order else torch.as_tensor(rows)[
            torch.randperm(len(rows), generator=g)]
        for idx in order.split(64):
            if shared_order:
                idx = idx[mask[idx]]
                if len(idx) == 0:
                    continue
            opt.zero_grad()
            F.cross_entropy(m(x[idx]), y[idx]).backward()
            opt.step()
    return m.eval()


def losses(m, x, y) -> np.ndarray:
    with torch.no_grad():
        return F.cross_entropy(m(x), y, reduction="none").numpy()


def lds_truth(arch, xs, ys, xq, yq, n_subsets=50, seeds=(0, 1)):
    rng = np.random.default_rng(7)
    masks = np.zeros((n_subsets, len(xs)), dtype=bool)
    for s in range(n_subsets):
        masks[s, rng.permutation(len(xs))[:len(xs) // 2]] = True
    outs = np.stack([[-losses(train(arch, xs, ys, seed, keep=mk), xq, yq) for mk in masks] for seed in seeds])
    a, b = outs[0], outs[-1]                          # [M, Q] per seed
    noise = np.mean([spearmanr(a[:, j], b[:, j])[0] for j in range(a.shape[1])]) if len(seeds) > 1 else None
    return masks, outs.mean(0), noise


def lds(scores, masks, actual) -> float:
    pred = scores @ masks.T.astype(np.float64)         # [Q, M]
    return float(np.nanmean([spearmanr(pred[j], actual[:, j])[0] for j in range(pred.shape[0])]))


def loo_truth(arch, xs, ys, xq, yq, ref_init, n_rows=40):
    rows = np.random.default_rng(3).permutation(len(xs))[:n_rows]
    base = losses(train(arch, xs, ys, 0, init=ref_init, shared_order=True), xq, yq)
    eff = np.zeros((len(xq), n_rows))
    for c, i in enumerate(rows):
        keep = np.ones(len(xs), dtype=bool)
        keep[i] = False
        eff[:, c] = losses(train(arch, xs, ys, 0, keep=keep, init=ref_init, shared_order=True), xq, yq) - base
    return rows, eff                                   # > 0: the row lowered the query's loss


def loo(scores, rows, eff) -> float:
    s = scores[:, rows]
    return float(np.nanmean([spearmanr(s[j], eff[j])[0] for j in range(s.shape[0])]))


def digits(n_train=1000, n_query=300, seed=0):
    from sklearn.datasets import load_digits
    x, y = load_digits(return_X_y=True)
    perm = np.random.default_rng(seed).permutation(len(x))
    x = torch.tensor(x / 16.0, dtype=torch.float64)
    y = torch.tensor(y)
    tr, q = perm[:n_train], perm[n_train:n_train + n_query]
    return x[tr], y[tr], x[q], y[q]


def detection(dataset: str, solvers, seed=0) -> dict:
    """AUROC of fit() values for 20% flipped labels (MLP 100-10 trained inside, 30 epochs)."""
    from dvgs_fast.datasets import flip_labels, load_adult, load_digits, make_split
    from dvgs_fast.evaluate.metrics import detection_auroc
    from dvgs_fast.methods.influence import InfluenceFunction
    ds = load_adult() if dataset == "adult" else load_digits()
    sp = make_split(ds.X, ds.y, 1000, 300, 0, seed=seed)
    xs, ys, xt, yt = ds.X[sp.source], ds.y[sp.source], ds.X[sp.target], ds.y[sp.target]
    ys_noisy, flipped = flip_labels(ys, 0.2, seed=seed, n_classes=ds.n_classes)
    d, k = xs.shape[1], ds.n_classes

    def factory():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(d, 100), nn.ReLU(), nn.Linear(100, k))

    out = {}
    for s in solvers:
        if s == "direct" and (d * 100 + 100 + 100 * k + k) > 20_000:
            continue
        c0 = time.process_time()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = InfluenceFunction(factory, solver=s, epochs=30, progress=False, seed=seed).fit(
                xs, ys_noisy, xt, yt)
        out[s] = {"auroc": float(detection_auroc(res.values, flipped)), "cpu": time.process_time() - c0}
        print(f"  detection {dataset} {s}: AUROC {out[s]['auroc']:.3f} ({out[s]['cpu']:.1f} CPU s)", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/influence_quality")
    ap.add_argument("--problems", default="logreg,mlp")
    ap.add_argument("--solvers", default=",".join(SOLVERS))
    ap.add_argument("--detection", default="digits,adult")
    a = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    from dvgs_fast.methods.influence import InfluenceFunction
    solvers = a.solvers.split(",")
    res = {"problems": {}, "detection": {}, "load_start": os.getloadavg()[0]}
    xs, ys, xq, yq = digits()
    for arch in a.problems.split(","):
        t0 = time.process_time()
        torch.manual_seed(0)
        init = model_for(arch).double().state_dict()
        ref = train(arch, xs, ys, 0, init=init, shared_order=True)
        masks, actual, noise = lds_truth(arch, xs, ys, xq, yq)
        rows, eff = loo_truth(arch, xs, ys, xq, yq, init)
        pr = {"ground_truth_cpu": time.process_time() - t0, "seed_noise": noise, "solvers": {}}
        print(f"[{arch}] ground truth {pr['ground_truth_cpu']:.0f} CPU s, seed noise {noise:.3f}", flush=True)
        for s in solvers:
            c0 = time.process_time()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                att = InfluenceFunction(ref, solver=s, weight_decay=RECIPES[arch]["weight_decay"], progress=False,
                                        seed=0).attribute(xs, ys, xq, yq, dtype="float64")
            sc = np.asarray(att.scores)
            pr["solvers"][s] = {"lds": lds(sc, masks, actual), "loo": loo(sc, rows, eff),
                                "cpu": time.process_time() - c0, "damping": att.info.get("damping")}
            print(f"  {s:8s} LDS {pr['solvers'][s]['lds']:.3f} LOO {pr['solvers'][s]['loo']:.3f} "
                  f"({pr['solvers'][s]['cpu']:.1f} CPU s)", flush=True)
        res["problems"][arch] = pr
    for ds in [d for d in a.detection.split(",") if d]:
        res["detection"][ds] = detection(ds, solvers)
    res["load_end"] = os.getloadavg()[0]
    (out / "influence_quality.json").write_text(json.dumps(res, indent=1, default=str))
    (out / "influence_quality.md").write_text(render(res, solvers))
    print((out / "influence_quality.md").read_text())


def render(res, solvers) -> str:
    lines = ["| problem | solver | LDS | LOO Spearman | CPU s (attribute, 300 x 1000) |", "|---|---|---|---|---|"]
    for arch, pr in res["problems"].items():
        for s, r in pr["solvers"].items():
            lines.append(f"| digits {arch} | {s} | {r['lds']:.3f} | {r['loo']:.3f} | {r['cpu']:.1f} |")
        lines.append(f"| digits {arch} | (ground truth seed noise: split-half Spearman) | {pr['seed_noise']:.3f} | | "
                     f"{pr['ground_truth_cpu']:.0f} (retrains) |")
    if res["detection"]:
        lines += ["", "| flipped-label detection (20%, MLP 100, 30 epochs) | " + " | ".join(solvers) + " |",
                  "|---|" + "---|" * len(solvers)]
        for ds, d in res["detection"].items():
            lines.append(f"| {ds} AUROC | " + " | ".join(f"{d[s]['auroc']:.3f}" if s in d else "n/a (p > 20k)"
                                                          for s in solvers) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
