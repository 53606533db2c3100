"""Monte-Carlo Shapley bookkeeping and the sequential reference loops (TMC- and G-Shapley).

The reference loops follow Ghorbani & Zou (2019) and their code (DShap.py):

TMC-Shapley, one permutation pi of the source points:
    prev = chance score (empty prefix); counter = 0
    for n, i in enumerate(pi):
        if the prefix pi[:n+1] contains every class present in the target set:
            new = score on the target set of a model refit on pi[:n+1]
        else:
            new = prev                                   (no refit; as the original)
        marginal[i] = new - prev; prev = new
        if |new - full_score| <= tolerance * |full_score|: counter += 1, stop after `patience` in a row
        else: counter = 0
    points after the truncation point get marginal 0.

G-Shapley, one permutation: a fresh model, one epoch of SGD with batch size 1 in the order pi;
marginal[i] = target score after the step on i - target score before it.

Values are the mean marginal over permutations. Stopping: the original convergence criterion
(`convergence_error` below < convergence_tol, checked every `check_every` permutations once at
least 100 are done), a maximum number of permutations, or a wall-clock budget.

``PermState`` holds the per-permutation state machine and is shared with the batched path, so
both paths apply exactly the same truncation logic to the scores they compute.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch


def convergence_error(mem: np.ndarray) -> float:
    """The original DShap `error`: mean relative change of the running means over the last 100
    permutations (max over those 100); 1.0 while fewer than 100 permutations are done."""
    if len(mem) < 100:
        return 1.0
    counts = np.arange(1, len(mem) + 1, dtype=np.float64).reshape(-1, 1)
    all_vals = (np.cumsum(mem, 0) / counts)[-100:]
    errors = np.mean(np.abs(all_vals - all_vals[-1:]) / (np.abs(all_vals[-1:]) + 1e-12), -1)
    return float(np.max(errors))


def cover_length(perm: np.ndarray, y_source: np.ndarray | None, required: np.ndarray | None) -> int:
    """Smallest prefix length of `perm` that contains every required class (N+1 if never)."""
    if y_source is None or required is None or len(required) == 0:
        return 1
    ys = y_source[perm]
    first = []
    for c in required:
        hits = np.flatnonzero(ys == c)
        if len(hits) == 0:
            return len(perm) + 1
        first.append(hits[0])
    return int(max(first)) + 1


class PermState:
    """One TMC permutation in progress."""

    __slots__ = ("index", "perm", "perm_t", "cover_len", "pos", "prev", "counter", "marg", "done",
                 "refits", "truncated", "_full", "_tol", "_patience")

    def __init__(self, index: int, perm: torch.Tensor, cover_len: int, chance: float, full: float,
                 tolerance: float, patience: int):
        self.index = index
        self.perm_t = perm
        self.perm = perm.numpy()
        self.cover_len = cover_len
        self.pos = 0
        self.prev = chance
        self.counter = 0
        self.marg = np.zeros(len(self.perm), dtype=np.float64)
        self.done = False
        self.refits = 0
        self.truncated = False
        self._full = full
        self._tol = tolerance * abs(full)
        self._patience = patience

    def needs_refit(self) -> bool:
        return self.pos + 1 >= self.cover_len

    def feed(self, score: float | None) -> bool:
        """Advance by one point given the score of the prefix ending there (None: no refit)."""
        if score is None:
            new = self.prev
        else:
            new = float(score)
            self.refits += 1
        self.marg[self.perm[self.pos]] = new - self.prev
        self.prev = new
        self.pos += 1
        if abs(new - self._full) <= self._tol:
            self.counter += 1
            if self.counter >= self._patience:
                self.done = self.truncated = True
        else:
            self.counter = 0
        if self.pos >= len(self.perm):
            self.done = True
        return self.done


class PermutationDriver:
    """Issues permutations in a fixed order and collects their marginals.

    Permutation i is the i-th ``torch.randperm`` draw of a generator seeded once, whichever path
    asks for it, so the sequential and batched paths see the same permutations.
    """

    def __init__(self, n: int, seed: int, *, max_permutations: int | None, convergence_tol: float | None,
                 check_every: int, budget, on_complete: Callable[[int], None] | None = None):
        self.n = n
        self.gen = torch.Generator().manual_seed(seed)
        self.max_permutations = max_permutations
        self.convergence_tol = convergence_tol
        self.check_every = check_every
        self.budget = budget
        self.issued = 0
        self.completed: dict[int, np.ndarray] = {}
        self.contiguous = 0
        self.converged_at: int | None = None
        self.last_error: float | None = None
        self.on_complete = on_complete
        self.on_refits: Callable[[int], None] | None = None     # progress within permutations
        self.stats: dict[int, tuple[int, bool]] = {}

    def refitted(self, n: int) -> None:
        """n more models refit (or SGD steps taken): the progress bar moves within a permutation."""
        if self.on_refits is not None:
            self.on_refits(n)

    def can_issue(self) -> bool:
        if self.converged_at is not None:
            return False
        return self.max_permutations is None or self.issued < self.max_permutations

    def issue(self) -> tuple[int, torch.Tensor]:
        perm = torch.randperm(self.n, generator=self.gen)
        idx = self.issued
        self.issued += 1
        return idx, perm

    def complete(self, index: int, marg: np.ndarray, refits: int = 0, truncated: bool = False) -> None:
        if self.converged_at is not None:
            return
        self.completed[index] = marg
        self.stats[index] = (refits, truncated)
        if self.on_complete is not None:
            self.on_complete(1)
        while self.contiguous in self.completed:
            self.contiguous += 1
            m = self.contiguous
            if (self.convergence_tol is not None and m >= 100 and m % self.check_every == 0):
                self.last_error = convergence_error(np.stack([self.completed[i] for i in range(m)]))
                if self.last_error < self.convergence_tol:
                    self.converged_at = m
                    return

    def used_indices(self) -> list[int]:
        if self.converged_at is not None:
            return list(range(self.converged_at))
        return sorted(self.completed)

    def marginals(self) -> np.ndarray:
        idx = self.used_indices()
        if not idx:
            return np.zeros((0, self.n))
        return np.stack([self.completed[i] for i in idx])

    def stop_reason(self) -> str:
        if self.converged_at is not None:
            return "converged"
        if self.max_permutations is not None and len(self.completed) >= self.max_permutations:
            return "max_permutations"
        if self.budget.time_up():
            return "max_time"
        return "completed"


# ---------------------------------------------------------------------------------------------
# sequential reference loops
# ---------------------------------------------------------------------------------------------

def tmc_sequential(refitter, theta0, X, Y, Xt, Yt, *, driver: PermutationDriver, make_state) -> str | None:
    """Refit one model per prefix, one after another. Returns 'max_time' if stopped mid-way."""
    budget = driver.budget
    while driver.can_issue():
        if budget.time_up():
            return "max_time"
        idx, perm = driver.issue()
        st: PermState = make_state(idx, perm)
        perm_d = perm.to(X.device)
        while not st.done:
            if st.needs_refit():
                k = st.pos + 1
                rows = perm_d[:k]
                params = refitter.train(theta0, X[rows], Y[rows], torch.ones(k, dtype=X.dtype, device=X.device))
                st.feed(float(refitter.score(params, Xt, Yt)))
                driver.refitted(1)
            else:
                st.feed(None)
            if budget.time_up() and not st.done:
                return "max_time"
        driver.complete(idx, st.marg, st.refits, st.truncated)
    return None


def gshapley_sequential(refitter, init_fn, X, Y, Xt, Yt, *, lr: float, driver: PermutationDriver) -> str | None:
    """One fresh model per permutation, SGD with batch size 1, score after every step."""
    budget = driver.budget
    while driver.can_issue():
        if budget.time_up():
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
            driver.refitted(1)
            if budget.time_up():
                return "max_time"
        driver.complete(idx, marg, driver.n, False)
    return None
