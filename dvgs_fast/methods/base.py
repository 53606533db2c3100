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
* threads: ``num_threads=None`` lets ``dvgs_fast.threads.choose`` pick the count from the size of
  the method's matrix products (``_thread_work``; one thread for small work); ``fit`` runs
  ``_fit`` with it (torch and the BLAS pools) and restores the caller's setting after. The count
  and the reason are stored as ``result.info["threads"]`` / ``["threads_reason"]``.
* the result: values, stderr, counts and status from the Estimate, the settings, the seed, the
  device, wall and CPU time; a ``"stopped"`` result warns once (``BudgetWarning``).
* input checks: ``x_target`` is required everywhere; everything else is checked by the method
  through ``dvgs_fast._validation`` (one module), before any long work.
"""
from __future__ import annotations

import abc
import functools
import inspect
import json
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from dvgs_fast import _validation as V
from dvgs_fast import runstate
from dvgs_fast._utils import draw_seed
from dvgs_fast.result import ValuationResult
from dvgs_fast.threads import choose as choose_threads
from dvgs_fast.threads import model_work
from dvgs_fast.threads import using as using_threads

# Constructor parameters that are not settings of the result: progress does not change the values;
# the thread count is recorded in info["threads"] instead, so that a run (and a checkpoint's
# fingerprint) does not depend on it being given (README: a resume may change the thread count).
_NOT_SETTINGS = ("progress", "num_threads")


class BudgetWarning(UserWarning):
    """A budget (max_time, an iteration cap) ended a run before it completed."""


class UnknownOptionError(ValueError, TypeError):
    """An option a method does not have. A ValueError like every bad setting (README); also a
    TypeError, which Python raises for an unexpected keyword, so either ``except`` catches it."""


def _unknown_option(cls_name: str, key: str, names: list[str]) -> str:
    import difflib
    close = difflib.get_close_matches(key, names, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; valid: {', '.join(names)}"
    return f"{key}: not an option of {cls_name}{hint}"


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

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Every method's constructor refuses an unknown option with a ValueError naming it (and the
        closest valid one), as every other bad setting, instead of Python's TypeError."""
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None or getattr(init, "_checks_options", False):
            return
        params = inspect.signature(init).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return
        names = [n for n, p in params.items() if n != "self" and p.kind is not inspect.Parameter.VAR_POSITIONAL]

        @functools.wraps(init)
        def checked(self, *args: Any, **kw: Any) -> None:
            unknown = [k for k in kw if k not in params]
            if unknown:
                raise UnknownOptionError(_unknown_option(cls.__name__, unknown[0], names))
            init(self, *args, **kw)

        checked._checks_options = True  # type: ignore[attr-defined]
        cls.__init__ = checked  # type: ignore[method-assign]

    def __init__(self, *, device: Any = None, seed: int | None = None, max_time: float | None = None,
                 progress: bool = True, num_threads: int | None = None):
        self.device = None if device is None else V.resolve_device(device)
        self.seed = V.check_seed(seed)
        self.max_time = V.check_optional_positive_float(max_time, "max_time")
        self.progress = V.check_bool(progress, "progress")
        self.num_threads = V.check_optional_positive_int(num_threads, "num_threads")

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
        threads = choose_threads(self.num_threads, self._thread_work(x_source, y_source, x_target),
                                 what=type(self).__name__)
        # also when fit() is called under torch.no_grad()
        with torch.enable_grad(), using_threads(threads.n):
            est = self._fit(x_source, y_source, x_target, y_target, run)
        # The last guard: whatever a method missed, NaN/Inf values are never returned as a result.
        V.check_finite_values(est.values, type(self).__name__)
        timings = dict(est.timings)
        timings["total"] = time.perf_counter() - t0
        timings["cpu"] = time.process_time() - c0
        status = est.status
        reason = est.stop_reason or status
        info = {"seed": run.seed, "device": str(run.device), **threads.as_info(), **est.info, "stopped_by": reason,
                "fingerprint": self._run_identity(run.seed, (x_source, y_source, x_target, y_target))}
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

    def _run_identity(self, seed: int, inputs: tuple) -> str:
        """A digest of what makes this run: method, settings, seed, the model's initial weights (or
        the factory's code) and the data. Stored as ``result.info["fingerprint"]``; ``a + b`` refuses
        two results of one run (pooling assumes independent runs)."""
        h = runstate.new_hash()
        h.update(json.dumps({"method": self.name, "settings": self.settings(), "seed": int(seed)},
                            sort_keys=True, default=repr).encode())
        model = getattr(self, "model", None)
        if isinstance(model, nn.Module):
            h.update(runstate.model_weights(model).encode())
        elif callable(model):
            h.update(runstate.callable_identity(model).encode())
        for x in inputs:
            _update_with_input(h, x)
        return h.hexdigest()

    def _thread_work(self, x_source: Any, y_source: Any, x_target: Any) -> int | None:
        """Multiply-adds of the largest matrix product of this method's steps, for the thread
        rule (None: unknown). The default reads the method's model (an nn.Module, a factory of
        one, or 'logistic' / 'mlp') and the largest of its batch sizes, at most the rows given."""
        return model_work(getattr(self, "model", None), x_source, y_source, x_target,
                          [getattr(self, k, None) for k in ("source_batch_size", "target_batch_size", "batch_size")],
                          hidden=getattr(self, "hidden_dim", 100))

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


def _update_with_input(h, x: Any) -> None:
    """Feed an input into the run's digest: every byte up to 64 MB, else its shape and an evenly
    strided sample of its rows (a digest must not cost a pass over a large input); a streamed
    source by its type and length."""
    if x is None:
        h.update(b"none")
        return
    if not isinstance(x, torch.Tensor):
        try:
            x = torch.as_tensor(np.asarray(x)) if isinstance(x, (np.ndarray, list, tuple)) else x
        except (TypeError, ValueError):
            pass
    if isinstance(x, torch.Tensor):
        n = int(x.shape[0]) if x.dim() else 1
        step = max(1, -(-x.numel() * x.element_size() // (64 << 20)))
        h.update(repr(("rows", n, step)).encode())
        runstate.update_with_tensor(h, x if step == 1 or x.dim() == 0 else x[::step])
        return
    h.update(repr((type(x).__qualname__, len(x) if hasattr(x, "__len__") else None)).encode())


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
