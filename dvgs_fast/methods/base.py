"""Valuation: the base every valuation method subclasses.

A method writes only its own algorithm: ``_fit(data, run) -> Estimate``. The base owns what all
methods share, so that they behave alike:

* settings: ``settings()`` is read from the constructor's own parameters (``inspect.signature``),
  so there is no second list of keys to keep in sync; values are made JSON-serialisable.
* device: ``device=None`` follows the tensor inputs (a CUDA input keeps the work on its GPU),
  else CUDA when available, else CPU; an explicit device is validated in the constructor.
* seed: ``seed=None`` draws one; the seed used is always stored in ``result.info["seed"]``.
* budgets: ``max_time`` (seconds of wall time) for every method; methods with iterations add
  their own caps. ``run.budget.exhausted(done)`` says why a loop should stop.
* progress: ``run.progress(total, desc)`` is a tqdm bar silenced by ``progress=False``.
* the result: values, stderr, counts and status from the Estimate, the settings, the seed, the
  device, wall and CPU time; a ``"stopped"`` result warns once (``BudgetWarning``).
* input checks: ``x_target`` is required everywhere; everything else is checked by the method
  through ``dvgs_fast._validation`` (one module), before any long work.
"""
from __future__ import annotations

import abc
import inspect
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from dvgs_fast import _validation as V
from dvgs_fast._utils import draw_seed
from dvgs_fast.result import ValuationResult

# Constructor parameters that are not settings of the result (they do not change the values).
_NOT_SETTINGS = ("progress",)


class BudgetWarning(UserWarning):
    """A budget (max_time, an iteration cap) ended a run before it completed."""


class Budget:
    """Wall-clock and iteration budget; ``exhausted(done)`` names what ran out (or None)."""

    def __init__(self, max_time: float | None, max_iterations: int | None = None):
        self.max_time = max_time
        self.max_iterations = max_iterations
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def time_up(self) -> bool:
        return self.max_time is not None and self.elapsed() >= self.max_time

    def exhausted(self, iterations_done: int = 0) -> str | None:
        if self.max_iterations is not None and iterations_done >= self.max_iterations:
            return "max_iterations"
        if self.time_up():
            return "max_time"
        return None


@dataclass
class Estimate:
    """What a method's ``_fit`` returns; the base turns it into a ValuationResult.

    stderr None -> NaN (no notion of spread); counts None -> 1 for every sample.
    status: "completed" (did what was asked), "converged" (its convergence rule ended it) or
    "stopped" (a budget ended it early). stop_reason: what ended the loop, stored as
    ``info["stopped_by"]`` ("max_time", "max_points", "max_permutations", "converged", ...);
    defaults to the status."""

    values: np.ndarray
    stderr: np.ndarray | None = None
    counts: np.ndarray | None = None
    status: str = "completed"
    stop_reason: str | None = None
    progress: str = ""                  # "448 of 1000 points", for the warning and the CLI banner
    info: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    snapshots: np.ndarray | None = None
    resampling_stderr: np.ndarray | None = None   # sd of each value under resampling of the data


@dataclass
class Run:
    """Per-fit context handed to ``_fit``: the resolved seed and device, the budget, progress."""

    seed: int
    device: torch.device
    budget: Budget
    show_progress: bool

    def progress(self, total: int | None, desc: str, unit: str = "it", initial: int = 0):
        from tqdm.auto import tqdm
        return tqdm(total=total, desc=desc, unit=unit, initial=initial, disable=not self.show_progress,
                    leave=False, dynamic_ncols=True)

    def generator(self, *salt: int) -> torch.Generator:
        """A CPU torch.Generator seeded from (seed, *salt): independent streams per purpose."""
        return torch.Generator().manual_seed(derive_seed(self.seed, *salt))


def derive_seed(seed: int, *salt: int) -> int:
    """A 63-bit seed derived from (seed, *salt): different salts give independent streams."""
    # shift a Python int: numpy 1.x has no right_shift for (uint64, int64), the types of `uint64 >> 1`
    return int(np.random.SeedSequence([int(seed), *map(int, salt)]).generate_state(1, dtype=np.uint64)[0]) >> 1


