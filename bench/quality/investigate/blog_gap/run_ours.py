"""Run `dvgs-fast run --dataset blog` (the paper's exp2 settings are the blog preset) once per seed,
1 torch thread, and append one row per seed to a CSV in the same layout as run_original.py.

usage: python3 run_ours.py --seeds 0-19 --out ours.csv [-- extra dvgs-fast run options]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import parse_seeds, results_writer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0-19")
    p.add_argument("--label", default="dvgs-fast", help="value of the 'side' column")
    p.add_argument("--out", required=True)
    p.add_argument("extra", nargs="*", help="extra dvgs-fast run options (after --)")
    args = p.parse_args()
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    with results_writer(args.out) as w:
        for seed in parse_seeds(args.seeds):
            with tempfile.TemporaryDirectory() as tmp:
                cmd = ["dvgs-fast", "run", "--dataset", "blog", "--seed", str(seed), "--threads", "1",
                       "--out", f"{tmp}/run", "--no-curves", "--no-progress", *args.extra]
                t0 = time.perf_counter()
                subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
                wall = time.perf_counter() - t0
                m = json.loads(Path(f"{tmp}/run/metrics.json").read_text())
            row = [args.label, "different", seed, f"{m['metrics']['auroc']:.6f}", m["metrics"]["n_corrupted"],
                   "", "", f"{m['timings']['valuation']:.1f}", f"{m['timings']['valuation_cpu']:.1f}"]
            w(row)
            print(*row, f"(process wall {wall:.1f} s)", flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
