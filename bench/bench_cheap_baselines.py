"""KNN-Shapley and Data-OOB: dvgs_fast next to pyDVL 0.10 and OpenDataVal 1.3 (CPU, 1 thread).

Same splits for every library: breast_cancer (make_split 300 source / 100 target) and UCI Adult
(1000 / 400 from the training rows, as bench_baselines.py), 20% of the source labels flipped
(flip_labels), seeds 0, 1, 2. Measured: the valuation call's wall time (perf_counter) and CPU
time (process_time) -- for pyDVL's Data-OOB this includes fitting its BaggingClassifier, which
its valuation needs --, and the flipped-label detection AUROC (low value = flipped).

Settings compared (k = 10 neighbours, B = 1000 bootstrap models of max_samples = N):
  knn_shapley   ours KNNShapley(k=10) | pyDVL KNNShapleyValuation(KNeighborsClassifier(10))
                | OpenDataVal KNNShapley(k_neighbors=10)
  data_oob      ours DataOOB() (batched torch logistic refits, the default)
                | ours DataOOB(LogisticRegression()) (sklearn refits, one process)
                | pyDVL DataOOBValuation(BaggingClassifier(LogisticRegression(), 1000).fit(...))
                | OpenDataVal DataOob(1000) + ClassifierSkLearnWrapper(LogisticRegression, 2)

Every measurement runs in its own fresh process (a venv per peer: they pin other numpy/pandas
versions), started with OMP/OPENBLAS/MKL_NUM_THREADS=1 and torch.set_num_threads(1); the
libraries are interleaved (seed -> dataset -> method -> library, library order rotated per seed)
so that load changes hit all sides alike; the 1-minute load average is recorded before and after
each call. Values are read back and scored in this process.

    python bench/bench_cheap_baselines.py [--seeds 0,1,2] [--datasets breast_cancer,adult]
        [--pydvl-python PATH] [--odv-python PATH] [--out runs/bench/cpu_cheap_baselines.json]

Peers are never dependencies of dvgs_fast. Their interpreters (default: $DVGS_BENCH_PYDVL_PYTHON,
$DVGS_BENCH_ODV_PYTHON, else this python if it imports them) come from, e.g.:
    python3 -m venv --system-site-packages /tmp/cbv/pydvl && /tmp/cbv/pydvl/bin/pip install pydvl==0.10.0
    python3 -m venv --system-site-packages /tmp/cbv/odv && \\
        /tmp/cbv/odv/bin/pip install opendataval==1.3.0 'transformers<4.40'
A peer that is not available is skipped and listed in the output.

`pytest bench/bench_cheap_baselines.py` (collected with the other benches) times ours only.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
K = 10
B = 1000
VARIANTS = {   # method -> [(library, variant)]
    "knn_shapley": [("dvgs_fast", "knn"), ("pydvl", "knn"), ("opendataval", "knn")],
    "data_oob": [("dvgs_fast", "oob_torch"), ("dvgs_fast", "oob_sklearn_lr"), ("pydvl", "oob_sklearn_lr"),
                 ("opendataval", "oob_sklearn_lr")],
}
THREAD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
              "NUMEXPR_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


# ------------------------------------------------------------------------------------ data
def make_splits(dataset: str, seed: int):
    from dvgs_fast.datasets import flip_labels, load_adult, load_breast_cancer, make_split
    if dataset == "breast_cancer":
        ds = load_breast_cancer()
        sp = make_split(ds.X, ds.y, 300, 100, 0, seed=seed)
    elif dataset == "adult":
        ds = load_adult()
        sp = make_split(ds.X, ds.y, 1000, 400, 0, seed=seed, train_idx=np.arange(ds.meta["n_train"]))
    else:
        raise ValueError(f"dataset: unknown {dataset!r}")
    ys, flipped = flip_labels(sp.y_source, 0.2, seed=seed)
    return (np.asarray(sp.x_source, np.float64), np.asarray(ys, np.int64), np.asarray(sp.x_target, np.float64),
            np.asarray(sp.y_target, np.int64), flipped)


# ---------------------------------------------------------------------------------- worker
def _value(lib: str, variant: str, xs, ys, xt, yt, seed: int) -> np.ndarray:
    """The measured call: returns the values in source order."""
    if lib == "dvgs_fast":
        from dvgs_fast import DataOOB, KNNShapley
        if variant == "knn":
            return KNNShapley(k=K, progress=False, seed=seed).fit(xs, ys, xt, yt).values
        if variant == "oob_torch":
            return DataOOB(n_estimators=B, progress=False, seed=seed).fit(xs, ys, xt, yt).values
        from sklearn.linear_model import LogisticRegression
        return DataOOB(LogisticRegression(), n_estimators=B, progress=False, seed=seed).fit(xs, ys, xt, yt).values
    if lib == "pydvl":
        from pydvl.valuation import Dataset
        train, test = Dataset(xs, ys), Dataset(xt, yt)
        if variant == "knn":
            from pydvl.valuation import KNNShapleyValuation
            from sklearn.neighbors import KNeighborsClassifier
            val = KNNShapleyValuation(KNeighborsClassifier(n_neighbors=K), test_data=test, progress=False).fit(train)
        else:
            from pydvl.valuation import DataOOBValuation
            from sklearn.ensemble import BaggingClassifier
            from sklearn.linear_model import LogisticRegression
            bag = BaggingClassifier(LogisticRegression(), n_estimators=B, max_samples=1.0, bootstrap=True,
                                    random_state=seed).fit(xs, ys)
            val = DataOOBValuation(bag).fit(train)
        res = val.result
        out = np.zeros(len(xs))
        out[np.asarray(res.indices)] = np.asarray(res.values)
        return out
    if lib == "opendataval":
        import torch
        eye = np.eye(int(max(ys.max(), yt.max())) + 1, dtype=np.float32)
        args = (torch.tensor(xs, dtype=torch.float32), torch.tensor(eye[ys]), torch.tensor(xt, dtype=torch.float32),
                torch.tensor(eye[yt]))
        if variant == "knn":
            from opendataval.dataval import KNNShapley
            ev = KNNShapley(k_neighbors=K, random_state=seed).input_data(*args)
        else:
            from opendataval.dataval import DataOob
            from opendataval.metrics import Metrics
            from opendataval.model import ClassifierSkLearnWrapper
            from sklearn.linear_model import LogisticRegression
            ev = DataOob(num_models=B, random_state=seed).input_data(*args)
            ev.input_model_metric(ClassifierSkLearnWrapper(LogisticRegression, eye.shape[0]), Metrics.ACCURACY)
        ev.train_data_values()
        return np.asarray(ev.evaluate_data_values(), dtype=np.float64)
    raise ValueError(f"lib: unknown {lib!r}")


def worker(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    for k, v in THREAD_ENV.items():
        os.environ.setdefault(k, v)
    try:
        import torch
        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover - every side has torch installed here
        pass
    from threadpoolctl import threadpool_limits
    import sklearn.linear_model  # noqa: F401  (load the BLAS libraries before limiting them)
    z = np.load(spec["data"])
    with threadpool_limits(1):
        # the import of the library is not timed (it is paid once per process by every user)
        _import_lib(spec["lib"])
        load0 = os.getloadavg()[0]
        t, c = time.perf_counter(), time.process_time()
        values = _value(spec["lib"], spec["variant"], z["xs"], z["ys"], z["xt"], z["yt"], spec["seed"])
        wall, cpu = time.perf_counter() - t, time.process_time() - c
    np.save(spec["out"], values)
    print("RESULT " + json.dumps({"wall_s": wall, "cpu_s": cpu, "load_before": load0,
                                  "load_after": os.getloadavg()[0], "version": _version(spec["lib"])}))


def _import_lib(lib: str) -> None:
    if lib == "dvgs_fast":
        import dvgs_fast.methods.data_oob  # noqa: F401
        import dvgs_fast.methods.knn_shapley  # noqa: F401
    elif lib == "pydvl":
        import pydvl.valuation  # noqa: F401
    else:
        import opendataval.dataval  # noqa: F401


def _version(lib: str) -> str:
    from importlib.metadata import version
    return version({"dvgs_fast": "dvgs_fast", "pydvl": "pydvl", "opendataval": "opendataval"}[lib])


# ---------------------------------------------------------------------------------- driver
def _interpreter(lib: str, args) -> str | None:
    exe = {"dvgs_fast": sys.executable, "pydvl": args.pydvl_python or os.environ.get("DVGS_BENCH_PYDVL_PYTHON"),
           "opendataval": args.odv_python or os.environ.get("DVGS_BENCH_ODV_PYTHON")}[lib] or sys.executable
    mod = {"dvgs_fast": "dvgs_fast", "pydvl": "pydvl.valuation", "opendataval": "opendataval.dataval"}[lib]
    try:
        ok = subprocess.run([exe, "-c", f"import {mod}"], capture_output=True, env={**os.environ, **THREAD_ENV})
    except OSError:
        return None
    return exe if ok.returncode == 0 else None


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--datasets", default="breast_cancer,adult")
    ap.add_argument("--methods", default="knn_shapley,data_oob")
    ap.add_argument("--pydvl-python")
    ap.add_argument("--odv-python")
    ap.add_argument("--out", default=str(Path("runs") / "bench" / "cpu_cheap_baselines.json"),
                    help="output (default runs/bench/, untracked; bench/results/ holds the committed record)")
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args.worker)

    from sklearn.metrics import roc_auc_score
    exes = {lib: _interpreter(lib, args) for lib in ("dvgs_fast", "pydvl", "opendataval")}
    missing = [lib for lib, e in exes.items() if e is None]
    print(f"interpreters: {exes}" + (f"; skipped (not importable): {missing}" if missing else ""), flush=True)
    runs = []
    tmp = Path(tempfile.mkdtemp(prefix="cheap_bench_"))
    seeds = [int(s) for s in args.seeds.split(",")]
    for si, seed in enumerate(seeds):
        for dataset in args.datasets.split(","):
            xs, ys, xt, yt, flipped = make_splits(dataset, seed)
            data = tmp / f"{dataset}_{seed}.npz"
            np.savez(data, xs=xs, ys=ys, xt=xt, yt=yt)
            for method in args.methods.split(","):
                order = VARIANTS[method]
                order = order[si % len(order):] + order[:si % len(order)]      # rotate per seed
                seen: dict[str, np.ndarray] = {}
                for lib, variant in order:
                    if exes[lib] is None:
                        continue
                    spec = {"lib": lib, "variant": variant, "seed": seed, "data": str(data),
                            "out": str(tmp / f"v_{lib}_{variant}_{dataset}_{seed}.npy")}
                    sp = tmp / "spec.json"
                    sp.write_text(json.dumps(spec))
                    p = subprocess.run([exes[lib], str(Path(__file__).resolve()), "--worker", str(sp)],
                                       capture_output=True, text=True, env={**os.environ, **THREAD_ENV})
                    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
                    if p.returncode != 0 or not line:
                        print(f"FAILED {lib} {variant} {dataset} seed {seed}:\n{p.stderr[-3000:]}", flush=True)
                        continue
                    rec = json.loads(line[-1][7:])
                    values = np.load(spec["out"])
                    if method == "knn_shapley":    # exact methods: how far from our values
                        seen[lib] = (values, rec)
                    rec.update({"library": lib, "variant": variant, "method": method, "dataset": dataset,
                                "seed": seed, "n_source": len(xs), "n_target": len(xt),
                                "auroc": float(roc_auc_score(flipped, -values))})
                    runs.append(rec)
                    print(f"{dataset:14s} seed {seed} {method:12s} {lib:12s} {variant:15s} AUROC {rec['auroc']:.4f} "
                          f"wall {rec['wall_s']:8.3f} s  cpu {rec['cpu_s']:8.3f} s  load {rec['load_before']:.1f}",
                          flush=True)
                if "dvgs_fast" in seen:
                    for lib, (values, rec) in seen.items():
                        if lib != "dvgs_fast":
                            rec["max_abs_diff_vs_dvgs_fast"] = float(np.abs(values - seen["dvgs_fast"][0]).max())
    summary = summarize(runs)
    out = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                       "cpus": os.cpu_count(), "threads": 1, "python": platform.python_version()},
           "settings": {"k": K, "n_estimators": B, "max_samples": "N", "flip_rate": 0.2, "seeds": seeds},
           "skipped": missing, "runs": runs, "summary": summary}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(table(summary))
    print(f"wrote {args.out}")


def summarize(runs: list[dict]) -> list[dict]:
    keys = sorted({(r["dataset"], r["method"], r["library"], r["variant"]) for r in runs},
                  key=lambda k: (k[0] != "breast_cancer", k[1], k[2] != "dvgs_fast", k[2], k[3]))
    out = []
    for ds, m, lib, var in keys:
        rs = [r for r in runs if (r["dataset"], r["method"], r["library"], r["variant"]) == (ds, m, lib, var)]
        out.append({"dataset": ds, "method": m, "library": lib, "variant": var, "version": rs[0]["version"],
                    "n": len(rs), "auroc_mean": float(np.mean([r["auroc"] for r in rs])),
                    "auroc_sd": float(np.std([r["auroc"] for r in rs])),
                    "wall_median_s": float(np.median([r["wall_s"] for r in rs])),
                    "cpu_median_s": float(np.median([r["cpu_s"] for r in rs])),
                    "load_mean": float(np.mean([r["load_before"] for r in rs]))})
        diffs = [r["max_abs_diff_vs_dvgs_fast"] for r in rs if "max_abs_diff_vs_dvgs_fast" in r]
        if diffs:
            out[-1]["max_abs_diff_vs_dvgs_fast"] = float(max(diffs))
    return out


def table(summary: list[dict]) -> str:
    lines = ["| dataset | method | library | variant | AUROC (mean ± sd) | wall (median s) | CPU (median s) | load |",
             "|---|---|---|---|---:|---:|---:|---:|"]
    for s in summary:
        lines.append(f"| {s['dataset']} | {s['method']} | {s['library']} {s['version']} | {s['variant']} | "
                     f"{s['auroc_mean']:.3f} ± {s['auroc_sd']:.3f} | {s['wall_median_s']:.3f} | "
                     f"{s['cpu_median_s']:.3f} | {s['load_mean']:.1f} |")
    return "\n".join(lines)


# --------------------------------------------------------------------- pytest (ours only)
def _bench_ours(benchmark, variant):
    import pytest
    try:
        xs, ys, xt, yt, flipped = make_splits("breast_cancer", 0)
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"breast_cancer not available ({exc})")
    import torch
    from sklearn.metrics import roc_auc_score
    torch.set_num_threads(1)
    benchmark.group = "cheap baselines, breast_cancer 300/100, 20% flipped, cpu, 1 thread"
    values = benchmark.pedantic(lambda: _value("dvgs_fast", variant, xs, ys, xt, yt, 0), rounds=3, iterations=1)
    benchmark.extra_info.update({"auroc": round(float(roc_auc_score(flipped, -values)), 4), "threads": 1,
                                 "load_avg_1min": os.getloadavg()[0]})


def test_knn_shapley_breast_cancer(benchmark):
    _bench_ours(benchmark, "knn")


def test_data_oob_breast_cancer(benchmark):
    _bench_ours(benchmark, "oob_torch")


if __name__ == "__main__":
    main()
