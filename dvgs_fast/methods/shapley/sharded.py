"""Monte-Carlo Shapley permutations spread over torch.distributed ranks.

Permutation p (the p-th draw of the generator seeded with `seed`, exactly as in a single process)
is run by rank ``p % world_size``; every rank draws all permutations and skips the others', so the
set of permutations does not depend on the number of ranks. Work proceeds in *rounds* of
`round_size` consecutive permutation indices (the convergence check interval). At the end of a
round every rank all-reduces the round's marginals (zeros for permutations it did not run, so the
sums are exact), completion flags, refit statistics and a "time is up" flag, and then applies the
single-process bookkeeping (`PermutationDriver.complete`, with its convergence check) to the same
reduced data: every rank takes the same decision, and the values equal a single-process run on
the same seed and number of permutations.

A wall-clock budget (`max_time`) stops every rank at the end of the round in which any rank ran
out of time; permutations a rank left unfinished are dropped, as in a single process.
"""
from __future__ import annotations

import numpy as np
import torch

from dvgs_fast.methods.shapley.tmc import PermutationDriver


class ShardedPermutationDriver(PermutationDriver):
    """Drop-in `PermutationDriver` for one rank of a multi-process run (see the module doc).

    The sequential and batched loops use it unchanged; after the loop returns, call
    ``finish(stopped)`` (a collective) so a rank that stopped early still joins the last round.
    """

    def __init__(self, ctx, n: int, seed: int, *, round_size: int, **kw):
        super().__init__(n, seed, **kw)
        self.ctx = ctx
        self.round_size = max(1, int(round_size))
        self.drawn = 0                      # draws taken from the shared generator so far
        self.lo = self.hi = 0               # the current round: permutation indices [lo, hi)
        self._next = 0                      # next own index to issue
        self._pending: set[int] = set()     # own permutations issued and not completed
        self._local: dict[int, tuple[np.ndarray, int, bool]] = {}
        self._started = 0                   # own permutations issued in this round
        self._stopped = False
        self.time_stop = False
        self._begin_round()

    # ---- rounds -------------------------------------------------------------------------------
    def _begin_round(self) -> None:
        self.lo = self.hi
        hi = self.lo + self.round_size
        if self.max_permutations is not None:
            hi = min(hi, self.max_permutations)
            if self.lo >= self.max_permutations:
                self._stopped = True
        self.hi = hi
        r, w = self.ctx.rank, self.ctx.world_size
        self._next = self.lo + (r - self.lo) % w    # first index >= lo with index % w == rank

    def _end_round(self, time_up: bool) -> None:
        n, m = self.n, self.hi - self.lo
        block = np.zeros((m + 1, n + 3), dtype=np.float64)
        for idx, (marg, refits, truncated) in self._local.items():
            row = idx - self.lo
            block[row, :n] = marg
            block[row, n:] = (1.0, refits, float(truncated))
        block[m, 0] = float(time_up)
        block[m, 1] = self._started
        red = self.ctx.all_reduce_sum(block)
        self._local.clear()
        self._pending.clear()
        self._started = 0
        self.issued += int(round(red[m, 1]))
        for row in range(m):
            if red[row, n] > 0:
                PermutationDriver.complete(self, self.lo + row, red[row, :n].copy(), int(round(red[row, n + 1])),
                                           bool(red[row, n + 2] > 0))
        if red[m, 0] > 0:
            self.time_stop = True
        if self.time_stop or self.converged_at is not None:
            self._stopped = True

    # ---- the PermutationDriver interface the loops use ---------------------------------------
    def can_issue(self) -> bool:
        while not self._stopped:
            if self._next < self.hi:
                return True
            if self._pending:               # own permutations of this round still in flight
                return False
            self._end_round(time_up=False)  # collective: every rank gets here once per round
            if not self._stopped:
                self._begin_round()
        return False

    def issue(self) -> tuple[int, torch.Tensor]:
        idx = self._next
        while self.drawn <= idx:
            perm = torch.randperm(self.n, generator=self.gen)
            self.drawn += 1
        self._next += self.ctx.world_size
        self._pending.add(idx)
        self._started += 1
        return idx, perm

    def complete(self, index: int, marg: np.ndarray, refits: int = 0, truncated: bool = False) -> None:
        self._pending.discard(index)
        self._local[index] = (np.asarray(marg, dtype=np.float64), int(refits), bool(truncated))

    def finish(self, stopped: str | None) -> str | None:
        """After the loop: join the round still open (a rank that ran out of time), then say why
        the run stopped, the same on every rank."""
        if not self._stopped:
            self._end_round(time_up=True)
        return "max_time" if self.time_stop else None


def make_driver(ctx, n: int, seed: int, **kw) -> PermutationDriver:
    """A plain driver alone, a sharded one under torch.distributed (rounds = `check_every`)."""
    if not ctx.enabled:
        return PermutationDriver(n, seed, **kw)
    return ShardedPermutationDriver(ctx, n, seed, round_size=kw["check_every"], **kw)
