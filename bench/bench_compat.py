"""The drop-in against the original DVGS code: the same script, only the import changed.

    git clone https://github.com/nathanieljevans/DVGS /tmp/DVGS        # the original code, once
    python bench/bench_compat.py --original /tmp/DVGS [--rounds 2] [--epochs 100] [--restarts 3] [--json OUT]
    DVGS_ORIGINAL=/tmp/DVGS pytest bench/bench_compat.py   # slow-marked, a short version (10 epochs, 1 round)

A script shaped like the original repository's ``scripts/run_valuation.py`` (written here, not
copied) values 1000 source / 400 target samples of the real UCI Adult data with 20% flipped labels
with the DVGS paper's Adult settings (the original ``NN`` 108-100-100-2, Mish, InstanceNorm,
dropout 0.5; 3 restarts x 100 epochs, Adam 1e-3, target batch 500, source batch 400, cosine,
balanced class weights on the target loss, ``agg(reduction='mean')``). It runs twice per round in
fresh processes, once with ``from DVGS import DVGS`` (the original's ``dvgs/DVGS.py``, taken
from a checkout or git mirror of nathanieljevans/DVGS) and once with
``from dvgs_fast.compat import DVGS``, interleaved (the order alternates per round), 1 torch
thread each (OMP/MKL too). Both use the original's own ``NN`` class as the model.

Recorded per run: wall and CPU time (time.process_time) of ``run`` + ``agg`` inside the script,
the whole process's wall and CPU time (imports included), the load average before it, and the
detection AUROC of the flipped labels (low value = flipped). The two sides draw different random
numbers (target order, dropout masks, initialisation), so their values are compared by AUROC and
rank correlation, not elementwise (elementwise equality with the native API is tested in
python_tests/test_compat.py).

Writes runs/bench/cpu_compat.json (or --json; bench/results/cpu_compat.json is the committed record,
replaced on purpose) and prints a markdown table. The original code is found only where it is
named (--original or $DVGS_ORIGINAL: a checkout, or a bare git mirror read with git show).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _timing import cpu_model  # noqa: E402
ORIGINAL_IMPORT = "from DVGS import DVGS"
OUR_IMPORT = "from dvgs_fast.compat import DVGS"

SCRIPT = '''\
"""Shaped like the original DVGS repository's scripts/run_valuation.py (written for this benchmark)."""
import copy
import json
import os
import sys
import time
import uuid

import numpy as np
import torch
from sklearn.utils.class_weight import compute_class_weight

torch.set_num_threads(1)
{IMPORT}
from NN import NN               # the original repository's model class


class config:
    out_dir = sys.argv[2]
    model = NN(in_channels=108, out_channels=2, num_layers=2, hidden_channels=100, norm=True, dropout=0.5,
               bias=True, act=torch.nn.Mish, out_fn=None)
    dvgs_balance_class_weights = True
    dvgs_clean_gradient_sims = True
    dvgs_kwargs = {{"target_crit": None, "source_crit": None, "num_restarts": {RESTARTS},
                   "save_dir": f"{{out_dir}}/dvgs/", "similarity": torch.nn.CosineSimilarity(dim=1),
                   "optim": torch.optim.Adam, "lr": 1e-3, "num_epochs": {EPOCHS}, "compute_every": 1,
                   "source_batch_size": 400, "target_batch_size": 500, "grad_params": None,
                   "verbose": False, "use_cuda": True}}


