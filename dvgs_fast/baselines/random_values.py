"""Random valuation: the floor every method must beat (uniform [0, 1) values, seeded)."""
from __future__ import annotations

import time
from typing import Any

import numpy as np

from ..result import ValuationResult
from .._validation import LOSSES, check_choice, resolve_device
from ._common import check_bool, check_optional_positive_int, check_seed, prepare_inputs


class RandomValuation:
    """Uniform random values; inputs are still validated like every other method.

    `model` is accepted (and ignored) so that every method shares one constructor shape.
    """

    def __init__(self, model: Any = None, *, loss: str = "cross_entropy", n_classes: int | None = None,
                 device: Any = None, seed: int | None = None, progress: bool = True):
        self.model = model
        self.loss = check_choice(loss, "loss", LOSSES)
        self.n_classes = check_optional_positive_int(n_classes, "n_classes")
        self.device = resolve_device(device)
        self.seed = check_seed(seed)
        self.progress = check_bool(progress, "progress")

    def fit(self, x_source: Any, y_source: Any, x_target: Any, y_target: Any) -> ValuationResult:
        t0 = time.perf_counter()
        data = prepare_inputs(x_source, y_source, x_target, y_target, loss=self.loss, n_classes=self.n_classes,
                              device=self.device, dtype=_float(), flatten=False)
        seed = self.seed if self.seed is not None else int(np.random.SeedSequence().generate_state(1)[0])
        # salted so that the stream differs from np.random.default_rng(seed) a caller may use elsewhere
        values = np.random.default_rng(np.random.SeedSequence([seed, 0x52414E44])).random(data.n_source)
        return ValuationResult(values=values, method="random",
                               params={"loss": self.loss, "n_classes": self.n_classes, "seed": self.seed,
                                       "device": str(self.device)},
                               timings={"total": time.perf_counter() - t0}, n_snapshots=1,
                               info={"seed": seed, "stopped_by": "completed", "iterations_done": 1})


def _float():
    import torch
    return torch.float32
