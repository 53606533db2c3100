"""Influence functions: dvgs_fast's InfluenceFunction against pyDVL 0.10, dattri 0.3.0 and
Kronfluence 1.0.1 -- the same trained weights, data, damping and solver settings; each run in its
own process (bench/peers/influence_runner.py under each library's virtualenv), interleaved over
rounds (the order reversed every other round), at a pinned thread count, in one session.

    python bench/bench_influence.py --out runs/bench_influence [--problems logreg,mlp,cnn] [--rounds 2]
    (peer virtualenvs: bash bench/peers/setup_influence_peers.sh; --venvs DIR, default $DVGS_PEER_VENVS or runs/peer-venvs)

Problems: digits (scikit-learn, 8x8, /16), 1,000 training rows, 300 queries from the rest:
"logreg" (64-10, L2 1e-2 in training), "mlp" (64-64-10 ReLU), "cnn" (digits upsampled to 32x32,
conv 8-16 + pool + linear; Kronfluence and dattri's EK-FAC take Linear/Conv2d layers). Models are
trained once here (Adam, 1 thread, fixed seed), float32 as every peer runs them.

Per (problem, solver, library): median CPU seconds (time.process_time of the computation: the
fit and the full [300 x 1000] score matrix; imports and loading excluded), median wall seconds,
peak RSS above the starting level, and the Pearson correlation of the scores with ours and with
the exact (direct) scores. Damping is one number per problem for every library (our "auto" rule
for the exact solvers, 0.01·λ_max(H), computed once here), except the extra EK-FAC row that runs
Kronfluence's own heuristic against ours (the same rule). Results: OUT/influence.json and
OUT/influence.md. Nothing is written outside --out.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
RUNNER = HERE / "peers" / "influence_runner.py"
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "peers"))
from _peers import PEER_VENVS  # noqa: E402
from influence_runner import build  # noqa: E402

# Which libraries run which solver (what each offers; Kronfluence: K-FAC / EK-FAC only).
OFFERS = {
    "direct": ["dvgs_fast", "pydvl", "dattri"],
    "cg": ["dvgs_fast", "pydvl", "dattri"],
    "lissa": ["dvgs_fast", "pydvl", "dattri"],
    "arnoldi": ["dvgs_fast", "pydvl", "dattri"],
    "ekfac": ["dvgs_fast", "kronfluence", "pydvl", "dattri"],
    "ekfac_auto": ["dvgs_fast", "kronfluence"],
    "kfac": ["dvgs_fast", "kronfluence"],
    "datainf": ["dvgs_fast", "pydvl", "dattri"],
}


def load_avg() -> float:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return float("nan")


def make_problem(arch: str, n_train: int, n_query: int, seed: int = 0) -> dict:
    from sklearn.datasets import load_digits
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    tr, q = perm[:n_train], perm[n_train:n_train + n_query]
    if arch == "cnn":
        x = F.interpolate(x.reshape(-1, 1, 8, 8), size=(32, 32), mode="bilinear", align_corners=False)
    torch.manual_seed(seed)
    model = build(arch)
    wd = 1e-2 if arch == "logreg" else 0.0
    opt = torch.optim.Adam(model.parameters(), lr=1e-2 if arch == "logreg" else 3e-3, weight_decay=wd)
    xs, ys = x[tr], y[tr]
    g = torch.Generator().manual_seed(seed + 1)
    for _ in range(60 if arch != "cnn" else 30):
        for idx in torch.randperm(len(xs), generator=g).split(64):
            opt.zero_grad()
            F.cross_entropy(model(xs[idx]), ys[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = float((model(x[q]).argmax(1) == y[q]).float().mean())
    return {"arch": arch, "state_dict": model.state_dict(), "x_train": xs, "y_train": ys, "x_query": x[q],
            "y_query": y[q], "weight_decay": wd, "query_accuracy": acc}


def damping_for(pb: dict) -> tuple[float, float]:
    """(λ, λ_max): our exact solvers' auto rule, λ = 0.01·λ_max(H) of the mean training loss
    (+ the training's L2), computed once with our HVPs, then given to every library."""
    from dvgs_fast.methods.influence import InfluenceFunction
    model = build(pb["arch"])
    model.load_state_dict(pb["state_dict"])
    res = InfluenceFunction(model, solver="cg", weight_decay=pb["weight_decay"], dtype="float32", progress=False,
                            seed=0, hessian_batch_size=len(pb["x_train"]), max_iterations=1).fit(
        pb["x_train"], pb["y_train"], pb["x_query"][:1], pb["y_query"][:1])
    return float(res.info["damping"]), float(res.info["lambda_max"])


def python_for(lib: str, venvs: Path) -> list[str]:
    if lib == "dvgs_fast":
        return [sys.executable]
    return [str(venvs / {"pydvl": "pydvl", "dattri": "dattri", "kronfluence": "kronfluence"}[lib] / "bin" / "python")]


def run_one(lib: str, solver: str, problem: Path, settings: dict, threads: int, out: Path, venvs: Path,
            timeout: float) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    if lib != "dvgs_fast":
        env.pop("PYTHONPATH", None)           # a peer's venv sees only its own packages
    cmd = [*python_for(lib, venvs), str(RUNNER), "--lib", lib, "--solver", solver.replace("_auto", ""),
           "--problem", str(problem), "--settings", json.dumps(settings), "--threads", str(threads), "--out", str(out)]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s"}
    if p.returncode != 0:
        tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
        return {"error": " | ".join(tail)[-400:]}
    r = np.load(out)
    return {"scores": r["scores"], "cpu": float(r["cpu"]), "wall": float(r["wall"]), "peak": int(r["peak"]),
            "version": str(r["version"]), "torch": str(r["torch"]), "process_wall": time.perf_counter() - t0}


def pearson(a, b) -> float | None:
    if a is None or b is None:
        return None
    a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
    if a.std() == 0 or b.std() == 0 or not (np.isfinite(a).all() and np.isfinite(b).all()):
        return None
    return float(np.corrcoef(a, b)[0, 1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/bench_influence")
    ap.add_argument("--problems", default="logreg,mlp,cnn")
    ap.add_argument("--solvers", default="direct,cg,lissa,arnoldi,ekfac,ekfac_auto,kfac,datainf")
    ap.add_argument("--libs", default="dvgs_fast,pydvl,dattri,kronfluence")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n-train", type=int, default=1000)
    ap.add_argument("--n-query", type=int, default=300)
    ap.add_argument("--venvs", default=str(PEER_VENVS))
    ap.add_argument("--timeout", type=float, default=1800.0)
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(a.threads)
    libs = a.libs.split(",")
    rows, meta = [], {"threads": a.threads, "rounds": a.rounds, "n_train": a.n_train, "n_query": a.n_query,
                      "machine": platform.platform(), "cpu_count": os.cpu_count(), "python": sys.version.split()[0],
                      "load_start": load_avg(), "problems": {}}
    for arch in a.problems.split(","):
        pb = make_problem(arch, a.n_train, a.n_query)
        path = out / f"problem_{arch}.pt"
        torch.save(pb, path)
        lam, lam_max = damping_for(pb)
        lam += pb["weight_decay"]                   # the training's L2 belongs to the Hessian: peers add it here
        p = sum(v.numel() for v in pb["state_dict"].values())
        meta["problems"][arch] = {"parameters": p, "damping": lam, "lambda_max": lam_max,
                                  "query_accuracy": pb["query_accuracy"], "weight_decay": pb["weight_decay"]}
        st = {"damping": lam, "cg_maxiter": 100, "cg_rtol": 1e-6, "cg_tol_abs": 1e-7, "lissa_depth": 500,
              "lissa_scale": 2.0 * (lam_max + lam), "lissa_batch": 100, "rank": 10, "arnoldi_iter": 100,
              "fisher": "empirical"}
        print(f"[{arch}] p={p} damping={lam:.4g} λ_max={lam_max:.4g} query acc {pb['query_accuracy']:.3f}", flush=True)
        exact = None
        for solver in a.solvers.split(","):
            who = [lib for lib in OFFERS[solver] if lib in libs]
            sset = dict(st, damping="auto") if solver == "ekfac_auto" else st
            got: dict[str, list] = {lib: [] for lib in who}
            failed: set[str] = set()
            for r in range(a.rounds):
                order = who if r % 2 == 0 else who[::-1]
                for lib in order:
                    if lib in failed:
                        continue
                    res = run_one(lib, solver, path, sset, a.threads, out / f"scores_{arch}_{solver}_{lib}.npz",
                                  Path(a.venvs), a.timeout)
                    got[lib].append(res)
                    print(f"  {solver:10s} {lib:12s} round {r}: "
                          + (res["error"] if "error" in res else f"cpu {res['cpu']:.2f} s wall {res['wall']:.2f} s"),
                          flush=True)
                    if "error" in res:
                        failed.add(lib)
            ours = next((g["scores"] for g in got.get("dvgs_fast", []) if "scores" in g), None)
            if solver == "direct" and ours is not None:
                exact = ours
            for lib in who:
                ok = [g for g in got[lib] if "error" not in g]
                row = {"problem": arch, "solver": solver, "lib": lib, "runs": len(ok)}
                if not ok:
                    row["error"] = got[lib][-1]["error"] if got[lib] else "not run"
                else:
                    row.update(cpu=float(np.median([g["cpu"] for g in ok])),
                               wall=float(np.median([g["wall"] for g in ok])),
                               peak_mb=float(np.median([g["peak"] for g in ok])) / 2**20, version=ok[0]["version"],
                               torch=ok[0]["torch"],
                               pearson_vs_ours=pearson(ok[-1]["scores"], ours),
                               pearson_vs_exact=pearson(ok[-1]["scores"], exact))
                rows.append(row)
        write(out, meta, rows)                      # after every problem: a long run killed later keeps these
    print((out / "influence.md").read_text())


def write(out: Path, meta: dict, rows: list[dict]) -> None:
    meta["load_end"] = load_avg()
    (out / "influence.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (out / "influence.md").write_text(render(meta, rows))


def render(meta: dict, rows: list[dict]) -> str:
    lines = [f"threads {meta['threads']}, {meta['rounds']} interleaved rounds (median), {meta['n_train']} train x "
             f"{meta['n_query']} queries, {meta['machine']}, {meta['cpu_count']} cores, load "
             f"{meta['load_start']} -> {meta['load_end']}", ""]
    for arch, pm in meta["problems"].items():
        lines.append(f"- {arch}: {pm['parameters']} parameters, damping {pm['damping']:.4g} "
                     f"(λ_max {pm['lambda_max']:.4g}), "
                     f"query accuracy {pm['query_accuracy']:.3f}")
    lines += ["", "| problem | solver | library | CPU s | wall s | peak MB | CPU ratio peer/ours | Pearson vs ours | "
                  "Pearson vs exact | version |", "|---|---|---|---|---|---|---|---|---|---|"]
    ours = {(r["problem"], r["solver"]): r for r in rows if r["lib"] == "dvgs_fast" and "cpu" in r}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['problem']} | {r['solver']} | {r['lib']} | failed: {r['error'][:120]} | | | | | | |")
            continue
        o = ours.get((r["problem"], r["solver"]))
        ratio = f"{r['cpu'] / o['cpu']:.2f}" if o and r["lib"] != "dvgs_fast" else ""
        f = (lambda v: "" if v is None else f"{v:.4f}")
        lines.append(f"| {r['problem']} | {r['solver']} | {r['lib']} | {r['cpu']:.2f} | {r['wall']:.2f} | "
                     f"{r['peak_mb']:.0f} | {ratio} | {f(r['pearson_vs_ours'])} | {f(r['pearson_vs_exact'])} | "
                     f"{r['version']}, torch {r.get('torch', '?')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
