"""Input checks shared by every valuation method.

Every check runs before any training starts and raises a ValueError that names the offending
argument, so a bad call fails in milliseconds instead of after an hour of work.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

LOSSES = ("cross_entropy", "mse")


def resolve_device(device: Any) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device: {device!r} is not a valid torch device") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} requested but CUDA is not available in this torch build/machine")
    return dev


def all_finite(t: torch.Tensor, block: int = 1 << 22) -> bool:
    """torch.isfinite(t).all() in blocks of `block` elements: a multi-GB input would otherwise
    need ~1.75x its size in temporaries (isfinite's intermediates) just to be checked."""
    flat = t.reshape(-1) if t.is_contiguous() else t.contiguous().reshape(-1)
    if flat.numel() <= block:
        return bool(torch.isfinite(flat).all())
    return all(bool(torch.isfinite(flat[i:i + block]).all()) for i in range(0, flat.numel(), block))


def as_float_tensor(x: Any, name: str, *, allow_none: bool = False) -> torch.Tensor | None:
    """numpy array / tensor / nested list -> floating tensor (float64 stays float64), checked."""
    if x is None:
        if allow_none:
            return None
        raise ValueError(f"{name}: is None")
    if isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        arr = np.asarray(x)
        if arr.dtype == object:
            raise ValueError(f"{name}: cannot convert an object array to a tensor")
        t = torch.from_numpy(np.ascontiguousarray(arr))
    if t.is_complex():
        raise ValueError(f"{name}: complex values are not supported (dtype {t.dtype})")
    if not t.is_floating_point():  # integers and booleans become float32 features
        t = t.to(torch.float32)
    if t.dim() == 0:
        raise ValueError(f"{name}: expected an array of samples, got a scalar")
    if t.shape[0] == 0:
        raise ValueError(f"{name}: is empty (0 samples)")
    if t.is_floating_point() and not all_finite(t):
        n_bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{name}: contains {n_bad} NaN/Inf value(s)")
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.to(torch.float32)
    return t


def as_labels(y: Any, name: str, *, loss: str, n_classes: int | None = None) -> torch.Tensor:
    """Labels for the given loss: int64 class indices for cross-entropy, floats otherwise."""
    if y is None:
        raise ValueError(f"{name}: labels are required for loss={loss!r}")
    t = y.detach() if isinstance(y, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(np.asarray(y)))
    if t.dim() == 0 or t.shape[0] == 0:
        raise ValueError(f"{name}: is empty (0 labels)")
    if loss == "cross_entropy":
        if t.is_floating_point():
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name}: contains NaN/Inf")
            if not bool((t == t.round()).all()):
                raise ValueError(f"{name}: cross_entropy needs integer class labels, got non-integer floats")
            raise ValueError(f"{name}: cross_entropy needs integer class labels (dtype {t.dtype}); "
                             f"pass y.astype(int)")
        if t.dtype == torch.bool:
            t = t.long()
        t = t.long()
        if t.dim() != 1:
            raise ValueError(f"{name}: class labels must be 1-D, got shape {tuple(t.shape)}")
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or (n_classes is not None and hi >= n_classes):
            raise ValueError(f"{name}: labels must be in [0, {n_classes}), found range [{lo}, {hi}]")
        return t
    t = t.to(torch.float32) if not t.is_floating_point() or t.dtype in (torch.float16, torch.bfloat16) else t
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name}: contains NaN/Inf")
    return t


def check_same_length(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> None:
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"{name_b}: has {b.shape[0]} rows but {name_a} has {a.shape[0]}")


def check_same_features(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> None:
    if tuple(a.shape[1:]) != tuple(b.shape[1:]):
        raise ValueError(f"{name_b}: sample shape {tuple(b.shape[1:])} differs from {name_a}'s {tuple(a.shape[1:])}")


def check_choice(value: Any, name: str, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}: unknown value {value!r}; choose one of {', '.join(map(repr, choices))}")
    return value


def check_positive_int(value: Any, name: str, *, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name}: expected an integer, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name}: must be {'>= 0' if allow_zero else '> 0'}, got {value}")
    return int(value)


def check_positive_float(value: Any, name: str, *, allow_zero: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: expected a number, got {value!r}") from exc
    if not np.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"{name}: must be {'>= 0' if allow_zero else '> 0'} and finite, got {value!r}")
    return v


def tensor_device_of(*xs: Any) -> set[torch.device]:
    return {x.device for x in xs if isinstance(x, torch.Tensor)}


def check_devices(named: dict[str, Any]) -> None:
    """All tensor inputs must live on one device (numpy inputs are placed by the method)."""
    devs = {name: x.device for name, x in named.items() if isinstance(x, torch.Tensor)}
    if len(set(devs.values())) > 1:
        desc = ", ".join(f"{k} on {v}" for k, v in devs.items())
        raise ValueError(f"inputs are on different devices ({desc}); move them to one device")


def infer_n_classes(*ys: torch.Tensor) -> int:
    return int(max(int(y.max()) for y in ys if y is not None)) + 1
