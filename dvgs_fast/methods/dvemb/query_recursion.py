"""The embedding recursion run from the queries' side: the same scores as ⟨q, E_i⟩ without forming E.

embedding.py computes each step's embeddings e_i,t = (I - M_t) u_i,t with M_t = Σ_{s>t} Σ_j e_j gⱼᵀ.
By induction from the last step (M = 0), I - M_t is the product of the later steps' propagators:

    I - M_t = (I - Σ_{j∈B_T} u_j gⱼᵀ) ··· (I - Σ_{j∈B_{t+1}} u_j gⱼᵀ)

since I - M_{t-1} = (I - M_t) - Σ_{j∈B_t} (I - M_t) u_j gⱼᵀ. So a query's score against sample i at
step t is ⟨q, e_i,t⟩ = ⟨w_t, u_i,t⟩ with w_t = (I - M_t)ᵀ q, and w goes backwards by one rank-B
update per step:

    z   = U_t w_t                (B scores: every sample of step t, added to its total)
    w_{t-1} = w_t - G_tᵀ z

2·B·k·Q multiply-adds per step for Q queries, against the embedding's 2·B·k² (then N·k·Q to
score): fewer whenever there are fewer queries than projected dimensions (fit()'s one mean
target gradient: a matrix-vector product per step). What is lost is E itself, i.e. scoring a
new query later without another pass over the recorded steps.
"""
from __future__ import annotations

import numpy as np
import torch

from dvgs_fast.gradstore import GradientStore

# Rows read from the store at a time (whole steps); the steps inside go one by one.
_READ_ROWS = 4096


def query_scores(traj: GradientStore, n: int, queries: torch.Tensor, *, sgd: bool, step_lr: np.ndarray,
                 progress=None, check_every: int = 16, exact: bool = False, stop=None) -> np.ndarray:
    """[n, Q] float64: Σ over the steps sample i took part in of ⟨q, e_i,t⟩ for the columns q of
    ``queries`` [k, Q] -- what E @ queries would be for embed()'s E, from the same store (rows [g] or
    [g | u]; columns ``index`` and ``step``). stop(step) is called between blocks of steps read (the
    caller's time budget: it raises to end the recursion)."""
    index, step = traj.aux("index").astype(np.int64), traj.aux("step").astype(np.int64)
    if index.shape[0] == 0:
        raise ValueError("x_source: the training took no step")
    k = queries.shape[0]
    dt = torch.float64 if exact else torch.float32
    w = queries.to(dt).clone()
    S = np.zeros((n, queries.shape[1]), dtype=np.float64)
    bounds = np.flatnonzero(np.diff(step)) + 1
    starts = np.concatenate([[0], bounds])
    stops = np.concatenate([bounds, [step.shape[0]]])
    done = 0
    hi = len(starts)
    while hi > 0:
        lo = hi - 1                           # whole steps, about _READ_ROWS rows, read in one go
        while lo > 0 and stops[hi - 1] - starts[lo - 1] <= _READ_ROWS:
            lo -= 1
        a, b = int(starts[lo]), int(stops[hi - 1])
        rows = torch.from_numpy(traj.read(a, b).astype(np.float64 if exact else np.float32, copy=False))
        for s in range(hi - 1, lo - 1, -1):
            r0, r1 = int(starts[s]) - a, int(stops[s]) - a
            g = rows[r0:r1, :k]
            u = g * float(step_lr[step[a + r0]]) if sgd else rows[r0:r1, k:2 * k]
            z = u @ w
            idx = index[a + r0:a + r1]        # distinct within a step: a plain fancy-index add is exact
            S[idx] += z.numpy()
            w.addmm_(g.t(), z, alpha=-1.0)
            done += 1
            if done % check_every == 0 and not bool(torch.isfinite(w).all()):
                raise ValueError(f"lr: the embedding diverged at step {int(step[a + r0])} (non-finite propagated "
                                 f"queries): the training's steps are too large for its first-order "
                                 f"propagation; lower lr")
        if progress is not None:
            progress.update(hi - lo)
        if stop is not None:
            stop(int(step[a]))
        hi = lo
    if not bool(torch.isfinite(w).all()) or not np.isfinite(S).all():
        raise ValueError("lr: the embedding is not finite: the training's steps are too large; lower lr")
    return S


__all__ = ["query_scores"]
