"""TRAK and LoGra: how the regularisation default was chosen, quality (LDS) on the digits MLP
beside traker 0.3.2, TracIn and grad-dot, and featurisation speed against traker's CPU projector.

    bash bench/peers/setup_traker.sh                     # $DVGS_PEER_VENVS/traker (traker 0.3.2)
    python bench/bench_trak.py --out runs/bench/trak [--parts reg,digits,speed] [--rounds 3]

Writes results.json and results.md into --out (ground truths cached there as gt_<task>.npz).
Not collected by pytest (~30-40 minutes on 2 shared cores).

Ground truth: ``dvgs_fast.evaluate.counterfactual.lds_ground_truth`` (random half-subsets of the
training rows, each retrained with every seed, the queries' margins averaged; digits: 100
subsets x 3 seeds as bench/quality/attribution; the other tasks: 50 x 2), scored by its ``lds``
(mean over queries of the Spearman correlation between summed scores and retrained margins, ±
its standard error). The models attributed are the recipe's (``reference_model``) with seeds
1000-1004.

Parts
  reg     the default of ``regularization`` (λ = reg × tr(ΦᵀΦ)/k), chosen WITHOUT digits: LDS of
          our TRAK for reg in a grid on three other tasks (breast cancer 300/100 rows, MLP
          30-32-2; Adult 1000/300, MLP 108-32-2; a 5-class make_classification 1000/300, MLP
          20-32-5), M = 1 and 5 models, k = 512; the default is the grid value with the best mean
          LDS over those six cells (the library's REGULARIZATION records it), with the default
          projection (Khatri-Rao).
  digits  sklearn digits, 1000 source / 300 query rows (split seed 0, features in [0, 1]),
          MLP 64-32-10 ReLU, Adam lr 3e-3, batch 64, 30 epochs (the attribution ground truth's
          case (b)). M = 5 models trained from seeds 0-4 on all rows, the final weights each (one
          checkpoint per model), k = 512: our TRAK (reg 0 and the default; the projection
          Khatri-Rao (default), Kronecker (LoGra's) and dense per layer), traker with the same
          checkpoints and k (its λ = 0 default, and λ from the same relative rule on its own
          features), LoGra at model 0 (damping 0.1; and k = every parameter), TracIn (ours, 5
          checkpoints of one training run with the recipe), grad-dot (model 0); a sweep of reg
          for reference only (it looks at the digits ground truth, so it chose nothing).
  seeds   the same comparison over 5 projection seeds each (ours: TRAK seed; traker:
          projector_seed), M = 1 and 5: one draw's LDS moves by ~0.01 with the seed.
  speed   featurisation of the 1000 training rows at the 5 models, k = 512: ours
          (TRAK.featurize: the engine's factors, the three projection structures, the store
          written) vs
          traker's (torch.func per-sample gradients, its BasicProjector: a dense Gaussian
          generated per batch), 1 thread (and 2 as its own row), CPU time, interleaved rounds,
          each side in its own process invocation order alternating.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _peers import peer_python  # noqa: E402
from _timing import load_avg  # noqa: E402

from dvgs_fast import GradDot, TracIn  # noqa: E402
from dvgs_fast.evaluate import counterfactual as cf  # noqa: E402
from dvgs_fast.methods.trak import TRAK, LoGraInfluence  # noqa: E402
from dvgs_fast.methods.trak.trak import REGULARIZATION  # noqa: E402

TRAKER_PY = os.environ.get("TRAKER_PYTHON", peer_python("traker"))
REG_GRID = [0.0, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0]
STRUCTURES = ("khatri_rao", "kronecker", "dense")
STRUCTURE_LABEL = {"khatri_rao": "Khatri-Rao (default)", "kronecker": "Kronecker (LoGra)", "dense": "dense per layer"}
K = 512
M = 5


def mlp(d, h, c):
    return lambda: nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, c))


def _tensors(sp):
    return (torch.as_tensor(np.asarray(sp.x_source), dtype=torch.float32),
            torch.as_tensor(np.asarray(sp.y_source), dtype=torch.long),
            torch.as_tensor(np.asarray(sp.x_target), dtype=torch.float32),
            torch.as_tensor(np.asarray(sp.y_target), dtype=torch.long))


def task(name):
    """(data, recipe, layer spec for traker)."""
    from dvgs_fast import datasets
    if name == "digits":
        data = _tensors(datasets.load_digits().split(n_source=1000, n_target=300, n_test=400, seed=0))
        return data, adam_recipe(mlp(64, 32, 10), epochs=30, batch_size=64), (64, 32, 10)
    if name == "breast_cancer":
        data = _tensors(datasets.load_breast_cancer().split(n_source=300, n_target=100, n_test=100, seed=0))
        return data, adam_recipe(mlp(30, 32, 2), epochs=30, batch_size=32), (30, 32, 2)
    if name == "adult":
        data = _tensors(datasets.load_adult().split(n_source=1000, n_target=300, n_test=300, seed=0))
        return data, adam_recipe(mlp(108, 32, 2), epochs=20, batch_size=64), (108, 32, 2)
    if name == "synthetic":
        from sklearn.datasets import make_classification
        x, y = make_classification(n_samples=1300, n_features=20, n_informative=10, n_classes=5, random_state=0)
        x = (x - x.min(0)) / (x.max(0) - x.min(0))
        t = lambda a, dt: torch.as_tensor(a, dtype=dt)   # noqa: E731
        data = (t(x[:1000], torch.float32), t(y[:1000], torch.long), t(x[1000:], torch.float32),
                t(y[1000:], torch.long))
        return data, adam_recipe(mlp(20, 32, 5), epochs=30, batch_size=64), (20, 32, 5)
    raise ValueError(name)


def adam_recipe(make, epochs, batch_size):
    """Adam lr 3e-3 (bench_counterfactual's MLP recipe), as a counterfactual TrainingRecipe."""
    rec = cf.TrainingRecipe(make, optimizer="adam", lr=3e-3, epochs=epochs, batch_size=batch_size)
    return rec


def make_model(rec):
    return rec.initial_module(0)


def ground_truth(name, out: Path):
    """LDS ground truth, cached by the counterfactual module under <out>/gt (fingerprinted)."""
    data, rec, _ = task(name)
    n_subsets, seeds = (100, 3) if name == "digits" else (50, 2)
    return cf.lds_ground_truth(rec, *data, n_subsets=n_subsets, seeds=seeds, cache_dir=out / "gt", progress=False)


def members(rec, xs, ys, m=M):
    return [cf.reference_model(rec, xs, ys, seed=1000 + s).state_dict() for s in range(m)]


def row(label, scores, gt, **extra):
    c = cf.lds(np.asarray(scores), gt)
    print(f"  {label}: LDS {c.mean:.3f} ± {c.stderr:.3f}", flush=True)
    return {"label": label, "lds": c.mean, "stderr": c.stderr, **extra}


# ------------------------------------------------------------------------------------------ reg
def part_reg(out: Path) -> dict:
    cells = {}
    for name in ("breast_cancer", "adult", "synthetic"):
        (xs, ys, xq, yq), recipe, _ = task(name)
        gt = ground_truth(name, out)
        mem = members(recipe, xs, ys)
        for m in (1, M):
            store = Path(tempfile.mkdtemp(prefix="trak_reg_"))
            try:
                for reg in REG_GRID:
                    r = TRAK(make_model(recipe), checkpoints=mem[:m], proj_dim=K, regularization=reg,
                             store_dir=store, progress=False, seed=0).attribute(xs, ys, xq, yq)
                    cells.setdefault(f"{name}, M={m}", {})[reg] = row(f"{name} M={m} reg={reg}", r.scores, gt)["lds"]
            finally:
                shutil.rmtree(store, ignore_errors=True)
    mean = {reg: float(np.mean([c[reg] for c in cells.values()])) for reg in REG_GRID}
    best = max(REG_GRID, key=lambda r: mean[r])
    print(f"best regularization on the other tasks: {best} (mean LDS {mean[best]:.3f})", flush=True)
    return {"grid": REG_GRID, "cells": {k: {str(r): v for r, v in c.items()} for k, c in cells.items()},
            "mean": {str(r): v for r, v in mean.items()}, "best": best, "library_default": REGULARIZATION}


# ------------------------------------------------------------------------------------------ traker
def save_for_traker(tmp: Path, data, mem, dims) -> tuple[Path, Path, list[Path]]:
    xs, ys, xq, yq = data
    np.savez(tmp / "data.npz", x_source=xs.numpy(), y_source=ys.numpy(), x_query=xq.numpy(), y_query=yq.numpy())
    d, h, c = dims
    (tmp / "model.json").write_text(json.dumps({"layers": [["linear", d, h], ["relu"], ["linear", h, c]]}))
    cks = []
    for j, sd in enumerate(mem):
        p = tmp / f"m{j}.pt"
        torch.save(sd, p)
        cks.append(p)
    return tmp / "data.npz", tmp / "model.json", cks


def run_traker(files, out_npz: Path, *extra: str, threads: int = 1) -> dict:
    data, model, cks = files
    cmd = [TRAKER_PY, str(HERE / "peers" / "traker_runner.py"), "--data", str(data), "--model", str(model),
           "--checkpoints", *map(str, cks), "--proj-dim", str(K), "--threads", str(threads), "--out", str(out_npz),
           *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": ""}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"traker_runner failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    rep = json.loads(out_npz.with_suffix(".json").read_text())
    if out_npz.exists():
        rep["scores"] = np.load(out_npz)["scores"]
    return rep


# ------------------------------------------------------------------------------------------ digits
def part_digits(out: Path, default_reg: float) -> dict:
    data, recipe, dims = task("digits")
    xs, ys, xq, yq = data
    gt = ground_truth("digits", out)
    mem = members(recipe, xs, ys)
    rows, sweep = [], []
    kw = dict(proj_dim=K, progress=False, seed=0)
    store = Path(tempfile.mkdtemp(prefix="trak_digits_"))
    tmp = Path(tempfile.mkdtemp(prefix="traker_digits_"))
    try:
        for m in (1, M):
            for structure in STRUCTURES:
                for reg, what in ((0.0, "no regularisation"), (default_reg, "default rule")):
                    if structure == "dense" and reg == 0.0:
                        continue
                    r = TRAK(make_model(recipe), checkpoints=mem[:m], regularization=reg,
                             projection_structure=structure, store_dir=store / f"m{m}{structure}",
                             **kw).attribute(xs, ys, xq, yq)
                    how = STRUCTURE_LABEL[structure]
                    rows.append(row(f"TRAK (ours, {how}), k={K}, M={m}, reg={reg} ({what})", r.scores, gt,
                                    method="trak", models=m, regularization=reg, structure=structure))
            for reg in REG_GRID:
                r = TRAK(make_model(recipe), checkpoints=mem[:m], regularization=reg,
                         store_dir=store / f"m{m}khatri_rao", **kw).attribute(xs, ys, xq, yq)
                sweep.append(row(f"sweep M={m} reg={reg}", r.scores, gt, models=m, regularization=reg))
        files = save_for_traker(tmp, data, mem, dims)
        for m in (1, M):
            sub = (files[0], files[1], files[2][:m])
            rep = run_traker(sub, tmp / f"t{m}_0.npz", "--lambda-reg", "0")
            rows.append(row(f"traker 0.3.2, k={K}, M={m}, lambda_reg=0 (its default)", rep.pop("scores"), gt,
                            method="traker", models=m, traker=rep))
            rep = run_traker(sub, tmp / f"t{m}_rel.npz", "--relative-reg", str(default_reg))
            rows.append(row(f"traker 0.3.2, k={K}, M={m}, lambda_reg = {default_reg} x tr(XᵀX)/k of its features "
                            f"(= {rep['lambda_reg']:.3g})", rep.pop("scores"), gt, method="traker", models=m, traker=rep))
        n_params = sum(p.numel() for p in make_model(recipe).parameters())
        for k, structure, label in ((K, "kronecker", f"k={K}, Kronecker (its default)"),
                                    (K, "khatri_rao", f"k={K}, Khatri-Rao"),
                                    (n_params, "kronecker", f"k={n_params} = every parameter (influence, damped Fisher)")):
            r = LoGraInfluence(make_model(recipe), checkpoints=mem[:1], proj_dim=k, projection_structure=structure,
                               progress=False, seed=0).attribute(xs, ys, xq, yq)
            rows.append(row(f"LoGra (ours), {label}, model 0, damping 0.1", r.scores, gt, method="logra", proj_dim=k,
                            structure=structure))
        r = TracIn(lambda: make_model(recipe), epochs=recipe.epochs, batch_size=recipe.batch_size, lr=recipe.lr,
                   optimizer="adam", n_checkpoints=5, progress=False, seed=0).attribute(xs, ys, xq, yq)
        rows.append(row("TracIn (ours), 5 checkpoints of one run of the recipe", r.scores, gt, method="tracin"))
        model0 = make_model(recipe)
        model0.load_state_dict(mem[0])
        r = GradDot(model0, progress=False, seed=0).attribute(xs, ys, xq, yq)
        rows.append(row("grad-dot (ours), model 0", r.scores, gt, method="grad_dot"))
    finally:
        shutil.rmtree(store, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
    return {"rows": rows, "sweep": sweep, "k": K, "models": M}


# ------------------------------------------------------------------------------------------ seeds
def part_seeds(out: Path, default_reg: float, n_seeds: int = 5) -> dict:
    """The projection is random: one draw's LDS moves with its seed. Ours and traker's, each over
    the projection seeds 0..n_seeds-1 (same members, k, rule for λ), M = 1 and M = 5."""
    data, recipe, dims = task("digits")
    xs, ys, xq, yq = data
    gt = ground_truth("digits", out)
    mem = members(recipe, xs, ys)
    tmp = Path(tempfile.mkdtemp(prefix="trak_seeds_"))
    cells = {}
    try:
        files = save_for_traker(tmp, data, mem, dims)
        for m in (1, M):
            for s in range(n_seeds):
                for structure in STRUCTURES:
                    r = TRAK(make_model(recipe), checkpoints=mem[:m], proj_dim=K, regularization=default_reg,
                             projection_structure=structure, progress=False, seed=s).attribute(xs, ys, xq, yq)
                    cells.setdefault(f"ours {structure} M={m}", []).append(
                        row(f"ours {structure} M={m} seed {s}", r.scores, gt)["lds"])
                rep = run_traker((files[0], files[1], files[2][:m]), tmp / "s.npz", "--relative-reg",
                                 str(default_reg), "--seed", str(s))
                cells.setdefault(f"traker M={m}", []).append(row(f"traker M={m} seed {s}", rep["scores"], gt)["lds"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {k: {"each": v, "mean": float(np.mean(v)), "sd": float(np.std(v, ddof=1))} for k, v in cells.items()}


# ------------------------------------------------------------------------------------------ speed
def part_speed(out: Path, rounds: int) -> dict:
    data, recipe, dims = task("digits")
    xs, ys, _, _ = data
    mem = members(recipe, xs, ys)
    tmp = Path(tempfile.mkdtemp(prefix="trak_speed_"))
    res = {}
    try:
        files = save_for_traker(tmp, data, mem, dims)
        for threads in (1, 2):
            times = {**{st: [] for st in STRUCTURES}, "traker": []}
            loads = [load_avg()]
            for r in range(rounds + 1):                       # round 0: warm-up, not counted
                order = [*STRUCTURES, "traker"]
                for who in (order if r % 2 == 0 else order[::-1]):
                    if who != "traker":
                        torch.set_num_threads(threads)
                        d = Path(tempfile.mkdtemp(dir=tmp))
                        c0, w0 = time.process_time(), time.perf_counter()
                        TRAK(make_model(recipe), checkpoints=mem, proj_dim=K, projection_structure=who, store_dir=d,
                             progress=False, seed=0).featurize(xs, ys)
                        c, w = time.process_time() - c0, time.perf_counter() - w0
                        shutil.rmtree(d)
                    else:
                        rep = run_traker(files, tmp / "speed.npz", "--featurize-only", "--warmup", threads=threads)
                        c, w = rep["featurize_cpu_s"], rep["featurize_wall_s"]
                        res["traker_versions"] = {k: rep[k] for k in ("traker", "torch", "numpy", "python", "projector")}
                    if r:
                        times[who].append((c, w))
                loads.append(load_avg())
            med = lambda v, i: float(np.median([t[i] for t in v]))   # noqa: E731
            cell = {"load_avg": loads, "rounds": rounds, "rows": int(xs.shape[0]), "models": len(mem), "k": K,
                    "each": times}
            for who, v in times.items():
                cell[f"{who}_cpu_s"], cell[f"{who}_wall_s"] = med(v, 0), med(v, 1)
                cell[f"{who}_rows_per_cpu_s"] = xs.shape[0] * len(mem) / med(v, 0)
            for who in STRUCTURES:
                cell[f"{who}_cpu_ratio"] = med(times["traker"], 0) / med(times[who], 0)
            res[f"threads_{threads}"] = cell
            print(f"  featurisation, {threads} thread(s): " + ", ".join(f"{w} {cell[w + '_cpu_s']:.3f}" for w in times)
                  + " CPU s", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return res


# ------------------------------------------------------------------------------------------ report
def markdown(results: dict) -> str:
    md = ["# TRAK / LoGra bench", "",
          f"Machine: {results['machine']}, {results['cpus']} cores (shared), torch {results['torch']}; "
          f"{results['date']}.", ""]
    if "reg" in results:
        r = results["reg"]
        md += ["## The regularisation default (chosen without digits)", "",
               "LDS of our TRAK (k = 512) by `regularization` (λ = reg × tr(ΦᵀΦ)/k):", "",
               "| task | " + " | ".join(str(g) for g in r["grid"]) + " |", "|---|" + "---|" * len(r["grid"])]
        for cell, vals in r["cells"].items():
            md.append(f"| {cell} | " + " | ".join(f"{vals[str(g)]:.3f}" for g in r["grid"]) + " |")
        md.append("| **mean** | " + " | ".join(f"{r['mean'][str(g)]:.3f}" for g in r["grid"]) + " |")
        md += ["", f"Best mean: reg = {r['best']}; the library default is {r['library_default']}.", ""]
    if "digits" in results:
        d = results["digits"]
        md += ["## Digits MLP 64-32-10: LDS (50 half-subsets x 2 seeds, 300 queries)", "",
               "| method | LDS | ± s.e. |", "|---|---|---|"]
        md += [f"| {x['label']} | {x['lds']:.3f} | {x['stderr']:.3f} |" for x in d["rows"]]
        md += ["", "Sweep of `regularization` on digits (reference only: it looks at the digits ground truth):", "",
               "| M | " + " | ".join(str(g) for g in REG_GRID) + " |", "|---|" + "---|" * len(REG_GRID)]
        for m in sorted({x["models"] for x in d["sweep"]}):
            vals = {x["regularization"]: x["lds"] for x in d["sweep"] if x["models"] == m}
            md.append(f"| {m} | " + " | ".join(f"{vals[g]:.3f}" for g in REG_GRID) + " |")
        md.append("")
    if "seeds" in results:
        md += ["## Over projection seeds (digits, k = 512, regularization 1.0, the same members)", "",
               "| | mean LDS over 5 projection seeds | sd over seeds | each |", "|---|---|---|---|"]
        for k, v in results["seeds"].items():
            md.append(f"| {k} | {v['mean']:.3f} | {v['sd']:.3f} | {', '.join(f'{x:.3f}' for x in v['each'])} |")
        md.append("")
    if "speed" in results:
        s = results["speed"]
        md += ["## Featurisation speed (digits, 1000 rows x 5 models, k = 512)", "",
               "| threads | implementation | CPU s | wall s | rows x models per CPU s | traker CPU / ours CPU |",
               "|---|---|---|---|---|---|"]
        names = {**{st: f"ours, {STRUCTURE_LABEL[st]}" for st in STRUCTURES}, "traker": "traker 0.3.2, BasicProjector"}
        for t in (1, 2):
            x = s.get(f"threads_{t}")
            if x:
                for who, label in names.items():
                    ratio = f"**{x[who + '_cpu_ratio']:.1f}x**" if who != "traker" else "1"
                    md.append(f"| {t} | {label} | {x[who + '_cpu_s']:.3f} | {x[who + '_wall_s']:.2f} | "
                              f"{x[who + '_rows_per_cpu_s']:,.0f} | {ratio} |")
        md += ["", f"Medians of {s['threads_1']['rounds']} interleaved rounds (a warm-up round first; traker "
               f"warms up on one batch in each of its processes); traker "
               f"{s['traker_versions']['traker']} (torch {s['traker_versions']['torch']}, "
               f"{s['traker_versions']['projector']}), in its own virtualenv.", ""]
    return "\n".join(md)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/bench/trak")
    ap.add_argument("--parts", default="reg,digits,seeds,speed")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results.update({"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                    "torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version(),
                    "date": time.strftime("%Y-%m-%d %H:%M")})
    parts = args.parts.split(",")
    if "reg" in parts:
        print("reg:", flush=True)
        results["reg"] = part_reg(out)
    if "digits" in parts:
        print("digits:", flush=True)
        results["digits"] = part_digits(out, REGULARIZATION)
    if "seeds" in parts:
        print("seeds:", flush=True)
        results["seeds"] = part_seeds(out, REGULARIZATION)
    if "speed" in parts:
        print("speed:", flush=True)
        results["speed"] = part_speed(out, args.rounds)
    path.write_text(json.dumps(results, indent=1, default=float))
    (out / "results.md").write_text(markdown(results))
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
