"""Gradient similarity at a trained model: grad-dot and grad-cos (as in dattri's GradDot / GradCos
and the "representer-free" baselines of the attribution literature).

    score(query j, source i) = ⟨∇ℓ(z_i; θ), ∇ℓ(q_j; θ)⟩          grad-dot
                             = cos(∇ℓ(z_i; θ), ∇ℓ(q_j; θ))         grad-cos

at the model θ as passed (``epochs=0``, the usual use: train the model first) or after ``epochs``
of plain mini-batch training on the source set. A positive score: a gradient step on z_i lowers
q_j's loss. Scoring is in eval mode (no dropout; BatchNorm with running statistics), through the
gradient engine's factored per-sample gradients (no per-sample gradient formed for Linear and
conv layers). ``attribute()`` gives the [n_query, n_source] matrix; ``fit()`` values each source
sample by its mean score over the target set (for grad-dot: ⟨g_i, mean target gradient⟩).
"""
from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from dvgs_fast import _validation as V
from dvgs_fast import grads
from dvgs_fast._utils import own_rng
from dvgs_fast.attribution import AttributionMixin, ScoreSink, query_error
from dvgs_fast.attribution.gradient_pairs import SIMILARITIES, factors_fn, query_factors, score_pass
from dvgs_fast.methods import _grad_training as T
from dvgs_fast.methods.base import Estimate, Run, Valuation


class GradientSimilarity(AttributionMixin, Valuation):
    """grad-dot (similarity="dot") or grad-cos (similarity="cosine") of each source sample with
    each target / query sample at a trained model.

    model              nn.Module (deep-copied; scored as passed when epochs=0) or a zero-argument factory.
    loss               "cross_entropy", "mse", or a callable (output, target) -> per-sample losses [N].
    similarity         "dot" or "cosine".
    epochs             0: score the model as passed; > 0: first train it on the source set
                       (shuffled mini-batches of batch_size, optimizer, lr, weight_decay).
    grad_params        None (all trainable parameters) or names / module-name prefixes.
    source_batch_size  source rows recorded at once (bounds memory).
    max_time           checked between source blocks: a stopped fit returns the rows reached.
    """

    name = "grad_similarity"
    requires_labels = False

    def __init__(self, model: nn.Module | Callable[[], nn.Module], loss: str | Callable = "cross_entropy",
                 similarity: str = "dot", epochs: int = 0, batch_size: int = 64, lr: float = 1e-3,
                 optimizer: str = "adam", weight_decay: float = 0.0, grad_params: Any = None,
                 source_batch_size: int = 1024, eps: float = 1e-8, device: Any = None, seed: int | None = None,
                 max_time: float | None = None, progress: bool = True):
        self.optimizer, self.backend, self.grad_params = T.check_common(loss, optimizer, "fast", grad_params, model)
        self.model, self.loss = model, loss
        self.similarity = V.check_choice(similarity, "similarity", SIMILARITIES)
        self.epochs = V.check_positive_int(epochs, "epochs", allow_zero=True)
        self.batch_size = V.check_positive_int(batch_size, "batch_size")
        self.lr = V.check_positive_float(lr, "lr")
        self.weight_decay = V.check_positive_float(weight_decay, "weight_decay", allow_zero=True)
        self.source_batch_size = V.check_positive_int(source_batch_size, "source_batch_size")
        self.eps = V.check_positive_float(eps, "eps")
        super().__init__(device=device, seed=seed, max_time=max_time, progress=progress)

    # ------------------------------------------------------------------------------------------
    def _prepare(self, xs, ys, xt, yt, run: Run):
        prep = T.prepare(self, xs, ys, xt, yt, run.device, run.seed)
        bn = T.batchnorm_layers(prep.model)
        if self.epochs and bn and (self.batch_size == 1 or prep.xs.shape[0] % self.batch_size == 1):
            raise ValueError(f"batch_size: {self.batch_size} leaves a training batch of one sample, which {bn[0]} "
                             f"cannot normalise in train mode; choose another batch_size")
        t0 = time.perf_counter()
        if self.epochs:
            self._train(prep, run)
        prep.model.eval()
        scorer = grads.FastScorer(prep.model, prep.names, prep.sample_loss, "dot", owner=type(self).__name__)
        return prep, scorer, time.perf_counter() - t0

    def _train(self, prep: T.Prepared, run: Run) -> None:
        T.train_plain(prep, run, optimizer=self.optimizer, lr=self.lr, weight_decay=self.weight_decay,
                      epochs=self.epochs, batch_size=self.batch_size, owner=type(self).__name__)

    def _source_blocks(self, prep: T.Prepared, run: Run, stop: list):
        xs, ys, n = prep.xs, prep.ys, prep.xs.shape[0]
        for s0 in range(0, n, self.source_batch_size):
            if run.budget.exhausted():
                stop.append("max_time")
                return
            s1 = min(s0 + self.source_batch_size, n)
            yield s0, s1, xs[s0:s1], ys[s0:s1]

    # ------------------------------------------------------------------------------------------
    def _fit(self, x_source, y_source, x_target, y_target, run: Run) -> Estimate:
        prep, scorer, t_train = self._prepare(x_source, y_source, x_target, y_target, run)
        n, m = prep.xs.shape[0], prep.xt.shape[0]
        t0 = time.perf_counter()
        stop: list = []
        with grads.FrozenStatistics(prep.model), own_rng(run.device):
            fo = factors_fn(scorer)
            queries = query_factors(fo, prep.xt, prep.yt, self.source_batch_size, self.similarity != "dot")
            sink = ScoreSink(m, n, keep=False, callback=lambda *a: None)
            sums = score_pass(fo, self._source_blocks(prep, run, stop), queries, sink,
                              similarity=self.similarity, eps=self.eps)
        done = 0 if sums is None else sums.shape[0]
        values = np.zeros(n)
        if done:
            values[:done] = sums.numpy() / m
        counts = np.zeros(n, dtype=np.int64)
        counts[:done] = 1
        return Estimate(values=values, counts=counts, status="stopped" if stop else "completed",
                        stop_reason=stop[0] if stop else None, progress=f"{done} of {n} source rows",
                        info={"similarity": self.similarity, **scorer.describe()},
                        timings={"train": t_train, "score": time.perf_counter() - t0})

    def _attribute(self, x_source, y_source, x_query, y_query, sink: ScoreSink, run: Run, query_batch_size: int):
        try:
            prep, scorer, _ = self._prepare(x_source, y_source, x_query, y_query, run)
        except ValueError as exc:
            raise query_error(exc) from None
        stop: list = []
        with grads.FrozenStatistics(prep.model), own_rng(run.device):
            fo = factors_fn(scorer)
            queries = query_factors(fo, prep.xt, prep.yt, query_batch_size, self.similarity != "dot")
            score_pass(fo, self._source_blocks(prep, run, stop), queries, sink, similarity=self.similarity,
                       eps=self.eps)
        if stop:
            raise ValueError("max_time: the budget ran out before every source row was scored; attribute() "
                             "returns no partial matrix (raise max_time)")
        return {"similarity": self.similarity, **scorer.describe()}


