"""Shared plumbing for the baseline methods: input preparation, budgets, progress bars.

Everything here runs before any training, so bad input fails fast with a ValueError that names the
argument (the conventions of ``dvgs_fast/_validation.py``, which these helpers call).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .._validation import (LOSSES, as_float_tensor, as_labels, check_choice, check_devices,
                           check_positive_float, check_positive_int, check_same_features,
                           check_same_length, infer_n_classes)

CLASSIFICATION_METRICS = ("accuracy", "auc", "neg_log_loss")
REGRESSION_METRICS = ("neg_mse", "neg_mae", "r2")
DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class Prepared:
    """Checked inputs on the method's device."""

    x_source: torch.Tensor
    y_source: torch.Tensor
    x_target: torch.Tensor
    y_target: torch.Tensor
    classification: bool
    n_classes: int | None  # None for regression
    out_dim: int
    device: torch.device

    @property
    def n_source(self) -> int:
        return int(self.x_source.shape[0])


def check_dtype(dtype: Any, name: str = "dtype") -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"{name}: expected float32 or float64, got {dtype}")
        return dtype
    return DTYPES[check_choice(dtype, name, tuple(DTYPES))]


def check_optional_positive_int(value: Any, name: str) -> int | None:
    return None if value is None else check_positive_int(value, name)


def check_optional_positive_float(value: Any, name: str) -> float | None:
    return None if value is None else check_positive_float(value, name)


def check_bool(value: Any, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name}: expected True or False, got {value!r}")
    return bool(value)


def check_seed(seed: Any) -> int | None:
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed: expected a non-negative integer or None, got {seed!r}")
    return int(seed)


def check_model_spec(model: Any, name: str = "model") -> Any:
    """'logistic' / 'mlp' / an nn.Module / a zero-argument factory (resolved at fit time)."""
    if isinstance(model, str):
        return check_choice(model, name, ("logistic", "mlp"))
    if isinstance(model, torch.nn.Module) or callable(model):
        return model
    raise ValueError(f"{name}: expected 'logistic', 'mlp', an nn.Module or a zero-argument factory, "
                     f"got {type(model).__name__}")


def resolve_metric(metric: str | None, loss: str, *, n_classes: int | None, default_cls: str,
                   default_reg: str = "neg_mse", name: str = "metric") -> str:
    if loss == "cross_entropy":
        metric = default_cls if metric is None else metric
        check_choice(metric, name, CLASSIFICATION_METRICS)
        if metric == "auc" and n_classes is not None and n_classes != 2:
            raise ValueError(f"{name}: 'auc' needs a binary problem, got {n_classes} classes")
        return metric
    metric = default_reg if metric is None else metric
    return check_choice(metric, name, REGRESSION_METRICS)


def prepare_inputs(x_source: Any, y_source: Any, x_target: Any, y_target: Any, *, loss: str,
                   n_classes: int | None, device: torch.device, dtype: torch.dtype,
                   flatten: bool) -> Prepared:
    """Validate and place the four arrays. Raises ValueError naming the argument."""
    check_choice(loss, "loss", LOSSES)
    check_devices({"x_source": x_source, "y_source": y_source, "x_target": x_target, "y_target": y_target})
    xs = as_float_tensor(x_source, "x_source")
    xt = as_float_tensor(x_target, "x_target")
    classification = loss == "cross_entropy"
    if n_classes is not None:
        n_classes = check_positive_int(n_classes, "n_classes")
        if classification and n_classes < 2:
            raise ValueError(f"n_classes: needs at least 2 classes for cross_entropy, got {n_classes}")
    ys = as_labels(y_source, "y_source", loss=loss, n_classes=n_classes)
    yt = as_labels(y_target, "y_target", loss=loss, n_classes=n_classes)
    if not classification:
        for name, y in (("y_source", ys), ("y_target", yt)):
            if y.dim() == 2 and y.shape[1] == 1:
                continue
            if y.dim() != 1:
                raise ValueError(f"{name}: regression targets must be 1-D (or [N, 1]), got shape {tuple(y.shape)}")
        ys, yt = ys.reshape(-1), yt.reshape(-1)
    check_same_length(xs, ys, "x_source", "y_source")
    check_same_length(xt, yt, "x_target", "y_target")
    check_same_features(xs, xt, "x_source", "x_target")
    if flatten:
        xs, xt = xs.reshape(xs.shape[0], -1), xt.reshape(xt.shape[0], -1)
    if classification:
        inferred = infer_n_classes(ys, yt)
        if n_classes is None:
            n_classes = max(inferred, 2)
        out_dim = n_classes
    else:
        n_classes = None
        out_dim = 1
    ydt = torch.long if classification else dtype
    return Prepared(xs.to(device=device, dtype=dtype), ys.to(device=device, dtype=ydt),
                    xt.to(device=device, dtype=dtype), yt.to(device=device, dtype=ydt),
                    classification, n_classes, out_dim, device)


class Budget:
    """Wall-clock and iteration budget; `exhausted()` says why a loop should stop (or None)."""

    def __init__(self, max_time: float | None, max_iterations: int | None):
        self.max_time = max_time
        self.max_iterations = max_iterations
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def time_up(self) -> bool:
        return self.max_time is not None and self.elapsed() >= self.max_time

    def exhausted(self, iterations_done: int) -> str | None:
        if self.max_iterations is not None and iterations_done >= self.max_iterations:
            return "max_iterations"
        if self.time_up():
            return "max_time"
        return None


def progress_bar(enabled: bool, total: int | None, desc: str):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


def to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy()


def settings_of(est: Any, keys: tuple[str, ...]) -> dict[str, Any]:
    """A baseline's settings for ValuationResult.params: the named attributes plus the model
    (its name, or its class for a module/factory), dtype and device as plain strings."""
    out = {k: getattr(est, k) for k in keys}
    out["model"] = est.model if isinstance(est.model, str) else type(est.model).__name__
    out["dtype"] = str(est.dtype).replace("torch.", "")
    out["device"] = str(est.device)
    return out
