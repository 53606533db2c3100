"""Leave-one-out values: value(i) = score(model on all source) - score(model on all but i).

As the original (DShap `_calculate_loo_vals`), with the deterministic refit procedure of
`_models.Refitter` (same initial weights, `refit_steps` full-batch steps), so that a difference
between two refits is the effect of the left-out point and not of initialisation noise. The
batched path trains `batch_size` leave-one-out models at once on shared rows with 0/1 masks
(same function, float-rounding-level differences from the sequential loop).

Points are evaluated in a seeded random order, so a run stopped by `max_time` / `max_points` has
evaluated a uniform random subset; points not evaluated get value 0 ("no measured effect") and
`result.info["points_done"]` says how many were.

Default metric: 'neg_log_loss' for classification. With deterministic refits a discrete metric
such as accuracy leaves most leave-one-out differences at exactly 0 (the original's default,
still available with metric='accuracy').
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from ..result import ValuationResult
from .._validation import check_choice, check_positive_float, check_positive_int, resolve_device
from .._utils import seed_everything
from ._batched import build_refit_grid, loo_batched_scores
from ._common import settings_of
from ._common import (Budget, check_bool, check_dtype, check_model_spec, check_optional_positive_float,
                      check_optional_positive_int, check_seed, prepare_inputs, progress_bar, resolve_metric)


class LeaveOneOut:
    """Leave-one-out data values.

    Parameters mirror `DataShapley`'s refit settings; `max_points` / `max_time` are the budgets
    (`batch_size` LOO models are trained together when `batched`).
    """

    def __init__(self, model: Any = "logistic", *, loss: str = "cross_entropy", metric: str | None = None,
                 refit_steps: int = 100, refit_lr: float = 0.1, refit_optimizer: str = "adam",
                 weight_decay: float = 0.0, hidden_dim: int = 100, batched: bool = True, batch_size: int = 64,
                 batch_engine: str = "auto", max_points: int | None = None, max_time: float | None = None,
                 n_classes: int | None = None, dtype: str = "float32", device: Any = None,
                 seed: int | None = None, progress: bool = True):
        self.model = check_model_spec(model)
        self.loss = check_choice(loss, "loss", ("cross_entropy", "mse"))
        if metric is not None:
            check_choice(metric, "metric", ("accuracy", "auc", "neg_log_loss", "neg_mse", "neg_mae", "r2"))
        self.metric = metric
        self.refit_steps = check_positive_int(refit_steps, "refit_steps")
        self.refit_lr = check_positive_float(refit_lr, "refit_lr")
        self.refit_optimizer = check_choice(refit_optimizer, "refit_optimizer", ("adam", "sgd"))
        self.weight_decay = check_positive_float(weight_decay, "weight_decay", allow_zero=True)
        self.hidden_dim = check_positive_int(hidden_dim, "hidden_dim")
        self.batched = check_bool(batched, "batched")
        self.batch_size = check_positive_int(batch_size, "batch_size")
        self.batch_engine = check_choice(batch_engine, "batch_engine", ("auto", "vmap", "linear"))
        self.max_points = check_optional_positive_int(max_points, "max_points")
        self.max_time = check_optional_positive_float(max_time, "max_time")
        self.n_classes = check_optional_positive_int(n_classes, "n_classes")
        self.dtype = check_dtype(dtype)
        self.device = resolve_device(device)
        self.seed = check_seed(seed)
        self.progress = check_bool(progress, "progress")
        if self.batch_engine == "linear" and self.model == "mlp":
            raise ValueError("batch_engine: 'linear' needs model='logistic' (or an nn.Linear), got 'mlp'")

    def params(self) -> dict[str, Any]:
        keys = (
            "loss", "metric", "refit_steps", "refit_lr", "refit_optimizer", "weight_decay", "hidden_dim",
            "batched", "batch_size", "batch_engine", "max_points", "max_time", "n_classes", "seed")
        return settings_of(self, keys)

    def fit(self, x_source: Any, y_source: Any, x_target: Any, y_target: Any) -> ValuationResult:
        t0 = time.perf_counter()
        budget = Budget(self.max_time, self.max_points)
        data = prepare_inputs(x_source, y_source, x_target, y_target, loss=self.loss, n_classes=self.n_classes,
                              device=self.device, dtype=self.dtype, flatten=isinstance(self.model, str))
        metric = resolve_metric(self.metric, self.loss, n_classes=data.n_classes, default_cls="neg_log_loss")
        X, Y, Xt, Yt = data.x_source, data.y_source, data.x_target, data.y_target
        N = data.n_source
        seed = self.seed if self.seed is not None else int(np.random.SeedSequence().generate_state(1)[0])
        seed_everything(seed)
        module, refitter, theta0, grid = build_refit_grid(self, X, data, metric)

        if self.batched:  # the full model through the same engine as the leave-one-out models
            M = torch.ones(1, 1, N, dtype=X.dtype, device=X.device)
            full = float(grid.score(grid.train(X.unsqueeze(0), Y.unsqueeze(0), M), Xt, Yt).reshape(()))
        else:
            full = float(refitter.score(refitter.train(theta0, X, Y, torch.ones(N, dtype=X.dtype, device=X.device)),
                                        Xt, Yt))
        order = torch.randperm(N, generator=torch.Generator().manual_seed(seed))
        t_setup = time.perf_counter() - t0
        values = np.zeros(N, dtype=np.float64)
        done = 0
        stopped = None
        total = N if self.max_points is None else min(N, self.max_points)
        bar = progress_bar(self.progress, total, "Leave-one-out")
        try:
            while done < N:
                stopped = budget.exhausted(done)
                if stopped:
                    break
                if self.batched:
                    step = min(self.batch_size, N - done)
                    if self.max_points is not None:
                        step = min(step, self.max_points - done)
                    idx = order[done:done + step].to(X.device)
                    scores = loo_batched_scores(grid, X, Y, Xt, Yt, idx)
                    values[idx.cpu().numpy()] = full - scores
                else:
                    step = 1
                    i = int(order[done])
                    keep = torch.cat([torch.arange(0, i), torch.arange(i + 1, N)]).to(X.device)
                    p = refitter.train(theta0, X[keep], Y[keep], torch.ones(N - 1, dtype=X.dtype, device=X.device))
                    values[i] = full - float(refitter.score(p, Xt, Yt))
                done += step
                bar.update(step)
        finally:
            bar.close()
        timings = {"setup": t_setup, "valuation": time.perf_counter() - t0 - t_setup,
                   "total": time.perf_counter() - t0}
        info = {"seed": seed, "metric": metric, "full_score": full, "points_done": done, "iterations_done": done,
                "stopped_by": {"max_iterations": "max_points"}.get(stopped, stopped) or "completed", "engine": grid.engine if self.batched else "sequential"}
        return ValuationResult(values=values, method="loo", params=self.params(), timings=timings,
                               n_snapshots=1, info=info)