if __name__ == "__main__":
    torch.manual_seed(int(sys.argv[3]))
    x_train, y_train, x_valid, y_valid = torch.load(sys.argv[1])
    uid = uuid.uuid4()
    os.makedirs(config.out_dir, exist_ok=True)        # the original's Logger creates it
    t0, c0 = time.perf_counter(), time.process_time()
    dvgs = DVGS(x_source=x_train, y_source=y_train, x_target=x_valid, y_target=y_valid,
                model=copy.deepcopy(config.model))
    if config.dvgs_balance_class_weights:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        class_weights = torch.tensor(compute_class_weight(class_weight="balanced",
                                                          classes=np.sort(np.unique(y_train.detach().numpy())),
                                                          y=y_valid.detach().numpy().ravel()),
                                     dtype=torch.float).to(device)
        CEL = torch.nn.CrossEntropyLoss(weight=class_weights)
        config.dvgs_kwargs["target_crit"] = lambda x, y: CEL(x, y.squeeze(1).type(torch.long))
        config.dvgs_kwargs["source_crit"] = lambda x, y: torch.nn.functional.cross_entropy(x, y.squeeze(1).type(torch.long))
    run_id = dvgs.run(**config.dvgs_kwargs, uid=uid)
    vals = dvgs.agg(f"{{config.out_dir}}/dvgs/{{run_id}}/").ravel()
    if config.dvgs_clean_gradient_sims:
        dvgs.clean(f"{{config.out_dir}}/dvgs/{{run_id}}/")
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    np.save(sys.argv[4], np.asarray(vals, dtype=np.float64))
    print("RESULT " + json.dumps({{"wall": wall, "cpu": cpu, "n": int(len(vals))}}))
