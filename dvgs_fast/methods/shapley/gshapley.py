"""G-Shapley (Ghorbani & Zou 2019): one fresh model per permutation, one epoch of SGD with
batch size 1 in the permutation's order; marginal[i] = target score after the step on i -
target score before it. Sequential reference and P permutations in lock-step on the batched
grid; both hand their marginals to the semivalue driver (`semivalues.driver`).
"""
from __future__ import annotations

import numpy as np
import torch

from dvgs_fast._validation import diverged
from dvgs_fast.refit.batched import one_epoch_scores
from dvgs_fast.refit.models import fresh_params, stack_params


def gshapley_sequential(refitter, init_fn, X, Y, Xt, Yt, *, lr: float, driver) -> str | None:
    """One fresh model per permutation, SGD with batch size 1, score after every step."""
    while driver.can_issue():
        if driver.time_up():
            return "max_time"
        idx, perm = driver.issue()
        params = init_fn(idx)
        marg = np.zeros(driver.n, dtype=np.float64)
        prev = float(refitter.score(params, Xt, Yt))
        for j in perm.tolist():
            params = refitter.sgd_step(params, X[j], Y[j], lr)
            new = float(refitter.score(params, Xt, Yt))
            marg[j] = new - prev
            prev = new
            if driver.time_up():
                return "max_time"
        driver.complete(idx, marg, driver.n, 0.0)
    return None


def gshapley_batched(grid, init_fn, X, Y, Xt, Yt, *, lr: float, driver, n_slots: int) -> str | None:
    """P permutations at once; their SGD trajectories advance in lock-step."""
    N = X.shape[0]
    while driver.can_issue():
        if driver.time_up():
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
            if driver.time_up():
                return "max_time"
        for p, i in enumerate(idxs):
            driver.complete(i, marg[p], N, 0.0)
        if driver.stopped:
            return None
    return None


def run_gshapley(u, driver, *, seed: int, lr: float | None, batched: bool, n_slots: int,
                 info: dict) -> str | None:
    """G-Shapley over `driver`'s permutations on the utility's model (`semivalues.utility`)."""
    X, Y, Xt, Yt = u.X, u.Y, u.Xt, u.Yt

    def init_fn(i: int):
        s = int(np.random.SeedSequence([seed, 104729, i]).generate_state(1)[0])
        return fresh_params(u.module, s)

    if lr is None:
        lr = search_lr(u.grid, u.module, X, Y, Xt, Yt, np.random.SeedSequence([seed, 7919]))
        info["g_learning_rate_searched"] = lr
    info["g_learning_rate"] = lr
    if batched:
        return gshapley_batched(u.grid, init_fn, X, Y, Xt, Yt, lr=lr, driver=driver, n_slots=n_slots)
    return gshapley_sequential(u.refitter, init_fn, X, Y, Xt, Yt, lr=lr, driver=driver)


def search_lr(grid, module, X, Y, Xt, Yt, seed_seq) -> float:
    """The original `_one_step_lr`: 10**-i for i in 1..4.5 (step .5), 10 runs each, one epoch of
    SGD (batch size 1), keep the best mean - std of the target score. Runs batched in both modes."""
    cands = [10.0 ** (-i) for i in np.arange(1, 5, 0.5)]
    reps = 10
    st = seed_seq.generate_state(2)
    g = torch.Generator().manual_seed(int(st[0]))
    N = X.shape[0]
    perms = torch.stack([torch.randperm(N, generator=g) for _ in range(len(cands) * reps)]).to(X.device)
    inits = stack_params([fresh_params(module, int(st[1]) + j) for j in range(len(cands) * reps)])
    lrs = torch.tensor([c for c in cands for _ in range(reps)], dtype=X.dtype, device=X.device)
    scores = one_epoch_scores(grid, inits, X, Y, Xt, Yt, perms, lrs).to("cpu", torch.float64).numpy()
    scores = scores.reshape(len(cands), reps)
    crit = scores.mean(1) - scores.std(1)
    # a candidate with a diverged run is out (np.argmax would pick a NaN first)
    crit = np.where(np.isfinite(crit), crit, -np.inf)
    if not np.isfinite(crit).any():
        raise diverged("DataShapley (G-Shapley)", "the target score of every candidate learning rate",
                       float("nan"), f"the learning-rate search ({cands[0]:g} ... {cands[-1]:g})",
                       lr_name="g_learning_rate")
    return float(cands[int(np.argmax(crit))])
