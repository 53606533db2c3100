"""Flipped-label detection by InfluenceFunction's solvers on digits and Adult: 20% of 1,000 training
labels flipped, fit() values against 300 clean target rows (an MLP d-100-k, ReLU, trained inside
for 30 epochs with the method's defaults), AUROC of the low values for the flipped rows. The
solvers' LDS and leave-one-out correlations are in the attribution table
(bench/quality/attribution/run_attribution.py), against dvgs_fast.evaluate.counterfactual.

    python bench/bench_influence_detection.py --out runs/influence_detection [--datasets digits,adult]

1 torch thread; CPU time (time.process_time) of each fit(), training included; load average
recorded. Writes OUT/influence_detection.json and .md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
import warnings
from pathlib import Path

import torch
from torch import nn

SOLVERS = ("direct", "cg", "lissa", "arnoldi", "kfac", "ekfac", "datainf")


def detection(dataset: str, solvers, seed=0) -> dict:
    """AUROC of fit() values for 20% flipped labels (MLP 100-10 trained inside, 30 epochs)."""
    from dvgs_fast.datasets import flip_labels, load_adult, load_digits, make_split
    from dvgs_fast.evaluate.metrics import detection_auroc
    from dvgs_fast.methods.influence import InfluenceFunction
    ds = load_adult() if dataset == "adult" else load_digits()
    sp = make_split(ds.X, ds.y, 1000, 300, 0, seed=seed)
    xs, ys, xt, yt = (torch.as_tensor(sp.x_source, dtype=torch.float32), torch.as_tensor(sp.y_source),
                      torch.as_tensor(sp.x_target, dtype=torch.float32), torch.as_tensor(sp.y_target))
    ys_noisy, flipped = flip_labels(ys.numpy(), 0.2, seed=seed, n_classes=ds.n_classes)
    ys_noisy = torch.as_tensor(ys_noisy)
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
    ap.add_argument("--out", default="runs/influence_detection")
    ap.add_argument("--solvers", default=",".join(SOLVERS))
    ap.add_argument("--datasets", default="digits,adult")
    a = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    solvers = a.solvers.split(",")
    res = {"date": time.strftime("%Y-%m-%d %H:%M"), "cpu": platform.processor() or platform.machine(),
           "cores": os.cpu_count(), "torch": torch.__version__, "load_start": os.getloadavg()[0], "detection": {}}
    for ds in [d for d in a.datasets.split(",") if d]:
        res["detection"][ds] = detection(ds, solvers)
    res["load_end"] = os.getloadavg()[0]
    (out / "influence_detection.json").write_text(json.dumps(res, indent=1, default=str))
    (out / "influence_detection.md").write_text(render(res, solvers))
    print((out / "influence_detection.md").read_text())


def render(res, solvers) -> str:
    lines = ["# Influence functions: flipped-label detection", "",
             f"{res['date']}; {res['cpu']}, {res['cores']} cores shared with other jobs (load "
             f"{res['load_start']:.1f}-{res['load_end']:.1f}); torch {res['torch']}; 1 thread; CPU s of each fit() "
             f"(training 30 epochs included). 20% flipped labels in 1,000 training rows, 300 clean target rows, "
             f"MLP d-100-k; `bench/bench_influence_detection.py`.", "",
             "| data | " + " | ".join(solvers) + " |", "|---|" + "---|" * len(solvers)]
    for ds, d in res["detection"].items():
        lines.append(f"| {ds}: AUROC | " + " | ".join(f"{d[s]['auroc']:.3f}" if s in d else "n/a (p > 20k)"
                                                    for s in solvers) + " |")
        lines.append(f"| {ds}: CPU s | " + " | ".join(f"{d[s]['cpu']:.1f}" if s in d else "-" for s in solvers) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
