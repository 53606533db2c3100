"""Removal curves with the DVGS paper's network: batched vs sequential refits, and what a full
paper curve pair costs per method-seed.

    python bench/bench_curves.py engines          # batched vs sequential, interleaved (short epochs)
    python bench/bench_curves.py full             # the paper's settings on Adult and Blog
    python bench/bench_curves.py full --epochs 50 --repeats 1    # a cheaper variant

Writes runs/bench/cpu_curves_<what>.json (``--out`` to change; bench/results/ holds the committed record). Not collected by pytest (no
test functions): the full run takes minutes on 2 shared cores.

Data: Adult and BlogFeedback from ../shared/data (or $DVGS_FAST_DATA) through the CLI's loader,
1000 source / 400 target / 2000 test rows, 20% of the source labels flipped, split seed 0 (the
CLI's `dvgs-fast run --dataset adult` split). The values ranked are a fixed random draw (seed 0):
the cost of a curve does not depend on the values (apart from ties, which random values have
none of).

Model and settings (dvgs_fast.evaluate.paper_settings("classification")): the exp1/exp2 MLP
in-100-100-2 (Mish, dropout 0.5, per-sample LayerNorm), Adam lr 1e-4, batch 250, 200 epochs,
2 replicates per point, 10 fractions in linspace(0, 0.5, 10), both curves: 40 refits.

Timing: torch intra-op threads pinned to 1 (OMP_NUM_THREADS=1 as well) and recorded, CPU time
(time.process_time) and wall time per call, the 1-minute load average before and after. The
engines are compared in one process, alternating their order every round, on the same refits.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _timing import load_avg  # noqa: E402


def load(name: str, seed: int = 0):
    from dvgs_fast.cli import _data as D
    root = D.resolve_data_root(os.environ.get("DVGS_FAST_DATA"))
    loaded = D.load(D.parse_dataset(name), root)
    return D.split_and_corrupt(loaded, 1000, 400, 2000, D.parse_noise("label:0.2"), seed, max_test=2000)


def curves(data, *, epochs: int, repeats: int, engine: str, fractions=None):
    from dvgs_fast.cli._models import mlp
    from dvgs_fast.evaluate import paper_settings, remove_curves
    ps = paper_settings("classification")
    d = int(np.prod(data.x_source.shape[1:]))
    values = np.random.default_rng(0).normal(size=data.n_source)
    return remove_curves(values, data.x_source.reshape(data.n_source, -1), data.y_source,
                         data.x_test.reshape(data.n_test, -1), data.y_test,
                         fractions=ps["fractions"] if fractions is None else fractions,
                         model=lambda: mlp(d, data.n_classes, 100, 0.5, 2), metric=ps["metric"],
                         repeats=repeats, selection=ps["selection"], seed=0,
                         torch_options={"epochs": epochs, "lr": ps["lr"], "batch_size": ps["batch_size"],
                                        "engine": engine})


def timed(fn):
    c0, w0 = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.process_time() - c0, time.perf_counter() - w0


def engines(args) -> dict:
    """batched vs sequential on the same 40 refits, epochs shortened (cost is linear in epochs)."""
    data = load("adult")
    res = {"epochs": args.epochs, "repeats": args.repeats, "rounds": args.rounds, "runs": []}
    for rnd in range(args.rounds):
        order = ["batched", "sequential"] if rnd % 2 == 0 else ["sequential", "batched"]
        for eng in order:
            la = load_avg()
            out, c, w = timed(lambda: curves(data, epochs=args.epochs, repeats=args.repeats, engine=eng))
            res["runs"].append({"engine": eng, "round": rnd, "cpu_s": c, "wall_s": w, "load_before": la,
                                "load_after": load_avg(),
                                "high": out["high"].scores.tolist(), "low": out["low"].scores.tolist()})
            print(f"round {rnd} {eng:<10} cpu {c:7.2f} s wall {w:7.2f} s (load {la})", flush=True)
    for eng in ("batched", "sequential"):
        cs = [r["cpu_s"] for r in res["runs"] if r["engine"] == eng]
        ws = [r["wall_s"] for r in res["runs"] if r["engine"] == eng]
        res[eng] = {"cpu_median_s": float(np.median(cs)), "wall_median_s": float(np.median(ws))}
    res["cpu_ratio_sequential_over_batched"] = res["sequential"]["cpu_median_s"] / res["batched"]["cpu_median_s"]
    return res


def full(args) -> dict:
    res = {"epochs": args.epochs, "repeats": args.repeats, "engine": "batched", "runs": []}
    for name in args.datasets.split(","):
        data = load(name)
        la = load_avg()
        out, c, w = timed(lambda: curves(data, epochs=args.epochs, repeats=args.repeats, engine="batched"))
        row = {"dataset": name, "n_features": int(np.prod(data.x_source.shape[1:])), "n_test": data.n_test,
               "refits": 2 * 10 * args.repeats, "cpu_s": c, "wall_s": w, "load_before": la,
               "load_after": load_avg(), "high": out["high"].scores.tolist(), "low": out["low"].scores.tolist()}
        res["runs"].append(row)
        print(f"{name}: {row['refits']} refits x {args.epochs} epochs: cpu {c:.1f} s, wall {w:.1f} s "
              f"(load {la} -> {row['load_after']})", flush=True)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=("engines", "full"))
    ap.add_argument("--epochs", type=int, default=None, help="engines: 10; full: 200 (the paper's)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--datasets", default="adult,blog")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.epochs is None:
        args.epochs = 10 if args.what == "engines" else 200
    torch.set_num_threads(1)
    res = engines(args) if args.what == "engines" else full(args)
    res.update({"threads": torch.get_num_threads(), "torch": torch.__version__,
                "cpu_isa": torch.backends.cpu.get_cpu_capability(), "cores": os.cpu_count()})
    out = Path(args.out) if args.out else Path("runs") / "bench" / f"cpu_curves_{args.what}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
