"""The data value embedding: the backward recursion over a recorded training run (Wang et al.
2024, "Capturing the Temporal Dependence of Training Data Influence", the recursion of their
Algorithm 1 as dattri's DVEmb computes it).

Removing sample i from step t moves θ_{t+1} by +u_i (its share of the step); every later step s
then moves differently because its samples' gradients changed, by (Gauss-Newton, per sample)
g_j g_jᵀ Δθ each, and that change is again carried to θ_T through those samples' own
embeddings. Going backwards from the last step, with M = Σ_{s>t} Σ_{j∈B_s} e_j g_jᵀ (what a
unit change of θ at step t does to θ_T beyond itself):

    e_i,t = u_i - M u_i            (in rows: e = u - u Mᵀ)
    E_i  += e_i,t                  (sample i's embedding: every step it took part in)
    M    += Σ_{j∈B_t} e_j g_jᵀ     (eᵀ g with rows e, g)

and removing i changes a query's loss at θ_T by about ⟨∇ℓ(q; θ_T), E_i⟩: the score of the
attribute() contract (> 0: i helped q). Everything is in the projected space of the recording
(trajectory.py): M is k x k, E is N x k -- the memory the method needs besides one step's rows.

The steps are read back from the store in reverse, a block of steps at a time; E is a
memory-mapped float32 [N, k] file beside the store when N·k is large, else in memory.
"""
from __future__ import annotations

import numpy as np
import torch

from dvgs_fast.gradstore import GradientStore

# Keep E in memory below this many bytes (float64); above, a float32 memory map.
_IN_MEMORY = 256 << 20


def embed(traj: GradientStore, n: int, k: int, *, sgd: bool, step_lr: np.ndarray, out_path=None,
          progress=None, check_every: int = 64) -> np.ndarray:
    """E [n, k] from a trajectory store of rows [g] (sgd: u = lr/B · g, ``step_lr[step]``) or
    [g | u] (preconditioned), in step order; columns ``index`` and ``step``."""
    index, step = traj.aux("index").astype(np.int64), traj.aux("step").astype(np.int64)
    if index.shape[0] == 0:
        raise ValueError("x_source: the training took no step")
    bounds = np.flatnonzero(np.diff(step)) + 1
    starts = np.concatenate([[0], bounds])
    stops = np.concatenate([bounds, [step.shape[0]]])
    big = n * k * 8 > _IN_MEMORY and out_path is not None
    E = (np.lib.format.open_memmap(out_path, mode="w+", dtype=np.float32, shape=(n, k)) if big
         else np.zeros((n, k), dtype=np.float64))
    dt = torch.float64
    M = torch.zeros(k, k, dtype=dt)
    for j, (a, b) in enumerate(zip(starts[::-1], stops[::-1])):
        rows = torch.from_numpy(traj.read(int(a), int(b)).astype(np.float64, copy=False))
        g = rows[:, :k]
        u = g * float(step_lr[step[a]]) if sgd else rows[:, k:2 * k]
        e = u - u @ M.t()
        idx = index[a:b]                        # distinct within a step: a plain fancy-index add is exact
        E[idx] += e.numpy().astype(E.dtype, copy=False)
        M.addmm_(e.t(), g)
        if j % check_every == 0 and not bool(torch.isfinite(M).all()):
            raise ValueError(f"lr: the embedding diverged at step {int(step[a])} (a non-finite recursion matrix): "
                             f"the training's steps are too large for its first-order propagation; lower lr")
        if progress is not None:
            progress.update(1)
    if not bool(torch.isfinite(M).all()) or not np.isfinite(np.asarray(E[:min(n, 4096)])).all():
        raise ValueError("lr: the embedding is not finite: the training's steps are too large; lower lr")
    return E


__all__ = ["embed"]
