"""Random valuation: the floor every method must beat (uniform [0, 1) values, seeded; attribute():
standard normal scores, the floor of LDS and leave-one-out correlation)."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from dvgs_fast import _validation as V
from dvgs_fast.attribution import AttributionMixin, ScoreSink
from dvgs_fast.methods.base import Estimate, Run, Valuation


class RandomValuation(AttributionMixin, Valuation):
    """Uniform random values; inputs are still validated like every other method's.

    `model` is accepted (and ignored) so that every method shares one constructor shape. Labels
    are optional with a regression loss ("mse"): an autoencoder task (y = x, e.g. LINCS profiles)
    has none, and the floor must be comparable there too."""

    name = "random"
    requires_labels = False

    def __init__(self, model: Any = None, *, loss: str = "cross_entropy", n_classes: int | None = None,
                 device: Any = None, seed: int | None = None, max_time: float | None = None,
                 progress: bool = True):
        self.model = model
        self.loss = V.check_choice(loss, "loss", V.LOSSES)
        self.n_classes = V.check_optional_positive_int(n_classes, "n_classes")
        super().__init__(device=device, seed=seed, max_time=max_time, progress=progress)

    def _fit(self, x_source, y_source, x_target, y_target, run: Run) -> Estimate:
        if y_source is None and y_target is None and self.loss != "cross_entropy":
            # unlabelled (autoencoder) task: the rows are still checked like everyone's
            xs = V.as_float_tensor(x_source, "x_source")
            V.check_same_features(xs, V.as_float_tensor(x_target, "x_target"), "x_source", "x_target")
            n = xs.shape[0]
        else:
            if y_source is None or y_target is None:
                missing = "y_source" if y_source is None else "y_target"
                raise ValueError(f"{missing}: is None; pass both label sets, or neither with loss='mse' "
                                 f"(an unlabelled task), got loss={self.loss!r}")
            n = V.prepare_inputs(x_source, y_source, x_target, y_target, loss=self.loss, n_classes=self.n_classes,
                                 device=run.device, dtype=torch.float32, flatten=False).n_source
        # salted so that the stream differs from np.random.default_rng(seed) a caller may use elsewhere
        values = np.random.default_rng(np.random.SeedSequence([run.seed, 0x52414E44])).random(n)
        return Estimate(values=values)

    def _attribute(self, x_source, y_source, x_query, y_query, sink: ScoreSink, run: Run, query_batch_size: int):
        xs, xq = V.as_float_tensor(x_source, "x_source"), V.as_float_tensor(x_query, "x_query")
        V.check_same_features(xs, xq, "x_source", "x_query")
        rng = np.random.default_rng(np.random.SeedSequence([run.seed, 0x41545452]))
        for q0 in range(0, sink.n_query, query_batch_size):
            q1 = min(q0 + query_batch_size, sink.n_query)
            sink.add(q0, q1, 0, sink.n_source, rng.standard_normal((q1 - q0, sink.n_source)))
        return {}
