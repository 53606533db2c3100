"""The attribution table of bench/QUALITY.md: every gradient method's attribute() against
retraining (LDS and leave-one-out Spearman), with its CPU time and the ground truth's cost, and
dattri's attributors on the same data, model and checkpoints in the same run.

    python bench/quality/attribution/run_attribution.py --out runs/bench/attribution \\
        [--dattri-python $DVGS_PEER_VENVS/dattri/bin/python] [--tasks digits_lr,digits_mlp,adult_lr]

Writes ``attribution.json`` and ``attribution.md`` into --out (never over tracked files); copy
``attribution.md`` to bench/quality/attribution/ to publish it (run_quality.py puts it in
QUALITY.md). A run takes ~10-20 minutes on 2 shared cores.

Tasks (the recipes of bench/bench_counterfactual.py, so the two benches judge the same models):

* digits_lr: sklearn digits, 1000 source / 300 query rows; nn.Linear(64, 10), full-batch SGD lr 1.0,
  1000 epochs, L2 1e-2 (float32);
* digits_mlp: the same rows; MLP 64-32-10 (ReLU), Adam lr 3e-3, batch 64, 30 epochs;
* adult_lr: Adult, 2000 source / 500 query rows; nn.Linear(108, 2), full-batch SGD lr 1.0, 1000 epochs,
  L2 1e-2.

Ground truth (dvgs_fast.evaluate.counterfactual): LDS on 100 random half-subsets, LOO of 100 random
rows (the convex tasks' LOO warm-started: the full-data model trained, then every retrain continues
500 epochs from it); 1 retrain seed for the convex tasks (a converged convex model does not depend
on its seed), 3 for the MLP (averaged; the seed-to-seed reliability is reported). Output: the
margin (logit of the true class minus logsumexp of the others).

Methods, each scored on the reference model = the recipe trained on every row with seed 0 (or on
checkpoints of that same run, at 20/40/60/80/100% of its epochs):
  exact influence (convex tasks: the closed-form L2 logistic influence, the sanity row);
  grad-dot, grad-cos (GradDot / GradCos at the reference model);
  TracIn on the reference run's 5 checkpoints (TracInCheckpoints, weight lr each) -- dattri's TracIn
  computes the same quantity;
  TracIn, In-Run Data Shapley (first order) and DVGS as users run them: each trains its own model
  with the recipe's optimizer settings (DVGS: on the queries, as it is defined); not the reference
  model, so their scores are judged as predictions of the recipe's retraining;
  influence functions (InfluenceFunction, every solver, at the reference model, damping 'auto');
  TRAK (k = 512: the reference model alone, and 5 models of its own training), LoGra (the reference
  model, its defaults); data value embedding (replays the reference run, k = 1024; 64 on the
  full-batch convex tasks, whose 1000 steps of every row make the store epochs x N x k);
  random scores (the floor).
dattri 0.3.0 (its own venv, bench/peers/dattri_attribution.py on the exported data and
checkpoints): TracIn, grad-dot, grad-cos and TRAK (last checkpoint, regularisation 1e-3), with
exact gradients (--proj identity) so that the same algorithms are compared; its CPU time is the
one it measures around each attributor in its own process.

Timing: 1 torch thread (OMP_NUM_THREADS=1 too), CPU time (time.process_time) and wall time of the
attribute() call alone (the method's own training included where it trains), load average before
and after; our methods and dattri's subprocess alternate per task.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

HERE = Path(__file__).resolve().parent
BENCH = HERE.parent.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH / "peers"))
from _timing import load_avg, pinned_threads  # noqa: E402
from bench_counterfactual import adult_or_none, digits, facts, lr_recipe, mlp_recipe  # noqa: E402
from export import export_lds_ground_truth, export_task  # noqa: E402

from dvgs_fast import (DVGS, TRAK, DataValueEmbedding, GradCos, GradDot, InfluenceFunction, InRunShapley,  # noqa: E402
                       LoGraInfluence, RandomValuation, TracIn, TracInCheckpoints)
from dvgs_fast.evaluate import counterfactual as cf  # noqa: E402

N_SUBSETS, LOO_ROWS = 100, 100


def tasks(dd, da) -> dict:
    out = {"digits_lr": {"label": "(a) logistic regression on digits, 1000 train / 300 query",
                         "data": dd, "recipe": lr_recipe(64, 10, 1000, torch.float32), "seeds": 1, "convex": True},
           "digits_mlp": {"label": "(b) MLP 64-32-10 on digits, 1000 train / 300 query",
                          "data": dd, "recipe": mlp_recipe(), "seeds": 3, "convex": False}}
    if da is not None:
        out["adult_lr"] = {"label": "(c) logistic regression on Adult, 2000 train / 500 query",
                           "data": da, "recipe": lr_recipe(108, 2, 1000, torch.float32), "seeds": 1, "convex": True}
    return out


def ground_truth(task) -> dict:
    rec, data, seeds = task["recipe"], task["data"], task["seeds"]
    c0, t0 = time.process_time(), time.perf_counter()
    lds_gt = cf.lds_ground_truth(rec, *data, n_subsets=N_SUBSETS, seeds=seeds, progress=False)
    c1, t1 = time.process_time(), time.perf_counter()
    warm = 500 if task["convex"] else None
    loo_gt = cf.loo_ground_truth(rec, *data, indices=LOO_ROWS, seeds=seeds, warm_start_epochs=warm, progress=False)
    c2, t2 = time.process_time(), time.perf_counter()
    out = {"lds": lds_gt, "loo": loo_gt, "lds_cpu_s": c1 - c0, "lds_wall_s": t1 - t0, "loo_cpu_s": c2 - c1,
           "loo_wall_s": t2 - t1}
    if seeds > 1:
        out["lds_reliability"] = float(cf.seed_noise(lds_gt).reliability)
        out["loo_reliability"] = float(cf.seed_noise(loo_gt).reliability)
    return out


def checkpoints(task) -> list[nn.Module]:
    """The reference run (seed 0) at 20..100% of its epochs: the same run stopped earlier."""
    rec = task["recipe"]
    return [cf.reference_model(dataclasses.replace(rec, epochs=max(1, round(rec.epochs * f))), *task["data"][:2])
            for f in (0.2, 0.4, 0.6, 0.8, 1.0)]


def factory_of(rec):
    """The recipe's architecture as a zero-argument factory (the methods that train build their own)."""
    return lambda: rec.initial_module(0)


