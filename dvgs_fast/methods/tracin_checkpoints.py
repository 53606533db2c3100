"""TracIn over checkpoints you saved from your own training (as dattri's TracInAttributor and
Captum's TracInCP take them), where ``TracIn`` trains the model itself:

    TracInCheckpoints(model, checkpoints=[sd_epoch10, sd_epoch20, ...], lrs=[0.1, 0.05, ...])
        .attribute(x_source, y_source, x_query, y_query)   # Σ_c lr_c ⟨∇ℓ(z_i; θ_c), ∇ℓ(q_j; θ_c)⟩

Each checkpoint (a state_dict, or a module whose state_dict is taken) is loaded into a copy of
``model`` and scored in eval mode through the gradient engine's factored per-sample gradients, as
grad-dot is at one model; ``fit()`` values each source sample by Σ_c lr_c ⟨g_i(θ_c), mean target
gradient at θ_c⟩, with stderr over the checkpoints' contributions as TracIn's.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from dvgs_fast import _validation as V
from dvgs_fast import grads
from dvgs_fast._utils import own_rng
from dvgs_fast.attribution import AttributionMixin, ScoreSink, query_error
from dvgs_fast.attribution.gradient_pairs import factors_fn, query_factors, score_pass
from dvgs_fast.methods import _grad_training as T
from dvgs_fast.methods.base import Estimate, Run, Valuation


def _state_dicts(checkpoints: Any) -> list[dict]:
    if isinstance(checkpoints, (nn.Module, dict)) or not isinstance(checkpoints, Sequence) or not checkpoints:
        raise ValueError("checkpoints: expected a non-empty list of state_dicts or modules (one per checkpoint, "
                         "in training order)")
    out = []
    for c, ck in enumerate(checkpoints):
        if isinstance(ck, nn.Module):
            ck = ck.state_dict()
        if not isinstance(ck, dict):
            raise ValueError(f"checkpoints: item {c} is a {type(ck).__name__}, not a state_dict or module")
        out.append({k: v.detach().clone() for k, v in ck.items()})
    return out


class TracInCheckpoints(AttributionMixin, Valuation):
    """TracIn-CP over given checkpoints (see the module docstring).

    model              the architecture: nn.Module or zero-argument factory (its weights are replaced
                       by each checkpoint's).
    checkpoints        state_dicts (or modules) of the training run, in order.
    lrs                the learning rate at each checkpoint (one number for all; default 1.0).
    loss, grad_params, source_batch_size   as TracIn.
    """

    name = "tracin_checkpoints"
    requires_labels = False
    attribute_accumulates = True

    def __init__(self, model: nn.Module | Callable[[], nn.Module], checkpoints: Sequence[Any],
                 lrs: float | Sequence[float] = 1.0, loss: str | Callable = "cross_entropy", grad_params: Any = None,
                 source_batch_size: int = 1024, device: Any = None, seed: int | None = None,
                 max_time: float | None = None, progress: bool = True):
        _, self.backend, self.grad_params = T.check_common(loss, "sgd", "fast", grad_params, model)
        self.model, self.loss = model, loss
        self._states = _state_dicts(checkpoints)
        self.checkpoints = [f"checkpoint {c}" for c in range(len(self._states))]
        if isinstance(lrs, (int, float)) and not isinstance(lrs, bool):
            lrs = [float(lrs)] * len(self._states)
        lrs = [V.check_positive_float(v, "lrs") for v in list(lrs)]
        if len(lrs) != len(self._states):
            raise ValueError(f"lrs: {len(lrs)} learning rates for {len(self._states)} checkpoints")
        self.lrs = lrs
        self.source_batch_size = V.check_positive_int(source_batch_size, "source_batch_size")
        super().__init__(device=device, seed=seed, max_time=max_time, progress=progress)

    def _prepare(self, xs, ys, xt, yt, run: Run):
        prep = T.prepare(self, xs, ys, xt, yt, run.device, run.seed)
        own = set(prep.model.state_dict())
        for c, sd in enumerate(self._states):
            if set(sd) != own:
                missing, extra = sorted(own - set(sd))[:3], sorted(set(sd) - own)[:3]
                raise ValueError(f"checkpoints: item {c} does not fit the model (missing {missing}, unexpected {extra})")
        return prep, grads.FastScorer(prep.model, prep.names, prep.sample_loss, "dot", owner="TracInCheckpoints")

    def _passes(self, prep, run: Run):
        """For each checkpoint c: (c, lr_c), with the model holding θ_c in eval mode."""
        bar = run.progress(len(self._states), "TracIn checkpoints", unit="ckpt")
        try:
            for c, (sd, lr) in enumerate(zip(self._states, self.lrs)):
                if run.budget.exhausted():
                    raise ValueError(f"max_time: the budget ran out after {c} of {len(self._states)} checkpoints")
                prep.model.load_state_dict(sd)
                prep.model.eval()
                with grads.FrozenStatistics(prep.model), own_rng(run.device):
                    yield c, lr
                bar.update(1)
        finally:
            bar.close()

    def _blocks(self, prep):
        for s0 in range(0, prep.xs.shape[0], self.source_batch_size):
            s1 = min(s0 + self.source_batch_size, prep.xs.shape[0])
            yield s0, s1, prep.xs[s0:s1], prep.ys[s0:s1]

    def _fit(self, x_source, y_source, x_target, y_target, run: Run) -> Estimate:
        prep, scorer = self._prepare(x_source, y_source, x_target, y_target, run)
        n, t0 = prep.xs.shape[0], time.perf_counter()
        per = np.zeros((len(self._states), n))
        params = dict(prep.model.named_parameters())
        for c, lr in self._passes(prep, run):
            loss = prep.sample_loss(prep.model(prep.xt), prep.yt).mean()
            G = dict(zip(prep.names, torch.autograd.grad(loss, [params[nm] for nm in prep.names], allow_unused=True)))
            G = {nm: torch.zeros_like(params[nm]) if g is None else g.detach() for nm, g in G.items()}
            for s0, s1, x, y in self._blocks(prep):
                dot, _ = scorer.record(x, y).stats(G, need_sq=False)
                per[c, s0:s1] = lr * dot.detach().double().cpu().numpy()
        if not np.isfinite(per).all():
            raise ValueError("x_source: a per-sample gradient is not finite at some checkpoint; rescale the inputs")
        counts = np.full(n, len(self._states), dtype=np.int64)
        values, stderr = T.finish_sums(per.sum(0), np.square(per).sum(0), counts)
        return Estimate(values=values, stderr=stderr, counts=counts, info=scorer.describe(),
                        timings={"score": time.perf_counter() - t0})

    def _attribute(self, x_source, y_source, x_query, y_query, sink: ScoreSink, run: Run, query_batch_size: int):
        try:
            prep, scorer = self._prepare(x_source, y_source, x_query, y_query, run)
        except ValueError as exc:
            raise query_error(exc) from None
        fo = factors_fn(scorer)
        for _, lr in self._passes(prep, run):
            queries = query_factors(fo, prep.xt, prep.yt, query_batch_size, False)
            score_pass(fo, self._blocks(prep), queries, sink, weight=lr)
        return {"checkpoints": len(self._states), **scorer.describe()}


__all__ = ["TracInCheckpoints"]
