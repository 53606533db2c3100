"""The checked inputs of a ground truth: source (training) rows, query rows, and their digest."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch

from dvgs_fast import _validation as V
from dvgs_fast.refit.models import check_model_output

from .recipe import TrainingRecipe


@dataclass
class Data:
    x: torch.Tensor          # [N, ...] source rows, in the recipe's dtype and device
    y: torch.Tensor          # [N] int64 labels, or [N] / [N, k] float targets
    xq: torch.Tensor         # [Q, ...] query rows
    yq: torch.Tensor
    classification: bool
    out_dim: int
    digest: str              # of the four arrays' bytes, shapes and dtypes

    @property
    def n_source(self) -> int:
        return int(self.x.shape[0])

    @property
    def n_query(self) -> int:
        return int(self.xq.shape[0])


def prepare(x_source: Any, y_source: Any, x_query: Any, y_query: Any, recipe: TrainingRecipe,
            n_classes: int | None = None) -> Data:
    """Validate and place the four arrays (ValueError naming the argument, before any training)."""
    V.check_devices({"x_source": x_source, "y_source": y_source, "x_query": x_query, "y_query": y_query})
    xs = V.as_float_tensor(x_source, "x_source")
    xq = V.as_float_tensor(x_query, "x_query")
    V.check_same_features(xs, xq, "x_source", "x_query")
    classification = recipe.loss == "cross_entropy"
    if n_classes is not None:
        n_classes = V.check_positive_int(n_classes, "n_classes")
        if classification and n_classes < 2:
            raise ValueError(f"n_classes: needs at least 2 classes for cross_entropy, got {n_classes}")
    ys = V.as_labels(y_source, "y_source", loss=recipe.loss, n_classes=n_classes)
    yq = V.as_labels(y_query, "y_query", loss=recipe.loss, n_classes=n_classes)
    V.check_same_length(xs, ys, "x_source", "y_source")
    V.check_same_length(xq, yq, "x_query", "y_query")
    if xs.shape[0] < 2:
        raise ValueError(f"x_source: a counterfactual ground truth needs at least 2 source rows, got {xs.shape[0]}")
    if classification:
        out_dim = n_classes if n_classes is not None else max(V.infer_n_classes(ys, yq), 2)
    else:
        if ys.dim() > 2 or tuple(ys.shape[1:]) != tuple(yq.shape[1:]):
            raise ValueError(f"y_query: targets of shape {tuple(yq.shape[1:])} do not match y_source's "
                             f"{tuple(ys.shape[1:])} (regression targets are [n] or [n, k])")
        out_dim = 1 if ys.dim() == 1 else int(ys.shape[1])
    dev, dt = torch.device(recipe.device), recipe.dtype
    ydt = torch.long if classification else dt
    data = Data(xs.to(device=dev, dtype=dt), ys.to(device=dev, dtype=ydt), xq.to(device=dev, dtype=dt),
                yq.to(device=dev, dtype=ydt), classification, int(out_dim), _digest(xs, ys, xq, yq))
    check_model_output(recipe.initial_module(0), data.x, data.out_dim)
    return data


def _digest(*arrays: torch.Tensor) -> str:
    h = hashlib.blake2b(digest_size=20)
    for a in arrays:
        a = a.detach().to("cpu").contiguous()
        h.update(repr((tuple(a.shape), str(a.dtype))).encode())
        h.update(a.numpy().tobytes())
    return h.hexdigest()