'''


def find_original(arg: str | None) -> Path | None:
    """A folder holding DVGS.py and NN.py of the original: from a checkout (PATH/dvgs/DVGS.py) or a
    git directory (bare mirror, read with git show). None when not found."""
    cands = [Path(arg)] if arg else []
    if os.environ.get("DVGS_ORIGINAL"):
        cands.append(Path(os.environ["DVGS_ORIGINAL"]))
    for c in cands:
        if (c / "dvgs" / "DVGS.py").is_file():
            return c / "dvgs"
        if (c / "HEAD").is_file() and (c / "objects").is_dir():
            out = Path(tempfile.mkdtemp(prefix="dvgs_original_"))
            for f in ("DVGS.py", "NN.py"):
                blob = subprocess.run(["git", f"--git-dir={c}", "show", f"HEAD:dvgs/{f}"], capture_output=True,
                                      check=True).stdout
                (out / f).write_bytes(blob)
            commit = subprocess.run(["git", f"--git-dir={c}", "rev-parse", "HEAD"], capture_output=True,
                                    text=True, check=True).stdout.strip()
            (out / "COMMIT").write_text(commit)
            return out
    return None


def adult_data(seed: int, path: Path):
    import torch
    from dvgs_fast.datasets import flip_labels, load_adult
    ds = load_adult()
    sp = ds.split(n_source=1000, n_target=400, n_test=100, seed=seed)
    y_noisy, flipped = flip_labels(sp.y_source, 0.2, seed=seed)
    t = lambda a: torch.as_tensor(np.asarray(a))  # noqa: E731
    torch.save((t(sp.x_source).float(), t(y_noisy).long().reshape(-1, 1), t(sp.x_target).float(),
                t(sp.y_target).long().reshape(-1, 1)), path)
    return np.asarray(flipped, dtype=bool)


def run_side(side: str, script: Path, data: Path, work: Path, original: Path, seed: int, tag: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join([str(original), env.get("PYTHONPATH", "")])
    out = work / f"vals_{tag}.npy"
    load = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, str(script), str(data), str(work / f"out_{tag}"), str(seed), str(out)],
                       cwd=work, env=env, capture_output=True, text=True)
    wall_proc = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        raise RuntimeError(f"{side} failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    line = next(l for l in p.stdout.splitlines() if l.startswith("RESULT "))
    r = json.loads(line[len("RESULT "):])
    r.update(side=side, wall_process=wall_proc,
             cpu_process=(after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
             load_before=load, values=str(out))
    return r


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--original", help="checkout or git mirror of nathanieljevans/DVGS (default: $DVGS_ORIGINAL)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--restarts", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=str(Path("runs") / "bench" / "cpu_compat.json"),
                    help="output (default runs/bench/cpu_compat.json, untracked)")
    args = ap.parse_args(argv)
    original = find_original(args.original)
    if original is None:
        raise SystemExit("the original DVGS code was not found: pass --original PATH (a checkout or git mirror of "
                         "github.com/nathanieljevans/DVGS: git clone https://github.com/nathanieljevans/DVGS) or "
                         "set DVGS_ORIGINAL")
    from dvgs_fast.evaluate import detection_auroc
    from scipy.stats import spearmanr

    work = Path(tempfile.mkdtemp(prefix="bench_compat_"))
    flipped = adult_data(args.seed, work / "data.pt")
    scripts = {}
    for side, imp in (("original", ORIGINAL_IMPORT), ("dvgs_fast.compat", OUR_IMPORT)):
        scripts[side] = work / f"run_valuation_{side.replace('.', '_')}.py"
        scripts[side].write_text(SCRIPT.format(IMPORT=imp, EPOCHS=args.epochs, RESTARTS=args.restarts))
    runs = []
    for r in range(args.rounds):
        order = ["original", "dvgs_fast.compat"] if r % 2 == 0 else ["dvgs_fast.compat", "original"]
        for side in order:
            res = run_side(side, scripts[side], work / "data.pt", work, original, args.seed + r, f"{side}_{r}")
            vals = np.load(res["values"])
            res["auroc"] = float(detection_auroc(vals, flipped))
            res["round"] = r
            runs.append(res)
            print(f"round {r} {side:<17} run+agg wall {res['wall']:8.1f} s  cpu {res['cpu']:8.1f} s  "
                  f"(process {res['wall_process']:.1f} / {res['cpu_process']:.1f} s)  AUROC {res['auroc']:.3f}  "
                  f"load {res['load_before']:.1f}", flush=True)
    summary = {}
    for side in ("original", "dvgs_fast.compat"):
        rs = [x for x in runs if x["side"] == side]
        summary[side] = {k: float(np.median([x[k] for x in rs])) for k in ("wall", "cpu", "wall_process", "cpu_process", "auroc")}
    o, c = summary["original"], summary["dvgs_fast.compat"]
    rho = [float(spearmanr(np.load(a["values"]), np.load(b["values"]))[0])
           for a in runs if a["side"] == "original" for b in runs if b["side"] == "dvgs_fast.compat" and b["round"] == a["round"]]
    import torch
    out = {
        "what": "run_valuation-shaped script, Adult 1000/400, 20% flipped, DVGS paper settings; only the import differs",
        "date": dt.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
        "cpu_model": cpu_model(), "cores": os.cpu_count(), "threads": 1, "torch": torch.__version__,
        "python": platform.python_version(), "original_commit": (original / "COMMIT").read_text().strip()
        if (original / "COMMIT").exists() else str(original),
        "epochs": args.epochs, "restarts": args.restarts, "rounds": args.rounds, "runs": runs, "median": summary,
        "speedup_wall": o["wall"] / c["wall"], "speedup_cpu": o["cpu"] / c["cpu"],
        "speedup_wall_process": o["wall_process"] / c["wall_process"],
        "speedup_cpu_process": o["cpu_process"] / c["cpu_process"], "spearman_same_round": rho,
    }
    for r in out["runs"]:
        r.pop("values", None)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1))
    print()
    print("| side | run+agg wall (s) | run+agg CPU (s) | process wall (s) | process CPU (s) | AUROC |")
    print("|---|---:|---:|---:|---:|---:|")
    for side, s in summary.items():
        print(f"| {side} | {s['wall']:.1f} | {s['cpu']:.1f} | {s['wall_process']:.1f} | {s['cpu_process']:.1f} | {s['auroc']:.3f} |")
    print(f"\nspeed-up (median over {args.rounds} rounds): run+agg wall {out['speedup_wall']:.1f}x, CPU "
          f"{out['speedup_cpu']:.1f}x; whole process wall {out['speedup_wall_process']:.1f}x, CPU "
          f"{out['speedup_cpu_process']:.1f}x; Spearman between sides {np.round(rho, 3).tolist()}; -> {args.json}")
    return out


try:
    import pytest

    @pytest.mark.slow
    def test_compat_vs_original_short(tmp_path):
        from dvgs_fast.datasets import default_data_root
        root = default_data_root()
        if root is None or not (root / "adult.data").is_file():
            pytest.skip("adult.data not found ($DVGS_FAST_DATA or ../shared/data)")
        if find_original(None) is None:
            pytest.skip("the original DVGS code was not found (set DVGS_ORIGINAL)")
        out = main(["--rounds", "1", "--epochs", "10", "--json", str(tmp_path / "compat.json")])
        assert out["median"]["dvgs_fast.compat"]["auroc"] > 0.6
except ImportError:  # pragma: no cover - running as a script without pytest
    pass


if __name__ == "__main__":
    main()
