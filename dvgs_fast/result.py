"""ValuationResult: the one result type every valuation method returns.

Every result says how complete it is:
  values   per-sample value (higher = more valuable), float64 [N]
  stderr   per-sample standard error of the value over what the method averaged (DVGS: snapshots
           and restarts; TMC / G-Shapley: permutations). NaN where the method has no such notion
           (LossVal, LOO, DVRL, random: one number per sample, nothing averaged) or where a sample
           was evaluated fewer than twice.
  counts   per-sample number of evaluations that contributed (snapshots, permutations, ...);
           0 = never valued: its value is a placeholder (0), not a measurement.
  status   "completed" (ran what was asked), "converged" (stopped by its convergence rule) or
           "stopped" (a budget ended it early; see info["stopped_by"]).
  resampling_stderr  optional: the standard deviation of each value under resampling of the
           *data* (the other training points drawn afresh from the same distribution; Wu et al.
           2024), estimated by the semivalue methods with ``resampling_samples > 0``. It is not
           the Monte Carlo stderr: more permutations do not shrink it, more data does.
           ``ci(level)`` combines the two into a confidence interval.

Two results of the same method on the same samples merge with ``a + b``: values become the
count-weighted mean and stderr is recomputed from the pooled sums of squares (Chan et al.'s
parallel variance), exactly as if one run had averaged all evaluations. Merging is how repeated
or distributed runs of the same estimator are combined. It assumes the runs are independent:
two results of one run (the same ``info["fingerprint"]``) or with identical values are refused,
and values that agree far more closely than their standard errors allow (e.g. one model instance
valued twice with different seeds, where the seed changes nothing) warn
(``DependentRunsWarning``): their pooled stderr would understate the uncertainty.
``a.merge(b, check_independent=False)`` skips these checks.
"""
from __future__ import annotations

import io
import json
import os
import warnings
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._io import SymlinkError, atomic_write_bytes

STATUSES = ("completed", "converged", "stopped")