class GradDot(GradientSimilarity):
    """grad-dot: ⟨∇ℓ(z_i), ∇ℓ(q_j)⟩ at the trained model (see GradientSimilarity)."""

    name = "grad_dot"

    def __init__(self, model, loss="cross_entropy", epochs: int = 0, batch_size: int = 64, lr: float = 1e-3,
                 optimizer: str = "adam", weight_decay: float = 0.0, grad_params: Any = None,
                 source_batch_size: int = 1024, device: Any = None, seed: int | None = None,
                 max_time: float | None = None, progress: bool = True):
        super().__init__(model, loss, "dot", epochs, batch_size, lr, optimizer, weight_decay, grad_params,
                         source_batch_size, 1e-8, device, seed, max_time, progress)


class GradCos(GradientSimilarity):
    """grad-cos: cos(∇ℓ(z_i), ∇ℓ(q_j)) at the trained model (see GradientSimilarity)."""

    name = "grad_cos"

    def __init__(self, model, loss="cross_entropy", epochs: int = 0, batch_size: int = 64, lr: float = 1e-3,
                 optimizer: str = "adam", weight_decay: float = 0.0, grad_params: Any = None,
                 source_batch_size: int = 1024, eps: float = 1e-8, device: Any = None, seed: int | None = None,
                 max_time: float | None = None, progress: bool = True):
        super().__init__(model, loss, "cosine", epochs, batch_size, lr, optimizer, weight_decay, grad_params,
                         source_batch_size, eps, device, seed, max_time, progress)


__all__ = ["GradientSimilarity", "GradDot", "GradCos"]
