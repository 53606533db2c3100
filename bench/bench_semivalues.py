"""Semivalues against pyDVL 0.10 and OpenDataVal 1.3: agreement of the values and speed.

    python bench/bench_semivalues.py --out runs/bench_semivalues [--rounds 2] [--quick]

Peers run in their own virtualenvs (bench/peers/setup_peers.sh), every run in a process of its
own (bench/peers/run_peer.py) with 1 torch/BLAS thread, our runs the same way; the valuation
alone is timed, process CPU time and wall time, the load average recorded. Rounds are
interleaved (every round runs every implementation of a comparison once, the order reversed
every other round). Data: Adult (``$DVGS_FAST_DATA``), source rows with 20% flipped labels and a
clean target set of 400, split seed 0.

1. agreement: the same utility (scikit-learn's LogisticRegression, target accuracy, the
   target's majority-class rate for subsets without both classes) valued by MSR Data Banzhaf
   and by Beta(16, 1) Shapley (plain permutations, no truncation) in pyDVL and in ours; per
   point z = (ours - pyDVL) / sqrt(se_ours^2 + se_pyDVL^2).
2. speed, like for like: the same torch model and training on every side (run_peer.TorchRefit:
   our refit, i.e. the task's initial weights, 100 full-batch Adam steps, lr 0.1), a logistic
   model and a small MLP (108-32-2), each library's own valuation loop. The cost per sample is
   CPU seconds per utility evaluation (a refit and its score), and, where both report a
   standard error, CPU seconds x mean stderr^2 (the cost of a given stderr: the stderr of a
   Monte Carlo mean falls as 1/sqrt(samples)). OpenDataVal's values carry no stderr; its
   estimators are the same (MSR) or a stratified variant of it (Beta: per-cardinality means,
   min_cardinality 0 here), so its row compares the cost per utility evaluation.

Writes OUT/semivalues.json (every run) and OUT/semivalues.md (the tables).
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

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from _peers import PEER_VENVS as VENVS  # noqa: E402
from _timing import cpu_model  # noqa: E402

RUNNER = HERE / "peers" / "run_peer.py"


def python_of(lib: str) -> list[str]:
    if lib == "ours":
        return [sys.executable]
    exe = VENVS / lib / "bin" / "python"
    if not exe.is_file():
        raise SystemExit(f"bench_semivalues: {exe} is missing; run bash bench/peers/setup_peers.sh first")
    return [str(exe)]


def make_task(out: Path, name: str, n_source: int, hidden: int = 32, seed: int = 0) -> Path:
    """Adult split with 20% flipped source labels, and the models' initial weights."""
    sys.path.insert(0, str(ROOT))
    import torch
    from dvgs_fast.datasets import flip_labels, load_adult
    ds = load_adult()
    sp = ds.split(n_source=n_source, n_target=400, n_test=0, seed=seed)
    y, flipped = flip_labels(sp.y_source, 0.2, seed=seed)
    torch.manual_seed(seed)
    d = sp.x_source.shape[1]
    lin = torch.nn.Linear(d, 2)
    mlp = torch.nn.Sequential(torch.nn.Linear(d, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 2))
    path = out / f"task_{name}.npz"
    np.savez(path, x_source=np.asarray(sp.x_source, dtype=np.float32), y_source=np.asarray(y, dtype=np.int64),
             x_target=np.asarray(sp.x_target, dtype=np.float32), y_target=np.asarray(sp.y_target, dtype=np.int64),
             flipped=flipped, init_weight=lin.weight.detach().numpy(), init_bias=lin.bias.detach().numpy(),
             **{f"init_{k.replace('.', '_')}": v.detach().numpy() for k, v in mlp.state_dict().items()})
    return path


