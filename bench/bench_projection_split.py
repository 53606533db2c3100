"""How a Kronecker projection splits a layer's k over its two sides, and what it does to quality:
the library's rule (grads.project._split: the sides balanced, k_out ≈ k_in ≈ √k, or a narrow side
kept whole) against the rule it replaced (k_out / k_in following the layer's aspect d_out / d_in),
at the same per-layer budgets (the planner's share of k by parameter count).

    python bench/bench_projection_split.py --out runs/bench/projection_split [--seeds 3]

Writes results.json / results.md into --out (ground truths cached there). ~5 minutes on 2 cores.

* DVEmb (bench/bench_dvemb.py's run: digits MLP 64-32-10, plain SGD lr 0.1, batch 64, 10 epochs):
  Spearman with the trajectory-specific LOO of 200 rows, mean over the 300 queries, k = 512, 1024;
  also with a Khatri-Rao projection of the same k, for reference.
* TRAK (M = 1 and 5 models, regularisation default) and LoGra (model 0, damping 0.1) on
  bench/bench_trak.py's digits task (Adam, 30 epochs): LDS, k = 512.
Each cell: the mean over --seeds projection seeds (a seed moves one draw by ~0.01).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import shutil
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_dvemb as BD  # noqa: E402
import bench_trak as BT  # noqa: E402
from bench_counterfactual import facts  # noqa: E402

from dvgs_fast.evaluate import counterfactual as cf  # noqa: E402
from dvgs_fast.grads import Projector  # noqa: E402
from dvgs_fast.methods.dvemb import DataValueEmbedding  # noqa: E402
from dvgs_fast.methods.trak import TRAK, LoGraInfluence  # noqa: E402

# The digits MLP 64-32-10's two Linear layers: [d_out, d_in + 1 (bias)].
LAYERS = [{"name": "0", "kind": "rows", "d_out": 32, "d_in": 65}, {"name": "2", "kind": "rows", "d_out": 10, "d_in": 33}]


def aspect_split(k: int, d_out: int, d_in: int) -> tuple[int, int]:
    """The rule before (for comparison only): k_out·k_in closest to k with k_out / k_in nearest
    d_out / d_in, unless that is lopsided by more than 2x (then the best aspect within 5% of k)."""
    target = math.log(d_out / d_in)
    cands = []
    for k_out in range(1, d_out + 1):
        k_in = min(d_in, k // k_out)
        if k_in < 1:
            break
        cands.append((k_out * k_in, round(abs(math.log(k_out / k_in) - target), 9), k_out, k_in))
    prod, aspect, k_out, k_in = min(cands, key=lambda c: (k - c[0], c[1], c[2]))
    if aspect > math.log(2.0):
        near = [c for c in cands if c[0] >= 0.95 * prod]
        prod, aspect, k_out, k_in = min(near, key=lambda c: (c[1], -c[0], c[2]))
    return k_out, k_in


def splits(k: int) -> dict[str, dict | None]:
    """{rule: layer_dims}: None = the library's default; the aspect rule at the same budgets (the
    planner's per-layer share of k, read from a Khatri-Rao plan, whose k per layer is the share)."""
    budget = {p.name: p.dim for p in Projector(k, structure="khatri_rao").plan_layers(LAYERS).layers}
    balanced = {p.name: (p.k_out, p.k_in) for p in Projector(k, structure="kronecker").plan_layers(LAYERS).layers}
    aspect = {s["name"]: aspect_split(budget[s["name"]], s["d_out"], s["d_in"]) for s in LAYERS}
    return {f"balanced (library) {balanced}": None, f"aspect (before) {aspect}": aspect}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/bench/projection_split")
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    rows = []

    xs, ys, xq, yq = [torch.as_tensor(np.asarray(a)) for a in BD.digits()]
    xs, xq = xs.float(), xq.float()
    gt = cf.loo_ground_truth(BD.recipe(), xs, ys, xq, yq, indices=200, seeds=[BD.SEED], output="neg_loss",
                             progress=False)
    for k in (512, 1024):
        # the two Kronecker splits, and Khatri-Rao (TRAK's default; DVEmb's before) for reference
        cases = [(rule, dims, "kronecker") for rule, dims in splits(k).items()]
        for rule, dims, structure in cases + [("Khatri-Rao, for reference", None, "khatri_rao")]:
            got = []
            for s in range(args.seeds):
                att = DataValueEmbedding(BD.factory, epochs=BD.EPOCHS, batch_size=BD.BATCH, lr=BD.LR, optimizer="sgd",
                                         seed=BD.SEED, progress=False, proj_dim=k, layer_dims=dims, proj_seed=s,
                                         projection_structure=structure).attribute(xs, ys, xq, yq)
                got.append(cf.loo_correlation(np.asarray(att), gt).spearman[0])
            rows.append({"method": "DVEmb", "metric": "Spearman vs trajectory LOO", "k": k, "rule": rule,
                         "mean": float(np.mean(got)), "each": got})
            print(rows[-1], flush=True)

    data, recipe, _ = BT.task("digits")
    xs, ys, xq, yq = data
    gt = BT.ground_truth("digits", out)
    mem = BT.members(recipe, xs, ys)
    for rule, dims in splits(BT.K).items():
        cells = {"TRAK M=1": [], f"TRAK M={BT.M}": [], "LoGra model 0": []}
        for s in range(args.seeds):
            for m in (1, BT.M):
                store = Path(tempfile.mkdtemp(prefix="split_trak_"))
                try:
                    r = TRAK(BT.make_model(recipe), checkpoints=mem[:m], proj_dim=BT.K, layer_dims=dims,
                             projection_structure="kronecker", store_dir=store, progress=False, seed=s
                             ).attribute(xs, ys, xq, yq)
                finally:
                    shutil.rmtree(store, ignore_errors=True)
                cells[f"TRAK M={m}"].append(cf.lds(np.asarray(r.scores), gt).mean)
            r = LoGraInfluence(BT.make_model(recipe), checkpoints=mem[:1], proj_dim=BT.K, layer_dims=dims,
                               progress=False, seed=s).attribute(xs, ys, xq, yq)
            cells["LoGra model 0"].append(cf.lds(np.asarray(r.scores), gt).mean)
        for method, got in cells.items():
            rows.append({"method": method, "metric": "LDS", "k": BT.K, "rule": rule, "mean": float(np.mean(got)),
                         "each": got})
            print(rows[-1], flush=True)

    res = {"facts": facts(), "seeds": args.seeds, "rows": rows}
    (out / "results.json").write_text(json.dumps(res, indent=1, default=float))
    f = res["facts"]
    lines = ["# Kronecker projection: how k is split over a layer's sides", "",
             f"{f['date']}; {f['cpu']}; torch {f['torch']}; commit {f['commit']}; `python bench/bench_projection_split.py` "
             f"(its docstring has every setting). Mean over {args.seeds} projection seeds; the split per layer "
             f"{{layer: (k_out, k_in)}} in the rule's name.", "",
             "| method | metric | k | split rule | mean | each seed |", "|---|---|---:|---|---:|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['metric']} | {r['k']} | {r['rule']} | {r['mean']:.3f} | "
                     f"{', '.join(f'{v:.3f}' for v in r['each'])} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return res


if __name__ == "__main__":
    main()
