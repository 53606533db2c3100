"""The sampling driver: issues samples in a fixed order, folds completed ones in that order,
and applies the stopping rule.

Sample i is the i-th draw of a generator seeded once (``draw(generator)``: a permutation, a
group-ordered permutation, a subset mask, ...), whichever loop asks for it, so the sequential,
batched, joblib and torchrun paths see the same samples. Loops may complete samples out of
order (the batched TMC grid finishes short permutations first); a sample is folded into the
running statistics (``accumulate.py``) only once every earlier one has been, and the rule is
checked after every ``check_every``-th folded sample. The estimate is therefore the estimate
after the first m samples, for the m at which the rule fired, independently of batching.

``ShardedSampleDriver`` (below) is the same driver for one rank of a torchrun job.
"""
from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np
import torch

from dvgs_fast.methods.semivalues.stopping import MaxTime, Progress, StoppingRule, find_rule


class SampleDriver:
    """Issues and collects samples for one process (see the module doc).

    draw        generator -> the sample's random content (e.g. a permutation tensor)
    stats       MarginalStats / MSRStats: folds a completed sample's (vector, *extras)
    stop        the stopping rule (None: only the budget and ``max_samples`` stop)
    max_samples an upper bound on the samples to issue (also implied by MaxUpdates in ``stop``)
    budget      methods.base.Budget (the method's ``max_time``)
    keep        keep every folded vector (``keep_marginals``)
    """

    def __init__(self, n: int, seed: int, *, draw: Callable[[torch.Generator], Any], stats,
                 stop: StoppingRule | None, check_every: int, budget, max_samples: int | None = None,
                 on_complete: Callable[[int], None] | None = None, keep: bool = False):
        self.n = n
        self.gen = torch.Generator().manual_seed(seed)
        self.draw = draw
        self.stats = stats
        self.stop = stop
        caps = [c for c in (max_samples, stop.max_samples() if stop is not None else None) if c is not None]
        self.max_samples = min(caps) if caps else None
        self.deadline = stop.deadline() if stop is not None else None
        self.check_every = max(1, int(check_every))
        self.budget = budget
        self.on_complete = on_complete
        self.on_refits: Callable[[int], None] | None = None     # progress within a sample (refits)
        self.keep = keep
        self.kept: list[np.ndarray] = []
        self.issued = 0
        self.folded = 0
        self.pending: dict[int, tuple] = {}
        self.extras_sum = np.zeros(stats.n_extra)
        self.fired: StoppingRule | None = None       # the rule that stopped the run
        self._t0 = time.perf_counter()

    # ---- what the loops use ------------------------------------------------------------------
    @property
    def stopped(self) -> bool:
        """The stopping rule fired: nothing more is issued and in-flight samples are dropped."""
        return self.fired is not None

    def can_issue(self) -> bool:
        if self.fired is not None:
            return False
        return self.max_samples is None or self.issued < self.max_samples

    def issue(self) -> tuple[int, Any]:
        sample = self.draw(self.gen)
        idx = self.issued
        self.issued += 1
        return idx, sample

    def time_up(self) -> bool:
        """The budget (max_time) or a MaxTime rule ran out: loops stop, even mid-sample."""
        return self.budget.time_up() or (self.deadline is not None and self.elapsed() >= self.deadline)

    def elapsed(self) -> float:
        return time.perf_counter() - self._t0

    def refitted(self, n: int) -> None:
        """n more models trained (the progress bar moves within a permutation: on digits one TMC
        permutation is ~1000 refits)."""
        if self.on_refits is not None:
            self.on_refits(n)

    def complete(self, index: int, vec: np.ndarray, *extras: float) -> None:
        if self.fired is not None:
            return
        self.pending[index] = (vec, extras)
        if self.on_complete is not None:
            self.on_complete(1)
        while self.folded in self.pending and self.fired is None:
            v, ex = self.pending.pop(self.folded)
            self.stats.add_record(v, ex)
            if ex:
                self.extras_sum[: len(ex)] += np.asarray(ex, dtype=np.float64)[: self.stats.n_extra]
            if self.keep:
                self.kept.append(np.asarray(v, dtype=np.float64))
            self.folded += 1
            if self.stop is not None and self.folded % self.check_every == 0:
                self.fired = self.stop.check(self.progress())

    def progress(self) -> Progress:
        s = self.stats
        return Progress(samples=s.samples, elapsed=self.elapsed(), values=s.values(), stderr=s.stderr(),
                        counts=s.counts(), history=s.history)

    # ---- the outcome ----------------------------------------------------------------------------
    def outcome(self, loop_stopped: str | None) -> tuple[str, str]:
        """(status, stopped_by) for the Estimate."""
        if self.fired is not None:
            return self.fired.status, self.fired.describe()
        if loop_stopped == "max_time" or self.time_up():
            if self.deadline is not None and not self.budget.time_up():
                rule = next((r for r in find_rule(self.stop, MaxTime) if r.deadline() == self.deadline), None)
                return "stopped", rule.describe() if rule else "max_time"
            return "stopped", "max_time"
        if self.max_samples is not None and self.folded >= self.max_samples:
            # the cap came from MaxUpdates (or max_samples): the rule reports it
            if self.stop is not None:
                fired = self.stop.check(self.progress())
                if fired is not None:
                    return fired.status, fired.describe()
            return "completed", "max_samples"
        return "completed", "completed"

    def kept_matrix(self) -> np.ndarray | None:
        return np.stack(self.kept) if self.kept else (np.zeros((0, self.n)) if self.keep else None)


