"""Maximum sample reuse (MSR, Wang & Jia 2023): Data Banzhaf from one utility per sample.

Every sample is a subset S with each point in it independently with probability 1/2 (uniform
over all subsets), scored once; each point then gets an in-sample update if it is in S and an
out-of-sample one otherwise, and its Banzhaf value is mean_in - mean_out (`accumulate.MSRStats`).
Conditioned on i in S (or not), S \\ {i} is uniform over the subsets of the others, so both means
are unbiased and every sample updates every point: n times fewer utilities than sampling
marginals point by point. Samples are scored in batches of ``batch`` subsets: as one grid of
refits for a torch model, over joblib workers for a scikit-learn estimator
(`utility.RefitUtility.scores`, which also caches the utilities by subset hash).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch


def msr_draw(n: int) -> Callable[[torch.Generator], torch.Tensor]:
    """A uniform random subset of range(n) as a boolean mask."""
    return lambda g: torch.rand(n, generator=g, dtype=torch.float64) < 0.5


def msr_loop(u, *, driver, batch: int) -> str | None:
    """Score subsets in batches until the driver stops issuing them; 'max_time' if time ran out."""
    while True:
        group = []
        while len(group) < batch and driver.can_issue():
            group.append(driver.issue())
        if not group:
            return None
        if driver.time_up():
            return "max_time"
        masks = np.stack([m.numpy() for _, m in group])
        scores = u.scores(masks, time_up=driver.time_up)
        for (idx, _), m, s in zip(group, masks, scores):
            if np.isnan(s):                 # not computed: time ran out inside the batch
                return "max_time"
            driver.complete(idx, m.astype(np.float64), float(s))
        if driver.stopped:
            return None
