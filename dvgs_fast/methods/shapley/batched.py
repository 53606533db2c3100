"""Data Shapley's permutations on the batched refit grid (dvgs_fast.refit.batched.GridTrainer).

TMC: P permutations in flight ("slots") x C consecutive prefixes each; truncation is decided
afterwards, per slot and position, by the same `PermState` state machine as the sequential loop,
and work computed past a slot's truncation point is discarded. Finished slots are refilled with
the next permutation, so the grid stays full. G-Shapley: P permutations whose one-epoch SGD
trajectories advance in lock-step.
"""
from __future__ import annotations

import numpy as np
import torch

from dvgs_fast.methods.shapley.tmc import PermState, PermutationDriver
from dvgs_fast.refit.batched import BudgetHit, GridTrainer
from dvgs_fast.refit.models import stack_params


# ---------------------------------------------------------------------------------------------
# batched TMC-Shapley
# ---------------------------------------------------------------------------------------------

def tmc_batched(grid: GridTrainer, X, Y, Xt, Yt, *, driver: PermutationDriver, make_state,
                n_slots: int, chunk: int) -> str | None:
    budget = driver.budget
    N = X.shape[0]
    slots: list[PermState] = []
    rows_cache: dict[int, torch.Tensor] = {}
    while True:
        while len(slots) < n_slots and driver.can_issue():
            idx, perm = driver.issue()
            st = make_state(idx, perm)
            slots.append(st)
            rows_cache[idx] = perm.to(X.device)
        if not slots:
            return None
        if budget.time_up():
            return "max_time"
        # slots whose whole chunk lies before class coverage need no models at all
        busy = [s for s in slots if s.pos + chunk >= s.cover_len]
        for s in slots:
            if s not in busy:
                for _ in range(chunk):
                    if s.done:
                        break
                    s.feed(None)
        scores = None
        if busy:
            L = min(N, max(s.pos + chunk for s in busy))
            rows = torch.stack([rows_cache[s.index][:L] for s in busy])  # [P, L]
            Xp, Yp = X[rows], Y[rows]
            ks = torch.tensor([[min(s.pos + j + 1, N) for j in range(chunk)] for s in busy], device=X.device)
            M = (torch.arange(L, device=X.device).view(1, 1, L) < ks.unsqueeze(-1)).to(X.dtype)
            try:      # a grid can train for seconds: the budget is asked between its steps
                params = grid.train(Xp, Yp, M, stop=budget.time_up)
            except BudgetHit:
                return "max_time"
            driver.refitted(len(busy) * chunk)
            scores = grid.score(params, Xt, Yt).to("cpu", torch.float64).numpy()  # [P, C]
        for p, s in enumerate(busy):
            for j in range(chunk):
                if s.done:
                    break
                s.feed(scores[p, j] if s.needs_refit() else None)
        for s in slots:
            if s.done:
                driver.complete(s.index, s.marg, s.refits, s.truncated)
                rows_cache.pop(s.index, None)
        slots = [s for s in slots if not s.done]
        if driver.converged_at is not None:
            return None


# ---------------------------------------------------------------------------------------------
# batched G-Shapley
# ---------------------------------------------------------------------------------------------

def gshapley_batched(grid: GridTrainer, init_fn, X, Y, Xt, Yt, *, lr: float, driver: PermutationDriver,
                     n_slots: int) -> str | None:
    """P permutations at once; their SGD trajectories advance in lock-step."""
    budget = driver.budget
    N = X.shape[0]
    while driver.can_issue():
        if budget.time_up():
            return "max_time"
        group = []
        while len(group) < n_slots and driver.can_issue():
            group.append(driver.issue())
        idxs = [g[0] for g in group]
        perms = torch.stack([g[1] for g in group]).to(X.device)  # [P, N]
        params = stack_params([init_fn(i) for i in idxs])
        P = len(group)
        marg = np.zeros((P, N), dtype=np.float64)
        prev = grid.score(params, Xt, Yt).to("cpu", torch.float64).numpy()
        perms_np = perms.cpu().numpy()
        ar = np.arange(P)
        for t in range(N):
            rows = perms[:, t]
            params = grid.sgd_step(params, X[rows], Y[rows], lr)
            new = grid.score(params, Xt, Yt).to("cpu", torch.float64).numpy()
            marg[ar, perms_np[:, t]] = new - prev
            prev = new
            driver.refitted(P)
            if budget.time_up():
                return "max_time"
        for p, i in enumerate(idxs):
            driver.complete(i, marg[p], N, False)
        if driver.converged_at is not None:
            return None
    return None
