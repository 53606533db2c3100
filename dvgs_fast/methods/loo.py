"""Leave-one-out values: value(i) = score(model on all source) - score(model on all but i).

As the original (DShap `_calculate_loo_vals`), with the deterministic refit procedure of
`_models.Refitter` (same initial weights, `refit_steps` full-batch steps), so that a difference
between two refits is the effect of the left-out point and not of initialisation noise. The
batched path trains `batch_size` leave-one-out models at once on shared rows with 0/1 masks
(same function, float-rounding-level differences from the sequential loop).

Points are evaluated in a seeded random order, so a run stopped by `max_time` / `max_points` has
evaluated a uniform random subset; points not evaluated get value 0 and `counts` 0 (never
valued), and the result's status is "stopped". stderr is NaN: one refit difference per point.

With a scikit-learn estimator as `model`, every refit is a fitted clone (`dvgs_fast.refit.sklearn`):
the full model and each leave-one-out model are fit on the rows (a random_state left at None is set
from the seed, the same for every refit, so that differences come from the left-out point),
`n_jobs` of them in parallel with joblib; the torch refit settings are then ignored.

Default metric: 'neg_log_loss' for classification ('accuracy' for an sklearn estimator without
predict_proba). With deterministic refits a discrete metric such as accuracy leaves most
leave-one-out differences at exactly 0 (the original's default, still available with
metric='accuracy').
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from dvgs_fast import _validation as V
from dvgs_fast.methods.base import Estimate, Run, Valuation
from dvgs_fast.refit.batched import build_refit_grid, loo_batched_scores
from dvgs_fast.refit.sklearn import SklearnRefit, is_sklearn_estimator


class LeaveOneOut(Valuation):
    """Leave-one-out data values.

    Parameters mirror `DataShapley`'s refit settings; `max_points` / `max_time` are the budgets
    (`batch_size` LOO models are trained together when `batched`). `model` may also be a
    scikit-learn estimator; its refits run on `n_jobs` joblib workers (None: in this process).
    """

    name = "loo"

    def __init__(self, model: Any = "logistic", *, loss: str = "cross_entropy", metric: str | None = None,
                 refit_steps: int = 100, refit_lr: float = 0.1, refit_optimizer: str = "adam",
                 weight_decay: float = 0.0, hidden_dim: int = 100, batched: bool = True, batch_size: int = 64,
                 batch_engine: str = "auto", max_points: int | None = None, max_time: float | None = None,
                 n_classes: int | None = None, dtype: str = "float32", n_jobs: int | None = None,
                 device: Any = None, seed: int | None = None, progress: bool = True, num_threads: int | None = None):
        self.model = model if is_sklearn_estimator(model) else V.check_model_spec(model)
        self.loss = V.check_choice(loss, "loss", V.LOSSES)
        if metric is not None:
            V.check_choice(metric, "metric", V.CLASSIFICATION_METRICS + V.REGRESSION_METRICS)
        self.metric = metric
        vars(self).update(V.check_refit_settings(refit_steps, refit_lr, refit_optimizer, weight_decay, hidden_dim))
        self.batched = V.check_bool(batched, "batched")
        self.batch_size = V.check_positive_int(batch_size, "batch_size")
        self.batch_engine = V.check_choice(batch_engine, "batch_engine", ("auto", "vmap", "linear"))
        self.max_points = V.check_optional_positive_int(max_points, "max_points")
        self.n_classes = V.check_optional_positive_int(n_classes, "n_classes")
        self.dtype = V.check_dtype(dtype)
        if n_jobs is not None and (isinstance(n_jobs, bool) or not isinstance(n_jobs, (int, np.integer)) or n_jobs == 0):
            raise ValueError(f"n_jobs: expected None or a non-zero integer (-1 = all cores), got {n_jobs!r}")
        self.n_jobs = n_jobs
        if self.batch_engine == "linear" and self.model == "mlp":
            raise ValueError("batch_engine: 'linear' needs model='logistic' (or an nn.Linear), got 'mlp'")
        super().__init__(device=device, seed=seed, max_time=max_time, progress=progress,
                         num_threads=num_threads)

    def _fit(self, x_source, y_source, x_target, y_target, run: Run) -> Estimate:
        if is_sklearn_estimator(self.model):
            return self._fit_sklearn(x_source, y_source, x_target, y_target, run)
        t0 = time.perf_counter()
        data = V.prepare_inputs(x_source, y_source, x_target, y_target, loss=self.loss, n_classes=self.n_classes,
                                device=run.device, dtype=self.dtype, flatten=isinstance(self.model, str))
        metric = V.resolve_metric(self.metric, self.loss, n_classes=data.n_classes, default_cls="neg_log_loss")
        X, Y, Xt, Yt = data.x_source, data.y_source, data.x_target, data.y_target
        N = data.n_source
        if N < 2:
            raise ValueError(f"x_source: leave-one-out needs at least 2 source samples (leaving the only one out "
                             f"leaves nothing to train on), got {N}")
        torch.manual_seed(run.seed)
        module, refitter, theta0, grid = build_refit_grid(self, X, data, metric)

        with V.naming_divergence("LeaveOneOut", lambda: "the full-data refit", lr_name="refit_lr", lr=self.refit_lr):
            if self.batched:  # the full model through the same engine as the leave-one-out models
                M = torch.ones(1, 1, N, dtype=X.dtype, device=X.device)
                full = float(grid.score(grid.train(X.unsqueeze(0), Y.unsqueeze(0), M), Xt, Yt).reshape(()))
            else:
                full = float(refitter.score(refitter.train(theta0, X, Y, torch.ones(N, dtype=X.dtype,
                                                                                    device=X.device)), Xt, Yt))
        if self.batched:
            def score_points(idx: np.ndarray) -> np.ndarray:
                return loo_batched_scores(grid, X, Y, Xt, Yt, torch.as_tensor(idx, device=X.device))
        else:
            def score_points(idx: np.ndarray) -> np.ndarray:
                i = int(idx[0])
                keep = torch.cat([torch.arange(0, i), torch.arange(i + 1, N)]).to(X.device)
                p = refitter.train(theta0, X[keep], Y[keep], torch.ones(N - 1, dtype=X.dtype, device=X.device))
                return np.array([float(refitter.score(p, Xt, Yt))])
        return self._points_loop(run, N, full, score_points, self.batch_size if self.batched else 1, t0,
                                 info={"metric": metric, "engine": grid.engine if self.batched else "sequential"})

    def _fit_sklearn(self, x_source, y_source, x_target, y_target, run: Run) -> Estimate:
        """Leave-one-out refits of clones of an sklearn estimator, in rounds of `batch_size` points
        spread over `n_jobs` joblib workers (the budget is checked between rounds)."""
        t0 = time.perf_counter()
        data = V.prepare_inputs(x_source, y_source, x_target, y_target, loss=self.loss, n_classes=self.n_classes,
                                device=torch.device("cpu"), dtype=torch.float64, flatten=True)
        has_proba = hasattr(self.model, "predict_proba")
        metric = V.resolve_metric(self.metric, self.loss, n_classes=data.n_classes,
                                  default_cls="neg_log_loss" if has_proba else "accuracy")
        N = data.n_source
        if N < 2:
            raise ValueError(f"x_source: leave-one-out needs at least 2 source samples (leaving the only one out "
                             f"leaves nothing to train on), got {N}")
        X, Y, Xt, Yt = (t.numpy() for t in (data.x_source, data.y_source, data.x_target, data.y_target))
        refit = SklearnRefit(self.model, classification=data.classification, n_classes=data.n_classes,
                             metric=metric, seed=run.seed % (2 ** 32), n_jobs=self.n_jobs)
        full = refit.fit_score(X, Y, Xt, Yt)
        everyone = np.arange(N)

        def score_points(idx: np.ndarray) -> np.ndarray:
            return refit.fit_score_many(X, Y, Xt, Yt, [np.delete(everyone, i) for i in idx])

        return self._points_loop(run, N, full, score_points, self.batch_size, t0,
                                 info={"metric": metric, "engine": "sklearn"})

    def _points_loop(self, run: Run, N: int, full: float, score_points, step_size: int, t0: float,
                     info: dict) -> Estimate:
        """Every engine's budgeted loop: points in a seeded random order (so a stopped run has
        valued a uniform random subset), `step_size` at a time; value = full - score without it."""
        order = torch.randperm(N, generator=torch.Generator().manual_seed(run.seed)).numpy()
        t_setup = time.perf_counter() - t0
        values = np.zeros(N, dtype=np.float64)
        counts = np.zeros(N, dtype=np.int64)
        run.budget.max_iterations = self.max_points
        done, stopped = 0, None
        total = N if self.max_points is None else min(N, self.max_points)
        bar = run.progress(total, "Leave-one-out", unit="point")
        try:
            while done < N:
                stopped = run.budget.exhausted(done)
                if stopped:
                    break
                step = min(step_size, N - done)
                if self.max_points is not None:
                    step = min(step, self.max_points - done)
                idx = order[done:done + step]
                with V.naming_divergence("LeaveOneOut", lambda: f"the refits leaving out points {idx[0]}"
                                         f"{'' if len(idx) == 1 else f' ... {idx[-1]} ({len(idx)} points)'} "
                                         f"({done} of {N} done)", lr_name="refit_lr", lr=self.refit_lr):
                    values[idx] = full - np.asarray(score_points(idx), dtype=np.float64)
                counts[idx] = 1
                done += step
                bar.update(step)
        finally:
            bar.close()
        return Estimate(values=values, counts=counts,
                        status="stopped" if stopped else "completed",
                        stop_reason={"max_iterations": "max_points"}.get(stopped, stopped),
                        progress=f"{done} of {N} points",
                        info={**info, "full_score": full, "points_done": done},
                        timings={"setup": t_setup, "valuation": time.perf_counter() - t0 - t_setup})
