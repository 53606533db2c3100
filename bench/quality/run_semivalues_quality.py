"""The semivalue methods and LAVA on the label-corruption experiments: one `dvgs-fast compare`
per dataset (the command a user runs), written to bench/quality/semivalues/ and summarised in
bench/quality/semivalues/SECTION.md, which bench/quality/run_quality.py appends to QUALITY.md.

    nice python3 bench/quality/run_semivalues_quality.py [--datasets adult,blog,digits] [--seeds 0,1,2]
    python3 bench/quality/run_semivalues_quality.py --report-only

Settings (the QUALITY.md tabular experiments': 1000 source / 400 target, 20% flipped labels;
digits 1000 / 300): every retraining semivalue (TMC Data Shapley, Beta(16, 1) Shapley, MSR Data
Banzhaf) refits the same logistic model for a fixed number of samples (``--permutations`` for
the two permutation methods, ``--subsets`` for MSR; chosen so that they cost CPU time of the
same order, reported per run), with ``--max-time`` only as a safety net: a wall-clock budget
would measure the machine's load, not the estimators (on this shared 2-core machine a 60 s
budget bought 3 CPU seconds). LAVA and KNN-Shapley (no training) run to completion. Detection of the flipped labels (AUROC, AUPRC, k-means F1) is the
metric; no removal curves (they retrain per fraction and do not change the ranking of the
values). LDS (linear datamodelling score) rows are not here: it needs the counterfactual
retraining module (dvgs_fast.evaluate.counterfactual) that is not on main yet.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
OUT = HERE / "semivalues"
SECTION = OUT / "SECTION.md"
METHODS = ("dshap", "beta_shapley", "banzhaf", "lava", "knn_shapley")
DATASETS = {"adult": {"n-source": 1000, "n-target": 400}, "blog": {"n-source": 1000, "n-target": 400},
            "digits": {"n-source": 1000, "n-target": 300}}


def config(perms: int, subsets: int, budget: float, sizes: dict) -> str:
    lines = ["# written by bench/quality/run_semivalues_quality.py", 'noise = "label:0.2"']
    lines += [f"{k} = {v}" for k, v in sizes.items()]
    lines += ["[method.dshap]", f"max_permutations = {perms}", f"max_time = {budget}",
              "[method.beta_shapley]", 'model = "logistic"', f"max_updates = {perms}", f"max_time = {budget}",
              "[method.banzhaf]", 'model = "logistic"', f"max_updates = {subsets}", f"max_time = {budget}"]
    return "\n".join(lines) + "\n"


def run(dataset: str, seeds: str, perms: int, subsets: int, budget: float, data_root: str | None) -> None:
    folder = OUT / dataset
    cfg = OUT / f"{dataset}.toml"
    OUT.mkdir(parents=True, exist_ok=True)
    cfg.write_text(config(perms, subsets, budget, DATASETS[dataset]))
    # checkout-relative paths (the command runs in ROOT), so the recorded command is portable
    argv = [sys.executable, "-m", "dvgs_fast.cli", "compare", "--dataset", dataset, "--method", ",".join(METHODS),
            "--seeds", seeds, "--config", str(cfg.relative_to(ROOT)), "--threads", "1", "--no-progress",
            "--no-curves", "--out", str(folder.relative_to(ROOT)), "--overwrite"]
    if data_root:
        argv += ["--data-root", data_root]
    print("run_semivalues_quality:", " ".join(argv), file=sys.stderr, flush=True)
    rc = subprocess.run(argv, cwd=ROOT).returncode
    if rc not in (0, 1):
        raise SystemExit(f"run_semivalues_quality: dvgs-fast compare on {dataset} exited {rc}")
    portable(folder, data_root)


def portable(folder: Path, data_root: str | None) -> None:
    """Rewrite this machine's paths in the committed records: the checkout becomes relative
    paths, the data folder ``$DVGS_FAST_DATA`` (the files hold the resolved paths)."""
    subs = [(str(ROOT) + os.sep, ""), (str(ROOT), ".")]
    if data_root:
        subs.insert(0, (str(Path(data_root).resolve()), "$DVGS_FAST_DATA"))
        subs.insert(0, (str(data_root).rstrip(os.sep), "$DVGS_FAST_DATA"))
    for f in folder.rglob("*"):
        if f.suffix not in (".json", ".md", ".html", ".csv", ".txt") or not f.is_file():
            continue
        text = f.read_text()
        new = text
        for old, rep in subs:
            new = new.replace(old, rep)
        if new != text:
            tmp = f.with_suffix(f.suffix + ".tmp")
            tmp.write_text(new)
            os.replace(tmp, f)


def _ms(v):
    v = [float(x) for x in v if x is not None and np.isfinite(x)]
    if not v:
        return "-"
    return f"{v[0]:.3f}" if len(v) == 1 else f"{np.mean(v):.3f} ± {2 * np.std(v):.3f}"


def section() -> str:
    L = ["## Semivalues and LAVA (issue 32): label corruption", "",
         "Produced by `bench/quality/run_semivalues_quality.py` (one `dvgs-fast compare` per dataset; do not edit by "
         "hand). 20% flipped source labels, clean target; the retraining semivalues refit the same logistic model "
         "(100 full-batch Adam steps) for a fixed number of samples (permutations for TMC Data Shapley and Beta(16, 1) "
         "Shapley, both with the TMC truncation at 1% of the full score; random subsets for MSR Banzhaf), their CPU "
         "cost per run beside them; LAVA and KNN-Shapley (k = 10) need no training. Metric: "
         "detection of the flipped labels, mean ± 2 sd (ddof 0) over the seeds. No LDS rows: the counterfactual "
         "retraining module it needs (dvgs_fast.evaluate.counterfactual) is not on main yet.", ""]
    for ds in DATASETS:
        f = OUT / ds / "compare.json"
        if not f.is_file():
            continue
        doc = json.loads(f.read_text())
        s = doc["sizes"]
        ms = doc.get("method_settings", {})
        budget = ", ".join(f"{m} {k} {v}" for m, t in ms.items() for k, v in t.items()
                           if k in ("max_permutations", "max_updates"))
        L += [f"### {ds}: {s['n_source']} source / {s['n_target']} target, seeds {', '.join(map(str, doc['seeds']))}",
              "", f"Samples: {budget or 'see the settings file'}.", "",
              "| method | AUROC | AUPRC | k-means F1 | CPU s / run | wall s / run | done (seed 0) | status |",
              "|---|---|---|---|---|---|---|---|"]
        for m in doc["methods"]:
            rs = [r for r in doc["runs"] if r["method"] == m and r["status"] != "failed"]
            if not rs:
                continue
            prog = rs[0].get("progress") or "-"
            st: dict[str, int] = {}
            for r in rs:
                k = r["status"] if r["status"] != "stopped" else f"stopped ({r.get('stopped_by')})"
                st[k] = st.get(k, 0) + 1
            L.append(f"| {m} | {_ms([r['metrics'].get('auroc') for r in rs])} | "
                     f"{_ms([r['metrics'].get('auprc') for r in rs])} | {_ms([r['metrics'].get('kmeans_f1') for r in rs])} | "
                     f"{_ms([r['cpu_s'] for r in rs])} | {_ms([r['wall_s'] for r in rs])} | "
                     f"{prog} | "
                     f"{', '.join(f'{k} {v}/{len(rs)}' for k, v in st.items())} |")
        L += ["", f"Load average {doc['loadavg_start']} at the start, {doc['loadavg_end']} at the end; settings: "
              f"[`quality/semivalues/{ds}.toml`](quality/semivalues/{ds}.toml); per run: "
              f"[`quality/semivalues/{ds}/runs.csv`](quality/semivalues/{ds}/runs.csv).", ""]
    return "\n".join(L)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default=",".join(DATASETS))
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--permutations", type=int, default=30)
    p.add_argument("--subsets", type=int, default=3000)
    p.add_argument("--max-time", dest="budget", type=float, default=3600.0, help="safety net per run (wall s)")
    p.add_argument("--data-root", default=os.environ.get("DVGS_FAST_DATA"))
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--portable-only", action="store_true",
                   help="only rewrite this machine's paths in the existing records, then the section")
    a = p.parse_args()
    if a.portable_only:
        for ds in a.datasets.split(","):
            if (OUT / ds).is_dir():
                portable(OUT / ds, a.data_root)
    elif not a.report_only:
        for ds in a.datasets.split(","):
            if ds not in DATASETS:
                raise SystemExit(f"run_semivalues_quality: --datasets: unknown {ds!r}; choose from {', '.join(DATASETS)}")
            t0 = time.perf_counter()
            run(ds, a.seeds, a.permutations, a.subsets, a.budget, a.data_root)
            print(f"run_semivalues_quality: {ds} took {(time.perf_counter() - t0) / 60:.1f} min", file=sys.stderr)
    SECTION.write_text(section())
    print(f"run_semivalues_quality: wrote {SECTION}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