def our_methods(task, cks) -> dict:
    rec = task["recipe"]
    ref = cks[-1]
    n = len(task["data"][0])
    batch = rec.batch_size or n
    train = {"epochs": rec.epochs, "batch_size": batch, "lr": rec.lr, "optimizer": rec.optimizer,
             "weight_decay": rec.weight_decay, "seed": 0, "progress": False}
    methods = {
        "grad-dot": (lambda: GradDot(ref, progress=False, seed=0), "at the reference model"),
        "grad-cos": (lambda: GradCos(ref, progress=False, seed=0), "at the reference model"),
        "TracIn (reference checkpoints)": (lambda: TracInCheckpoints(factory_of(rec), cks, rec.lr, progress=False,
                                                                     seed=0), "5 checkpoints, weight lr"),
        "TracIn (own training)": (lambda: TracIn(factory_of(rec), n_checkpoints=5, **train),
                                  "trains with the recipe's optimizer settings"),
        "In-Run Data Shapley (own training)": (
            lambda: InRunShapley(factory_of(rec), **{k: v for k, v in train.items() if k != "batch_size"},
                                 batch_size=batch), "first order; trains with the recipe's settings"),
        "DVGS (trained on the queries)": (
            lambda: DVGS(factory_of(rec), epochs=min(rec.epochs, 30), lr=1e-3, target_batch_size=64, seed=0,
                         progress=False), "cosine, Adam 1e-3, 30 epochs on the queries (its definition)"),
        "random": (lambda: RandomValuation(seed=0, progress=False), "the floor"),
    }
    for solver in INFLUENCE_SOLVERS:
        methods[f"influence ({solver})"] = (
            lambda solver=solver: InfluenceFunction(ref, solver=solver, progress=False, seed=0),
            "at the reference model, damping 'auto'")
    methods["TRAK (reference model)"] = (
        lambda: TRAK(factory_of(rec), checkpoints=[ref.state_dict()], proj_dim=PROJ_DIM, progress=False, seed=0),
        f"k = {PROJ_DIM}, Khatri-Rao projection, regularization 1.0 (its default)")
    methods["TRAK (5 models, own training)"] = (
        lambda: TRAK(factory_of(rec), n_models=5, proj_dim=PROJ_DIM, **train),
        f"k = {PROJ_DIM}; 5 models trained with the recipe's settings from their own seeds")
    methods["LoGra (reference model)"] = (
        lambda: LoGraInfluence(ref, proj_dim=PROJ_DIM, progress=False, seed=0),
        f"k = {PROJ_DIM}, Kronecker projection, damping 0.1 (its defaults)")
    # The embedding's training replays the recipe's reference run (same initialisation and data
    # order): it predicts exactly the trajectory-specific LOO the ground truth retrains. Its store
    # holds epochs x N x k floats, so the 1000-step full-batch tasks use a small k.
    k_dve = 1024 if rec.batch_size else 64
    methods["data value embedding (own training)"] = (
        lambda: DataValueEmbedding(factory_of(rec), proj_dim=k_dve, **train),
        f"k = {k_dve}; replays the reference run" + (" (Adam: preconditioned step, approximate)"
                                                      if rec.optimizer != "sgd" else ""))
    return methods


