"""The training recipe of a ground truth, as a value: what every retrain does.

A counterfactual ground truth asks "what would the model output on each query had it been trained
without these rows?", and the answer is only as good as the retrains are comparable: the
retrains of one seed share their initial weights, their batch order and their dropout noise, and
differ only by the rows left out. The recipe fixes everything else.

Seed ``s`` of a retrain means, exactly as a plain loop would write it:

* initial weights: ``torch.manual_seed(s); net = model()`` for a factory, or a copy of the
  template module with ``reset_parameters()`` of every submodule under ``torch.manual_seed(s)``;
* batch order (and dropout masks): ``g = torch.Generator().manual_seed(s)``, each epoch
  ``torch.randperm(n, generator=g)`` then one ``torch.rand(n, width, generator=g)`` per dropout
  layer (see ``evaluate/_net_refits.py``); ``batch_size=None`` is full-batch training (one step
  per epoch on all kept rows).

``data_order`` says how a retrain on a subset orders its rows: ``"shared"`` shuffles all N rows
and masks the removed ones inside their batch (leaving one row out changes one batch only: the
leave-one-out default); ``"subset"`` shuffles the kept rows alone, in batches of
``batch_size`` (what a DataLoader over the subset does: the default for random subsets).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from torch import nn

from dvgs_fast import _validation as V
from dvgs_fast._utils import reset_parameters
from dvgs_fast.evaluate import _net_refits as R

ORDERS = ("shared", "subset")


@dataclass(frozen=True)
class TrainingRecipe:
    """How each retrain is trained.

    model         a zero-argument factory returning an ``nn.Module``, or a module used as a
                  template (deep-copied and re-initialised per seed); no batch norm (retrains
                  run in train mode for dropout only)
    loss          "cross_entropy" (integer labels) or "mse" (float targets [n] or [n, k])
    optimizer     "sgd" (no momentum) or "adam" (torch.optim's arithmetic)
    lr, epochs    learning rate; passes over the data
    batch_size    rows per step; None = full batch (one step per epoch)
    weight_decay  L2 coefficient added to the gradient of every parameter (torch.optim's
                  ``weight_decay``: the objective is mean loss + weight_decay / 2 * ||theta||^2)
    data_order    None (the ground truth's default: "shared" for leave-one-out, "subset" for
                  random subsets), "shared" or "subset" (module docstring)
    dtype         torch.float32 or torch.float64 (data, weights and arithmetic)
    device        where the retrains run ("cpu", "cuda", ...)
    """

    model: Any
    loss: str = "cross_entropy"
    optimizer: str = "sgd"
    lr: float = 0.1
    epochs: int = 100
    batch_size: int | None = None
    weight_decay: float = 0.0
    data_order: str | None = None
    dtype: torch.dtype = torch.float32
    device: str = "cpu"

    def __post_init__(self):
        if isinstance(self.model, str) or not (isinstance(self.model, nn.Module) or callable(self.model)):
            raise ValueError(f"model: expected an nn.Module or a zero-argument factory returning one, got "
                             f"{type(self.model).__name__}")
        V.check_choice(self.loss, "loss", V.LOSSES)
        V.check_choice(self.optimizer, "optimizer", R.OPTIMIZERS)
        V.check_positive_float(self.lr, "lr")
        V.check_positive_int(self.epochs, "epochs")
        if self.batch_size is not None:
            V.check_positive_int(self.batch_size, "batch_size")
        V.check_positive_float(self.weight_decay, "weight_decay", allow_zero=True)
        if self.data_order is not None:
            V.check_choice(self.data_order, "data_order", ORDERS)
        object.__setattr__(self, "dtype", V.check_dtype(self.dtype))
        object.__setattr__(self, "device", str(V.resolve_device(self.device)))

    # ------------------------------------------------------------------ seeds -> networks
    def initial_module(self, seed: int) -> nn.Module:
        """The network a retrain of seed ``seed`` starts from (global RNG state restored)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            if isinstance(self.model, nn.Module):
                net = copy.deepcopy(self.model)
                reset_parameters(net)
            else:
                net = self.model()
                if not isinstance(net, nn.Module):
                    raise ValueError(f"model: the factory returned {type(net).__name__}, not an nn.Module")
        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules()):
            raise ValueError("model: batch norm is not supported (a retrain's output would depend on the "
                             "batch statistics of the rows left out); use LayerNorm or none")
        return net.to(device=self.device, dtype=self.dtype)

    def net_settings(self, n_rows: int, epochs: int | None = None) -> R.NetSettings:
        """The batched trainer's settings (full batch = one batch of all rows)."""
        return R.NetSettings(epochs=self.epochs if epochs is None else epochs, lr=self.lr,
                             batch_size=self.batch_size or n_rows, weight_decay=self.weight_decay,
                             loss="ce" if self.loss == "cross_entropy" else "mse", optimizer=self.optimizer,
                             device=self.device, dtype=self.dtype)

    def order_for(self, default: str) -> str:
        return self.data_order or default

    def settings(self) -> dict[str, Any]:
        """JSON-friendly settings (the model is fingerprinted separately: structure + weights)."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "model"}
        d["dtype"] = str(self.dtype).replace("torch.", "")
        d["device"] = torch.device(self.device).type
        return d


def as_recipe(recipe: Any) -> TrainingRecipe:
    if not isinstance(recipe, TrainingRecipe):
        raise ValueError(f"recipe: expected a TrainingRecipe, got {type(recipe).__name__}")
    return recipe


def check_seeds(seeds: Any, name: str = "seeds") -> tuple[int, ...]:
    """An int k -> (0, ..., k-1); a sequence of distinct non-negative ints as given."""
    if isinstance(seeds, bool):
        raise ValueError(f"{name}: expected a count or a list of seeds, got {seeds!r}")
    if isinstance(seeds, (int, np.integer)):
        return tuple(range(V.check_positive_int(seeds, name)))
    try:
        out = tuple(seeds)
    except TypeError:
        raise ValueError(f"{name}: expected a count or a list of seeds, got {seeds!r}") from None
    if not out:
        raise ValueError(f"{name}: is empty")
    for s in out:
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0:
            raise ValueError(f"{name}: seeds must be non-negative integers, got {s!r}")
    if len(set(out)) != len(out):
        raise ValueError(f"{name}: lists a seed twice ({list(out)})")
    return tuple(int(s) for s in out)

