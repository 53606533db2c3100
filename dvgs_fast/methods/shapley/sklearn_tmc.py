"""TMC-Shapley with a scikit-learn estimator as the refit model.

Each permutation runs the sequential TMC loop (`tmc.PermState`, the same truncation logic as the
torch paths) with one fitted clone per prefix (`dvgs_fast.refit.sklearn.SklearnRefit`). The
permutations of a round (``n_parallel`` of them, drawn from the driver in order) are independent,
so they run in parallel on joblib workers; their marginals are handed back to the driver in
permutation order, so the values do not depend on ``n_jobs`` and a torchrun driver
(`sharded.py`) works unchanged. A wall-clock budget reaches the workers as a deadline: a
permutation that passes it is dropped, as in the sequential loop.
"""
from __future__ import annotations

import time

import numpy as np

from dvgs_fast.methods.shapley.tmc import PermState, PermutationDriver
from dvgs_fast.refit.sklearn import SklearnRefit


def tmc_sklearn(refit: SklearnRefit, X: np.ndarray, Y: np.ndarray, Xt: np.ndarray, Yt: np.ndarray, *,
                driver: PermutationDriver, make_state, n_parallel: int) -> str | None:
    """Run permutations until the driver stops issuing them; 'max_time' if the budget ran out."""
    budget = driver.budget
    while True:
        group = []
        while len(group) < n_parallel and driver.can_issue():
            group.append(make_state(*driver.issue()))
        if not group:
            return None
        if budget.time_up():
            return "max_time"
        deadline = None
        if budget.max_time is not None:   # the budget's clock is per process: hand workers wall time
            deadline = time.time() + (budget.max_time - budget.elapsed())
        n_tasks = max(1, min(len(group), refit.workers()))
        parts = [p for p in np.array_split(np.arange(len(group)), n_tasks) if len(p)]
        res = refit.map(_run_states, [(refit, X, Y, Xt, Yt, [group[i] for i in p], deadline) for p in parts])
        finished = [st for chunk in res for st in chunk]
        timed_out = False
        for st in finished:
            if st is None:
                timed_out = True
                continue
            driver.refitted(st.refits)
            driver.complete(st.index, st.marg, st.refits, st.truncated)
        if timed_out:
            return "max_time"
        if driver.converged_at is not None:
            return None


def _run_states(refit: SklearnRefit, X, Y, Xt, Yt, states: list[PermState], deadline: float | None) -> list:
    """Run each permutation to its end (or truncation); None for one cut off by the deadline."""
    out = []
    for st in states:
        while not st.done:
            if deadline is not None and time.time() >= deadline:
                break
            if st.needs_refit():
                st.feed(refit.fit_score(X, Y, Xt, Yt, rows=st.perm[:st.pos + 1]))
            else:
                st.feed(None)
        out.append(st if st.done else None)
    return out
