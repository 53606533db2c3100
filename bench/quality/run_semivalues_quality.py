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
values).

``--lds``: the linear datamodeling score of the same methods on clean digits (1000 source / 300
query rows, split seed 0, as bench/bench_trak.py), the ground truth from
dvgs_fast.evaluate.counterfactual with the semivalues' own refit (softmax regression, 100
full-batch Adam steps, lr 0.1): written to semivalues/lds_digits.json and a table in SECTION.md.

SECTION.md is spliced into bench/QUALITY.md (replacing its earlier copy, else before the
hand-written analysis), where bench/quality/run_quality.py also appends it when it regenerates.
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
LDS_JSON = OUT / "lds_digits.json"
QUALITY_MD = HERE.parent / "QUALITY.md"
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


def run_lds(perms: int, subsets: int, n_subsets: int = 100, gt_seeds: int = 2) -> None:
    """LDS of every method's values on clean digits (module doc). A data value is one number per
    source row, not per query, so it is scored twice: as the attribution of every query (the
    module's ``lds``: mean Spearman over the queries) and against the target set's mean margin
    (one Spearman over the subsets: what a global value is meant to predict)."""
    import torch
    from scipy.stats import spearmanr
    from torch import nn

    sys.path.insert(0, str(ROOT))
    import dvgs_fast as D
    from dvgs_fast import datasets
    from dvgs_fast.evaluate import TrainingRecipe, lds, lds_ground_truth, seed_noise

    torch.set_num_threads(1)
    sp = datasets.load_digits().split(n_source=1000, n_target=300, n_test=0, seed=0)
    xs, xt = (torch.as_tensor(np.asarray(a), dtype=torch.float32) for a in (sp.x_source, sp.x_target))
    ys, yt = (torch.as_tensor(np.asarray(a), dtype=torch.int64) for a in (sp.y_source, sp.y_target))
    # the semivalues' refit: softmax regression, full batch, 100 Adam steps at lr 0.1
    recipe = TrainingRecipe(nn.Linear(xs.shape[1], 10), optimizer="adam", lr=0.1, epochs=100, batch_size=None)
    c0 = time.process_time()
    gt = lds_ground_truth(recipe, xs, ys, xt, yt, n_subsets=n_subsets, alpha=0.5, seeds=gt_seeds, progress=False)
    gt_cpu = time.process_time() - c0
    noise = seed_noise(gt)
    group_actual = gt.actual.mean(1)                       # [M]: the target set's mean margin per subset
    masks = gt.masks.astype(np.float64)
    quiet = {"seed": 0, "progress": False}
    methods = {
        "dshap": lambda: D.DataShapley("logistic", max_permutations=perms, **quiet),
        "beta_shapley": lambda: D.BetaShapley("logistic", max_updates=perms, **quiet),
        "banzhaf": lambda: D.DataBanzhaf("logistic", max_updates=subsets, **quiet),
        "lava": lambda: D.LAVA(**quiet),
        "knn_shapley": lambda: D.KNNShapley(**quiet),
        "random": lambda: D.RandomValuation(**quiet),
    }
    rows = []
    for name, make in methods.items():
        c0, w0 = time.process_time(), time.perf_counter()
        res = make().fit(xs, ys, xt, yt)
        cpu, wall = time.process_time() - c0, time.perf_counter() - w0
        v = np.asarray(res.values, dtype=np.float64)
        per_query = lds(np.broadcast_to(v, (gt.n_query, v.shape[0])), gt)
        group = float(spearmanr(masks @ v, group_actual).statistic)
        rows.append({"method": name, "lds_mean": per_query.mean, "lds_stderr": per_query.stderr,
                     "group_spearman": group, "cpu_s": cpu, "wall_s": wall, "status": res.status,
                     "progress": res.info.get("progress")})
        print(f"run_semivalues_quality: LDS {name}: {per_query.mean:.3f} ± {per_query.stderr:.3f}, "
              f"group {group:.3f}, {cpu:.1f} CPU s", file=sys.stderr, flush=True)
    doc = {"task": "digits, 1000 source / 300 query rows, split seed 0, clean labels",
           "recipe": "nn.Linear(64, 10), full-batch Adam, lr 0.1, 100 steps",
           "ground_truth": {"n_subsets": n_subsets, "alpha": 0.5, "seeds": gt_seeds, "cpu_s": gt_cpu,
                            "seed_noise_split_half": noise.split_half.mean,
                            "seed_noise_split_half_stderr": noise.split_half.stderr,
                            "seed_noise_reliability": noise.reliability},
           "samples": {"permutations": perms, "subsets": subsets}, "torch_threads": 1,
           "loadavg": list(os.getloadavg()), "date": time.strftime("%Y-%m-%d %H:%M"), "rows": rows}
    LDS_JSON.write_text(json.dumps(doc, indent=1))


