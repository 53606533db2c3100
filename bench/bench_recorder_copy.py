"""What the gradient engine's recorded training step costs beyond a plain one, with and without the
copy of each recorded layer output (grads.record: skipped where only an out-of-place module reads
the output, fresh_output_modules).

    python bench/bench_recorder_copy.py --out runs/bench/recorder_copy [--rounds 15]

A training step on 1,000 random rows: plain (zero_grad, backward, SGD step) against the engine's
recorded step (methods/_grad_training.recorded_step: the forward recorded, autograd.grad to the
parameters and the layers' outputs, the same SGD step), the latter with every output copied (the
former behaviour) and with the copies skipped. Two MLPs: 64-32-10 at batch 64 (digits-sized, a
step of fixed costs) and 2048-100-10 at batch 128. 1 torch thread; CPU time per step over an epoch,
the three interleaved in each round; medians. Writes OUT/recorder_copy.json and .md.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from dvgs_fast import grads  # noqa: E402
from dvgs_fast.methods import _grad_training as T  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import bench_setup, report_markdown  # noqa: E402

SHAPES = ((64, 32, 64), (2048, 100, 128))      # (inputs, hidden, batch)


def steps(d_in: int, hidden: int):
    torch.manual_seed(0)
    xs, ys = torch.randn(1000, d_in), torch.randint(0, 10, (1000,))
    m = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, 10))
    params, names = list(m.parameters()), [n for n, _ in m.named_parameters()]
    loss = grads.make_sample_loss("cross_entropy")
    copied = grads.FastScorer(m, names, loss, "dot", owner="bench")
    copied._uncopied = frozenset()               # the former behaviour: every recorded output copied
    uncopied = grads.FastScorer(m, names, loss, "dot", owner="bench")
    opt = torch.optim.SGD(params, lr=0.0)        # lr 0: the same weights in every round

    def plain(idx):
        opt.zero_grad()
        nn.functional.cross_entropy(m(xs[idx]), ys[idx]).backward()
        opt.step()

    def recorded(scorer):
        def step(idx):
            T.recorded_step(scorer, loss, m, xs[idx], ys[idx], params)
            opt.step()
        return step

    return {"plain": plain, "recorded, outputs copied": recorded(copied),
            "recorded, copies skipped": recorded(uncopied)}, len(uncopied._uncopied)


def main() -> None:
    a, out = bench_setup(__doc__, "runs/bench/recorder_copy", 15)
    load = [os.getloadavg()[0]]
    rows = []
    for d_in, hidden, batch in SHAPES:
        fns, n_uncopied = steps(d_in, hidden)
        t = {k: [] for k in fns}
        for _ in range(a.rounds):
            for k, f in fns.items():
                perm = torch.randperm(1000).split(batch)
                c0 = time.process_time()
                for idx in perm:
                    f(idx)
                t[k].append((time.process_time() - c0) / len(perm) * 1e6)
        med = {k: float(np.median(v)) for k, v in t.items()}
        rows.append({"mlp": f"{d_in}-{hidden}-10", "batch": batch, "uncopied_layers": n_uncopied, "us": med,
                     "rounds_us": t})
        print(rows[-1]["mlp"], {k: round(v, 1) for k, v in med.items()}, flush=True)
    load.append(os.getloadavg()[0])
    doc = {"date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__, "rounds": a.rounds, "load": load,
           "rows": rows}
    (out / "recorder_copy.json").write_text(json.dumps(doc, indent=1))
    keys = list(rows[0]["us"])
    md = report_markdown(
        "The engine's recorded training step: with and without the output copies", doc, "bench_recorder_copy.py",
        "1,000 random rows, SGD; µs a step (an epoch's mean), median of the rounds.",
        ["MLP", "batch", "layers uncopied"] + [f"{k}, µs" for k in keys] + ["recorded - plain, copied / skipped"],
        "lrr" + "r" * len(keys) + "r",
        [[r["mlp"], str(r["batch"]), str(r["uncopied_layers"])] + [f"{r['us'][k]:.0f}" for k in keys]
         + [f"{r['us'][keys[1]] - r['us'][keys[0]]:.0f} / {r['us'][keys[2]] - r['us'][keys[0]]:.0f}"] for r in rows])
    (out / "recorder_copy.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
