"""Retraining one recipe on many 0/1 row masks at once, and reading the query outputs.

Three engines compute the same retrains (same recipe, seed and mask -> the same network up to
float summation order; python_tests/test_counterfactual.py checks each against plain torch loops
in float64):

* ``linear``: full-batch training of a bare ``nn.Linear`` (logistic / linear regression) on the
  hand-batched GEMM grid of ``refit/batched.py`` (``GridTrainer``: the masks share the rows,
  loss = sum(mask * l) / sum(mask), the functional SGD / Adam of ``refit/optim.py``);
* ``chain``: any network that is a chain of ``nn.Linear`` and parameter-free layers, trained as
  one stack of networks by ``evaluate/_net_refits.py`` -- ``train_batched_masked`` for the
  "shared" data order, ``train_batched`` for the "subset" order (recipe.py);
* ``plain``: one ``nn.Module`` + ``torch.optim`` loop per mask (``_net_refits.train_sequential``):
  the reference, the fallback for other networks, and the baseline of bench/bench_counterfactual.py.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from dvgs_fast.evaluate import _net_refits as R
from dvgs_fast.refit.batched import GridTrainer
from dvgs_fast.refit.models import Refitter

from ._data import Data
from .outputs import query_outputs
from .recipe import TrainingRecipe

ENGINES = ("auto", "batched", "plain")
Params = dict[str, torch.Tensor]


@dataclass
class Trained:
    """K retrained networks: stacked parameters [K, ...] (batched engines) or modules (plain)."""

    params: Params | None = None
    modules: list[nn.Module] | None = None


class Retrainer:
    """Trains retrains of ``recipe`` on row masks and returns their query outputs."""

    def __init__(self, recipe: TrainingRecipe, data: Data, *, order: str, output: str, engine: str = "auto"):
        self.recipe, self.data, self.order, self.output = recipe, data, order, output
        probe = recipe.initial_module(0)
        n = data.n_source
        full_batch = recipe.batch_size is None or recipe.batch_size >= n
        flat = data.x.dim() == 2
        self.chain = R.as_chain(probe, int(data.x.shape[1])) if flat else None
        if engine == "plain":
            self.kind = "plain"
        elif full_batch and type(probe) is nn.Linear and (data.classification or data.out_dim == 1):
            self.kind = "linear"
        elif self.chain is not None:
            self.kind = "chain"
        elif engine == "batched":
            raise ValueError("engine: 'batched' needs a network that is a chain of nn.Linear and parameter-free "
                             "layers (activations, Dropout, LayerNorm without affine) on flat inputs; use 'auto'")
        else:
            self.kind = "plain"
        self.template = probe

    # ------------------------------------------------------------------ weights
    def initial_params(self, seed: int) -> Params:
        return {k: v.detach().clone() for k, v in self.recipe.initial_module(seed).named_parameters()}

    def params_of(self, trained: Trained, k: int) -> Params:
        if trained.params is not None:
            return {name: v[k].detach().clone() for name, v in trained.params.items()}
        return {name: v.detach().clone() for name, v in trained.modules[k].named_parameters()}

    # ------------------------------------------------------------------ training
    def fit(self, masks: torch.Tensor, seed: int, start: Params, epochs: int | None = None) -> Trained:
        """Train one network per row of ``masks`` ([K, N] bool) from ``start`` with seed ``seed``'s
        batch order (and dropout), for ``epochs`` (default: the recipe's)."""
        d = self.data
        K, N = masks.shape
        cfg = self.recipe.net_settings(N, epochs)
        if self.kind == "linear":
            module = self.template
            refitter = Refitter(module, classification=d.classification, steps=cfg.epochs, lr=cfg.lr,
                                optimizer=cfg.optimizer, weight_decay=cfg.weight_decay)
            grid = GridTrainer(refitter, start, "linear")
            M = masks.to(device=d.x.device, dtype=d.x.dtype).unsqueeze(0)
            params = grid.train(d.x.unsqueeze(0), d.y.unsqueeze(0), M)
            return Trained(params={k: v[0] for k, v in params.items()})
        if self.kind == "chain":
            params0 = {k: start[k].unsqueeze(0).expand(K, *start[k].shape).clone() for k in self.chain.names}
            if self.order == "shared":
                params = R.train_batched_masked(self.chain, params0, d.x, d.y, masks, seed, cfg)
            else:
                rows = [np.flatnonzero(m) for m in masks.cpu().numpy()]
                params = R.train_batched(self.chain, params0, d.x, d.y, rows, [seed] * K, cfg)
            return Trained(params=params)
        modules = []
        for m in masks.cpu().numpy():
            net = self.module_with(start).train()
            modules.append(R.train_sequential(net, d.x, d.y, np.flatnonzero(m), seed, cfg, self.chain,
                                              order=self.order))
        return Trained(modules=modules)

    def module_with(self, params: Params) -> nn.Module:
        """A copy of the network holding ``params`` (eval mode)."""
        net = copy.deepcopy(self.template)
        with torch.no_grad():
            for name, p in net.named_parameters():
                p.copy_(params[name])
        return net.eval()

    # ------------------------------------------------------------------ outputs
    def outputs(self, trained: Trained) -> np.ndarray:
        """The recorded output of every query under every network: [K, Q] float64."""
        d = self.data
        with torch.no_grad():
            if self.kind == "linear":
                W = trained.params["weight"]
                z = torch.matmul(d.xq, W.transpose(1, 2))              # [K, Q, o]
                if "bias" in trained.params:
                    z = z + trained.params["bias"].unsqueeze(1)
            elif self.kind == "chain":
                z = R.batched_outputs(self.chain, trained.params, d.xq)
            else:
                z = torch.stack([net.eval()(d.xq) for net in trained.modules])
            out = query_outputs(z, d.yq, self.output, d.classification)
        return out.to("cpu").numpy()

    def info(self) -> dict[str, Any]:
        return {"engine": self.kind, "data_order": self.order}