@dataclass
class ValuationResult:
    """Data values for the source samples with their uncertainty and completeness.

    values, stderr, counts, status: see the module docstring.
    method      name of the method that produced them ("dvgs", "lossval", ...)
    params      the settings of the run (JSON-serialisable; Valuation.settings())
    timings     seconds spent per phase ("total" is wall time, "cpu" is process CPU time)
    snapshots   optional [N, K] array of every snapshot (DVGS keep_snapshots=True; memory-mapped)
    info        anything else the method reports (seed, device, how far a budgeted run got, ...)
    """

    values: np.ndarray
    method: str
    stderr: np.ndarray | None = None
    counts: np.ndarray | None = None
    status: str = "completed"
    params: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    snapshots: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)
    resampling_stderr: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.values = np.asarray(self.values, dtype=np.float64).reshape(-1)
        n = self.values.shape[0]
        self.stderr = (np.full(n, np.nan) if self.stderr is None
                       else np.asarray(self.stderr, dtype=np.float64).reshape(-1))
        self.counts = (np.ones(n, dtype=np.int64) if self.counts is None
                       else np.asarray(self.counts).astype(np.int64, copy=False).reshape(-1))
        if self.stderr.shape[0] != n or self.counts.shape[0] != n:
            raise ValueError(f"ValuationResult: stderr ({self.stderr.shape[0]}) and counts "
                             f"({self.counts.shape[0]}) must have one entry per value ({n})")
        if self.resampling_stderr is not None:
            self.resampling_stderr = np.asarray(self.resampling_stderr, dtype=np.float64).reshape(-1)
            if self.resampling_stderr.shape[0] != n:
                raise ValueError(f"ValuationResult: resampling_stderr ({self.resampling_stderr.shape[0]}) must have "
                                 f"one entry per value ({n})")
        if self.status not in STATUSES:
            raise ValueError(f"status: expected one of {', '.join(STATUSES)}, got {self.status!r}")

    # --------------------------------------------------------------------------------- access
    def __len__(self) -> int:
        return int(self.values.shape[0])

    def __repr__(self) -> str:
        valued = int((self.counts > 0).sum())
        return (f"ValuationResult(method={self.method!r}, n={len(self)}, status={self.status!r}, "
                f"valued={valued}, median_count={float(np.median(self.counts)) if len(self) else 0:g})")

    @property
    def valued(self) -> np.ndarray:
        """Boolean mask of the samples that were evaluated at least once (counts > 0)."""
        return self.counts > 0

    def lowest(self, k: int) -> np.ndarray:
        """Indices of the k lowest values (the likeliest harmful samples), lowest first.

        Ties are broken by index (a stable sort), so the answer is reproducible."""
        return np.argsort(self.values, kind="stable")[:_check_k(k, len(self))]

    def highest(self, k: int) -> np.ndarray:
        """Indices of the k highest values, highest first (ties by index)."""
        return np.argsort(-self.values, kind="stable")[:_check_k(k, len(self))]

    def ranks(self) -> np.ndarray:
        """Rank of every sample, 1 = lowest value (ties broken by index)."""
        r = np.empty(len(self), dtype=np.int64)
        r[np.argsort(self.values, kind="stable")] = np.arange(1, len(self) + 1)
        return r

    def ci(self, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
        """(low, high): a normal ``level`` confidence interval per sample for its *expected* value
        over training data drawn from the same distribution (Wu et al. 2024):
        value +- z * sqrt(resampling_stderr^2 + stderr^2) -- the spread under resampling of the
        data plus the Monte Carlo error of this estimate. NaN where either is unknown.

        Only results with ``resampling_stderr`` have one (semivalue methods run with
        ``resampling_samples > 0``); ``stderr`` alone describes the Monte Carlo error only,
        i.e. how far the estimate may be from the exact value on *this* dataset."""
        if isinstance(level, bool) or not isinstance(level, (int, float, np.floating)) or not 0 < level < 1:
            raise ValueError(f"level: expected a number in (0, 1), got {level!r}")
        if self.resampling_stderr is None:
            why = self.info.get("resampling_skipped")
            raise ValueError(f"ci: this {self.method!r} result has no resampling variance "
                             f"({'skipped: ' + why if why else 'not estimated'}); run a semivalue method (DataShapley, "
                             f"BetaShapley, ...) with resampling_samples > 0 (e.g. 50) and enough max_time")
        from scipy.stats import norm
        z = float(norm.ppf(0.5 + level / 2))
        half = z * np.sqrt(self.resampling_stderr ** 2 + self.stderr ** 2)
        return self.values - half, self.values + half

    def to_dataframe(self):
        """A pandas DataFrame: index, value, stderr, counts, rank (1 = lowest value)."""
        try:
            import pandas as pd
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError("ValuationResult.to_dataframe() needs pandas (a dependency of dvgs_fast; it is "
                              "missing from this environment): pip install pandas") from exc
        return pd.DataFrame({"index": np.arange(len(self)), "value": self.values, "stderr": self.stderr,
                             "counts": self.counts, "rank": self.ranks()})

    # --------------------------------------------------------------------------------- merging
    def __add__(self, other: "ValuationResult") -> "ValuationResult":
        if not isinstance(other, ValuationResult):
            return NotImplemented
        return self.merge(other)

    def merge(self, other: "ValuationResult", *, check_independent: bool = True) -> "ValuationResult":
        """``self + other`` (see the module docstring); ``check_independent=False`` pools without
        checking that the two results come from independent runs."""
        if not isinstance(other, ValuationResult):
            raise ValueError(f"other: expected a ValuationResult, got {type(other).__name__}")
        if other.method != self.method:
            raise ValueError(f"cannot merge a {self.method!r} result with a {other.method!r} result")
        if len(other) != len(self):
            raise ValueError(f"cannot merge results over different samples ({len(self)} vs {len(other)} values)")
        if check_independent:
            _check_independent(self, other)
        ca, cb = self.counts.astype(np.float64), other.counts.astype(np.float64)
        c = ca + cb
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(c > 0, (ca * self.values + cb * other.values) / np.where(c > 0, c, 1), 0.0)
            m2 = (_m2(self.stderr, ca) + _m2(other.stderr, cb)
                  + np.where(c > 0, (self.values - other.values) ** 2 * ca * cb / np.where(c > 0, c, 1), 0.0))
            stderr = np.where(c > 1, np.sqrt(m2 / np.maximum(c - 1, 1) / np.maximum(c, 1)), np.nan)
        # Where either side has no spread information for c >= 2 (its stderr is NaN although it
        # averaged several evaluations) the pooled stderr is unknown too.
        unknown = (np.isnan(self.stderr) & (ca > 1)) | (np.isnan(other.stderr) & (cb > 1))
        stderr[unknown] = np.nan
        if "stopped" in (self.status, other.status):
            status = "stopped"
        elif self.status == other.status == "converged":
            status = "converged"
        else:
            status = "completed"
        # The resampling variance is a property of the data, estimated by each run: their mean.
        rs = None
        if self.resampling_stderr is not None and other.resampling_stderr is not None:
            rs = np.sqrt((self.resampling_stderr ** 2 + other.resampling_stderr ** 2) / 2)
        return ValuationResult(values=mean, method=self.method, stderr=stderr, counts=c.astype(np.int64),
                               resampling_stderr=rs,
                               status=status, params=dict(self.params),
                               timings={k: self.timings.get(k, 0.0) + other.timings.get(k, 0.0)
                                        for k in set(self.timings) | set(other.timings)},
                               info={"merged_from": [_summary(self), _summary(other)],
                                     "fingerprints": _fingerprints(self) + _fingerprints(other)})

    # ---------------------------------------------------------------------------------- files
    def save(self, path: str | os.PathLike) -> Path:
        """Write everything to one .npz file, atomically (temp file + rename); returns its path.

        A path without a suffix gets ``.npz``; an existing directory is refused (it would
        otherwise become ``dir.npz`` beside it)."""
        path = Path(path)
        if path.is_dir():
            raise ValueError(f"path: {path} is a directory; give a file name such as {path / 'values.npz'}")
        if path.suffix != ".npz":
            path = path.with_name(path.name + ".npz")
        meta = {"method": self.method, "status": self.status, "params": self.params, "timings": self.timings,
                "info": self.info}
        arrays = {"values": self.values, "stderr": self.stderr, "counts": self.counts,
                  "meta": np.frombuffer(json.dumps(meta, default=_json_default).encode(), dtype=np.uint8)}
        if self.snapshots is not None:
            arrays["snapshots"] = np.asarray(self.snapshots)
        if self.resampling_stderr is not None:
            arrays["resampling_stderr"] = self.resampling_stderr
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        try:
            atomic_write_bytes(path, buf.getvalue())
        except SymlinkError as exc:
            raise ValueError(f"path: {exc}") from None
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ValuationResult":
        """Read a file written by :meth:`save`; a damaged or foreign file is one ValueError naming it."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(bytes(z["meta"]).decode())
                if not isinstance(meta, dict) or set(meta) - _META_KEYS or "method" not in meta:
                    what = type(meta).__name__ if not isinstance(meta, dict) else \
                        f"keys {sorted(set(meta) - _META_KEYS) or ['method (missing)']}"
                    raise ValueError(f"its metadata is not a ValuationResult's ({what})")
                arrays = {k: z[k] for k in ("values", "stderr", "counts")}
                snapshots = z["snapshots"] if "snapshots" in z.files else None
                resampling = z["resampling_stderr"] if "resampling_stderr" in z.files else None
            return cls(**arrays, snapshots=snapshots, resampling_stderr=resampling, **meta)
        except (OSError, KeyError, ValueError, EOFError, TypeError, zipfile.BadZipFile, zlib.error,
                UnicodeDecodeError) as exc:
            detail = str(exc).replace("\n", " ")
            raise ValueError(f"path: {path} is not a readable ValuationResult file "
                             f"({type(exc).__name__}: {detail})") from None


_META_KEYS = {"method", "status", "params", "timings", "info"}


def _fingerprints(r: ValuationResult) -> list[str]:
    """The runs a result holds: its own fingerprint, or those of the results merged into it."""
    if "fingerprints" in r.info:
        return list(r.info["fingerprints"])
    return [r.info["fingerprint"]] if r.info.get("fingerprint") else []


class DependentRunsWarning(UserWarning):
    """Two pooled results look like one run twice: the pooled stderr understates the uncertainty."""


def _check_independent(a: ValuationResult, b: ValuationResult) -> None:
    """Refuse pooling one run with itself; warn when the values are too close to be independent."""
    shared = set(_fingerprints(a)) & set(_fingerprints(b))
    fa = next(iter(shared), None)
    if a is b or shared:
        raise ValueError("cannot pool a result with itself: both come from the same run (same method, settings, "
                         "seed, model and data; info['fingerprint'] " f"{str(fa)[:12]}), so their evaluations are "
                         "the same draws and pooling would shrink the stderr by sqrt(2) for nothing; pool runs "
                         "with different seeds (or a.merge(b, check_independent=False) to force it)")
    both = (a.counts > 0) & (b.counts > 0)
    if both.sum() < 2:
        return
    va, vb = a.values[both], b.values[both]
    if np.array_equal(va, vb) and np.ptp(va) > 0:
        raise ValueError(f"cannot pool two results with identical values on all {int(both.sum())} samples valued "
                         f"by both: they are one deterministic result twice (a method or model that ignores the "
                         f"seed), and pooling would claim a spread of 0; use one of them (or "
                         f"a.merge(b, check_independent=False) to force it)")
    se = np.sqrt(a.stderr[both] ** 2 + b.stderr[both] ** 2)
    ok = np.isfinite(se) & (se > 0)
    if ok.sum() >= 10:
        # Independent runs differ by about their combined stderr (|z| has median 0.67 when the
        # stderrs are right, more when they understate, as DVGS's correlated snapshots do).
        z = float(np.median(np.abs(va[ok] - vb[ok]) / se[ok]))
        if z < 0.05:
            warnings.warn(f"the two results agree far more closely than their standard errors allow (median "
                          f"|a - b| / stderr = {z:.3g}, about 0.67 for independent runs): they look like one run "
                          f"twice (e.g. the same model instance, whose initial weights the seed does not change), "
                          f"so the pooled stderr understates the uncertainty", DependentRunsWarning, stacklevel=4)


def _m2(stderr: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Sum of squared deviations from the mean, recovered from stderr = sqrt(var / c), var with
    ddof = 1. A sample seen once has no spread (0); unknown spread (NaN) counts as 0 here and is
    marked NaN again by the caller."""
    with np.errstate(invalid="ignore"):
        m2 = stderr ** 2 * counts * (counts - 1)
    return np.where(np.isfinite(m2), m2, 0.0)


def _summary(r: ValuationResult) -> dict[str, Any]:
    return {"status": r.status, "seed": r.info.get("seed"), "median_count": float(np.median(r.counts))}


def _check_k(k: Any, n: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
        raise ValueError(f"k: expected a non-negative integer, got {k!r}")
    return min(int(k), n)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return repr(obj)


def stats_from_sums(s1: np.ndarray, s2: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, stderr) from per-sample sums of x and x² over `counts` evaluations (float64).

    stderr = sqrt(var / c) with the unbiased variance; NaN where c < 2; 0 mean where c == 0."""
    c = np.asarray(counts, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(c > 0, s1 / np.where(c > 0, c, 1), 0.0)
        var = np.maximum(s2 - c * mean * mean, 0.0) / np.where(c > 1, c - 1, 1)
        stderr = np.where(c > 1, np.sqrt(var / np.where(c > 0, c, 1)), np.nan)
    return mean, stderr
