"""DVRL: quality over seeds and thread counts, cost per outer iteration against OpenDataVal,
where the values stabilise, and BlogFeedback.

    python bench/bench_dvrl.py quality     # breast_cancer + Adult, 5 seeds x {1, 2} threads
    python bench/bench_dvrl.py stability   # values vs iteration (the TooFewIterationsWarning number)
    python bench/bench_dvrl.py blog        # BlogFeedback against the DVGS repository's anchor
    $ODV_PYTHON bench/bench_dvrl.py cost   # ours vs OpenDataVal 1.3 DVRL, same process, interleaved
    $ODV_PYTHON bench/bench_dvrl.py cost --selections 1 --fresh   # like for like: 1 selection per
                                           # iteration on both sides, a fresh process per run

Each writes runs/bench/cpu_dvrl_<what>.json (``--out`` to change; bench/results/ holds the committed record). Not collected by pytest
(no test functions): these runs take minutes to tens of minutes on 2 shared cores.

Data (real files from ../shared/data or $DVGS_FAST_DATA, as bench_baselines.py):
breast_cancer (sklearn, min-max) 200 source / 100 target; Adult 1000 / 400 from the training
rows; BlogFeedback 1000 / 400 from the training rows; `make_split(seed=0)`, 20% of the source
labels flipped with `flip_labels(seed=0)`. DVRL seeds vary, the data do not. AUROC = detection
of the flipped labels by low value. The reference line "target p(y|x)" is a scikit-learn
LogisticRegression fit on the clean target set, scoring p(given label | x) of each source row.

Timing: CPU time (time.process_time) and wall time per run, torch intra-op threads set per run
with torch.set_num_threads and recorded, the load average recorded before each run. Compared
sides (1 vs 2 threads; ours vs OpenDataVal) alternate run by run in one process.

OpenDataVal: 1.3.0 pins torch 2.2 / numpy 1.26 / pandas < 2 and imports torchvision at package
import, so it is installed *without* its dependencies into a separate venv on top of the system
packages (never a dependency of dvgs_fast):

    python -m venv --system-site-packages /tmp/odv && /tmp/odv/bin/pip install --no-deps opendataval==1.3.0
    /tmp/odv/bin/python bench/bench_dvrl.py cost

and only its DVRL, LogisticRegression and their direct modules are imported (the package
``__init__`` files, which pull in torchvision and the dataset registry, are bypassed; see
`_import_opendataval`). Equal settings: logistic predictor, outer batch = N, `inner` full-batch
Adam steps at lr 0.01 per outer iteration (OpenDataVal: epochs=inner, batch_size=N), AUC on
breast_cancer / Adult.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import types
import warnings
from pathlib import Path

import numpy as np
import torch

RESULTS = Path("runs") / "bench"          # untracked; a committed record is copied on purpose


# ------------------------------------------------------------------------------ data
def load(name: str, seed: int = 0):
    from dvgs_fast.datasets import flip_labels, load_adult, load_blog, load_breast_cancer, make_split
    if name == "breast_cancer":
        ds = load_breast_cancer()
        sp = make_split(ds.X, ds.y, 200, 100, 0, seed=seed)
    else:
        ds = load_adult() if name == "adult" else load_blog()
        sp = make_split(ds.X, ds.y, 1000, 400, 0, seed=seed, train_idx=np.arange(ds.meta["n_train"]))
    ys, flipped = flip_labels(sp.y_source, 0.2, seed=seed)
    return sp.x_source.astype(np.float32), ys, sp.x_target.astype(np.float32), sp.y_target, flipped


def target_confidence_auroc(xs, ys, xt, yt, flipped) -> float:
    """AUROC of p(given label | x) from a logistic regression fit on the clean target set."""
    from sklearn.linear_model import LogisticRegression

    from dvgs_fast.evaluate import detection_auroc
    lr = LogisticRegression(max_iter=2000).fit(xt, yt)
    cols = {c: i for i, c in enumerate(lr.classes_)}
    p = lr.predict_proba(xs)[np.arange(len(ys)), [cols.get(int(c), 0) for c in ys]]
    return detection_auroc(p, flipped)


def spearman(a, b) -> float:
    from scipy.stats import spearmanr
    return float(spearmanr(a, b)[0])


def machine() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
            "platform": platform.platform(), "date": time.strftime("%Y-%m-%d %H:%M")}


def run_ours(data, threads: int, **kw):
    from dvgs_fast import DVRL
    from dvgs_fast.evaluate import detection_auroc
    xs, ys, xt, yt, flipped = data
    torch.set_num_threads(threads)
    load1 = os.getloadavg()[0]
    c0, t0 = time.process_time(), time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = DVRL(progress=False, **kw).fit(xs, ys, xt, yt)
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    n = res.info["iterations_done"]
    return res, {"threads": threads, "auroc": round(detection_auroc(res.values, flipped), 4),
                 "iterations": n, "status": res.status, "cpu_s": round(cpu, 2), "wall_s": round(wall, 2),
                 "cpu_ms_per_iteration": round(1e3 * cpu / max(n, 1), 2), "load_avg_1min": load1,
                 "convergence_distance": res.info.get("convergence_distance"), "threads_used": res.info.get("threads")}


def write(what: str, payload: dict, out: str | None):
    path = Path(out) if out else RESULTS / f"cpu_dvrl_{what}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1))
    print("wrote", path)


# ------------------------------------------------------------------------------ quality
def quality(args):
    """AUROC per seed x threads at the default settings; Spearman between 1- and 2-thread values."""
    out = {"machine": machine(), "datasets": {},
           "settings": ("DVRL defaults, num_threads forced to the thread count" if args.force_threads else
                        "DVRL defaults; torch.set_num_threads(t) before fit (num_threads=None: DVRL picks)")}
    for name in args.datasets:
        data = load(name)
        rows, spear = [], []
        ref = target_confidence_auroc(*data)
        for seed in args.seeds:
            vals = {}
            for threads in args.threads:
                extra = {"num_threads": threads} if args.force_threads else {}
                res, row = run_ours(data, threads, seed=seed, **extra)
                row["forced"] = bool(args.force_threads)
                row["seed"] = seed
                rows.append(row)
                vals[threads] = res.values
                print(name, row, flush=True)
            if len(vals) == 2:
                a, b = vals.values()
                spear.append({"seed": seed, "spearman_1_vs_2_threads": round(spearman(a, b), 4)})
                print(name, spear[-1], flush=True)
        out["datasets"][name] = {"target_p_y_given_x_auroc": round(ref, 4), "runs": rows, "thread_agreement": spear}
        write("quality", out, args.out)


# ------------------------------------------------------------------------------ stability
def stability(args):
    """Values every check_every iterations (no early stop): AUROC over seeds, and Spearman of
    each seed's values at iteration t with its own final values and with the other seeds'."""
    from dvgs_fast.evaluate import detection_auroc
    out = {"machine": machine(), "datasets": {}}
    for name in args.datasets:
        data = load(name)
        snaps = {}
        for seed in args.seeds:
            res, row = run_ours(data, 1, seed=seed, n_iterations=args.iterations, convergence_tol=0.0,
                                keep_checks=True)
            snaps[seed] = (res.info["check_iterations"], res.snapshots)
            print(name, row, flush=True)
        its = snaps[args.seeds[0]][0]
        table = []
        for j, it in enumerate(its):
            V = np.stack([snaps[s][1][j] for s in args.seeds])
            au = [detection_auroc(v, data[4]) for v in V]
            to_final = [spearman(snaps[s][1][j], snaps[s][1][-1]) for s in args.seeds]
            pair = [spearman(V[a], V[b]) for a in range(len(V)) for b in range(a + 1, len(V))]
            table.append({"iteration": int(it), "auroc_min": round(min(au), 4), "auroc_max": round(max(au), 4),
                          "spearman_to_final_min": round(min(to_final), 4),
                          "spearman_between_seeds_mean": round(float(np.mean(pair)), 4) if pair else None})
            print(name, table[-1], flush=True)
        out["datasets"][name] = table
        write("stability", out, args.out)


# ------------------------------------------------------------------------------ blog
def blog(args):
    out = {"machine": machine(), "anchor": "DVGS repository: DVRL AUROC 0.697 +- 0.033 (BlogFeedback, 20% flipped)",
           "runs": []}
    data = load("blog")
    out["target_p_y_given_x_auroc"] = round(target_confidence_auroc(*data), 4)
    for seed in args.seeds:
        _, row = run_ours(data, 1, seed=seed)
        row["seed"] = seed
        out["runs"].append(row)
        print("blog", row, flush=True)
        write("blog", out, args.out)
    au = [r["auroc"] for r in out["runs"]]
    out["auroc_mean"], out["auroc_sd"] = round(float(np.mean(au)), 4), round(float(np.std(au, ddof=1)), 4)
    write("blog", out, args.out)


# ------------------------------------------------------------------------------ cost vs OpenDataVal
def _import_opendataval():
    """OpenDataVal's DVRL and LogisticRegression without running the package __init__ files."""
    import importlib.util
    if "opendataval.dataval.dvrl.dvrl" in sys.modules:       # imported by an earlier run
        return (sys.modules["opendataval.dataval.dvrl.dvrl"].DVRL,
                sys.modules["opendataval.model.logistic_regression"].LogisticRegression)
    spec = importlib.util.find_spec("opendataval")
    if spec is None:
        raise SystemExit("opendataval is not installed in this interpreter (see the module docstring)")
    root = spec.submodule_search_locations[0]

    def namespace(name, sub):
        m = types.ModuleType(name)
        m.__path__ = [os.path.join(root, sub)] if sub else [root]
        sys.modules[name] = m
        return m

    namespace("opendataval", "")
    dl = namespace("opendataval.dataloader", "dataloader")
    namespace("opendataval.dataval", "dataval")
    mdl = namespace("opendataval.model", "model")
    from opendataval.dataloader.util import CatDataset
    dl.CatDataset, dl.DataFetcher = CatDataset, type("DataFetcher", (), {})
    from opendataval.model.api import Model
    mdl.Model = Model
    from opendataval.dataval.dvrl.dvrl import DVRL as ODVRL
    from opendataval.model.logistic_regression import LogisticRegression
    return ODVRL, LogisticRegression


