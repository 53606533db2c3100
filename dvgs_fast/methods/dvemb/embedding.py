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
# Rows per group of steps in the recursion (see embed()).
_GROUP_ROWS = 256


def embed(traj: GradientStore, n: int, k: int, *, sgd: bool, step_lr: np.ndarray, out_path=None,
          progress=None, check_every: int = 16, exact: bool = False, group_rows: int | None = None,
          stop=None) -> np.ndarray:
    """E [n, k] from a trajectory store of rows [g] (sgd: u = lr/B · g, ``step_lr[step]``) or
    [g | u] (preconditioned), in step order; columns ``index`` and ``step``.

    exact: the recursion in float64 (for a float64 store); otherwise in float32, which the
    recorded rows (float32 / float16) cannot resolve beyond anyway, at half the cost of its
    2·B·k² multiply-adds per step. stop(step) is called between groups of steps (the caller's
    time budget: it raises to end the recursion).

    Steps go in groups of about group_rows rows (whole steps): the k x k matrix M is read once per
    group for all its rows and updated once by a rank-(group rows) product, instead of a rank-B
    update per step -- that update streams all of M through memory for B·k² multiply-adds, at
    half the speed of the GEMM (k = 2410, B = 64, 1 thread: 25 ms per step against 14 ms for
    u Mᵀ). Within a group, each step's correction from the group's later steps is
    (u gᵀ_later) e_later: B x rows x k, small beside the k² terms."""
    index, step = traj.aux("index").astype(np.int64), traj.aux("step").astype(np.int64)
    if index.shape[0] == 0:
        raise ValueError("x_source: the training took no step")
    bounds = np.flatnonzero(np.diff(step)) + 1
    starts = np.concatenate([[0], bounds])
    stops = np.concatenate([bounds, [step.shape[0]]])
    big = n * k * 8 > _IN_MEMORY and out_path is not None
    E = (np.lib.format.open_memmap(out_path, mode="w+", dtype=np.float32, shape=(n, k)) if big
         else np.zeros((n, k), dtype=np.float64))
    dt = torch.float64 if exact else torch.float32
    M = torch.zeros(k, k, dtype=dt)
    for j, (a, b) in enumerate(_groups(starts, stops, group_rows or _GROUP_ROWS)):
        rows = torch.from_numpy(traj.read(int(a), int(b)).astype(np.float64 if exact else np.float32, copy=False))
        g = rows[:, :k]
        if sgd:
            lr = torch.from_numpy(step_lr[step[a:b]].astype(np.float64 if exact else np.float32, copy=False))
            u = g * lr[:, None]
        else:
            u = rows[:, k:2 * k]
        # u M_tᵀ for every row of the group: the part through M at the group's end by one GEMM,
        # the rest (the group's own later steps) by its rows -- M only moves once per group.
        P = u @ M.t()
        e = torch.empty_like(u)
        ends = np.flatnonzero(np.diff(step[a:b])) + 1
        for r0, r1 in reversed(list(zip(np.concatenate([[0], ends]), np.concatenate([ends, [b - a]])))):
            r0, r1 = int(r0), int(r1)
            et = u[r0:r1] - P[r0:r1]
            if r1 < b - a:
                et -= (u[r0:r1] @ g[r1:].t()) @ e[r1:]
            e[r0:r1] = et
            idx = index[a + r0:a + r1]          # distinct within a step: a plain fancy-index add is exact
            E[idx] += et.numpy().astype(E.dtype, copy=False)
        M.addmm_(e.t(), g)
        if j % check_every == 0 and not bool(torch.isfinite(M).all()):
            raise ValueError(f"lr: the embedding diverged at step {int(step[a])} (a non-finite recursion matrix): "
                             f"the training's steps are too large for its first-order propagation; lower lr")
        if progress is not None:
            progress.update(len(ends) + 1)
        if stop is not None:
            stop(int(step[a]))
    if not bool(torch.isfinite(M).all()) or not np.isfinite(np.asarray(E[:min(n, 4096)])).all():
        raise ValueError("lr: the embedding is not finite: the training's steps are too large; lower lr")
    return E


def _groups(starts: np.ndarray, stops: np.ndarray, rows: int):
    """(first row, stop row) of groups of consecutive steps, last steps first, each of about
    `rows` rows (at least one whole step)."""
    i = len(starts) - 1
    while i >= 0:
        j = i
        while j > 0 and stops[i] - starts[j - 1] <= rows:
            j -= 1
        yield int(starts[j]), int(stops[i])
        i = j - 1


__all__ = ["embed"]
