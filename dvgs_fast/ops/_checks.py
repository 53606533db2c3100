"""Python-side input checks, shared by the wrappers and the fake (meta) kernels.

The C++ kernels check the same things (so direct torch.ops calls are safe too); checking
here as well gives errors under torch.compile / FakeTensor tracing, where no kernel runs.
"""
from __future__ import annotations

from typing import Sequence

import torch


def check_grad_stats_inputs(grads: Sequence[torch.Tensor], target: Sequence[torch.Tensor], op: str) -> int:
    if isinstance(grads, torch.Tensor) or isinstance(target, torch.Tensor):
        raise ValueError(f"{op}: grads and target must be lists of tensors (one per parameter), not a single tensor")
    grads, target = list(grads), list(target)
    if not grads:
        raise ValueError(f"{op}: grads is an empty list")
    if len(grads) != len(target):
        raise ValueError(f"{op}: grads has {len(grads)} tensors but target has {len(target)}")
    if grads[0].dim() < 1:
        raise ValueError(f"{op}: grads[0] must have a sample dimension, got a 0-d tensor")
    n = grads[0].shape[0]
    dev = grads[0].device
    for k, (g, t) in enumerate(zip(grads, target)):
        if not g.is_floating_point():
            raise ValueError(f"{op}: grads[{k}] must be floating point, got {g.dtype}")
        if not t.is_floating_point():
            raise ValueError(f"{op}: target[{k}] must be floating point, got {t.dtype}")
        if g.device != dev or t.device != dev:
            raise ValueError(f"{op}: all tensors must be on one device; grads[0] is on {dev}, "
                             f"grads[{k}] on {g.device}, target[{k}] on {t.device}")
        if g.dim() < 1:
            raise ValueError(f"{op}: grads[{k}] must have a sample dimension, got a 0-d tensor")
        if g.shape[0] != n:
            raise ValueError(f"{op}: grads[{k}] has {g.shape[0]} samples but grads[0] has {n}")
        if tuple(g.shape[1:]) != tuple(t.shape):
            raise ValueError(f"{op}: target[{k}] has shape {list(t.shape)} but grads[{k}] has per-sample shape "
                             f"{list(g.shape[1:])} (grads[{k}] is {list(g.shape)})")
    return n


def stats_out_dtype(grads: Sequence[torch.Tensor]) -> torch.dtype:
    return torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32


def check_linear_ghost_inputs(a: torch.Tensor, d: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> None:
    op = "linear_ghost_stats"
    if a.dim() not in (2, 3):
        raise ValueError(f"{op}: inputs must be [N, d_in] or [N, T, d_in], got {list(a.shape)}")
    if d.dim() != a.dim():
        raise ValueError(f"{op}: output_grads must have the same number of dims as inputs ({a.dim()}), got {list(d.shape)}")
    if d.shape[0] != a.shape[0]:
        raise ValueError(f"{op}: output_grads has {d.shape[0]} samples but inputs has {a.shape[0]}")
    if a.dim() == 3 and d.shape[1] != a.shape[1]:
        raise ValueError(f"{op}: output_grads has T={d.shape[1]} but inputs has T={a.shape[1]}")
    if w.dim() != 2 or w.shape[0] != d.shape[-1] or w.shape[1] != a.shape[-1]:
        raise ValueError(f"{op}: target_weight must be [d_out, d_in] = [{d.shape[-1]}, {a.shape[-1]}], got {list(w.shape)}")
    for t, name in ((a, "inputs"), (d, "output_grads"), (w, "target_weight")):
        if not t.is_floating_point():
            raise ValueError(f"{op}: {name} must be floating point, got {t.dtype}")
        if t.device != a.device:
            raise ValueError(f"{op}: {name} is on {t.device} but inputs is on {a.device}")
    if a.dtype != d.dtype:
        raise ValueError(f"{op}: inputs ({a.dtype}) and output_grads ({d.dtype}) must have the same dtype")
    if b is not None:
        if b.dim() != 1 or b.shape[0] != d.shape[-1]:
            raise ValueError(f"{op}: target_bias must be [d_out] = [{d.shape[-1]}], got {list(b.shape)}")
        if not b.is_floating_point():
            raise ValueError(f"{op}: target_bias must be floating point, got {b.dtype}")
        if b.device != a.device:
            raise ValueError(f"{op}: target_bias is on {b.device} but inputs is on {a.device}")
