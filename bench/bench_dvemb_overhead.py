"""The data value embedding's training overhead against plain training at a size where the step
is not dominated by fixed costs: an MLP 2048-100-100-10 (the DVGS paper's exp3 head) on 4,096
random rows, plain SGD, 4 epochs, batches of 128 and 512; the projection k = 1024 with each
structure (Khatri-Rao, the default; LoGra's Kronecker).

    python bench/bench_dvemb_overhead.py --out runs/bench/dvemb_overhead [--rounds 3]

1 torch thread; CPU time (time.process_time). Plain training: the same model, initialisation,
data order and steps in a plain torch loop. DataValueEmbedding's figure is its own training +
recording CPU time (``info["train_cpu_s"] + info["record_cpu_s"]``; the backward recursion after
training and the 50 queries' scores, ``scores_cpu_s``, by the route ``recursion="auto"`` takes,
is reported beside it). The recorded steps fit in memory here (no store_dir): no disk writes.
Rounds interleaved; medians reported. The overhead is given as the ratio of the medians and as the
median of each round's ratio (plain and DVEmb run back to back in a round: the pair shares the
VM's drift between rounds).
Writes OUT/dvemb_overhead.json and .md.
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

from dvgs_fast import DataValueEmbedding  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import bench_setup, report_markdown  # noqa: E402

N, D, EPOCHS, LR = 4096, 2048, 4, 0.01


def model() -> nn.Module:
    return nn.Sequential(nn.Linear(D, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 10))


def plain(xs, ys, batch: int) -> float:
    torch.manual_seed(0)
    m = model()
    opt = torch.optim.SGD(m.parameters(), lr=LR)
    gen = torch.Generator().manual_seed(0)
    c0 = time.process_time()
    for _ in range(EPOCHS):
        for idx in torch.randperm(N, generator=gen).split(batch):
            opt.zero_grad()
            nn.functional.cross_entropy(m(xs[idx]), ys[idx]).backward()
            opt.step()
    return time.process_time() - c0


# The projections compared: Khatri-Rao (rows u_r ⊗ v_r, DVEmb's default: k·(d_in + d_out) per
# sample, 971 x 2149 on the 2048-wide first layer, ten times that layer's forward) and Kronecker
# (LoGra's P_out ⊗ P_in, k split over a layer's sides to balance them: 31 x 31 there, 2049 x 31
# multiply-adds per sample on its input side; the steps kept as their two sides). With either, the
# first layer's input side (the model's input) is projected once per sample for the whole run
# (trajectory.InputSides, within DVEmb's training + recording time), not at each of 4 epochs' steps.
PROJECTIONS = {"kronecker": "kronecker", "khatri_rao (default)": "khatri_rao"}


def main() -> None:
    a, out = bench_setup(__doc__, "runs/bench/dvemb_overhead", 3)
    g = torch.Generator().manual_seed(0)
    xs, ys = torch.randn(N, D, generator=g), torch.randint(0, 10, (N,), generator=g)
    load = [os.getloadavg()[0]]
    cells: dict = {}
    for r in range(a.rounds):
        for batch in (128, 512):
            for label, structure in PROJECTIONS.items():
                p = plain(xs, ys, batch)
                res = DataValueEmbedding(model, epochs=EPOCHS, batch_size=batch, lr=LR, optimizer="sgd", seed=0,
                                         progress=False, proj_dim=1024, projection_structure=structure
                                         ).attribute(xs, ys, xs[:50], ys[:50])
                c = cells.setdefault(f"{batch}|{label}", {"plain": [], "ours": [], "embed": [], "route": ""})
                c["plain"].append(p)
                c["ours"].append(res.info["train_cpu_s"] + res.info["record_cpu_s"])
                c["embed"].append(res.info["scores_cpu_s"])
                c["route"] = res.info["recursion"]
                print(f"round {r} B={batch} {label}: plain {p:.2f} CPU s, ours {c['ours'][-1]:.2f}", flush=True)
    load.append(os.getloadavg()[0])
    rows = []
    for key, c in cells.items():
        batch, structure = key.split("|")
        pl, ours = float(np.median(c["plain"])), float(np.median(c["ours"]))
        # each round's pair ran back to back: their ratio cancels this VM's drift between rounds
        paired = float(np.median(np.array(c["ours"]) / np.array(c["plain"])))
        rows.append({"batch": int(batch), "structure": structure, "plain_cpu_s": pl, "ours_cpu_s": ours,
                     "ratio": ours / pl, "paired_ratio": paired, "scores_cpu_s": float(np.median(c["embed"])),
                     "route": c["route"], "rounds_plain_cpu_s": c["plain"], "rounds_ours_cpu_s": c["ours"]})
    doc = {"date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__, "rounds": a.rounds,
           "load": load, "rows": rows}
    (out / "dvemb_overhead.json").write_text(json.dumps(doc, indent=1))
    md = report_markdown(
        "Data value embedding: training overhead against plain training", doc, "bench_dvemb_overhead.py",
        f"MLP {D}-100-100-10, {N} rows, SGD lr {LR}, {EPOCHS} epochs, k = 1024.",
        ["batch", "projection", "plain training CPU s", "DVEmb training + recording CPU s",
         "overhead (ratio of medians)", "overhead (median of each round's ratio)",
         "recursion + scores afterwards CPU s (route)"], "rlrrrrr",
        [[str(r["batch"]), r["structure"], f"{r['plain_cpu_s']:.2f}", f"{r['ours_cpu_s']:.2f}", f"{r['ratio']:.2f}x",
          f"{r['paired_ratio']:.2f}x", f"{r['scores_cpu_s']:.2f} ({r['route']})"] for r in rows])
    (out / "dvemb_overhead.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