def run_odv(data, iterations: int, inner: int, seed: int):
    from sklearn.metrics import roc_auc_score

    from dvgs_fast.evaluate import detection_auroc
    ODVRL, LogisticRegression = _import_opendataval()
    xs, ys, xt, yt, flipped = data
    n, d = xs.shape
    oh = lambda y: torch.nn.functional.one_hot(torch.as_tensor(y), 2).float()  # noqa: E731
    torch.manual_seed(seed)
    dv = ODVRL(rl_epochs=iterations, rl_batch_size=n, lr=0.01, random_state=seed)
    dv.input_data(torch.as_tensor(xs), oh(ys), torch.as_tensor(xt), oh(yt))
    dv.input_model_metric(LogisticRegression(d, 2), lambda a, b: float(roc_auc_score(a[:, 1], b[:, 1])))
    torch.set_num_threads(1)
    c0, t0 = time.process_time(), time.perf_counter()
    dv.train_data_values(epochs=inner, batch_size=n, lr=0.01)
    values = dv.evaluate_data_values()
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    return {"side": "opendataval", "auroc": round(detection_auroc(values, flipped), 4), "iterations": iterations,
            "cpu_s": round(cpu, 2), "wall_s": round(wall, 2),
            "cpu_ms_per_iteration": round(1e3 * cpu / iterations, 2)}


