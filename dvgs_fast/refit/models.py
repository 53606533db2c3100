"""Small refit models shared by Data Shapley, G-Shapley and leave-one-out.

The refit procedure is a *pure function* of (initial weights, rows, labels, row weights):

    params = train(theta0, x, y, w)        # `steps` full-batch steps, loss = sum(w * l) / sum(w)

with the functional Adam / SGD of refit/optim.py (no torch.optim state objects), so that

* every refit starts from the same initial weights theta0 (drawn once from the seed) and is a
  deterministic function of the training subset -- marginal contributions are not polluted by
  initialisation noise, and
* the same function can be called on one subset (the sequential reference: ``x[subset]`` with
  ``w = 1``) or under ``torch.func.vmap`` on many 0/1 row masks at once (the batched path: ``x``
  shared, ``w`` = mask). Both compute the same mathematical quantity; they differ only in float
  summation order (rows with weight 0 add exact zeros), so values agree to float rounding.

Models run through ``torch.func.functional_call`` in eval mode: dropout is off and batch-norm uses
its buffers, which keeps refits deterministic. Use models without train-time randomness.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.func import grad

from dvgs_fast import _validation as V
from dvgs_fast._utils import build_model, functional_call
from dvgs_fast.refit.optim import run_optimizer


def make_model(spec: Any, in_dim: int, out_dim: int, *, hidden_dim: int = 100, name: str = "model") -> nn.Module:
    """'logistic' -> Linear; 'mlp' -> Linear-ReLU-Linear; a module is deep-copied; a factory is called."""
    if spec == "logistic":
        return nn.Linear(in_dim, out_dim)
    if spec == "mlp":
        return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, out_dim))
    return build_model(spec, name)


def check_model_output(module: nn.Module, x: torch.Tensor, out_dim: int, name: str = "model",
                       owner: str = "the refit") -> None:
    """One forward pass on two rows: catches a wrong input/output size, or a model that gives
    non-finite outputs before any training, before any long work (`owner`: the method, for the
    message)."""
    try:
        with torch.no_grad():
            out = module(x[:2])
    except Exception as exc:  # noqa: BLE001 - re-raised as a clear ValueError
        raise ValueError(f"{name}: forward pass on x_source rows failed ({type(exc).__name__}: {exc})") from exc
    if out.dim() != 2 or out.shape[1] != out_dim:
        raise ValueError(f"{name}: expected output shape [n, {out_dim}], got {tuple(out.shape)}")
    bad = V.first_bad(out)
    if bad is not None:
        raise V.diverged(owner, "the model's output", bad, "x_source rows 0:2", before_training=True)


def guard_outputs(out: torch.Tensor) -> torch.Tensor:
    """A refit model's outputs, refused when not finite: a NaN output would become a score of 0
    (accuracy: argmax of NaN) or NaN, i.e. silently wrong values. The method names where
    (``_validation.naming_divergence``)."""
    bad = V.first_bad(out)
    if bad is not None:
        raise V.UnplacedNonFinite("a refit model's output", bad)
    return out


def init_params(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def fresh_params(module: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Re-initialise a CPU copy of `module` under a fixed seed (the global RNG is left untouched)."""
    device = next(iter(module.parameters())).device
    m = copy.deepcopy(module).to("cpu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for sub in m.modules():
            if hasattr(sub, "reset_parameters") and callable(sub.reset_parameters):
                sub.reset_parameters()
    return {k: v.to(device) for k, v in init_params(m).items()}


class Refitter:
    """Functional training / prediction / scoring of one model architecture."""

    def __init__(self, module: nn.Module, *, classification: bool, steps: int, lr: float,
                 optimizer: str = "adam", weight_decay: float = 0.0, metric: str = "accuracy"):
        self.module = module.eval()
        self.buffers = {k: v.detach() for k, v in module.named_buffers()}
        self.classification = classification
        self.steps = steps
        self.lr = lr
        self.optimizer = optimizer
        self.weight_decay = weight_decay
        self.metric = metric
        self.should_stop = None          # a budget asked between optimizer steps (refit/optim.py)
        self._grad = grad(self._loss)

    # -- pieces -------------------------------------------------------------------------------
    def forward(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.module, (params, self.buffers), (x,))

    def _loss(self, params, x, y, w):
        out = self.forward(params, x)
        if self.classification:
            per_row = torch.nn.functional.cross_entropy(out, y, reduction="none")
        else:
            per_row = (out[:, 0] - y) ** 2
        loss = (per_row * w).sum() / w.sum()
        if self.weight_decay:
            loss = loss + 0.5 * self.weight_decay * sum((p * p).sum() for p in params.values())
        return loss

    def _grad_autograd(self, params, x, y, w):
        """Plain autograd (about 3x less overhead than torch.func.grad outside vmap)."""
        with torch.enable_grad():
            ps = {k: v.detach().requires_grad_(True) for k, v in params.items()}
            gs = torch.autograd.grad(self._loss(ps, x, y, w), list(ps.values()))
        return dict(zip(ps, gs))

    def train(self, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
              w: torch.Tensor) -> dict[str, torch.Tensor]:
        """`steps` full-batch steps on rows weighted by w (0/1 masks or all ones). Eager autograd."""
        return self._run(self._grad_autograd, params, x, y, w)

    def train_functional(self, params, x, y, w):
        """The same as `train`, with torch.func.grad so that it composes with vmap."""
        return self._run(self._grad, params, x, y, w)

    def _run(self, grad_fn, params, x, y, w):
        return run_optimizer(self.optimizer, params, lambda ps: grad_fn(ps, x, y, w), steps=self.steps, lr=self.lr,
                             should_stop=self.should_stop)

    def sgd_step(self, params, x_row, y_row, lr, functional: bool = False):
        """One SGD step on a single sample (G-Shapley)."""
        g = (self._grad if functional else self._grad_autograd)(params, x_row[None], y_row[None], torch.ones(1, dtype=x_row.dtype, device=x_row.device))
        return {k: p - lr * g[k] for k, p in params.items()}

    # -- scoring ------------------------------------------------------------------------------
    def score(self, params, x_target: torch.Tensor, y_target: torch.Tensor) -> torch.Tensor:
        return score_outputs(guard_outputs(self.forward(params, x_target)), y_target, self.metric)


def score_outputs(out: torch.Tensor, y: torch.Tensor, metric: str) -> torch.Tensor:
    """Score model outputs [..., n, C] against targets [n]; returns [...] (higher is better)."""
    if metric == "accuracy":
        return (out.argmax(-1) == y).to(out.dtype).mean(-1)
    if metric == "neg_log_loss":
        logp = torch.log_softmax(out, -1)
        yy = y.expand(out.shape[:-1])
        return logp.gather(-1, yy.unsqueeze(-1)).squeeze(-1).mean(-1)
    if metric == "auc":
        s = out[..., 1] - out[..., 0]  # monotone in P(class 1)
        pos, neg = y == 1, y == 0
        sp, sn = s[..., pos], s[..., neg]
        if sp.shape[-1] == 0 or sn.shape[-1] == 0:
            return torch.full(out.shape[:-2], 0.5, dtype=out.dtype, device=out.device)
        gt = (sp.unsqueeze(-1) > sn.unsqueeze(-2)).to(out.dtype).sum((-1, -2))
        eq = (sp.unsqueeze(-1) == sn.unsqueeze(-2)).to(out.dtype).sum((-1, -2))
        return (gt + 0.5 * eq) / (sp.shape[-1] * sn.shape[-1])
    pred = out[..., 0]
    if metric == "neg_mse":
        return -((pred - y) ** 2).mean(-1)
    if metric == "neg_mae":
        return -(pred - y).abs().mean(-1)
    if metric == "r2":
        ss_tot = ((y - y.mean()) ** 2).sum()
        return 1.0 - ((pred - y) ** 2).sum(-1) / torch.clamp(ss_tot, min=1e-12)
    raise ValueError(f"metric: unknown value {metric!r}")


def chance_score(y_target: torch.Tensor, metric: str, n_classes: int | None) -> float:
    """Score of a model that learned nothing (the empty-prefix score of TMC-Shapley).

    accuracy: majority-class rate of the target labels (as the original code); auc: 0.5;
    neg_log_loss: predicting the target class frequencies; neg_mse/neg_mae: predicting the mean /
    median; r2: 0.
    """
    if metric == "accuracy":
        return float(torch.bincount(y_target, minlength=n_classes or 0).max()) / len(y_target)
    if metric == "auc":
        return 0.5
    if metric == "neg_log_loss":
        p = torch.bincount(y_target, minlength=n_classes or 0).double() / len(y_target)
        p = p[p > 0]
        return float((p * p.log()).sum())
    if metric == "neg_mse":
        return -float(y_target.double().var(unbiased=False))
    if metric == "neg_mae":
        return -float((y_target.double() - y_target.double().median()).abs().mean())
    return 0.0


def stack_params(params_list: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([p[k] for p in params_list]) for k in params_list[0]}
