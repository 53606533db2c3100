"""The compat layer's own DVGS loop, for what the engine's DVGS cannot express:

* a similarity callable that is none of cosine / dot / projection / distance (scored on explicit
  per-sample gradients, the original's route, and called exactly as the original calls it);
* a target criterion that is not the (class-weighted) mean of the per-sample source criterion
  (e.g. a sum-reduced loss, a label-smoothed target loss);
* an optimizer class other than Adam / AdamW / SGD (any ``optim(params, lr=, weight_decay=)``);
* a model whose own ``reset_parameters()`` re-initialises other tensors than the engine's restart
  would (e.g. a model that resets only its head).

It is the original algorithm step for step: every restart calls the model's own
``reset_parameters()`` and builds ``optim(model.parameters(), lr=lr, weight_decay=wd)``; every
target mini-batch computes ``target_crit`` in train mode; when the global step counter (never
reset) is a multiple of ``compute_every`` every source sample's ``source_crit`` gradient (a batch
of one) is compared with the target gradient before the optimizer step. The target order is
drawn from a generator seeded with the run's seed (as the engine does), so with a known
similarity and the engine-compatible settings it gives the engine's values.

With a known similarity the source gradients' statistics come from the engine's FastScorer
(per-layer, no per-sample gradient vectors); otherwise from ``per_sample_grads`` (torch.func).
While scoring, BatchNorm layers run in eval mode and buffers are restored afterwards, as in the
engine (a per-sample gradient is undefined under batch statistics).
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from dvgs_fast.grads import FrozenStatistics

from .._utils import iter_chunks
from ._identify import reset_model


def run_loop(model: nn.Module, *, xs: torch.Tensor, ys: torch.Tensor, xt: torch.Tensor, yt: torch.Tensor,
             target_loss: Callable, sample_loss: Callable, similarity: Any, kind: str | None, names: list[str],
             optim: Any, lr: float, wd: float, restarts: int, epochs: int, compute_every: int,
             target_batch_size: int, source_batch_size: int, device: torch.device, seed: int, writer,
             progress: bool) -> dict:
    """Run the original loop; snapshots go to `writer`. Returns sums and counters."""
    from tqdm.auto import tqdm

    from dvgs_fast.grads import FastScorer, per_sample_grads

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    n = xs.shape[0]
    selected = [(nm, p) for nm, p in model.named_parameters() if nm in set(names)]
    scorer = FastScorer(model, names, sample_loss, kind, 1e-8) if kind is not None else None
    s1 = np.zeros(n, dtype=np.float64)
    s2 = np.zeros(n, dtype=np.float64)
    step = k = 0
    t_score = 0.0
    bar = tqdm(total=restarts * epochs, disable=not progress, desc="DVGS (compat loop)", unit="epoch", leave=False)
    try:
        for restart in range(restarts):
            if restart > 0:
                reset_model(model)
            opt = optim(model.parameters(), lr=lr, weight_decay=wd)
            for _epoch in range(epochs):
                for idx in torch.randperm(xt.shape[0], generator=gen).split(target_batch_size):
                    idx = idx.to(device)
                    model.train()
                    loss = target_loss(model(xt[idx]), yt[idx])
                    opt.zero_grad()
                    loss.backward()
                    if step % compute_every == 0:
                        t0 = time.perf_counter()
                        G = {nm: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
                             for nm, p in selected}
                        sims = np.empty(n, dtype=np.float64 if xs.dtype == torch.float64 else np.float32)
                        with FrozenStatistics(model):
                            if scorer is not None:
                                target = scorer.target(G)
                            else:
                                flat_G = torch.cat([G[nm].reshape(-1) for nm in names])
                            for a, b in iter_chunks(n, source_batch_size):
                                x = xs[a:b].to(device)
                                y = ys[a:b].to(device)
                                if scorer is not None:
                                    sim = scorer.score(x, y, target)
                                else:
                                    g = per_sample_grads(model, names, x, y, sample_loss)
                                    flat = torch.cat([g[nm].reshape(b - a, -1) for nm in names], dim=1)
                                    sim = similarity(flat_G.unsqueeze(0).expand(b - a, -1), flat)
                                    if not isinstance(sim, torch.Tensor) or sim.numel() != b - a:
                                        raise ValueError(f"similarity: returned "
                                                         f"{tuple(sim.shape) if isinstance(sim, torch.Tensor) else type(sim).__name__}"
                                                         f" for {b - a} samples; expected [{b - a}]")
                                sims[a:b] = sim.detach().reshape(-1).cpu().numpy()
                        writer.write(k, sims)
                        s1 += sims
                        s2 += sims.astype(np.float64) ** 2
                        k += 1
                        t_score += time.perf_counter() - t0
                    opt.step()
                    step += 1
                bar.update(1)
                bar.set_postfix(snapshots=k, refresh=False)
    finally:
        bar.close()
    return {"s1": s1, "s2": s2, "k": k, "steps": step, "score_time": t_score}


def n_snapshots(n_target: int, target_batch_size: int, epochs: int, restarts: int, compute_every: int) -> int:
    return math.ceil(restarts * epochs * math.ceil(n_target / target_batch_size) / compute_every)


__all__ = ["run_loop", "n_snapshots"]
