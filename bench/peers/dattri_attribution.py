"""dattri's attributors on saved data and model weights: [n_query, n_source] score matrices + CPU time.

Runs inside dattri's own virtualenv (never imports dvgs_fast), so that a bench can put dattri's
scores beside ours on the very same data, splits and checkpoints:

    bash bench/peers/setup_dattri.sh                      # $DVGS_PEER_VENVS/dattri (dattri 0.3.0)
    $DVGS_PEER_VENVS/dattri/bin/python bench/peers/dattri_attribution.py \\
        --data data.npz --model model.json --checkpoints ck0.pt ck1.pt --lrs 0.1,0.1 \\
        --methods tracin,grad_dot,grad_cos,trak --out dattri_scores.npz

Inputs
  --data         npz with x_source [N, d] float, y_source [N] int, x_query [Q, d], y_query [Q]
  --model        JSON {"layers": [["linear", 64, 32], ["relu"], ["linear", 32, 10]]}: one
                 "linear" is an nn.Linear (state_dict keys weight / bias), more layers an
                 nn.Sequential (keys "0.weight", ...); activations: relu, tanh, sigmoid, gelu, mish
  --checkpoints  torch.save(model.state_dict()) files, in training order; TracIn sums over all
                 of them, grad-dot / grad-cos / TRAK use the last one (TRAK: all with --trak-ensemble)
  --lrs          TracIn's weight of each checkpoint (the learning rate at it), comma-separated

Definitions (dattri 0.3.0, dattri/algorithm/tracin.py and trak.py):
  tracin    sum_c lr_c <grad loss(z_i), grad target(z_q)> over the checkpoints (TracInAttributor,
            normalized_grad=False, weight_list=lrs)
  grad_dot  the same at the last checkpoint with weight 1; grad_cos: normalized_grad=True
  trak      TRAKAttributor: loss_func = the log-odds of the true class (TRAK's margin,
            log p - log(1 - p)), correct_probability_func = p, ``--trak-reg`` added to the kernel
  The per-sample loss is cross-entropy. ``--target loss`` (dattri's default for TracIn) attributes
  the query's loss: dattri's sign is then already "positive = the row lowers the query's loss
  (helps it)"; ``--target margin`` attributes the log-odds, and the scores are negated so that
  positive still means "helps". Gradients are randomly projected unless ``--proj identity``:
  dattri's default is a normal projection to 512 dimensions (seed 0) for every method.
  dattri's DEFAULT_PROJECTOR_KWARGS is a module-level dict that each attributor updates in
  place; every call here passes all of its keys, so no setting leaks from one method to the next.

Output: --out npz with scores_<method> [n_query, n_source] float64 (transposed from dattri's
[n_train, n_test]), and <out>.json with each method's CPU / wall seconds, settings and versions
(and, with --lds-gt, dattri's own LDS of each method's scores: a check of our ``lds``).
bench/peers/export.py writes the inputs from our side.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU, "mish": nn.Mish}


def build_model(spec: dict) -> nn.Module:
    layers = []
    for entry in spec["layers"]:
        kind = entry[0]
        if kind == "linear":
            layers.append(nn.Linear(int(entry[1]), int(entry[2])))
        elif kind in ACTIVATIONS:
            layers.append(ACTIVATIONS[kind]())
        else:
            raise ValueError(f"model: unknown layer {kind!r}")
    return layers[0] if len(layers) == 1 else nn.Sequential(*layers)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--checkpoints", nargs="+", required=True)
    ap.add_argument("--lrs", default=None, help="TracIn weight per checkpoint (default: 1 each)")
    ap.add_argument("--methods", default="tracin,grad_dot,grad_cos,trak")
    ap.add_argument("--target", choices=("loss", "margin"), default="loss")
    ap.add_argument("--proj", choices=("normal", "rademacher", "identity"), default="normal")
    ap.add_argument("--proj-dim", type=int, default=512)
    ap.add_argument("--trak-reg", type=float, default=0.0)
    ap.add_argument("--trak-ensemble", action="store_true", help="TRAK over every checkpoint (default: the last)")
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=1, help="calls per method; the median CPU and wall time is reported")
    ap.add_argument("--lds-gt", default=None, help="npz (actual [M, Q], indices [M, k]) from export.py: "
                                                   "also score each method with dattri.metric.lds")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    import dattri
    from dattri.algorithm.tracin import TracInAttributor
    from dattri.algorithm.trak import TRAKAttributor
    from dattri.task import AttributionTask
    from torch.utils.data import DataLoader, TensorDataset

    d = np.load(args.data)
    xs, xq = (torch.as_tensor(d[k], dtype=torch.float32) for k in ("x_source", "x_query"))
    ys, yq = (torch.as_tensor(d[k], dtype=torch.long) for k in ("y_source", "y_query"))
    with open(args.model) as fh:
        spec = json.load(fh)
    model = build_model(spec).eval()
    ckpts = [torch.load(p, map_location="cpu", weights_only=True) for p in args.checkpoints]
    lrs = [1.0] * len(ckpts) if args.lrs is None else [float(v) for v in args.lrs.split(",")]
    if len(lrs) != len(ckpts):
        raise SystemExit(f"--lrs: {len(lrs)} weights for {len(ckpts)} checkpoints")

    def loss_func(params, data):                  # per-sample cross-entropy, torch.func style
        x, y = data
        out = torch.func.functional_call(model, params, x.unsqueeze(0))
        return nn.functional.cross_entropy(out, y.unsqueeze(0))

    def margin_func(params, data):                # TRAK's log-odds of the true class
        logp = -loss_func(params, data)
        return logp - torch.log(1 - torch.exp(logp))

    def correct_prob(params, data):
        return torch.exp(-loss_func(params, data))

    train = DataLoader(TensorDataset(xs, ys), batch_size=args.batch_size, shuffle=False)
    test = DataLoader(TensorDataset(xq, yq), batch_size=args.batch_size, shuffle=False)
    proj = {"proj_dim": args.proj_dim, "proj_max_batch_size": 32, "proj_seed": 0, "device": "cpu",
            "proj_type": args.proj}
    target = loss_func if args.target == "loss" else margin_func
    sign = 1.0 if args.target == "loss" else -1.0
    scores, report = {}, {}
    def run_one(method):
        """One attributor call: (scores [n_train, n_test] as dattri returns them, settings)."""
        if method in ("tracin", "grad_dot", "grad_cos"):
            cks = ckpts if method == "tracin" else ckpts[-1:]
            weights = torch.tensor(lrs if method == "tracin" else [1.0])
            task = AttributionTask(loss_func=loss_func, model=model, checkpoints=cks, target_func=target)
            att = TracInAttributor(task, weight_list=weights, normalized_grad=method == "grad_cos",
                                   projector_kwargs=dict(proj))
            with torch.no_grad():
                s = sign * att.attribute(train, test)
            return s, {"checkpoints": len(cks), "weights": weights.tolist(), "target": args.target, **proj}
        if method == "trak":
            cks = ckpts if args.trak_ensemble else ckpts[-1:]
            task = AttributionTask(loss_func=margin_func, model=model, checkpoints=cks)
            att = TRAKAttributor(task, correct_probability_func=correct_prob, projector_kwargs=dict(proj),
                                 regularization=args.trak_reg)
            with torch.no_grad():
                att.cache(train)
                s = att.attribute(test)
            return s, {"checkpoints": len(cks), "regularization": args.trak_reg, **proj}
        raise SystemExit(f"--methods: unknown method {method!r}")

    for method in args.methods.split(","):
        times = []
        for _ in range(args.rounds):
            c0, w0 = time.process_time(), time.perf_counter()
            s, settings = run_one(method)
            times.append((time.process_time() - c0, time.perf_counter() - w0))
        cpu, wall = float(np.median([c for c, _ in times])), float(np.median([w for _, w in times]))
        s = s.T.to(torch.float64).numpy()
        if not np.isfinite(s).all():
            print(f"{method}: {int((~np.isfinite(s)).sum())} non-finite scores", file=sys.stderr)
        scores[f"scores_{method}"] = s
        report[method] = {"cpu_s": cpu, "wall_s": wall, "cpu_each": [c for c, _ in times], "settings": settings}
        if args.lds_gt is not None:
            report[method]["dattri_lds"] = dattri_lds(s, args.lds_gt)
        print(f"{method}: {cpu:.2f} CPU s (median of {len(times)}), {wall:.2f} wall s, scores {s.shape}", flush=True)
    np.savez(args.out, **scores)
    meta = {"dattri": getattr(dattri, "__version__", None) or _dist_version("dattri"), "torch": torch.__version__,
            "numpy": np.__version__, "python": platform.python_version(), "threads": args.threads,
            "methods": report, "n_source": int(len(xs)), "n_query": int(len(xq))}
    with open(os.path.splitext(args.out)[0] + ".json", "w") as fh:
        json.dump(meta, fh, indent=1)
    return meta


def dattri_lds(scores_qn: np.ndarray, gt_path: str) -> dict:
    """dattri.metric.lds on our ground truth: its own definition (Spearman per query over the
    subsets of the summed scores; queries whose correlation is NaN are dropped from the mean)."""
    from dattri.metric import lds
    g = np.load(gt_path)
    per, _ = lds(torch.as_tensor(scores_qn.T), (torch.as_tensor(g["actual"]), torch.as_tensor(g["indices"])))
    per = per.numpy().astype(np.float64)
    ok = ~np.isnan(per)
    return {"mean": float(per[ok].mean()), "stderr": float(per[ok].std(ddof=1) / np.sqrt(ok.sum())),
            "n_nan": int((~ok).sum()), "per_query": per.tolist()}


def _dist_version(name: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:  # noqa: BLE001 - only a label
        return None


if __name__ == "__main__":
    main()
