"""dattri's DVEmb on a training run replayed step by step: [n_query, n_source] scores + CPU time.

Runs inside dattri's own virtualenv (never imports dvgs_fast):

    $DVGS_PEER_VENVS/dattri/bin/python bench/peers/dattri_dvemb.py --data data.npz --model model.json \\
        --init init.pt --order order.npz --lr 0.1 [--factorization kronecker] [--proj-dim 512] --out s.npz

Inputs (bench/bench_dvemb.py writes them): data.npz (x_source, y_source, x_query, y_query), the
layout model.json (bench/peers/export.py's format), init.pt (the initial state_dict) and order.npz
(``indices`` of every step concatenated, ``sizes`` per step, ``epochs`` per step): the very run our
DataValueEmbedding trained, so both judge the same trajectory. The training is replayed with
plain SGD (torch.optim.SGD, lr, the mean cross-entropy of each batch); before every step,
``DVEmbAttributor.cache_gradients(epoch, batch, indices, lr)`` as dattri documents; then
``cache()`` and ``attribute()`` of the query loader. dattri's sign (embedding · test gradient of
the loss) is already "positive = the row lowers the query's loss".

CPU time: the whole of it (training, caching, cache(), attribute()), median of --rounds.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dattri_attribution import build_model  # noqa: E402


def run_once(args, data, order, spec):
    from dattri.algorithm.dvemb import DVEmbAttributor
    from dattri.task import AttributionTask
    from torch.utils.data import DataLoader, TensorDataset
    xs, ys = torch.as_tensor(data["x_source"]), torch.as_tensor(data["y_source"])
    xq, yq = torch.as_tensor(data["x_query"]), torch.as_tensor(data["y_query"])
    model = build_model(spec)
    model.load_state_dict(torch.load(args.init))

    def loss_factored(m, batch, device):
        x, y = batch
        return nn.functional.cross_entropy(m(x.to(device)), y.to(device))

    def loss_params(params, batch):
        x, y = batch
        return nn.functional.cross_entropy(torch.func.functional_call(model, params, x), y)

    factored = args.factorization != "none"
    task = AttributionTask(loss_func=loss_factored if factored else loss_params, model=model, checkpoints=model.state_dict())
    att = DVEmbAttributor(task, proj_dim=args.proj_dim, proj_seed=0, factorization_type=args.factorization)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    pos = 0
    for size, epoch in zip(order["sizes"], order["epochs"]):
        idx = torch.as_tensor(order["indices"][pos:pos + size])
        pos += size
        model.train()
        att.cache_gradients(int(epoch), (xs[idx], ys[idx]), idx, args.lr)
        opt.zero_grad()
        nn.functional.cross_entropy(model(xs[idx]), ys[idx]).backward()
        opt.step()
    att.cache()
    model.eval()
    scores = att.attribute(DataLoader(TensorDataset(xq, yq), batch_size=500, shuffle=False))
    return scores.T.to(torch.float64).detach().numpy(), {k: v.detach().clone() for k, v in model.state_dict().items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--init", required=True)
    ap.add_argument("--order", required=True)
    ap.add_argument("--lr", type=float, required=True)
    ap.add_argument("--factorization", choices=("none", "kronecker", "elementwise"), default="kronecker")
    ap.add_argument("--proj-dim", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data, order = np.load(args.data), np.load(args.order)
    with open(args.model) as fh:
        spec = json.load(fh)
    times = []
    for _ in range(args.rounds):
        c0, w0 = time.process_time(), time.perf_counter()
        scores, final = run_once(args, data, order, spec)
        times.append((time.process_time() - c0, time.perf_counter() - w0))
    np.savez(args.out, scores=scores, **{f"final_{k}": v.numpy() for k, v in final.items()})
    import dattri
    meta = {"dattri": getattr(dattri, "__version__", "0.3.0"), "torch": torch.__version__,
            "cpu_s": float(np.median([c for c, _ in times])), "wall_s": float(np.median([w for _, w in times])),
            "cpu_each": [c for c, _ in times], "factorization": args.factorization, "proj_dim": args.proj_dim,
            "threads": args.threads}
    with open(os.path.splitext(args.out)[0] + ".json", "w") as fh:
        json.dump(meta, fh, indent=1)
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
