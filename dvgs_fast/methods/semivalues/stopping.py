"""Stopping rules for the sampling loops, composable with ``|`` (either) and ``&`` (both).

    from dvgs_fast.methods.semivalues import MaxUpdates, MaxTime, StderrBelow, RankStable, HistoryDeviation
    stop = StderrBelow(0.002) | MaxUpdates(2000) | MaxTime(600)
    stop = RankStable(k=20, patience=3) & MaxUpdates(200)     # stable ranks, but not before 200 samples

A rule is checked on the values folded so far (``Progress``) every ``check_every`` samples, in
sample order, so the same seed stops at the same sample whatever the batching or the number of
processes (time aside). ``check`` returns the rule that fired (a leaf, or an ``&`` node) or None;
the result says which one in ``info["stopped_by"]`` and its ``status``: a budget (``MaxTime``)
gives "stopped", a count (``MaxUpdates``) "completed", a convergence rule "converged".

One *sample* is one unit of the sampler: a permutation (every point gets one marginal) or, for
maximum sample reuse, one subset (every point gets one in- or out-of-sample update). So
``MaxUpdates(n)`` is n permutations / subsets and every value has then been updated n times.

The TMC *truncation* rule (stop scoring a permutation once the score is within a tolerance of
the full-data score) is a per-permutation policy (``tolerance``, ``truncation_patience`` of
the permutation methods), not a rule for the whole run; its companion from the same code, the
running-mean convergence test of Ghorbani & Zou, is ``HistoryDeviation``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

KINDS = ("budget", "count", "convergence")
STATUS_OF_KIND = {"budget": "stopped", "count": "completed", "convergence": "converged"}


@dataclass
class Progress:
    """What a rule sees: the estimate after ``samples`` samples, ``elapsed`` seconds in.

    history() -> [w, N] running means after each of the last w samples (oldest first), for
    rules that look back (``HistoryDeviation``); w = the largest ``history_window`` asked for."""

    samples: int
    elapsed: float
    values: np.ndarray
    stderr: np.ndarray
    counts: np.ndarray
    history: Callable[[], np.ndarray] | None = None


class StoppingRule:
    """Base class. Subclasses set ``kind`` and implement ``_fires(progress) -> bool``."""

    kind = "convergence"

    def __init__(self, label: str | None = None):
        self._label = label

    # ---- what the loops ask -------------------------------------------------------------
    def check(self, p: Progress) -> "StoppingRule | None":
        """The rule that fired on this progress, or None."""
        return self if self._fires(p) else None

    def _fires(self, p: Progress) -> bool:
        raise NotImplementedError

    def max_samples(self) -> int | None:
        """A sample count this rule alone stops at (no more samples need to be issued)."""
        return None

    def deadline(self) -> float | None:
        """Seconds after which this rule alone stops (a loop may then stop mid-sample)."""
        return None

    def history_window(self) -> int:
        """How many past running means ``Progress.history()`` must hold for this rule."""
        return 0

    def reset(self) -> None:
        """Forget state kept between checks (called at the start of every fit)."""

    @property
    def status(self) -> str:
        return STATUS_OF_KIND[self.kind]

    def describe(self) -> str:
        return self._label or repr(self)

    # ---- composition --------------------------------------------------------------------
    def __or__(self, other: "StoppingRule") -> "StoppingRule":
        return AnyOf(self, _check_rule(other, "|"))

    def __and__(self, other: "StoppingRule") -> "StoppingRule":
        return AllOf(self, _check_rule(other, "&"))


def _check_rule(r, op: str) -> StoppingRule:
    if not isinstance(r, StoppingRule):
        raise ValueError(f"stop: cannot combine a stopping rule with {type(r).__name__} by '{op}'")
    return r


class AnyOf(StoppingRule):
    """``a | b``: stops when either does (the first, in order, that fires is reported)."""

    def __init__(self, *rules: StoppingRule):
        super().__init__()
        self.rules = [x for r in rules for x in (r.rules if isinstance(r, AnyOf) else [r])]

    def check(self, p):
        fired = [r.check(p) for r in self.rules]        # every rule sees every check (stateful ones)
        return next((f for f in fired if f is not None), None)

    def max_samples(self):
        caps = [c for c in (r.max_samples() for r in self.rules) if c is not None]
        return min(caps) if caps else None

    def deadline(self):
        ds = [d for d in (r.deadline() for r in self.rules) if d is not None]
        return min(ds) if ds else None

    def history_window(self):
        return max(r.history_window() for r in self.rules)

    def reset(self):
        for r in self.rules:
            r.reset()

    def __repr__(self):
        return " | ".join(_paren(r) for r in self.rules)


class AllOf(StoppingRule):
    """``a & b``: stops when both do; reported as itself, with the kind of its strongest part
    (a convergence rule makes it a convergence, else a count, else a budget)."""

    def __init__(self, *rules: StoppingRule):
        super().__init__()
        self.rules = [x for r in rules for x in (r.rules if isinstance(r, AllOf) else [r])]
        kinds = {r.kind for r in self.rules}
        self.kind = next(k for k in ("convergence", "count", "budget") if k in kinds)

    def check(self, p):
        fired = [r.check(p) for r in self.rules]
        return self if all(f is not None for f in fired) else None

    def max_samples(self):
        caps = [r.max_samples() for r in self.rules]
        return max(caps) if all(c is not None for c in caps) else None

    def deadline(self):
        ds = [r.deadline() for r in self.rules]
        return max(ds) if all(d is not None for d in ds) else None

    def history_window(self):
        return max(r.history_window() for r in self.rules)

    def reset(self):
        for r in self.rules:
            r.reset()

    def __repr__(self):
        return " & ".join(_paren(r) for r in self.rules)


def _paren(r: StoppingRule) -> str:
    s = r.describe()
    return f"({s})" if isinstance(r, (AnyOf, AllOf)) else s


# ---------------------------------------------------------------------------------- leaves
class MaxUpdates(StoppingRule):
    """Stop after ``n`` samples (permutations, or MSR subsets): every value updated n times."""

    kind = "count"

    def __init__(self, n: int, label: str | None = None):
        super().__init__(label)
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"n: MaxUpdates needs a positive integer, got {n!r}")
        self.n = int(n)

    def _fires(self, p):
        return p.samples >= self.n

    def max_samples(self):
        return self.n

    def __repr__(self):
        return f"MaxUpdates({self.n})"


class MaxTime(StoppingRule):
    """Stop after ``seconds`` of wall time (a budget: the result's status is "stopped")."""

    kind = "budget"

    def __init__(self, seconds: float, label: str | None = None):
        super().__init__(label)
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float, np.integer, np.floating)) \
                or not math.isfinite(seconds) or seconds <= 0:
            raise ValueError(f"seconds: MaxTime needs a positive finite number, got {seconds!r}")
        self.seconds = float(seconds)

    def _fires(self, p):
        return p.elapsed >= self.seconds

    def deadline(self):
        return self.seconds

    def __repr__(self):
        return f"MaxTime({self.seconds:g})"