INFLUENCE_SOLVERS = ("direct", "cg", "lissa", "arnoldi", "kfac", "ekfac", "datainf")
PROJ_DIM = 512


# The methods dattri also runs (fast: timed as the median of --rounds calls on both sides).
CHEAP = ("grad-dot", "grad-cos", "TracIn (reference checkpoints)", "random")


def run_ours(task, gt, cks, threads, rounds) -> list[dict]:
    rows = []
    xs, ys, xq, yq = task["data"]
    if task["convex"]:
        ref = cks[-1]
        with pinned_threads(threads):
            c0, t0 = time.process_time(), time.perf_counter()
            infl = cf.exact_linear_influence(ref.weight.detach(), ref.bias.detach(), xs, ys, xq, yq,
                                             weight_decay=task["recipe"].weight_decay)
            cpu, wall = time.process_time() - c0, time.perf_counter() - t0
        rows.append(_scored("exact influence (closed form)", "sanity: the L2 model's exact influence", infl, gt,
                            cpu, wall, "ours"))
    for name, (make, note) in our_methods(task, cks).items():
        times = []
        with pinned_threads(threads):
            try:
                for _ in range(rounds if name in CHEAP else 1):
                    c0, t0 = time.process_time(), time.perf_counter()
                    res = make().attribute(xs, ys, xq, yq)
                    times.append((time.process_time() - c0, time.perf_counter() - t0))
            except Exception as exc:  # noqa: BLE001 - a failing method is a row saying so
                rows.append({"method": name, "side": "ours", "note": note, "error": f"{type(exc).__name__}: {exc}"})
                continue
        rows.append(_scored(name, note, res, gt, float(np.median([c for c, _ in times])),
                            float(np.median([w for _, w in times])), "ours"))
    return rows


def _scored(name, note, scores, gt, cpu, wall, side) -> dict:
    s = cf.lds(scores, gt["lds"])
    loo = cf.loo_correlation(scores, gt["loo"])
    return {"method": name, "side": side, "note": note, "lds": [s.mean, s.stderr],
            "loo_spearman": [loo.spearman.mean, loo.spearman.stderr], "cpu_s": cpu, "wall_s": wall}


