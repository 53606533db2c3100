"""Batched refits: many prefix models trained at once.

TMC-Shapley spends its time refitting tiny models one after another. Here a *grid* of models is
trained together: P permutations in flight ("slots") x C consecutive prefixes of each (a "chunk").
Slot p holds its permuted rows ``Xp[p] = X[perm_p[:L]]``; model (p, c) is trained on the first
``k_pc`` of them, expressed as a 0/1 row mask, with the very same refit function as the sequential
reference (`_models.Refitter.train`): ``loss = sum(mask * l) / sum(mask)``, same initial weights,
same number of full-batch steps, same optimizer arithmetic. Masked-out rows add exact zeros, so
the batched and the sequential path compute the same models up to float summation order.

Two engines compute the grid:

* ``vmap`` (any model): ``torch.func.vmap`` over slots (per-slot rows) and, nested, over the
  prefixes of a slot (rows shared), around the functional trainer -- the
  ``stack_module_state`` + ``vmap`` recipe, written against a dict of stacked parameters.
* ``linear`` (logistic / linear regression, i.e. a bare ``nn.Linear``): the same maths written as
  batched GEMMs with hand-derived gradients in a class-major layout ([P, C, classes, rows]), which
  avoids slow softmax kernels over a size-2 last dimension on CPU. It is selected automatically.
* ``mlp`` (Linear-ReLU-Linear, ``batched_mlp.py``): the same for a one-hidden-layer network; asked
  for explicitly (the semivalue methods pick it for such a model).

Truncation is decided afterwards, per slot and position, by the same `PermState` state machine as
the sequential loop; work computed past a slot's truncation point is discarded. Finished slots are
refilled with the next permutation, so the grid stays full.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.func import vmap

from dvgs_fast.refit.batched_mlp import is_relu_mlp, mlp_outputs, train_mlp_grid
from dvgs_fast.refit.models import (Refitter, check_model_output, guard_outputs, init_params, make_model,
                                    score_outputs)
from dvgs_fast.refit.optim import BudgetHit, run_optimizer  # noqa: F401 - BudgetHit for the callers


class GridTrainer:
    """Train / score a [P, C] grid of models from the same initial weights."""

    def __init__(self, refitter: Refitter, theta0: dict[str, torch.Tensor], engine: str = "auto"):
        self.r = refitter
        self.theta0 = theta0
        is_linear = isinstance(refitter.module, nn.Linear)
        if engine == "auto":
            engine = "linear" if is_linear else "vmap"
        if engine == "linear" and not is_linear:
            raise ValueError("batch_engine: 'linear' needs the model to be a single nn.Linear "
                             "(model='logistic'); use 'vmap' or 'auto'")
        if engine == "mlp" and not is_relu_mlp(refitter.module):
            raise ValueError("batch_engine: 'mlp' needs the model to be nn.Sequential(Linear, ReLU, Linear) "
                             "(model='mlp'); use 'vmap' or 'auto'")
        self.engine = engine
        if engine == "vmap":
            inner = vmap(refitter.train_functional, in_dims=(None, None, None, 0))
            self._train_grid = vmap(inner, in_dims=(None, 0, 0, 0))

    # -- training ----------------------------------------------------------------------------
    def train(self, Xp: torch.Tensor, Yp: torch.Tensor, M: torch.Tensor,
              stop: Callable[[], bool] | None = None) -> dict[str, torch.Tensor]:
        """Xp [P, L, ...], Yp [P, L], M [P, C, L] (0/1) -> params with leading dims [P, C].

        stop: asked before every optimizer step (instead of the refitter's own ``should_stop``);
        True raises ``BudgetHit`` (a budget that ran out in the middle of the grid's training,
        which can take seconds)."""
        saved = self.r.should_stop
        if stop is not None:
            self.r.should_stop = stop
        try:
            if self.engine == "vmap":
                return self._train_grid(self.theta0, Xp, Yp, M)
            if self.engine == "mlp":
                return train_mlp_grid(self.r, self.theta0, Xp, Yp, M)
            return self._train_linear(Xp, Yp, M)
        finally:
            self.r.should_stop = saved

    def _train_linear(self, Xp, Yp, M):
        r = self.r
        P, C, L = M.shape
        W0 = self.theta0["weight"]
        o, d = W0.shape
        has_bias = "bias" in self.theta0
        W = W0.expand(P, C, o, d).clone()
        b = self.theta0["bias"].expand(P, C, o).clone() if has_bias else None
        Xp2 = Xp.reshape(P, L, d)
        XpT = Xp2.transpose(1, 2).contiguous()  # [P, d, L]
        wk = (M / M.sum(-1, keepdim=True)).unsqueeze(2)  # [P, C, 1, L]
        if r.classification:
            target = torch.nn.functional.one_hot(Yp, o).to(Xp.dtype).transpose(1, 2).unsqueeze(1)  # [P,1,o,L]
        else:
            target = Yp.reshape(P, 1, 1, L)

        binary = r.classification and o == 2
        if binary:  # softmax over 2 classes = sigmoid of the logit difference: half the work
            y1 = Yp.to(Xp.dtype).reshape(P, 1, L)
            wk2 = wk.squeeze(2)

        def grads(W, b):
            if binary:
                zd = torch.bmm((W[:, :, 1] - W[:, :, 0]), XpT)  # [P, C, L]
                if b is not None:
                    zd = zd + (b[:, :, 1] - b[:, :, 0]).unsqueeze(-1)
                g1 = (torch.sigmoid(zd) - y1) * wk2
                g1W = torch.bmm(g1, Xp2)  # [P, C, d]
                gW = torch.stack([-g1W, g1W], dim=2)
                gb = None
                if b is not None:
                    g1b = g1.sum(-1)
                    gb = torch.stack([-g1b, g1b], dim=2)
                if r.weight_decay:
                    gW = gW + r.weight_decay * W
                    if b is not None:
                        gb = gb + r.weight_decay * b
                return gW, gb
            z = torch.bmm(W.reshape(P, C * o, d), XpT).view(P, C, o, L)
            if b is not None:
                z = z + b.unsqueeze(-1)
            if r.classification:
                g = (torch.softmax(z, dim=2) - target) * wk
            else:
                g = 2.0 * (z - target) * wk
            gW = torch.bmm(g.reshape(P, C * o, L), Xp2).view(P, C, o, d)
            gb = g.sum(-1) if b is not None else None
            if r.weight_decay:
                gW = gW + r.weight_decay * W
                if b is not None:
                    gb = gb + r.weight_decay * b
            return gW, gb

        def grad_fn(ps):
            gW, gb = grads(ps["weight"], ps.get("bias"))
            return {"weight": gW} if gb is None else {"weight": gW, "bias": gb}

        return run_optimizer(r.optimizer, {"weight": W} if b is None else {"weight": W, "bias": b}, grad_fn,
                             steps=r.steps, lr=r.lr, should_stop=r.should_stop)

    # -- scoring -----------------------------------------------------------------------------
    def outputs(self, params: dict[str, torch.Tensor], Xt: torch.Tensor, check: bool = True) -> torch.Tensor:
        """params with leading batch dims [*B] -> outputs [*B, n_target, out_dim]; `check`: refuse
        non-finite outputs (models.guard_outputs)."""
        lead = next(iter(params.values())).shape[:-self._param_ndim(params)]
        flat = {k: v.reshape(-1, *v.shape[len(lead):]) for k, v in params.items()}
        if self.engine == "linear":
            W = flat["weight"]
            n = Xt.shape[0]
            z = torch.matmul(W, Xt.reshape(n, -1).T)  # [B, o, n]
            if "bias" in flat:
                z = z + flat["bias"].unsqueeze(-1)
            out = z.transpose(1, 2)
        elif self.engine == "mlp":
            out = mlp_outputs(flat, Xt)
        else:
            out = vmap(self.r.forward, in_dims=(0, None))(flat, Xt)
        out = out.reshape(*lead, *out.shape[1:])
        return guard_outputs(out) if check else out

    def _param_ndim(self, params) -> int:
        k = next(iter(params))
        return self.theta0[k].dim()

    def score(self, params, Xt, Yt, check: bool = True) -> torch.Tensor:
        return score_outputs(self.outputs(params, Xt, check), Yt, self.r.metric)

    # -- G-Shapley ---------------------------------------------------------------------------
    def sgd_step(self, params, x_rows, y_rows, lr):
        """One SGD step per member on its own sample: params [B, ...], x_rows [B, ...], y_rows [B]."""
        if self.engine != "linear":
            return vmap(self.r.sgd_step, in_dims=(0, 0, 0, 0 if torch.is_tensor(lr) else None, None))(
                params, x_rows, y_rows, lr, True)
        r = self.r
        W = params["weight"]
        B, o, d = W.shape
        x = x_rows.reshape(B, d)
        z = torch.bmm(W, x.unsqueeze(-1)).squeeze(-1)
        if "bias" in params:
            z = z + params["bias"]
        if r.classification:
            g = torch.softmax(z, -1) - torch.nn.functional.one_hot(y_rows, o).to(z.dtype)
        else:
            g = 2.0 * (z - y_rows.reshape(B, 1))
        gW = g.unsqueeze(-1) * x.unsqueeze(1)
        lr_ = lr.reshape(B, 1, 1) if torch.is_tensor(lr) else lr
        if r.weight_decay:
            gW = gW + r.weight_decay * W
        out = {"weight": W - lr_ * gW}
        if "bias" in params:
            gb = g + r.weight_decay * params["bias"] if r.weight_decay else g
            out["bias"] = params["bias"] - (lr.reshape(B, 1) if torch.is_tensor(lr) else lr) * gb
        return out


def one_epoch_scores(grid: GridTrainer, inits: dict[str, torch.Tensor], X, Y, Xt, Yt, perms: torch.Tensor,
                     lrs: torch.Tensor) -> torch.Tensor:
    """Final target score after one SGD epoch (batch size 1) for B members with their own lr
    (NaN for a member whose training diverged: the caller compares the members)."""
    params = inits
    for t in range(perms.shape[1]):
        rows = perms[:, t]
        params = grid.sgd_step(params, X[rows], Y[rows], lrs)
    out = grid.outputs(params, Xt, check=False)
    bad = ~torch.isfinite(out).reshape(*out.shape[:-2], -1).all(-1)
    return score_outputs(out, Yt, grid.r.metric).masked_fill(bad, float("nan"))


# ---------------------------------------------------------------------------------------------
# batched leave-one-out
# ---------------------------------------------------------------------------------------------

def loo_batched_scores(grid: GridTrainer, X, Y, Xt, Yt, left_out: torch.Tensor) -> np.ndarray:
    """Scores of models trained on all rows but one, for each index in `left_out` (rows shared)."""
    N = X.shape[0]
    B = len(left_out)
    M = torch.ones(1, B, N, dtype=X.dtype, device=X.device)
    M[0, torch.arange(B, device=X.device), left_out] = 0
    params = grid.train(X.unsqueeze(0), Y.unsqueeze(0), M)
    return grid.score(params, Xt, Yt).reshape(B).to("cpu", torch.float64).numpy()


def build_refit_grid(est, X: torch.Tensor, data, metric):
    """The refit model, its trainer, its fixed initial weights and the batched grid over them,
    set up the same way for leave-one-out and Data Shapley (`est` holds their shared settings:
    model, hidden_dim, dtype, batch_engine, refit_*, weight_decay)."""
    module = make_model(est.model, int(np.prod(X.shape[1:])), data.out_dim, hidden_dim=est.hidden_dim)
    module = module.to(device=X.device, dtype=est.dtype)
    check_model_output(module, X, data.out_dim, owner=type(est).__name__)
    if est.batch_engine == "linear" and not isinstance(module, nn.Linear):
        raise ValueError("batch_engine: 'linear' needs the model to be a single nn.Linear")
    refitter = Refitter(module, classification=data.classification, steps=est.refit_steps, lr=est.refit_lr,
                        optimizer=est.refit_optimizer, weight_decay=est.weight_decay, metric=metric)
    theta0 = init_params(module)
    return module, refitter, theta0, GridTrainer(refitter, theta0, est.batch_engine)
