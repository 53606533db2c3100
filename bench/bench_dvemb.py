"""Data value embedding against trajectory-specific leave-one-out, beside dattri's DVEmb on the same
run; its training overhead against plain training; its memory.

    python bench/bench_dvemb.py --out runs/bench/dvemb [--dattri-python $DVGS_PEER_VENVS/dattri/bin/python]

Writes results.json / results.md into --out (never over tracked files).

The run: sklearn digits, 1000 source / 300 query rows (split seed 0); MLP 64-32-10 (ReLU), plain
SGD lr 0.1, batch 64, 10 epochs, seed 0 -- the conventions of a counterfactual TrainingRecipe (its
initial weights under torch.manual_seed(0), each epoch's order from Generator(0).randperm), so
the ground truth retrains exactly that run without one row (``loo_ground_truth``, data order
"shared": the row masked inside its batch, every other step as it was; 200 random rows; the
attributed output: minus the query's loss, as DVEmb predicts the change of the loss).

Both implementations see the same run: ours trains it (DataValueEmbedding); dattri's replays it
from the exported initial weights and batch order (bench/peers/dattri_dvemb.py, plain SGD,
``cache_gradients`` before every step as dattri documents), so both embed the same trajectory
(the final weights of both are compared). Settings side by side: exact (no projection: dattri's
Kronecker factors reconstructed, ours the identity) and projected to 16 x 16 per Linear layer
(dattri: ``proj_dim=512`` with ``factorization_type="kronecker"``, i.e. sqrt(512 / 2) = 16 per side,
weights only; ours: ``layer_dims`` (16, 16) per layer, Kronecker, the bias as the input's
appended 1).

Ours runs twice per round, interleaved: ``recursion="embedding"`` (E [N, k] formed, then the
queries scored against it -- what dattri computes) and ``recursion="query"`` (the same scores by
propagating the 300 queries backwards, no E: dvgs_fast/methods/dvemb/query_recursion.py).

Timing: 1 torch thread; CPU time of the whole method (training, recording, the recursion, the
query gradients and scores) on both sides, median of --rounds, interleaved with a plain training
loop of the same run (the overhead's denominator: ours' training-and-recording CPU time over it).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "peers"))
from _timing import load_avg, pinned_threads  # noqa: E402
from bench_counterfactual import digits, facts  # noqa: E402
from export import model_spec  # noqa: E402

from dvgs_fast.evaluate import counterfactual as cf  # noqa: E402
from dvgs_fast.methods.dvemb import DataValueEmbedding  # noqa: E402

EPOCHS, BATCH, LR, SEED = 10, 64, 0.1, 0


def factory():
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def recipe():
    return cf.TrainingRecipe(factory, optimizer="sgd", lr=LR, epochs=EPOCHS, batch_size=BATCH, data_order="shared")


def order(n: int) -> dict:
    g = torch.Generator().manual_seed(SEED)
    idx, sizes, epochs = [], [], []
    for e in range(EPOCHS):
        for b in torch.randperm(n, generator=g).split(BATCH):
            idx.append(b.numpy())
            sizes.append(len(b))
            epochs.append(e)
    return {"indices": np.concatenate(idx), "sizes": np.array(sizes), "epochs": np.array(epochs)}


def plain_training(xs, ys) -> float:
    """CPU seconds of the run itself: the loop a user writes (same init, order, optimizer)."""
    c0 = time.process_time()
    torch.manual_seed(SEED)
    model = factory()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    g = torch.Generator().manual_seed(SEED)
    for _ in range(EPOCHS):
        for b in torch.randperm(len(xs), generator=g).split(BATCH):
            opt.zero_grad()
            F.cross_entropy(model(xs[b]), ys[b]).backward()
            opt.step()
    return time.process_time() - c0


SETTINGS = {
    "exact": ({"proj_dim": 10 ** 7}, {"factorization": "kronecker"}),
    "16x16 per layer": ({"proj_dim": 1, "layer_dims": {"0": (16, 16), "2": (16, 16)}, "projection_structure": "kronecker"},
                        {"factorization": "kronecker", "proj_dim": 512}),
}


# Our two recursions (method.py's ``recursion``): E formed as dattri does, or the queries propagated.
ROUTES = {"embedding": "E formed", "query": "query route"}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/bench/dvemb")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dattri-python", default=None)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    xs, ys, xq, yq = [torch.as_tensor(np.asarray(a)) for a in digits()]
    xs, xq = xs.float(), xq.float()
    loads = [load_avg()]
    with pinned_threads(args.threads):
        c0 = time.process_time()
        gt = cf.loo_ground_truth(recipe(), xs, ys, xq, yq, indices=200, seeds=[SEED], output="neg_loss",
                                 progress=False)
        gt_cpu = time.process_time() - c0
        ref = cf.reference_model(recipe(), xs, ys, seed=SEED)
    np.savez(out / "data.npz", x_source=xs.numpy(), y_source=ys.numpy(), x_query=xq.numpy(), y_query=yq.numpy())
    (out / "model.json").write_text(json.dumps(model_spec(factory())))
    torch.save(recipe().initial_module(SEED).state_dict(), out / "init.pt")
    np.savez(out / "order.npz", **order(len(xs)))
    res = {"facts": {**facts(), "threads": args.threads}, "ground_truth_cpu_s": gt_cpu, "rows": []}
    plain = []
    for name, (ours_kw, theirs_kw) in SETTINGS.items():
        ours_t, atts = {r: [] for r in ROUTES}, {}
        for r in range(args.rounds):
            with pinned_threads(args.threads):
                plain.append(plain_training(xs, ys))
                for route in ROUTES:                       # interleaved within each round
                    c0 = time.process_time()
                    atts[route] = DataValueEmbedding(factory, epochs=EPOCHS, batch_size=BATCH, lr=LR, optimizer="sgd",
                                                     seed=SEED, progress=False, recursion=route,
                                                     **ours_kw).attribute(xs, ys, xq, yq)
                    ours_t[route].append(time.process_time() - c0)
            loads.append(load_avg())
        for route, att in atts.items():
            k, q = att.info["proj_dim"], len(xq)
            row = {"setting": name, "side": f"ours ({ROUTES[route]})", "route": route,
                   "recorded_in": att.info["recorded_in"],
                   "cpu_s": float(np.median(ours_t[route])), "cpu_each": ours_t[route], "proj_dim": k,
                   "train_record_cpu_s": att.info["train_cpu_s"] + att.info["record_cpu_s"],
                   **{key: att.info.get(key) for key in ("train_cpu_s", "record_cpu_s", "embed_cpu_s", "scores_cpu_s",
                                                         "recorded_bytes", "embedding_bytes")},
                   "memory_floats": k * k + len(xs) * k if route == "embedding" else k * q + len(xs) * q}
            c = cf.loo_correlation(np.asarray(att), gt)
            row.update(spearman=c.spearman[:2], pearson=c.pearson[:2])
            res["rows"].append(row)
        if args.dattri_python:
            dst = out / f"dattri_{name.replace(' ', '_')}.npz"
            cmd = [args.dattri_python, str(HERE / "peers" / "dattri_dvemb.py"), "--data", str(out / "data.npz"),
                   "--model", str(out / "model.json"), "--init", str(out / "init.pt"), "--order", str(out / "order.npz"),
                   "--lr", str(LR), "--rounds", str(args.rounds), "--threads", str(args.threads), "--out", str(dst)]
            for k, v in theirs_kw.items():
                cmd += [f"--{k.replace('_', '-')}", str(v)]
            p = subprocess.run(cmd, capture_output=True, text=True)
            loads.append(load_avg())
            if p.returncode != 0:
                res["rows"].append({"setting": name, "side": "dattri", "error": p.stderr.strip().splitlines()[-1:]})
                continue
            theirs_meta = json.loads(dst.with_suffix(".json").read_text())
            z = np.load(dst)
            c = cf.loo_correlation(z["scores"], gt)
            drift = max(float(np.abs(z[f"final_{k}"] - v.detach().numpy()).max()) for k, v in ref.state_dict().items())
            res["rows"].append({"setting": name, "side": "dattri", "cpu_s": theirs_meta["cpu_s"],
                                "cpu_each": theirs_meta["cpu_each"], "spearman": c.spearman[:2],
                                "pearson": c.pearson[:2], "final_weights_vs_ours": drift,
                                "version": theirs_meta["dattri"], "settings": theirs_kw})
    res["plain_training_cpu_s"] = float(np.median(plain))
    res["load"] = [min(loads), max(loads)]
    (out / "results.json").write_text(json.dumps(res, indent=1, default=float))
    (out / "results.md").write_text(markdown(res))
    print(markdown(res))
    return res


def markdown(res: dict) -> str:
    f = res["facts"]
    plain = res["plain_training_cpu_s"]
    lines = [f"# Data value embedding vs trajectory-specific leave-one-out ({f['date']})", "",
             f"{f['cpu']}, {f['cores']} cores shared (load {res['load'][0]:.1f}-{res['load'][1]:.1f}); torch "
             f"{f['torch']}; {f['threads']} thread; commit {f['commit']}; `python bench/bench_dvemb.py` (its docstring "
             f"has every setting). Digits MLP 64-32-10, SGD lr {LR}, batch {BATCH}, {EPOCHS} epochs; ground truth: "
             f"that run retrained without each of 200 rows ({res['ground_truth_cpu_s']:.1f} CPU s); per query, "
             f"Spearman between the scores and the actual change of the query's loss; mean ± standard error over "
             f"the 300 queries. CPU s: the whole method, median of the rounds. Plain training of the run: "
             f"{plain:.2f} CPU s.", "",
             "| projection | by | Spearman | Pearson | CPU s | training + recording CPU s (x plain) | memory |",
             "|---|---|---:|---:|---:|---:|---|"]
    for r in res["rows"]:
        if "error" in r:
            lines.append(f"| {r['setting']} | {r['side']} | - | - | - | - | failed: {r['error']} |")
            continue
        if r["side"].startswith("ours"):
            held = "k² + N·k" if r["route"] == "embedding" else "k·Q + N·Q"
            mem = (f"k = {r['proj_dim']}: {held} = {r['memory_floats'] / 1e6:.1f} M floats in memory; "
                   f"{r['recorded_bytes'] / 2 ** 20:.1f} MiB of steps in {r['recorded_in']}")
            over = f"{r['train_record_cpu_s']:.2f} ({r['train_record_cpu_s'] / plain:.2f}x)"
        else:
            mem = f"dattri {r['version']} (final weights vs ours: max diff {r['final_weights_vs_ours']:.1e})"
            over = "-"
        lines.append(f"| {r['setting']} | {r['side']} | {r['spearman'][0]:.3f} ± {r['spearman'][1]:.3f} | "
                     f"{r['pearson'][0]:.3f} ± {r['pearson'][1]:.3f} | {r['cpu_s']:.2f} | {over} | {mem} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