def run_dattri(python: str, task, gt, cks, out: Path, threads: int, rounds: int) -> list[dict]:
    files = export_task(out, *task["data"], cks)
    export_lds_ground_truth(out / "lds_gt.npz", gt["lds"])
    dst = out / "scores_identity.npz"
    lrs = ",".join([str(task["recipe"].lr)] * len(cks))
    proc = subprocess.run([python, str(BENCH / "peers" / "dattri_attribution.py"), "--data", files["data"],
                           "--model", files["model"], "--checkpoints", *files["checkpoints"], "--lrs", lrs,
                           "--proj", "identity", "--trak-reg", "1e-3", "--threads", str(threads), "--rounds", str(rounds),
                           "--out", str(dst)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return [{"method": "dattri", "side": "dattri", "error": proc.stderr.strip().splitlines()[-1:]}]
    meta = json.loads(dst.with_suffix(".json").read_text())
    scores = np.load(dst)
    names = {"tracin": "TracIn (reference checkpoints)", "grad_dot": "grad-dot", "grad_cos": "grad-cos",
             "trak": "TRAK (last checkpoint, exact gradients, reg 1e-3)"}
    rows = []
    for m, r in meta["methods"].items():
        row = _scored(names.get(m, m), f"dattri {meta['dattri']}", scores[f"scores_{m}"], gt, r["cpu_s"],
                      r["wall_s"], "dattri")
        rows.append(row)
    return rows


def markdown(res: dict) -> str:
    f = res["facts"]
    lines = ["## Attribution: LDS and leave-one-out against retraining", "",
             f"Produced by `bench/quality/attribution/run_attribution.py` ({f['date']}; {f['cpu']}, {f['cores']} "
             f"cores shared with other jobs; torch {f['torch']}; {res['threads']} thread; commit {f['commit']}; its "
             f"docstring has every setting). Each method's `attribute()` [query x train] scores against the actual "
             f"effect of retraining: LDS over {N_SUBSETS} random half-subsets, Spearman with the leave-one-out effect "
             f"of {LOO_ROWS} random rows; mean ± standard error over the queries. CPU s: the attribute() call alone, "
             f"1 thread, median of {res['rounds']} calls for the methods dattri also runs (the method's own training "
             f"included where it trains). dattri rows: dattri's own code on "
             f"the same data and checkpoints, in the same run.", ""]
    for key, t in res["tasks"].items():
        g = t["ground_truth"]
        rel = ""
        if "lds_reliability" in g:
            rel = (f"; the ground truth's own seeds agree to a reliability of {g['lds_reliability']:.2f} (LDS) and "
                   f"{g['loo_reliability']:.2f} (LOO): roughly the best any method can score")
        lines += [f"### {t['label']}", "",
                  f"Recipe: {t['recipe']}. Ground truth: LDS {g['lds_cpu_s']:.1f} CPU s ({g['lds_wall_s']:.1f} s wall), "
                  f"LOO {g['loo_cpu_s']:.1f} CPU s ({g['loo_wall_s']:.1f} s wall), {t['seeds']} retrain seed(s){rel}. "
                  f"Load average {t['load'][0]:.1f}-{t['load'][1]:.1f}.", "",
                  "| method | by | LDS | LOO Spearman | CPU s | wall s | note |", "|---|---|---:|---:|---:|---:|---|"]
        for r in t["rows"]:
            if "error" in r:
                lines.append(f"| {r['method']} | {r['side']} | - | - | - | - | failed: {r['error']} |")
                continue
            lines.append(f"| {r['method']} | {r['side']} | {r['lds'][0]:.3f} ± {r['lds'][1]:.3f} | "
                         f"{r['loo_spearman'][0]:.3f} ± {r['loo_spearman'][1]:.3f} | {r['cpu_s']:.2f} | "
                         f"{r['wall_s']:.2f} | {r['note']} |")
        same = {r["method"]: r for r in t["rows"] if r["side"] == "ours"}
        pairs = [(r, same[r["method"]]) for r in t["rows"] if r["side"] == "dattri" and r["method"] in same
                 and "error" not in r]
        if pairs:
            lines += ["", "Same algorithm, same model: " + "; ".join(
                f"{o['method']} LDS {o['lds'][0]:.3f} (ours) vs {d['lds'][0]:.3f} (dattri), CPU "
                f"{d['cpu_s'] / max(o['cpu_s'], 1e-9):.1f}x less" for d, o in pairs) + "."]
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/bench/attribution")
    ap.add_argument("--tasks", default="digits_lr,digits_mlp,adult_lr")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dattri-python", default=None)
    ap.add_argument("--rounds", type=int, default=5, help="calls of each fast method per side (median reported)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dd, da = digits(), adult_or_none("adult_lr")
    todo = {k: v for k, v in tasks(dd, da).items() if k in args.tasks.split(",")}
    res = {"facts": facts(), "threads": args.threads, "rounds": args.rounds, "tasks": {}}
    for i, (key, task) in enumerate(todo.items()):
        print(f"{task['label']}: ground truth ...", flush=True)
        loads = [load_avg()]
        with pinned_threads(args.threads):
            gt = ground_truth(task)
            cks = checkpoints(task)
        loads.append(load_avg())
        rows = []
        sides = [lambda: run_ours(task, gt, cks, args.threads, args.rounds)]
        if args.dattri_python:
            sides.append(lambda: run_dattri(args.dattri_python, task, gt, cks, out / key, args.threads, args.rounds))
        for side in (sides if i % 2 == 0 else sides[::-1]):      # alternate who goes first
            rows += side()
            loads.append(load_avg())
        rec = task["recipe"]
        res["tasks"][key] = {
            "label": task["label"], "seeds": task["seeds"], "load": [min(loads), max(loads)], "rows": rows,
            "recipe": f"{type(rec.initial_module(0)).__name__} ({rec.optimizer}, lr {rec.lr:g}, {rec.epochs} epochs, "
                      f"batch {rec.batch_size or 'full'}, L2 {rec.weight_decay:g})",
            "ground_truth": {k: v for k, v in gt.items() if k not in ("lds", "loo")}}
        for r in rows:
            if "error" in r:
                print(f"  {r['side']:6s} {r['method']}: failed: {r['error']}", flush=True)
            else:
                print(f"  {r['side']:6s} {r['method']}: LDS {r['lds'][0]:.3f} LOO {r['loo_spearman'][0]:.3f} "
                      f"CPU {r['cpu_s']:.2f} s", flush=True)
    (out / "attribution.json").write_text(json.dumps(res, indent=1, default=float))
    (out / "attribution.md").write_text(markdown(res))
    print(markdown(res))
    return res


if __name__ == "__main__":
    main()
