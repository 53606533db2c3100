"""LAVA against OpenDataVal's LavaEvaluator (1.3): the same values, and the time to get them.

    python bench/bench_lava.py --out runs/bench_lava [--rounds 2] [--sizes adult:1000:400,...]

Each task is a dataset with 20% flipped source labels and a clean target set. Both sides run
in processes of their own (bench/peers/run_peer.py; OpenDataVal in its virtualenv from
bench/peers/setup_peers.sh) with 1 torch/BLAS thread, the valuation alone timed (process CPU and
wall time), rounds interleaved (order reversed every other round).

* agreement: float64 on both sides (OpenDataVal gets float64 tensors, so geomloss runs in
  float64): max |ours - theirs| over the points, relative to the largest |value|; Pearson r;
  the detection AUROC of the flipped labels from each side's values.
* speed: float32 (OpenDataVal's usual input; our default), CPU seconds of each side, and the
  peak memory is noted from the algorithm (theirs: dense N x M cost and kernel matrices; ours:
  O(N + M)).

Writes OUT/lava.json and OUT/lava.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from _timing import cpu_model  # noqa: E402
from bench_semivalues import interleaved, python_of, run_job  # noqa: E402

DEFAULT_SIZES = "digits:1000:300,adult:1000:400,adult:5000:1000,adult:10000:2000"


def make_task(out: Path, dataset: str, n: int, m: int, seed: int = 0) -> Path:
    sys.path.insert(0, str(ROOT))
    from dvgs_fast.datasets import flip_labels, load_dataset
    ds = load_dataset(dataset)
    sp = ds.split(n_source=n, n_target=m, n_test=0, seed=seed)
    y, flipped = flip_labels(sp.y_source, 0.2, seed=seed)
    path = out / f"task_{dataset}_{n}_{m}.npz"
    np.savez(path, x_source=np.asarray(sp.x_source, dtype=np.float64), y_source=np.asarray(y, dtype=np.int64),
             x_target=np.asarray(sp.x_target, dtype=np.float64), y_target=np.asarray(sp.y_target, dtype=np.int64),
             flipped=flipped)
    return path


def auroc(values: np.ndarray, flipped: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score
    return float(roc_auc_score(flipped, -values))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench_lava")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--sizes", default=DEFAULT_SIZES, help="dataset:n_source:n_target,...")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    import torch
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__}
    import subprocess
    meta["opendataval"] = subprocess.run([*python_of("opendataval"), "-c", "import opendataval, geomloss; "
                                          "print(opendataval.__version__, geomloss.__version__)"],
                                         capture_output=True, text=True).stdout.strip()
    rows = []
    for spec in a.sizes.split(","):
        ds, n, m = spec.split(":")
        task = make_task(out, ds, int(n), int(m))
        flipped = np.load(task)["flipped"]
        base = {"task": str(task), "method": "lava", "seed": 0, "threads": 1, "samples": 0, "model": "none"}
        # agreement, float64 both sides (one run each)
        o64 = run_job(out, {**base, "id": f"lava-{ds}-{n}-f64-ours", "lib": "ours", "dtype": "float64"})
        t64 = run_job(out, {**base, "id": f"lava-{ds}-{n}-f64-odv", "lib": "opendataval", "dtype": "float64"})
        vo, vt = np.array(o64["values"]), np.array(t64["values"])
        # speed, float32, interleaved rounds
        jobs = [{**base, "id": f"lava-{ds}-{n}-f32-ours", "lib": "ours", "dtype": "float32"},
                {**base, "id": f"lava-{ds}-{n}-f32-odv", "lib": "opendataval", "dtype": "float32"}]
        res = interleaved(out, jobs, a.rounds)
        cpu_o = float(np.median([r[0]["cpu_s"] for r in res]))
        cpu_t = float(np.median([r[1]["cpu_s"] for r in res]))
        v32o, v32t = np.array(res[0][0]["values"]), np.array(res[0][1]["values"])
        rows.append({
            "dataset": ds, "n_source": int(n), "n_target": int(m),
            "max_abs_diff_f64": float(np.max(np.abs(vo - vt))), "max_abs_value": float(np.max(np.abs(vt))),
            "pearson_f64": float(np.corrcoef(vo, vt)[0, 1]), "pearson_f32": float(np.corrcoef(v32o, v32t)[0, 1]),
            "auroc_ours": auroc(v32o, flipped), "auroc_odv": auroc(v32t, flipped),
            "cpu_ours": cpu_o, "cpu_odv": cpu_t, "speedup_cpu": cpu_t / cpu_o,
            "wall_ours": float(np.median([r[0]["wall_s"] for r in res])),
            "wall_odv": float(np.median([r[1]["wall_s"] for r in res])),
            "load": [r[0]["load_start"] for r in res], "f64_cpu_ours": o64["cpu_s"], "f64_cpu_odv": t64["cpu_s"]})
        print(f"bench_lava: {spec}: max |diff| {rows[-1]['max_abs_diff_f64']:.2e} of {rows[-1]['max_abs_value']:.3g}, "
              f"CPU {cpu_o:.2f} s vs {cpu_t:.2f} s ({cpu_t / cpu_o:.1f}x)", flush=True)
    (out / "lava.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    L = ["# LAVA against OpenDataVal's LavaEvaluator", "",
         f"Machine: {meta['cpu']}, {meta['cores']} cores shared with other jobs; 1 torch/BLAS thread per run, every run "
         f"its own process; CPU = process CPU time of the valuation alone (median of {a.rounds} interleaved rounds). "
         f"torch {meta['torch']}; OpenDataVal, geomloss {meta['opendataval']}. 20% flipped source labels, clean "
         f"target. Produced by `python bench/bench_lava.py --out DIR` on {meta['date']}.", "",
         "| data | source / target | max abs diff (float64) | max abs value | Pearson r f64 / f32 | detection AUROC ours / "
         "theirs | CPU s ours | CPU s OpenDataVal | faster (CPU) | wall s ours / theirs |",
         "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        L.append(f"| {r['dataset']} | {r['n_source']} / {r['n_target']} | {r['max_abs_diff_f64']:.1e} | "
                 f"{r['max_abs_value']:.3g} | {r['pearson_f64']:.6f} / {r['pearson_f32']:.6f} | {r['auroc_ours']:.3f} / "
                 f"{r['auroc_odv']:.3f} | {r['cpu_ours']:.2f} | {r['cpu_odv']:.2f} | {r['speedup_cpu']:.1f}x | "
                 f"{r['wall_ours']:.2f} / {r['wall_odv']:.2f} |")
    L += ["", "Same definition on both sides (OTDD label-aware cost with lam_x = lam_y = 1, blur sqrt(0.1) outside and "
          "inside, epsilon-scaling 0.5, the same starting scale, calibrated gradient, sign flipped so that low = "
          "harmful). Memory: theirs holds dense N x M cost and kernel matrices (geomloss tensorized); ours O(N + M) "
          "(online log-sum-exp kernel). OpenDataVal also computes the within-set class-to-class distances, which its "
          "non-debiased outer problem never uses; we skip them (part of the time difference).", ""]
    (out / "lava.md").write_text("\n".join(L))
    print(f"bench_lava: wrote {out / 'lava.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
