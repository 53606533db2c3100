"""Why TracIn and In-Run Data Shapley value the *noisiest* LINCS rows highest (bench/QUALITY.md,
lincs), while DVGS values them lowest. TracIn and In-Run train on the (noisy) source and credit a
row with the dot product of its loss gradient and the target's; DVGS trains on the clean target
and averages the cosine over every step.

Same data as the quality run (lincs:test_l1000_highprecision.gctx z-scored, 300 source / 77
target, sigma ~ U(0, 5), split seed 0), the exp8 autoencoder trained with Adam 1e-3 on the
target (as DVGS) or on the source (full batch; as TracIn / In-Run, which use mini-batches);
prints, at a few points of training, Spearman(sigma, x) for the per-row gradient norm, the
per-row loss, the dot product and the cosine with the target gradient.

    OMP_NUM_THREADS=1 nice -n 10 python3 bench/quality/investigate/lincs_grad_norm.py
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from dvgs_fast.cli import _data as D
from dvgs_fast.cli import _models as M

torch.set_num_threads(1)
root = Path(os.environ.get("DVGS_FAST_DATA", Path(__file__).resolve().parents[4] / "shared" / "data"))
ld = D.load(D.DatasetSpec("lincs", root / "lincs/test_l1000_highprecision.gctx"), None)
data = D.split_and_corrupt(ld, 300, 77, 0, D.Noise("feature", 5.0), seed=0)
xs, xt = torch.from_numpy(data.x_source), torch.from_numpy(data.x_target)


def flat_grad(loss, params):
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])


for train_on, xtrain in (("target", xt), ("source", xs)):
    torch.manual_seed(0)
    model = M.factory("autoencoder", (978,), 0, hidden=250, dropout=0.0, num_layers=2, latent=32)()
    params = list(model.parameters())
    opt = torch.optim.Adam(params, lr=1e-3)
    for step in range(0, 501):
        if step in (0, 10, 100, 500):
            gt = flat_grad(torch.nn.functional.mse_loss(model(xt), xt), params)
            rows = []
            for i in range(xs.shape[0]):
                x = xs[i:i + 1]
                loss = torch.nn.functional.mse_loss(model(x), x)
                g = flat_grad(loss, params)
                rows.append((g.norm().item(), loss.item(), (g @ gt).item(),
                             torch.nn.functional.cosine_similarity(g, gt, 0).item()))
            r = np.array(rows)
            sp = [spearmanr(data.sigma, r[:, k])[0] for k in range(4)]
            print(f"trained on the {train_on}, step {step:4d}: Spearman(sigma, .): grad norm {sp[0]:+.3f}, "
                  f"loss {sp[1]:+.3f}, dot with target grad {sp[2]:+.3f}, cosine {sp[3]:+.3f}", flush=True)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(xtrain), xtrain).backward()
        opt.step()
