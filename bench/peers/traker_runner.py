"""traker 0.3.2 on saved data and checkpoints: TRAK scores [n_query, n_source] + CPU time.

Runs inside traker's own virtualenv (never imports dvgs_fast):

    bash bench/peers/setup_traker.sh
    $DVGS_PEER_VENVS/traker/bin/python bench/peers/traker_runner.py --data data.npz --model model.json \\
        --checkpoints m0.pt m1.pt --proj-dim 512 --out traker_scores.npz [--lambda-reg 0 | --relative-reg 1.0]

Inputs
  --data         npz: x_source [N, d] float, y_source [N] int, x_query [Q, d], y_query [Q]
  --model        JSON {"layers": [["linear", 64, 32], ["relu"], ["linear", 32, 10]]} (nn.Sequential)
  --checkpoints  torch.save(state_dict) files: traker's model ids 0, 1, ... (its ensemble)
  --proj-dim     TRAK's projection dimension; on CPU traker uses its BasicProjector (a dense
                 Gaussian matrix generated block by block of 100 columns, per batch)
  --lambda-reg   traker's absolute ridge term added to XᵀX (its default 0.0), or
  --relative-reg c: λ = c x tr(XᵀX)/k of traker's own features of the first model (the rule
                 dvgs_fast's TRAK uses), read from its saver after featurising
  --featurize-only   time the featurisation and stop (the speed comparison)
  --warmup       featurise one batch in a throwaway TRAKer before the timed one

Definitions (traker 0.3.2, trak/traker.py, modelout_functions.py, score_computers.py): task
"image_classification": margin log(p/(1-p)) of the true class, out-to-loss 1 - p; gradients
divided by sqrt(#parameters); per model (XᵀX + λI)⁻¹ normalised by its mean |entry|; scores =
mean over models of φ_q (XᵀX+λI)⁻¹ Xᵀ times the mean over models of 1 - p. Positive = helps.

Output: --out npz with scores [n_query, n_source] (float64, transposed from traker's [N, Q]) and
<out>.json with featurize / score CPU and wall seconds, settings and versions.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "mish": nn.Mish, "gelu": nn.GELU}


def build_model(spec: dict) -> nn.Module:
    layers = []
    for entry in spec["layers"]:
        if entry[0] == "linear":
            layers.append(nn.Linear(int(entry[1]), int(entry[2])))
        else:
            layers.append(ACTIVATIONS[entry[0]]())
    return nn.Sequential(*layers)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--checkpoints", nargs="+", required=True)
    ap.add_argument("--proj-dim", type=int, default=512)
    ap.add_argument("--lambda-reg", type=float, default=0.0)
    ap.add_argument("--relative-reg", type=float, default=None)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--featurize-only", action="store_true")
    ap.add_argument("--warmup", action="store_true",
                    help="featurise one batch with a throwaway TRAKer first (first-call costs not timed)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import logging

    import trak
    from trak import TRAKer

    logging.disable(logging.WARNING)
    d = np.load(args.data)
    xs, xq = (torch.as_tensor(d[k], dtype=torch.float32) for k in ("x_source", "x_query"))
    ys, yq = (torch.as_tensor(d[k], dtype=torch.long) for k in ("y_source", "y_query"))
    with open(args.model) as fh:
        model = build_model(json.load(fh)).eval()
    ckpts = [torch.load(p, map_location="cpu", weights_only=True) for p in args.checkpoints]
    save_dir = tempfile.mkdtemp(prefix="traker_")
    report = {}
    try:
        if args.warmup:
            w = TRAKer(model=model, task="image_classification", train_set_size=len(xs), save_dir=save_dir + "_w",
                       device="cpu", proj_dim=args.proj_dim, projector_seed=args.seed, use_half_precision=False)
            w.load_checkpoint(ckpts[0], model_id=0)
            w.featurize(batch=(xs[:args.batch_size], ys[:args.batch_size]), num_samples=len(xs[:args.batch_size]))
            del w
            shutil.rmtree(save_dir + "_w", ignore_errors=True)
        traker = TRAKer(model=model, task="image_classification", train_set_size=len(xs), save_dir=save_dir,
                        device="cpu", proj_dim=args.proj_dim, projector_seed=args.seed, use_half_precision=False,
                        lambda_reg=args.lambda_reg)
        c0, w0 = time.process_time(), time.perf_counter()
        for mid, ck in enumerate(ckpts):
            traker.load_checkpoint(ck, model_id=mid)
            for a in range(0, len(xs), args.batch_size):
                traker.featurize(batch=(xs[a:a + args.batch_size], ys[a:a + args.batch_size]),
                                 num_samples=len(xs[a:a + args.batch_size]))
        report["featurize_cpu_s"], report["featurize_wall_s"] = time.process_time() - c0, time.perf_counter() - w0
        report["projector"] = type(traker.projector).__name__
        if not args.featurize_only:
            lam = args.lambda_reg
            if args.relative_reg is not None:
                traker.saver.load_current_store(0)
                g = torch.as_tensor(np.asarray(traker.saver.current_store["grads"]), dtype=torch.float64)
                lam = args.relative_reg * float((g * g).sum()) / g.shape[1]
                traker.score_computer.lambda_reg = lam
            report["lambda_reg"] = lam
            c0, w0 = time.process_time(), time.perf_counter()
            traker.finalize_features()
            for mid, ck in enumerate(ckpts):
                traker.start_scoring_checkpoint(exp_name="q", checkpoint=ck, model_id=mid, num_targets=len(xq))
                for a in range(0, len(xq), args.batch_size):
                    traker.score(batch=(xq[a:a + args.batch_size], yq[a:a + args.batch_size]),
                                 num_samples=len(xq[a:a + args.batch_size]))
            scores = np.asarray(traker.finalize_scores(exp_name="q"), dtype=np.float64).T
            report["score_cpu_s"], report["score_wall_s"] = time.process_time() - c0, time.perf_counter() - w0
            np.savez(args.out, scores=scores)
    finally:
        shutil.rmtree(save_dir, ignore_errors=True)
    report.update({"traker": trak.__version__, "torch": torch.__version__, "numpy": np.__version__,
                   "python": platform.python_version(), "threads": args.threads, "proj_dim": args.proj_dim,
                   "models": len(ckpts), "n_source": len(xs), "n_query": len(xq), "batch_size": args.batch_size})
    with open(os.path.splitext(args.out)[0] + ".json", "w") as fh:
        json.dump(report, fh, indent=1)
    return report


if __name__ == "__main__":
    main()
