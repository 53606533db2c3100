"""Random valuation: the floor every method must beat (uniform [0, 1) values, seeded)."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from dvgs_fast import _validation as V
from dvgs_fast.methods.base import Estimate, Run, Valuation


class RandomValuation(Valuation):
    """Uniform random values; inputs are still validated like every other method's.

    `model` is accepted (and ignored) so that every method shares one constructor shape."""

    name = "random"

    def __init__(self, model: Any = None, *, loss: str = "cross_entropy", n_classes: int | None = None,
                 device: Any = None, seed: int | None = None, max_time: float | None = None,
                 progress: bool = True):
        self.model = model
        self.loss = V.check_choice(loss, "loss", V.LOSSES)
        self.n_classes = V.check_optional_positive_int(n_classes, "n_classes")
        super().__init__(device=device, seed=seed, max_time=max_time, progress=progress)

    def _fit(self, x_source, y_source, x_target, y_target, run: Run) -> Estimate:
        data = V.prepare_inputs(x_source, y_source, x_target, y_target, loss=self.loss, n_classes=self.n_classes,
                                device=run.device, dtype=torch.float32, flatten=False)
        # salted so that the stream differs from np.random.default_rng(seed) a caller may use elsewhere
        values = np.random.default_rng(np.random.SeedSequence([run.seed, 0x52414E44])).random(data.n_source)
        return Estimate(values=values)
