"""Permutation sampling: the marginals of every point along random permutations (TMC).

One permutation pi gives every point i the marginal U(pi_<i + i) - U(pi_<i) at its position
k (the size of the prefix it joins). The prefix scores come from refits on the prefixes,
computed by one of three loops that share the bookkeeping of ``PermState``:

* ``tmc_sequential``: one refit after another (the reference);
* ``tmc_batched``: P permutations in flight ("slots") x C consecutive prefixes each, trained as
  one grid of models (`refit.batched.GridTrainer`); finished slots are refilled so the grid
  stays full; work computed past a slot's truncation point is discarded;
* ``tmc_sklearn``: a scikit-learn estimator, the permutations of a round on joblib workers.

``PermState`` is the per-permutation state machine of Ghorbani & Zou's TMC code: no refit while
the prefix lacks a target class (the score stays the chance score), truncation once
``patience`` consecutive scores are within ``tolerance * |full score|`` of the full-data score
(later points get marginal 0; ``tolerance=None``: never), and the semivalue's importance weight
of each position (``weights``; None for Shapley, whose weights are all 1).

What a permutation is comes from the draw function given to the driver: uniform
(`uniform_draw`), group-ordered for asymmetric Shapley (`group_ordered_draw`: every point of an
earlier group before every point of a later one, random within groups), or a given first point
(`first_fixed_draw`: the resampling-variance estimators, `resampling.py`).
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch

from dvgs_fast.refit.optim import BudgetHit

# ---------------------------------------------------------------------------------------------
# what a permutation is
# ---------------------------------------------------------------------------------------------


def uniform_draw(n: int) -> Callable[[torch.Generator], torch.Tensor]:
    return lambda g: torch.randperm(n, generator=g)


def group_ordered_draw(groups: list[np.ndarray]) -> Callable[[torch.Generator], torch.Tensor]:
    """Permutations of the concatenated groups, each group shuffled in place (in order)."""
    members = [torch.as_tensor(np.asarray(gr, dtype=np.int64)) for gr in groups]
    return lambda g: torch.cat([m[torch.randperm(len(m), generator=g)] for m in members])


def first_fixed_draw(n: int, first: int) -> Callable[[torch.Generator], torch.Tensor]:
    """Permutations that start with point `first`, the rest uniform."""
    rest = torch.as_tensor(np.delete(np.arange(n), first))
    head = torch.tensor([first])
    return lambda g: torch.cat([head, rest[torch.randperm(n - 1, generator=g)]])


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
    """One permutation in progress (see the module doc)."""

    __slots__ = ("index", "perm", "perm_t", "cover_len", "pos", "prev", "counter", "marg", "done",
                 "refits", "fresh", "truncated", "keys", "_full", "_tol", "_patience", "_weights")

    def __init__(self, index: int, perm: torch.Tensor, cover_len: int, chance: float, full: float,
                 tolerance: float | None, patience: int, weights: np.ndarray | None = None,
                 keys: tuple[np.ndarray, np.ndarray] | None = None):
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
        self.fresh = 0          # refits run by a joblib worker (counted back in the main process)
        self.truncated = False
        self.keys = keys
        self._full = full
        self._tol = None if tolerance is None else tolerance * abs(full)
        self._patience = patience
        self._weights = weights

    def needs_refit(self) -> bool:
        return self.pos + 1 >= self.cover_len

    def key(self, offset: int = 0):
        """Subset-hash key of the prefix ending `offset` points after the current one."""
        p = self.pos + offset
        return (int(self.keys[0][p]), int(self.keys[1][p]))

    def feed(self, score: float | None) -> bool:
        """Advance by one point given the score of the prefix ending there (None: no refit).
        ``refits`` counts the prefixes scored, refit or taken from the cache alike."""
        if score is None:
            new = self.prev
        else:
            new = float(score)
            self.refits += 1
        d = new - self.prev
        self.marg[self.perm[self.pos]] = d if self._weights is None else d * self._weights[self.pos]
        self.prev = new
        self.pos += 1
        if self._tol is not None and abs(new - self._full) <= self._tol:
            self.counter += 1
            if self.counter >= self._patience:
                self.done = self.truncated = True
        else:
            self.counter = 0
        if self.pos >= len(self.perm):
            self.done = True
        return self.done


def _complete(driver, st: PermState) -> None:
    driver.complete(st.index, st.marg, st.refits, float(st.truncated))


# ---------------------------------------------------------------------------------------------
# the loops
# ---------------------------------------------------------------------------------------------

def tmc_sequential(u, *, driver, make_state) -> str | None:
    """Refit one model per prefix, one after another. Returns 'max_time' if stopped mid-way."""
    X, Y = u.X, u.Y
    cache = u.cache
    while driver.can_issue():
        if driver.time_up():
            return "max_time"
        idx, perm = driver.issue()
        st: PermState = make_state(idx, perm)
        perm_d = perm.to(X.device)
        while not st.done:
            if st.needs_refit():
                hit = cache.get(st.key()) if cache is not None else None
                if hit is not None:
                    st.feed(hit)
                else:
                    k = st.pos + 1
                    rows = perm_d[:k]
                    params = u.refitter.train(u.theta0, X[rows], Y[rows], torch.ones(k, dtype=X.dtype, device=X.device))
                    score = float(u.refitter.score(params, u.Xt, u.Yt))
                    u.refits += 1
                    driver.refitted(1)
                    if cache is not None:
                        cache.put(st.key(), score)
                    st.feed(score)
            else:
                st.feed(None)
            if driver.time_up() and not st.done:
                return "max_time"
        _complete(driver, st)
    return None


def tmc_batched(u, *, driver, make_state, n_slots: int, chunk: int) -> str | None:
    X, Y, Xt, Yt, grid, cache = u.X, u.Y, u.Xt, u.Yt, u.grid, u.cache
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
        if driver.time_up():
            return "max_time"
        # slots whose whole chunk lies before class coverage need no models at all; slots whose
        # needed prefixes are all cached need none either
        busy = []
        for s in slots:
            if s.pos + chunk < s.cover_len:
                _advance(s, chunk, None)
            elif cache is not None and _all_cached(s, chunk, cache):
                _advance(s, chunk, cache)
            else:
                busy.append(s)
        if busy:
            C = min(chunk, max(N - s.pos for s in busy))     # no columns past every permutation's end
            L = min(N, max(s.pos + C for s in busy))
            rows = torch.stack([rows_cache[s.index][:L] for s in busy])  # [P, L]
            Xp, Yp = X[rows], Y[rows]
            ks = torch.tensor([[min(s.pos + j + 1, N) for j in range(C)] for s in busy], device=X.device)
            M = (torch.arange(L, device=X.device).view(1, 1, L) < ks.unsqueeze(-1)).to(X.dtype)
            try:
                # asked between the grid's optimizer steps: one grid can train for seconds
                params = grid.train(Xp, Yp, M, stop=driver.time_up)
            except BudgetHit:
                return "max_time"
            scores = grid.score(params, Xt, Yt).to("cpu", torch.float64).numpy()  # [P, C]
            u.refits += scores.size
            driver.refitted(scores.size)
            for p, s in enumerate(busy):
                if cache is not None:
                    for j in range(min(C, N - s.pos)):
                        if s.pos + j + 1 >= s.cover_len:
                            cache.put(s.key(j), scores[p, j])
                for j in range(C):
                    if s.done:
                        break
                    s.feed(scores[p, j] if s.needs_refit() else None)
        for s in slots:
            if s.done:
                _complete(driver, s)
                rows_cache.pop(s.index, None)
        slots = [s for s in slots if not s.done]
        if driver.stopped:
            return None


def _all_cached(s: PermState, chunk: int, cache) -> bool:
    for j in range(chunk):
        p = s.pos + j
        if p >= len(s.perm):
            break
        if p + 1 >= s.cover_len and s.key(j) not in cache:
            return False
    return True


def _advance(s: PermState, chunk: int, cache) -> None:
    """Feed up to `chunk` points without training: before coverage, or from the cache."""
    for _ in range(chunk):
        if s.done:
            break
        if s.needs_refit():
            s.feed(cache.get(s.key()))
        else:
            s.feed(None)


def tmc_sklearn(u, *, driver, make_state, n_parallel: int) -> str | None:
    """Permutations in rounds of `n_parallel`, each on a joblib worker (in order of index)."""
    budget = driver.budget
    X, Y, Xt, Yt = u.np
    refit = u.refit
    in_process = refit.workers() == 1
    while True:
        group = []
        while len(group) < n_parallel and driver.can_issue():
            group.append(make_state(*driver.issue()))
        if not group:
            return None
        if driver.time_up():
            return "max_time"
        deadline = None
        limit = [x for x in (budget.max_time, driver.deadline) if x is not None]
        if limit:                 # the budget's clock is per process: hand the workers wall time
            deadline = time.time() + (min(limit) - max(budget.elapsed(), driver.elapsed()))
        n_tasks = max(1, min(len(group), refit.workers()))
        parts = [p for p in np.array_split(np.arange(len(group)), n_tasks) if len(p)]
        cache = u.cache if in_process else None      # a worker process cannot fill ours
        res = refit.map(_run_states, [(refit, X, Y, Xt, Yt, [group[i] for i in p], deadline, cache) for p in parts])
        finished = [st for chunk in res for st in chunk]
        timed_out = False
        for st in finished:
            if st is None:
                timed_out = True
                continue
            u.refits += st.fresh
            driver.refitted(st.fresh)
            _complete(driver, st)
        if timed_out:
            return "max_time"
        if driver.stopped:
            return None


def _run_states(refit, X, Y, Xt, Yt, states: list[PermState], deadline: float | None, cache) -> list:
    """Run each permutation to its end (or truncation); None for one cut off by the deadline."""
    out = []
    for st in states:
        while not st.done:
            if deadline is not None and time.time() >= deadline:
                break
            if st.needs_refit():
                hit = cache.get(st.key()) if cache is not None else None
                if hit is not None:
                    st.feed(hit)
                    continue
                score = refit.fit_score(X, Y, Xt, Yt, rows=st.perm[:st.pos + 1])
                st.fresh += 1
                if cache is not None:
                    cache.put(st.key(), score)
                st.feed(score)
            else:
                st.feed(None)
        out.append(st if st.done else None)
    return out