class StderrBelow(StoppingRule):
    """Stop when the Monte Carlo standard error is at most ``threshold`` for at least
    ``fraction`` of the points (``relative=True``: at most threshold x |value|; a value of 0
    then needs a stderr of 0), after at least ``min_samples`` samples (a few samples can agree by chance and
    report a spuriously small spread). The stderr measures the sampling error only: a noisy
    utility can have a small stderr around a wrong value."""

    def __init__(self, threshold: float, *, relative: bool = False, fraction: float = 1.0,
                 min_samples: int = 10, label: str | None = None):
        super().__init__(label)
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.integer, np.floating)) \
                or not math.isfinite(threshold) or threshold <= 0:
            raise ValueError(f"threshold: StderrBelow needs a positive finite number, got {threshold!r}")
        if not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise ValueError(f"fraction: expected a number in (0, 1], got {fraction!r}")
        if isinstance(min_samples, bool) or not isinstance(min_samples, (int, np.integer)) or min_samples < 2:
            raise ValueError(f"min_samples: expected an integer >= 2, got {min_samples!r}")
        self.threshold, self.relative, self.fraction = float(threshold), bool(relative), float(fraction)
        self.min_samples = int(min_samples)

    def _fires(self, p):
        if p.samples < self.min_samples or len(p.values) == 0:
            return False
        se = np.where(np.isfinite(p.stderr), p.stderr, np.inf)
        bound = self.threshold * np.abs(p.values) if self.relative else self.threshold
        ok = se <= bound
        return float(ok.mean()) >= self.fraction

    def __repr__(self):
        extra = (", relative" if self.relative else "") + (f", fraction={self.fraction:g}" if self.fraction < 1 else "")
        return f"StderrBelow({self.threshold:g}{extra})"