def _ours_kw(args) -> dict:
    """Our DVRL at the cost run's settings; K = --selections predictors per outer iteration (the
    like-for-like figure is K = 1, OpenDataVal's, with the paper's moving-average baseline: the
    leave-one-out baseline needs K >= 2)."""
    kw = dict(n_iterations=args.iterations, convergence_tol=0.0, inner_iterations=args.inner, metric="auc",
              n_samples=args.selections, num_threads=1)
    if args.selections == 1:
        kw["baseline"] = "moving_average"
    return kw


def cost_one(args):
    """One side, one dataset, one seed, printed as a JSON line (a fresh process per run: --fresh)."""
    import resource
    data = load(args.datasets[0])
    seed = args.seeds[0]
    load1 = os.getloadavg()[0]
    if args.side == "opendataval":
        row = run_odv(data, args.iterations, args.inner, seed)
    else:
        _, row = run_ours(data, 1, seed=seed, **_ours_kw(args))
        row.update(side="dvgs_fast", selections_per_iteration=args.selections)
    ru = resource.getrusage(resource.RUSAGE_SELF)
    row.update(dataset=args.datasets[0], seed=seed, load_avg_1min=load1, fresh_process=True,
               process_cpu_s=round(ru.ru_utime + ru.ru_stime, 2))
    print("ROW " + json.dumps(row), flush=True)