class Valuation(abc.ABC):
    """Base class of every valuation method.

    Subclasses set ``name`` (the result's ``method``), call ``super().__init__(device=, seed=,
    max_time=, progress=)`` from their constructor after validating their own settings (stored as
    attributes of the same names as the parameters), and implement ``_fit``. Override
    ``_stop_rule_error`` to refuse settings that would never stop."""

    name: ClassVar[str] = ""
    #: whether ``fit`` needs y_source (False for methods that accept y = x autoencoders)
    requires_labels: ClassVar[bool] = True

    def __init__(self, *, device: Any = None, seed: int | None = None, max_time: float | None = None,
                 progress: bool = True):
        self.device = None if device is None else V.resolve_device(device)
        self.seed = V.check_seed(seed)
        self.max_time = V.check_optional_positive_float(max_time, "max_time")
        self.progress = V.check_bool(progress, "progress")

    # ------------------------------------------------------------------------------ settings
    def settings(self) -> dict[str, Any]:
        """The run's settings, JSON-serialisable (stored in ValuationResult.params)."""
        out = {}
        for name in inspect.signature(type(self).__init__).parameters:
            if name in ("self",) or name in _NOT_SETTINGS or not hasattr(self, name):
                continue
            out[name] = _jsonable(getattr(self, name))
        return out

    def __repr__(self) -> str:
        s = ", ".join(f"{k}={v!r}" for k, v in self.settings().items())
        return f"{type(self).__name__}({s})"

    # ------------------------------------------------------------------------------- fitting
    def fit(self, x_source: Any, y_source: Any = None, x_target: Any = None, y_target: Any = None) -> ValuationResult:
        """Value every source sample against the target (clean) set; returns a ValuationResult."""
        if x_target is None:
            raise ValueError("x_target: is required (the clean target set the values are measured against)")
        if self.requires_labels and y_source is None:
            raise ValueError(f"y_source: {type(self).__name__} needs the source labels")
        t0, c0 = time.perf_counter(), time.process_time()
        run = self._new_run(x_source, y_source, x_target, y_target)
        with torch.enable_grad():      # also when fit() is called under torch.no_grad()
            est = self._fit(x_source, y_source, x_target, y_target, run)
        # The last guard: whatever a method missed, NaN/Inf values are never returned as a result.
        V.check_finite_values(est.values, type(self).__name__)
        timings = dict(est.timings)
        timings["total"] = time.perf_counter() - t0
        timings["cpu"] = time.process_time() - c0
        status = est.status
        reason = est.stop_reason or status
        info = {"seed": run.seed, "device": str(run.device), **est.info, "stopped_by": reason}
        if est.progress:
            info["progress"] = est.progress
        result = ValuationResult(values=est.values, method=self.name, stderr=est.stderr, counts=est.counts,
                                 status=status, params=self.settings(), timings=timings,
                                 snapshots=est.snapshots, info=info, resampling_stderr=est.resampling_stderr)
        if status == "stopped":
            unvalued = int((result.counts == 0).sum())
            warnings.warn(f"{type(self).__name__}: stopped early by {reason}"
                          f"{' after ' + est.progress if est.progress else ''}"
                          f"{f'; {unvalued} of {len(result)} samples were never valued (counts == 0)' if unvalued else ''}"
                          f"; result.status == 'stopped'", BudgetWarning, stacklevel=2)
        return result

    def _new_run(self, *inputs: Any) -> Run:
        """The per-call context: the seed (drawn when None), the device the inputs decide, the budget."""
        return Run(seed=self.seed if self.seed is not None else draw_seed(), device=self._resolve_device(*inputs),
                   budget=Budget(self.max_time), show_progress=self.progress)

    @abc.abstractmethod
    def _fit(self, x_source: Any, y_source: Any, x_target: Any, y_target: Any, run: Run) -> Estimate:
        """The method's algorithm: validate its inputs, value the source, return an Estimate."""

    def _resolve_device(self, *inputs: Any) -> torch.device:
        """Explicit device; else where the tensor inputs live (if not CPU); else CUDA if available."""
        V.check_devices({n: x for n, x in zip(("x_source", "y_source", "x_target", "y_target"), inputs)})
        devs = V.tensor_device_of(*inputs)
        in_dev = next(iter(devs)) if devs else None
        if self.device is not None:
            if in_dev is not None and in_dev.type != "cpu" and not _same_device(in_dev, self.device):
                raise ValueError(f"device: {self.device} was requested but the inputs are on {in_dev}; "
                                 f"move them or pass device={str(in_dev)!r}")
            return self.device
        if in_dev is not None and in_dev.type != "cpu":
            return in_dev
        return V.resolve_device(None)


def _same_device(a: torch.device, b: torch.device) -> bool:
    """'cuda' and 'cuda:0' name the same GPU when the current device is 0."""
    if a.type != b.type:
        return False
    if a.index is None or b.index is None:
        return True
    return a.index == b.index


def _jsonable(v: Any) -> Any:
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (np.integer, np.floating, np.bool_)):
        return v.item()
    if isinstance(v, torch.dtype):
        return str(v).replace("torch.", "")
    if isinstance(v, (torch.device, os.PathLike)):
        return str(v)
    if isinstance(v, torch.Tensor):
        return v.detach().cpu().tolist()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, nn.Module):
        return type(v).__name__
    if callable(v):
        return getattr(v, "__name__", type(v).__name__)
    return repr(v)