class RankStable(StoppingRule):
    """Stop when the sets of the ``k`` highest and ``k`` lowest values (``which``: "both",
    "top", "bottom") have not changed over ``patience`` consecutive checks, after at least
    ``min_samples`` samples. What data valuation is usually used for (what to drop, what to
    keep) depends only on these sets."""

    def __init__(self, k: int = 10, *, patience: int = 3, which: str = "both", min_samples: int = 10,
                 label: str | None = None):
        super().__init__(label)
        for v, nm in ((k, "k"), (patience, "patience"), (min_samples, "min_samples")):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{nm}: RankStable needs a positive integer, got {v!r}")
        if which not in ("both", "top", "bottom"):
            raise ValueError(f"which: expected 'both', 'top' or 'bottom', got {which!r}")
        self.k, self.patience, self.which, self.min_samples = int(k), int(patience), which, int(min_samples)
        self.reset()

    def reset(self):
        self._last: tuple | None = None
        self._same = 0

    def _fires(self, p):
        order = np.argsort(p.values, kind="stable")
        k = min(self.k, len(order))
        sets = (frozenset(order[len(order) - k:].tolist()) if self.which != "bottom" else None,
                frozenset(order[:k].tolist()) if self.which != "top" else None)
        self._same = self._same + 1 if sets == self._last else 0
        self._last = sets
        return p.samples >= self.min_samples and self._same >= self.patience

    def __repr__(self):
        return f"RankStable(k={self.k}, patience={self.patience}{'' if self.which == 'both' else ', ' + self.which})"


class HistoryDeviation(StoppingRule):
    """The convergence test of Ghorbani & Zou's TMC-Shapley code: over the last ``window``
    samples, the largest mean (over points) relative change of the running means against the
    current ones is below ``tol``. Never fires before ``window`` samples."""

    def __init__(self, tol: float = 0.1, window: int = 100, label: str | None = None):
        super().__init__(label)
        if isinstance(tol, bool) or not isinstance(tol, (int, float, np.integer, np.floating)) \
                or not math.isfinite(tol) or tol <= 0:
            raise ValueError(f"tol: HistoryDeviation needs a positive finite number, got {tol!r}")
        if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 2:
            raise ValueError(f"window: expected an integer >= 2, got {window!r}")
        self.tol, self.window = float(tol), int(window)
        self.last_error: float | None = None

    def reset(self):
        self.last_error = None

    def history_window(self):
        return self.window

    def _fires(self, p):
        if p.samples < self.window or p.history is None:
            return False
        self.last_error = running_mean_deviation(p.history()[-self.window:])
        return self.last_error < self.tol

    def __repr__(self):
        return f"HistoryDeviation(tol={self.tol:g}, window={self.window})"


def running_mean_deviation(means: np.ndarray) -> float:
    """max over the rows of mean_i |m_t,i - m_last,i| / (|m_last,i| + 1e-12) (the original's error)."""
    last = means[-1:]
    return float(np.max(np.mean(np.abs(means - last) / (np.abs(last) + 1e-12), -1)))


def find_rule(rule: StoppingRule | None, cls: type) -> list[StoppingRule]:
    """Every leaf of type ``cls`` inside a (composite) rule."""
    if rule is None:
        return []
    if isinstance(rule, (AnyOf, AllOf)):
        return [x for r in rule.rules for x in find_rule(r, cls)]
    return [rule] if isinstance(rule, cls) else []