def cost(args):
    import subprocess
    import opendataval  # noqa: F401 - fail early when absent
    out = {"machine": machine(), "threads": 1, "runs": [], "settings": {
        "iterations": args.iterations, "inner_full_batch_steps": args.inner, "predictor": "logistic, lr 0.01",
        "outer_batch": "N", "metric": "auc", "selections_per_iteration": {"opendataval": 1, "dvgs_fast": args.selections},
        "fresh_process_per_run": bool(args.fresh)}}
    for name in args.datasets:
        data = None if args.fresh else load(name)
        for k, seed in enumerate(args.seeds):
            sides = ("opendataval", "dvgs_fast") if k % 2 == 0 else ("dvgs_fast", "opendataval")
            for side in sides:
                if args.fresh:
                    cmd = [sys.executable, __file__, "cost-one", "--side", side, "--datasets", name, "--seeds",
                           str(seed), "--iterations", str(args.iterations), "--inner", str(args.inner),
                           "--selections", str(args.selections)]
                    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
                    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
                    line = next((x for x in p.stdout.splitlines() if x.startswith("ROW ")), None)
                    if line is None:
                        raise SystemExit(f"{side} {name} seed {seed} failed:\n{p.stderr[-3000:]}")
                    row = json.loads(line[4:])
                else:
                    load1 = os.getloadavg()[0]
                    if side == "opendataval":
                        row = run_odv(data, args.iterations, args.inner, seed)
                    else:
                        _, row = run_ours(data, 1, seed=seed, **_ours_kw(args))
                        row.update(side="dvgs_fast", selections_per_iteration=args.selections)
                    row.update(dataset=name, seed=seed, load_avg_1min=load1)
                out["runs"].append(row)
                print(row, flush=True)
        write("cost", out, args.out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("quality", "stability", "blog", "cost", "cost-one"))
    ap.add_argument("--selections", type=int, default=8,
                    help="cost: our predictors per outer iteration (OpenDataVal trains 1; 1 = like for like)")
    ap.add_argument("--fresh", action="store_true", help="cost: every run in a fresh process")
    ap.add_argument("--side", choices=("opendataval", "dvgs_fast"), help="cost-one: which side")
    ap.add_argument("--datasets", default=None)
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--iterations", type=int, default=None)
    ap.add_argument("--inner", type=int, default=100)
    ap.add_argument("--out", default=None)
    ap.add_argument("--force-threads", action="store_true", help="quality: pass the thread count as num_threads")
    args = ap.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.threads = [int(t) for t in args.threads.split(",")]
    args.datasets = (args.datasets or "breast_cancer,adult").split(",")
    if args.iterations is None:
        args.iterations = {"stability": 400, "cost": 200, "cost-one": 200}.get(args.what)
    {"quality": quality, "stability": stability, "blog": blog, "cost": cost, "cost-one": cost_one}[args.what](args)


if __name__ == "__main__":
    main()