def run_job(out: Path, job: dict, reuse: bool = False) -> dict:
    """Run one job in its own process; ``reuse``: take an earlier result of the very same job
    from OUT/jobs (the agreement runs are not timings, so a rerun of the speed rows keeps them)."""
    jpath = out / "jobs" / f"{job['id']}.json"
    rpath = out / "jobs" / f"{job['id']}.out.json"
    if reuse and rpath.is_file() and jpath.is_file() and json.loads(jpath.read_text()) == job:
        print(f"  {job['id']}: reused {rpath}", flush=True)
        return json.loads(rpath.read_text())
    jpath.parent.mkdir(parents=True, exist_ok=True)
    jpath.write_text(json.dumps(job))
    env = dict(os.environ)
    if job["lib"] == "ours":
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    t0 = time.perf_counter()
    proc = subprocess.run([*python_of(job["lib"]), str(RUNNER), str(jpath), str(rpath)], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench_semivalues: {job['id']} failed:\n{proc.stderr[-3000:]}")
    res = json.loads(rpath.read_text())
    v = np.asarray(res["values"], dtype=float)
    v = v[np.isfinite(v)]
    if job["method"] != "lava" and (v.size == 0 or np.ptp(v) == 0):
        # every utility the same: the library's utility failed (e.g. an error it caught and turned
        # into its default score); its timing would not be of a valuation
        raise SystemExit(f"bench_semivalues: {job['id']}: every value is {v[0] if v.size else 'NaN'}; the "
                         f"library's utility did not evaluate the model (see bench/peers/run_peer.py)")
    print(f"  {job['id']}: cpu {res['cpu_s']:.2f} s, wall {res['wall_s']:.2f} s, {res['refits']} refits "
          f"(process {time.perf_counter() - t0:.0f} s)", flush=True)
    return res


def interleaved(out: Path, jobs: list[dict], rounds: int) -> list[list[dict]]:
    """Every job once per round, the order reversed every other round; [round][job] results."""
    res = []
    for r in range(rounds):
        order = jobs if r % 2 == 0 else jobs[::-1]
        got = {j["id"]: run_job(out, {**j, "id": f"{j['id']}-r{r}"}) for j in order}
        res.append([got[j["id"]] for j in jobs])
    return res


# ------------------------------------------------------------------------------- agreement
def agreement(out: Path, task: Path, quick: bool) -> list[dict]:
    rows = []
    for method, k_ours, k_peer, extra in (("banzhaf", 2000, 2000, {}),
                                          ("beta", 30, 30, {"alpha": 16.0, "beta": 1.0})):
        if quick:
            k_ours = k_peer = max(10, k_ours // 10)
        base = {"task": str(task), "model": "sklearn_logistic", "method": method, "seed": 1, "threads": 1, **extra}
        ours = run_job(out, {**base, "id": f"agree-{method}-ours", "lib": "ours", "samples": k_ours}, reuse=True)
        peer = run_job(out, {**base, "id": f"agree-{method}-pydvl", "lib": "pydvl", "samples": k_peer, "seed": 2},
                       reuse=True)
        a, b = np.array(ours["values"]), np.array(peer["values"])
        sa, sb = np.array(ours["stderr"], dtype=float), np.array(peer["stderr"], dtype=float)
        z = (a - b) / np.sqrt(sa ** 2 + sb ** 2)
        ok = np.isfinite(z)
        rows.append({"method": method, "n": len(a), "samples": k_ours, "within_2se": float(np.mean(np.abs(z[ok]) < 2)),
                     "within_3se": float(np.mean(np.abs(z[ok]) < 3)), "max_abs_z": float(np.max(np.abs(z[ok]))),
                     "pearson": float(np.corrcoef(a, b)[0, 1]), "mean_se_ours": float(np.nanmean(sa)),
                     "mean_se_pydvl": float(np.nanmean(sb)), "ours": ours, "pydvl": peer})
    return rows


# ----------------------------------------------------------------------------------- speed
SPEED = [
    # (method, model, samples: ours, pyDVL, OpenDataVal)
    ("banzhaf", "torch_logistic", 2000, 100, 100),
    ("beta", "torch_logistic", 24, 1, 1),
    ("banzhaf", "torch_mlp", 1000, 60, 60),
    ("beta", "torch_mlp", 8, 1, 1),
]


def speed(out: Path, task: Path, rounds: int, quick: bool) -> list[dict]:
    rows = []
    for method, model, k_ours, k_pydvl, k_odv in SPEED:
        if quick:
            k_ours, k_pydvl, k_odv = max(2, k_ours // 10), max(1, k_pydvl // 5), max(1, k_odv // 5)
        base = {"task": str(task), "model": model, "method": method, "seed": 3, "threads": 1, "steps": 100,
                "lr": 0.1, "alpha": 16.0, "beta": 1.0}
        jobs = [{**base, "id": f"speed-{method}-{model}-ours", "lib": "ours", "samples": k_ours},
                {**base, "id": f"speed-{method}-{model}-pydvl", "lib": "pydvl", "samples": k_pydvl},
                {**base, "id": f"speed-{method}-{model}-opendataval", "lib": "opendataval", "samples": k_odv}]
        res = interleaved(out, jobs, rounds)
        row = {"method": method, "model": model, "runs": {}}
        for i, j in enumerate(jobs):
            runs = [r[i] for r in res]
            per_refit = [x["cpu_s"] / max(x["refits"], 1) for x in runs]
            se2 = [float(np.nanmean(np.square(np.array(x["stderr"], dtype=float)))) if x["stderr"] else None
                   for x in runs]
            row["runs"][j["lib"]] = {
                "samples": j["samples"], "refits": [x["refits"] for x in runs], "cpu_s": [x["cpu_s"] for x in runs],
                "wall_s": [x["wall_s"] for x in runs], "cpu_per_refit": float(np.median(per_refit)),
                "cpu_x_se2": (float(np.median([x["cpu_s"] * s for x, s in zip(runs, se2)]))
                              if se2[0] is not None and np.isfinite(se2[0]) else None),
                "load": [x["load_start"] for x in runs], "version": runs[0]["version"]}
        rows.append(row)
    return rows


def markdown(meta: dict, agree: list[dict], spd: list[dict]) -> str:
    L = ["# Semivalues against pyDVL and OpenDataVal", "",
         f"Machine: {meta['cpu']}, {meta['cores']} cores shared with other jobs; 1 torch/BLAS thread per run, every "
         f"run its own process; CPU = process CPU time of the valuation alone. torch {meta['torch']}; pyDVL "
         f"{meta.get('pydvl', '?')}, OpenDataVal {meta.get('opendataval', '?')}. Data: Adult, {meta['n_source']} source "
         f"rows (20% flipped labels) / 400 clean target rows (speed), {meta['n_agree']} source rows (agreement). "
         f"Produced by `python bench/bench_semivalues.py --out DIR` on {meta['date']}.", ""]
    if agree:
        L += ["## Agreement with pyDVL (same utility: scikit-learn LogisticRegression, target accuracy)", "",
              "| method | points | samples each | within 2 se | within 3 se | max abs z | Pearson r | mean se ours / pyDVL |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in agree:
            unit = "subsets" if r["method"] == "banzhaf" else "permutations"
            L.append(f"| {'MSR Banzhaf' if r['method'] == 'banzhaf' else 'Beta(16, 1) Shapley'} | {r['n']} | "
                     f"{r['samples']} {unit} | {r['within_2se']:.0%} | {r['within_3se']:.0%} | {r['max_abs_z']:.2f} | "
                     f"{r['pearson']:.3f} | {r['mean_se_ours']:.4f} / {r['mean_se_pydvl']:.4f} |")
        L += ["", "z = (ours - pyDVL) / sqrt(se_ours² + se_pyDVL²) per point: two independent Monte Carlo estimates of "
              "the same values agree within 2 se for ~95% of the points if the estimands are equal.", ""]
    if spd:
        L += ["## Speed, like for like (the same torch model and training inside every library's own loop)", "",
              "| method | model | library | samples | refits | CPU s (median) | wall s (median) | CPU ms / refit | "
              "ours faster per refit | CPU × se² | ours faster at equal se |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in spd:
            o = r["runs"]["ours"]
            for lib in ("ours", "pydvl", "opendataval"):
                x = r["runs"][lib]
                ratio = x["cpu_per_refit"] / o["cpu_per_refit"]
                se_ratio = (x["cpu_x_se2"] / o["cpu_x_se2"]) if (x["cpu_x_se2"] and o["cpu_x_se2"]) else None
                cse = "-" if not x["cpu_x_se2"] else f"{x['cpu_x_se2']:.2e}"
                faster = "-" if lib == "ours" else f"{ratio:.1f}x"
                faster_se = "-" if lib == "ours" or se_ratio is None else f"{se_ratio:.1f}x"
                L.append(f"| {r['method']} | {r['model']} | {lib} {x['version']} | {x['samples']} | "
                         f"{int(np.median(x['refits']))} | {np.median(x['cpu_s']):.2f} | {np.median(x['wall_s']):.2f} | "
                         f"{1000 * x['cpu_per_refit']:.2f} | {faster} | {cse} | {faster_se} |")
        loads = [x for r in spd for lib in r["runs"].values() for x in lib["load"]]
        cpu = sum(sum(lib["cpu_s"]) for r in spd for lib in r["runs"].values())
        wall = sum(sum(lib["wall_s"]) for r in spd for lib in r["runs"].values())
        L += ["", f"{meta['rounds']} interleaved rounds, medians shown. Load average (1 min) at the start of the runs: "
              f"{min(loads):.1f} to {max(loads):.1f} on the 2 cores; all speed runs together {cpu:.0f} CPU s in "
              f"{wall:.0f} wall s (wall = {wall / cpu:.1f}x CPU: the other jobs' share of the cores)."]
        L += ["", "samples: MSR subsets (banzhaf) or permutations (beta: Beta(16, 1), no truncation on our and pyDVL's "
              "side; OpenDataVal's TMCSampler truncates after 10 unchanged marginals, min_cardinality 0). A refit is one "
              "utility evaluation (ours: refits actually trained, cache hits excluded). CPU × se²: CPU seconds times the "
              "mean squared standard error, the cost of a given precision.", ""]
    return "\n".join(L)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench_semivalues")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--n-source", type=int, default=500)
    p.add_argument("--n-agree", type=int, default=60)
    p.add_argument("--quick", action="store_true", help="a few samples each (a smoke test)")
    p.add_argument("--skip", default="", help="comma-separated: agreement,speed")
    p.add_argument("--report-only", action="store_true", help="rewrite OUT/semivalues.md from OUT/semivalues.json")
    a = p.parse_args()
    out = Path(a.out)
    if a.report_only:
        doc = json.loads((out / "semivalues.json").read_text())
        (out / "semivalues.md").write_text(markdown(doc["meta"], doc["agreement"], doc["speed"]))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    import torch
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
            "n_source": a.n_source, "n_agree": a.n_agree, "rounds": a.rounds, "python": platform.python_version()}
    for lib in ("pydvl", "opendataval"):
        v = subprocess.run([*python_of(lib), "-c", f"import {lib}; print({lib}.__version__)"], capture_output=True,
                           text=True).stdout.strip()
        meta[lib] = v
    skip = set(filter(None, a.skip.split(",")))
    agree = [] if "agreement" in skip else agreement(out, make_task(out, "agree", a.n_agree), a.quick)
    spd = [] if "speed" in skip else speed(out, make_task(out, "speed", a.n_source), a.rounds, a.quick)
    (out / "semivalues.json").write_text(json.dumps({"meta": meta, "agreement": agree, "speed": spd}, indent=1))
    (out / "semivalues.md").write_text(markdown(meta, agree, spd))
    print(f"bench_semivalues: wrote {out / 'semivalues.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