def lds_section() -> list[str]:
    if not LDS_JSON.is_file():
        return ["### LDS", "", "Not run yet (`--lds`).", ""]
    doc = json.loads(LDS_JSON.read_text())
    g = doc["ground_truth"]
    L = ["### LDS: digits, softmax regression (clean labels)", "",
         f"{doc['task']}; ground truth: `dvgs_fast.evaluate.counterfactual.lds_ground_truth`, {g['n_subsets']} "
         f"random half-subsets x {g['seeds']} seeds retrained with the semivalues' own refit ({doc['recipe']}), the "
         f"queries' margins; {g['cpu_s']:.0f} CPU s. Samples: {doc['samples']['permutations']} permutations (TMC, "
         f"Beta), {doc['samples']['subsets']} subsets (MSR Banzhaf). A data value is one number per source row, "
         "so it is scored as the attribution of every query (*LDS*: mean Spearman over the 300 queries ± s.e.) "
         "and against the target set's mean margin (*set LDS*: one Spearman over the subsets, what a value of "
         "the whole target set is meant to predict). The semivalues' utility is target accuracy (the default), "
         "the ground truth's output a margin. One Spearman over 100 subsets has a standard error of about 0.1 "
         "(1/sqrt(99)), so set-LDS differences below ~0.2 are noise; `random` is one draw of random values.", "",
         "| method | LDS (per query) | set LDS | CPU s | wall s | status |", "|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        L.append(f"| {r['method']} | {r['lds_mean']:.3f} ± {r['lds_stderr']:.3f} | {r['group_spearman']:.3f} | "
                 f"{r['cpu_s']:.1f} | {r['wall_s']:.1f} | {r['status']} |")
    L += ["", f"Ground truth's own seed agreement (split-half Spearman over subsets): {g['seed_noise_split_half']:.3f}, "
          f"extrapolated to both seeds {g['seed_noise_reliability']:.3f} (about the best any attribution can reach). "
          f"1 torch thread, load average {'/'.join(f'{x:.2f}' for x in doc['loadavg'])} at the end, {doc['date']}; "
          "all numbers: [`quality/semivalues/lds_digits.json`](quality/semivalues/lds_digits.json).", ""]
    return L


def splice_quality() -> None:
    """Put SECTION.md into QUALITY.md in place of its earlier copy, else before the analysis."""
    if not QUALITY_MD.is_file():
        return
    text = QUALITY_MD.read_text()
    sec = SECTION.read_text().rstrip() + "\n\n"
    head = "## Semivalues and LAVA"
    if head in text:
        a = text.index(head)
        b = text.find("\n## ", a + len(head))
        text = text[:a] + sec + (text[b + 1:] if b >= 0 else "")
    elif "\n## Analysis (hand-written)" in text:
        a = text.index("\n## Analysis (hand-written)") + 1
        text = text[:a] + sec + text[a:]
    else:
        text = text.rstrip() + "\n\n" + sec
    tmp = QUALITY_MD.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, QUALITY_MD)


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
         "detection of the flipped labels, mean ± 2 sd (ddof 0) over the seeds. LDS: the last table.", ""]
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
    L += lds_section()
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
    p.add_argument("--lds", action="store_true", help="also (re)run the digits LDS table (a few CPU minutes)")
    p.add_argument("--lds-only", action="store_true", help="only the digits LDS table, then the section")
    p.add_argument("--portable-only", action="store_true",
                   help="only rewrite this machine's paths in the existing records, then the section")
    a = p.parse_args()
    if a.portable_only:
        for ds in a.datasets.split(","):
            if (OUT / ds).is_dir():
                portable(OUT / ds, a.data_root)
    elif a.lds_only:
        run_lds(a.permutations, a.subsets)
    elif not a.report_only:
        for ds in a.datasets.split(","):
            if ds not in DATASETS:
                raise SystemExit(f"run_semivalues_quality: --datasets: unknown {ds!r}; choose from {', '.join(DATASETS)}")
            t0 = time.perf_counter()
            run(ds, a.seeds, a.permutations, a.subsets, a.budget, a.data_root)
            print(f"run_semivalues_quality: {ds} took {(time.perf_counter() - t0) / 60:.1f} min", file=sys.stderr)
        if a.lds:
            run_lds(a.permutations, a.subsets)
    SECTION.write_text(section())
    splice_quality()
    print(f"run_semivalues_quality: wrote {SECTION}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
