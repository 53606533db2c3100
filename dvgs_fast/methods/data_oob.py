"""Data-OOB (Kwon & Zou, ICML 2023): out-of-bag scores of bootstrap models.

B models are trained on bootstrap samples of the source set (``max_samples`` draws with
replacement each). A sample's value is the mean out-of-bag score over the models whose bootstrap
did not contain it:

    value_i = sum_b 1[w_bi = 0] T(y_i, f_b(x_i)) / sum_b 1[w_bi = 0]

with T = 1[f_b(x_i) == y_i] (classification) or -(f_b(x_i) - y_i)^2 (regression). A mislabeled
sample disagrees with the models that did not see it, so it gets a low value. The target set is
not used by the estimator (the common API requires it; it is only validated).

Default path: the batched torch refits of ``dvgs_fast.refit.batched`` (the same deterministic
refit procedure as LeaveOneOut and Data Shapley: fixed initial weights, ``refit_steps``
full-batch steps): ``batch_size`` bootstrap models are trained at once on the shared source rows,
the bootstrap multiplicities being the row weights of the grid's mask (the weighted mean loss
with integer multiplicities is exactly the mean loss over the bootstrap sample). With a
scikit-learn estimator as ``model`` each bootstrap model is a fitted clone on the bootstrap rows
(``dvgs_fast.refit.sklearn``), ``n_jobs`` of them in parallel.

Bootstrap b's rows come from its own seeded generator (seed, b), so a sample's bootstraps do not
depend on ``batch_size``, ``n_jobs`` or the model, and a run stopped by ``max_time`` holds the
first models of the full run. stderr is the standard error of a value over its out-of-bag
evaluations and counts their number; a sample that was never out of bag has counts 0 (value 0).
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from dvgs_fast import _validation as V
from dvgs_fast.methods.base import Estimate, Run, Valuation, derive_seed
from dvgs_fast.refit.batched import build_refit_grid
from dvgs_fast.refit.optim import BudgetHit
from dvgs_fast.refit.sklearn import SklearnRefit, is_sklearn_estimator, to_numpy
from dvgs_fast.result import stats_from_sums

# Output entries ([models, rows, classes]) scored at once: bounds memory for large N.
_OUT_ELEMENTS = 1 << 23
_SALT_BOOTSTRAP, _SALT_SKLEARN = 0xB007, 0x5C1


class DataOOB(Valuation):
    """Data-OOB values of the source samples.

    Parameters
    ----------
    model : 'logistic' (default) | 'mlp' | nn.Module | zero-argument factory | a scikit-learn
        estimator (fit + predict), e.g. ``DecisionTreeClassifier()`` as in the paper's bagging.
    n_estimators : number of bootstrap models (the paper and OpenDataVal: 1000).
    max_samples : draws per bootstrap: None = N (the standard bootstrap), a float in (0, 1] = that
        fraction of N, an int = that many draws.
    loss : 'cross_entropy' (classification, integer labels) or 'mse' (regression).
    refit_steps, refit_lr, refit_optimizer, weight_decay, hidden_dim, batch_engine, dtype : the
        torch refit procedure, as in LeaveOneOut / DataShapley (ignored for sklearn estimators).
    batch_size : bootstrap models trained at once (torch) / handed to the workers per round
        (sklearn). The budget is checked at every optimizer step of a round (torch) or before
        every model (sklearn): a round cut short keeps its models done in order (sklearn) or
        none of them (torch: they train together); once a round's cost is known, a round is
        shrunk to what the time left affords, so little work is thrown away.
    n_jobs : joblib workers for sklearn estimators (None: in this process; -1: all cores).
    max_time : wall-clock budget; a stopped run averages the models trained so far.
    """

    name = "data_oob"

    def __init__(self, model: Any = "logistic", *, n_estimators: int = 1000, max_samples: int | float | None = None,
                 loss: str = "cross_entropy", refit_steps: int = 100, refit_lr: float = 0.1,
                 refit_optimizer: str = "adam", weight_decay: float = 0.0, hidden_dim: int = 100,
                 batch_size: int = 100, batch_engine: str = "auto", n_jobs: int | None = None,
                 n_classes: int | None = None, dtype: str = "float32", device: Any = None,
                 seed: int | None = None, max_time: float | None = None, progress: bool = True, num_threads: int | None = None):
        self.model = model if is_sklearn_estimator(model) else V.check_model_spec(model)
        self.n_estimators = V.check_positive_int(n_estimators, "n_estimators")
        if max_samples is not None:
            if isinstance(max_samples, bool) or not isinstance(max_samples, (int, float, np.integer, np.floating)):
                raise ValueError(f"max_samples: expected None, an int or a float in (0, 1], got {max_samples!r}")
            if isinstance(max_samples, (float, np.floating)):
                if not 0.0 < float(max_samples) <= 1.0:
                    raise ValueError(f"max_samples: a fraction must be in (0, 1], got {max_samples!r}")
                max_samples = float(max_samples)
            else:
                max_samples = V.check_positive_int(max_samples, "max_samples")
        self.max_samples = max_samples
        self.loss = V.check_choice(loss, "loss", V.LOSSES)
        vars(self).update(V.check_refit_settings(refit_steps, refit_lr, refit_optimizer, weight_decay, hidden_dim))
        self.batch_size = V.check_positive_int(batch_size, "batch_size")
        self.batch_engine = V.check_choice(batch_engine, "batch_engine", ("auto", "vmap", "linear"))
        if n_jobs is not None and (isinstance(n_jobs, bool) or not isinstance(n_jobs, (int, np.integer)) or n_jobs == 0):
            raise ValueError(f"n_jobs: expected None or a non-zero integer (-1 = all cores), got {n_jobs!r}")
        self.n_jobs = n_jobs
        self.n_classes = V.check_optional_positive_int(n_classes, "n_classes")
        self.dtype = V.check_dtype(dtype)
        if self.batch_engine == "linear" and self.model == "mlp":
            raise ValueError("batch_engine: 'linear' needs model='logistic' (or an nn.Linear), got 'mlp'")
        super().__init__(device=device, seed=seed, max_time=max_time, progress=progress,
                         num_threads=num_threads)

    # ------------------------------------------------------------------------------------------
    def _fit(self, x_source, y_source, x_target, y_target, run: Run) -> Estimate:
        t0 = time.perf_counter()
        sk = is_sklearn_estimator(self.model)
        data = V.prepare_inputs(x_source, y_source, x_target, y_target, loss=self.loss, n_classes=self.n_classes,
                                device=torch.device("cpu") if sk else run.device,
                                dtype=torch.float64 if sk else self.dtype, flatten=sk or isinstance(self.model, str))
        N = data.n_source
        n_draw = self.max_samples
        if n_draw is None:
            n_draw = N
        elif isinstance(n_draw, float):
            n_draw = max(1, int(round(n_draw * N)))
        elif n_draw > N:
            raise ValueError(f"max_samples: {n_draw} draws per bootstrap exceed the {N} source samples; "
                             f"use at most {N} or a fraction")
        s1 = np.zeros(N)
        s2 = np.zeros(N)
        cnt = np.zeros(N, dtype=np.int64)
        if sk:
            score_batch = self._sklearn_scorer(data, run)
            engine = "sklearn"
        else:
            score_batch = self._torch_scorer(data, run)
            engine = score_batch.engine
        t_setup = time.perf_counter() - t0
        done, stopped = 0, None
        per_model = None                       # seconds per model, measured on the rounds so far
        bar = run.progress(self.n_estimators, "Data-OOB", unit="model")
        try:
            while done < self.n_estimators:
                stopped = run.budget.exhausted(done)
                if stopped:
                    break
                b = min(self.batch_size, self.n_estimators - done)
                if per_model is None and run.budget.max_time is not None:
                    b = min(b, 10)                 # a short first round measures the cost per model
                elif per_model is not None and run.budget.max_time is not None:
                    # The budget is checked between rounds: shrink the round to what the time left
                    # affords, so a slow model (an MLP, a big sklearn estimator) cannot overrun
                    # max_time by a whole round. Values do not depend on the round size.
                    left = run.budget.max_time - run.budget.elapsed()
                    b = max(1, min(b, int(left / per_model)))
                t_round = time.perf_counter()
                rows = [bootstrap_rows(run.seed, j, N, n_draw) for j in range(done, done + b)]
                with V.naming_divergence("DataOOB", lambda: f"bootstrap models {done} ... {done + b - 1}",
                                         lr_name="refit_lr", lr=self.refit_lr):
                    score, oob = score_batch(rows, range(done, done + b))     # [got, N] each, got <= b
                got = score.shape[0]           # fewer: the budget ran out inside the round
                if got:
                    per_model = (time.perf_counter() - t_round) / got
                s1 += (score * oob).sum(0)
                s2 += (score * score * oob).sum(0)
                cnt += oob.sum(0).astype(np.int64)
                done += got
                bar.update(got)
                if got < b:
                    stopped = "max_time"
                    break
        finally:
            bar.close()
        values, stderr = stats_from_sums(s1, s2, cnt)
        return Estimate(values=values, stderr=stderr, counts=cnt,
                        status="stopped" if stopped else "completed", stop_reason=stopped,
                        progress=f"{done} of {self.n_estimators} bootstrap models",
                        info={"models_done": done, "max_samples": n_draw, "engine": engine,
                              "score": "correct_class" if data.classification else "neg_squared_error",
                              "never_out_of_bag": int((cnt == 0).sum()), "uses_target": False},
                        timings={"setup": t_setup, "valuation": time.perf_counter() - t0 - t_setup})

    # ------------------------------------------------------------------------------------------
    def _torch_scorer(self, data, run: Run):
        X, Y = data.x_source, data.y_source
        N = data.n_source
        torch.manual_seed(run.seed)
        metric = "accuracy" if data.classification else "neg_mse"    # unused: OOB scores are per sample
        _, refitter, _, grid = build_refit_grid(self, X, data, metric)
        if run.budget.max_time is not None:
            refitter.should_stop = run.budget.time_up      # asked at every optimizer step
        Xg, Yg = X.unsqueeze(0), Y.unsqueeze(0)

        def score_batch(rows, _model_ids):
            M = torch.zeros(len(rows), N, dtype=X.dtype)
            for b, r in enumerate(rows):
                M[b] = torch.from_numpy(np.bincount(r, minlength=N)).to(X.dtype)
            M = M.to(X.device)
            with torch.no_grad():
                try:
                    params = grid.train(Xg, Yg, M.unsqueeze(0))          # leading dims [1, b]
                except BudgetHit:               # the round's models train together: none is done
                    return np.zeros((0, N)), np.zeros((0, N), dtype=bool)
                score = torch.empty(len(rows), N, dtype=torch.float64, device=X.device)
                step = max(1, _OUT_ELEMENTS // max(1, len(rows) * data.out_dim))
                for a in range(0, N, step):
                    out = grid.outputs(params, X[a:a + step])[0]      # [b, rows, out_dim]
                    if data.classification:
                        score[:, a:a + step] = (out.argmax(-1) == Y[a:a + step]).to(torch.float64)
                    else:
                        score[:, a:a + step] = -((out[..., 0] - Y[a:a + step]).to(torch.float64) ** 2)
            return score.cpu().numpy(), (M == 0).cpu().numpy()

        score_batch.engine = grid.engine
        return score_batch

    def _sklearn_scorer(self, data, run: Run):
        X, Y = to_numpy(data.x_source), to_numpy(data.y_source)
        N = data.n_source
        refit = SklearnRefit(self.model, classification=data.classification, n_classes=data.n_classes,
                             n_jobs=self.n_jobs)
        n_workers = refit.workers()

        def score_batch(rows, model_ids):
            seeds = [derive_seed(run.seed, _SALT_SKLEARN, j) for j in model_ids]
            # the budget as a wall-clock deadline: the workers are other processes
            b = run.budget
            deadline = None if b.max_time is None else time.time() + (b.max_time - b.elapsed())
            # one task per worker (not per model): the source arrays are pickled once per task
            parts = np.array_split(np.arange(len(rows)), min(len(rows), n_workers))
            res = refit.map(_oob_chunk, [(refit, X, Y, [rows[i] for i in p], [seeds[i] for i in p], deadline)
                                         for p in parts if len(p)])
            res = [r for chunk in res for r in chunk]
            if None in res:                    # past the deadline: keep the models done in order
                res = res[:res.index(None)]
            score = np.zeros((len(res), N))
            oob = np.zeros((len(res), N), dtype=bool)
            for b, (idx, sc) in enumerate(res):
                score[b, idx] = sc
                oob[b, idx] = True
            return score, oob

        return score_batch


def bootstrap_rows(seed: int, model: int, n: int, n_draw: int) -> np.ndarray:
    """The rows of bootstrap model `model`: n_draw draws with replacement from range(n)."""
    rng = np.random.default_rng(derive_seed(seed, _SALT_BOOTSTRAP, model))
    return rng.integers(0, n, size=n_draw)


def _oob_chunk(refit: SklearnRefit, X, Y, rows_list, seeds, deadline: float | None = None) -> list:
    """One worker's models in order; None for each one not started before `deadline` (time.time())."""
    out = []
    for r, s in zip(rows_list, seeds):
        if deadline is not None and time.time() >= deadline:
            out.append(None)
        else:
            out.append(_oob_task(refit, X, Y, r, s))
    return out


def _oob_task(refit: SklearnRefit, X, Y, rows, seed):
    """Fit one bootstrap clone; its per-sample scores on the rows it did not see."""
    fitted = refit.fit(X, Y, rows=rows, seed=seed)
    oob = np.ones(X.shape[0], dtype=bool)
    oob[rows] = False
    idx = np.flatnonzero(oob)
    if idx.shape[0] == 0:
        return idx, np.zeros(0)
    pred = refit.predict(fitted, X[idx])
    if refit.classification:
        return idx, (pred == Y[idx]).astype(np.float64)
    return idx, -(pred - Y[idx]) ** 2