class ShardedSampleDriver(SampleDriver):
    """`SampleDriver` for one rank of a multi-process (torchrun) run.

    Sample p (the p-th draw of the generator seeded with `seed`, exactly as in one process) is
    run by rank ``p % world_size``; every rank draws every sample and skips the others', so the
    samples do not depend on the number of ranks. Work proceeds in rounds of ``check_every``
    consecutive sample indices: at the end of a round every rank all-reduces the round's records
    (zeros for samples it did not run, so sums are exact), completion flags and a "time is up"
    flag, then folds the reduced records with the single-process bookkeeping: every rank takes
    the same decision and the values equal a one-process run on the same seed and samples.
    A budget stops every rank at the end of the round in which any rank ran out of time;
    samples a rank left unfinished are dropped, as in one process. After the loop returns,
    call ``finish(stopped)`` (a collective) so a rank that stopped early joins the last round.
    """

    def __init__(self, ctx, n: int, seed: int, **kw):
        super().__init__(n, seed, **kw)
        self.ctx = ctx
        self.round_size = self.check_every
        self.drawn = 0
        self.lo = self.hi = 0
        self._next = 0
        self._own_pending: set[int] = set()
        self._local: dict[int, tuple[np.ndarray, tuple]] = {}
        self._started = 0
        self._closed = False
        self.time_stop = False
        self._begin_round()

    def _begin_round(self) -> None:
        self.lo = self.hi
        hi = self.lo + self.round_size
        if self.max_samples is not None:
            hi = min(hi, self.max_samples)
            if self.lo >= self.max_samples:
                self._closed = True
        self.hi = hi
        r, w = self.ctx.rank, self.ctx.world_size
        self._next = self.lo + (r - self.lo) % w

    def _end_round(self, time_up: bool) -> None:
        n, m, e = self.n, self.hi - self.lo, self.stats.n_extra
        block = np.zeros((m + 1, n + 1 + e), dtype=np.float64)
        for idx, (vec, extras) in self._local.items():
            row = idx - self.lo
            block[row, :n] = vec
            block[row, n] = 1.0
            block[row, n + 1:n + 1 + len(extras)] = extras
        block[m, 0] = float(time_up)
        block[m, 1] = self._started
        red = self.ctx.all_reduce_sum(block)
        self._local.clear()
        self._own_pending.clear()
        self._started = 0
        self.issued += int(round(red[m, 1]))
        for row in range(m):
            if red[row, n] > 0:
                SampleDriver.complete(self, self.lo + row, red[row, :n].copy(), *red[row, n + 1:].tolist())
        if red[m, 0] > 0:
            self.time_stop = True
        if self.time_stop or self.fired is not None:
            self._closed = True

    def can_issue(self) -> bool:
        while not self._closed:
            if self._next < self.hi:
                return True
            if self._own_pending:
                return False
            self._end_round(time_up=False)          # collective: every rank gets here once per round
            if not self._closed:
                self._begin_round()
        return False

    def issue(self):
        idx = self._next
        while self.drawn <= idx:
            sample = self.draw(self.gen)
            self.drawn += 1
        self._next += self.ctx.world_size
        self._own_pending.add(idx)
        self._started += 1
        return idx, sample

    def complete(self, index: int, vec: np.ndarray, *extras: float) -> None:
        self._own_pending.discard(index)
        self._local[index] = (np.asarray(vec, dtype=np.float64), tuple(float(x) for x in extras))

    def finish(self, stopped: str | None) -> str | None:
        if not self._closed:
            self._end_round(time_up=True)
        return "max_time" if self.time_stop else None


def make_driver(ctx, n: int, seed: int, **kw) -> SampleDriver:
    """A plain driver alone, a sharded one under torch.distributed (rounds = ``check_every``)."""
    if not ctx.enabled:
        return SampleDriver(n, seed, **kw)
    return ShardedSampleDriver(ctx, n, seed, **kw)
