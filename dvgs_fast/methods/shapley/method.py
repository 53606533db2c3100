"""Data Shapley (Ghorbani & Zou, ICML 2019): TMC-Shapley and G-Shapley, reference and batched.

Refit procedure (both paths, documented so that equality is checkable): every refit starts from
the same initial weights theta0 (built once from `seed`) and runs `refit_steps` full-batch steps
of Adam (or SGD) with `refit_lr` on the mean loss of its training rows (+ optional L2
`weight_decay`), see `_models.Refitter`. A refit is thus a deterministic function of its training
subset; the batched path computes the same function on 0/1 row masks, so the same seed (= the same
permutations) gives the same values up to float rounding (use dtype='float64' for the strict
comparison: the two paths then agree to ~1e-12 and discrete scores such as accuracy exactly).

Differences from the original code, all documented in `params`/`info`:
* the full-data score is the score of one model fit on all source data (the original averages 100
  bootstrap resamples of the target set, whose mean is the same number up to resampling noise);
* truncation stops after `truncation_patience` consecutive points within tolerance (default 5, the
  issue's "5 in a row"; the original code's `counter > 5` is `truncation_patience=6`);
* G-Shapley's first point gets (score after its step - score of the fresh model); the original
  code leaves it at 0.

A scikit-learn estimator as `model` (TMC only) refits a fitted clone per prefix
(`dvgs_fast.refit.sklearn`, a random_state left at None is set from the seed, the same for every
refit); the permutations of a round run in parallel on `n_jobs` joblib workers (`sklearn_tmc.py`).
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from dvgs_fast._utils import seed_everything
from dvgs_fast._validation import (check_bool, check_choice, check_dtype, check_model_spec,
                                   check_optional_positive_float, check_optional_positive_int,
                                   check_positive_float, check_positive_int, diverged, naming_divergence,
                                   prepare_inputs, resolve_metric)
from dvgs_fast.distributed import context_for
from dvgs_fast.methods.base import Estimate, Run, Valuation
from dvgs_fast.methods.shapley.batched import gshapley_batched, tmc_batched
from dvgs_fast.methods.shapley.sharded import make_driver
from dvgs_fast.methods.shapley.sklearn_tmc import tmc_sklearn
from dvgs_fast.methods.shapley.tmc import PermState, cover_length, gshapley_sequential, tmc_sequential
from dvgs_fast.refit.batched import build_refit_grid, one_epoch_scores
from dvgs_fast.refit.models import chance_score, fresh_params, stack_params
from dvgs_fast.refit.sklearn import SklearnRefit, is_sklearn_estimator

METHODS = ("tmc", "gshapley")
ENGINES = ("auto", "vmap", "linear")


class DataShapley(Valuation):
    """Monte-Carlo Data Shapley values of the source samples.

    Parameters
    ----------
    model : 'logistic' | 'mlp' | nn.Module | zero-argument factory | scikit-learn estimator
        The refit model. 'logistic' = one nn.Linear (softmax regression / linear regression),
        'mlp' = Linear-ReLU-Linear with `hidden_dim` units. A module's current weights are the
        initial weights of every TMC refit; a factory is called once after seeding. An sklearn
        estimator (TMC only) is cloned and fit per prefix; the torch refit settings are ignored.
    method : 'tmc' (TMC-Shapley) or 'gshapley' (G-Shapley).
    loss : 'cross_entropy' (classification, integer labels) or 'mse' (regression).
    metric : target-set score; classification 'accuracy' (default, as the original) | 'auc' |
        'neg_log_loss'; regression 'neg_mse' (default) | 'neg_mae' | 'r2'.
    tolerance : TMC truncation tolerance, relative to the full-data score (original: 0.01).
    truncation_patience : consecutive within-tolerance points that truncate a permutation.
    max_permutations : permutation budget (None: until convergence or `max_time`).
    convergence_tol : the original stopping criterion (0.1); None disables it.
    check_every : permutations between convergence checks (the original checks every 100).
    max_time : wall-clock budget in seconds (None: no limit). Values are then the mean over the
        permutations completed; `result.info` says how far it got.
    refit_steps, refit_lr, refit_optimizer, weight_decay : the TMC refit procedure (see module doc).
    g_learning_rate : G-Shapley SGD learning rate; None searches it as the original
        (10**-i, i in 1, 1.5, ..., 4.5; best mean - std of the one-epoch score over 10 runs).
    batched : train many prefix models at once (default) or run the sequential reference loop.
    batch_permutations : permutations in flight in the batched path (TMC slots / G-Shapley group).
    chunk_size : consecutive prefixes per permutation trained together in the batched TMC path.
    batch_engine : 'auto' (hand-derived GEMMs for a linear model, vmap otherwise) | 'vmap' | 'linear'.
    n_jobs : joblib workers for an sklearn estimator: the `batch_permutations` permutations of a
        round run in parallel (None: in this process; -1: all cores).
    dtype : 'float32' (default) or 'float64'. Both paths run the same arithmetic; they differ only in
        summation order, so in float64 they agree to ~1e-12 and discrete scores (accuracy) agree
        exactly; in float32 a refit whose target prediction sits within float32 rounding of the
        decision boundary may, rarely, score differently between the two paths.
    keep_marginals : store the [n_permutations, N] marginals in `result.snapshots` (transposed).
    distributed : None (automatic under torchrun / an initialised process group), True (required)
        or False. Permutation p runs on rank p % world_size; marginals are all-reduced every
        `check_every` permutations and the convergence check runs on the reduced values, so the
        values equal a single-process run with the same seed (see `sharded.py`).

    At least one stopping rule is required (max_permutations, convergence_tol or max_time).
    result.stderr is the standard error of each value over the permutations (TMC marginals of a
    truncated tail are 0, as in the original); result.counts the permutations averaged.
    """

    def __init__(self, model: Any = "logistic", method: str = "tmc", *, loss: str = "cross_entropy",
                 metric: str | None = None, tolerance: float = 0.01, truncation_patience: int = 5,
                 max_permutations: int | None = None, convergence_tol: float | None = 0.1,
                 check_every: int = 100, max_time: float | None = None, refit_steps: int = 100,
                 refit_lr: float = 0.1, refit_optimizer: str = "adam", weight_decay: float = 0.0,
                 g_learning_rate: float | None = None, hidden_dim: int = 100, batched: bool = True,
                 batch_permutations: int = 16, chunk_size: int = 32, batch_engine: str = "auto",
                 n_classes: int | None = None, dtype: str = "float32", keep_marginals: bool = False,
                 n_jobs: int | None = None, device: Any = None, seed: int | None = None, progress: bool = True, num_threads: int | None = None,
                 distributed: bool | None = None):
        sk = is_sklearn_estimator(model)
        self.model = model if sk else check_model_spec(model)
        self.method = check_choice(method, "method", METHODS)
        if sk and self.method != "tmc":
            raise ValueError(f"method: {method!r} trains a torch model by SGD steps; a scikit-learn estimator "
                             f"supports method='tmc' only")
        if n_jobs is not None and (isinstance(n_jobs, bool) or not isinstance(n_jobs, (int, np.integer)) or n_jobs == 0):
            raise ValueError(f"n_jobs: expected None or a non-zero integer (-1 = all cores), got {n_jobs!r}")
        self.n_jobs = n_jobs
        self.loss = check_choice(loss, "loss", ("cross_entropy", "mse"))
        if metric is not None:
            check_choice(metric, "metric", ("accuracy", "auc", "neg_log_loss", "neg_mse", "neg_mae", "r2"))
        self.metric = metric
        self.tolerance = check_positive_float(tolerance, "tolerance", allow_zero=True)
        self.truncation_patience = check_positive_int(truncation_patience, "truncation_patience")
        self.max_permutations = check_optional_positive_int(max_permutations, "max_permutations")
        self.convergence_tol = check_optional_positive_float(convergence_tol, "convergence_tol")
        self.check_every = check_positive_int(check_every, "check_every")
        self.refit_steps = check_positive_int(refit_steps, "refit_steps")
        self.refit_lr = check_positive_float(refit_lr, "refit_lr")
        self.refit_optimizer = check_choice(refit_optimizer, "refit_optimizer", ("adam", "sgd"))
        self.weight_decay = check_positive_float(weight_decay, "weight_decay", allow_zero=True)
        self.g_learning_rate = check_optional_positive_float(g_learning_rate, "g_learning_rate")
        self.hidden_dim = check_positive_int(hidden_dim, "hidden_dim")
        self.batched = check_bool(batched, "batched")
        self.batch_permutations = check_positive_int(batch_permutations, "batch_permutations")
        self.chunk_size = check_positive_int(chunk_size, "chunk_size")
        self.batch_engine = check_choice(batch_engine, "batch_engine", ENGINES)
        self.n_classes = check_optional_positive_int(n_classes, "n_classes")
        self.dtype = check_dtype(dtype)
        self.keep_marginals = check_bool(keep_marginals, "keep_marginals")
        if distributed is not None and not isinstance(distributed, bool):
            raise ValueError(f"distributed: expected None, True or False, got {distributed!r}")
        self.distributed = distributed
        if self.batch_engine == "linear" and self.model == "mlp":
            raise ValueError("batch_engine: 'linear' needs model='logistic' (or an nn.Linear), got 'mlp'")
        super().__init__(device=device, seed=seed, max_time=max_time, progress=progress,
                         num_threads=num_threads)
        if self.max_permutations is None and self.convergence_tol is None and self.max_time is None:
            raise ValueError("max_permutations: DataShapley needs a stopping rule: set max_permutations, "
                             "convergence_tol or max_time (all three are None, so it would run forever)")

    @property
    def name(self) -> str:  # the result's method name says which estimator ran
        return "tmc_shapley" if self.method == "tmc" else "g_shapley"

    # ------------------------------------------------------------------------------------------
    def _fit(self, x_source, y_source, x_target, y_target, run: Run) -> Estimate:
        ctx = context_for(self.distributed, run.device)
        try:
            return self._fit_ctx(ctx, run, x_source, y_source, x_target, y_target)
        finally:
            ctx.close()                       # only if fit() initialised the process group

    def _fit_ctx(self, ctx, run: Run, x_source, y_source, x_target, y_target) -> Estimate:
        t_start = time.perf_counter()
        budget = run.budget
        sk = is_sklearn_estimator(self.model)   # sklearn refits run on the CPU, in float64
        data = prepare_inputs(x_source, y_source, x_target, y_target, loss=self.loss, n_classes=self.n_classes,
                              device=torch.device("cpu") if sk else ctx.device_for(run.device),
                              dtype=torch.float64 if sk else self.dtype, flatten=sk or isinstance(self.model, str))
        metric = resolve_metric(self.metric, self.loss, n_classes=data.n_classes, default_cls="accuracy")
        X = data.x_source
        N = data.n_source
        seed = run.seed = ctx.broadcast_object(run.seed)     # a drawn seed must be the same on every rank
        seed_everything(seed)
        if sk:
            refit = SklearnRefit(self.model, classification=data.classification, n_classes=data.n_classes,
                                 metric=metric, seed=seed % (2 ** 32), n_jobs=self.n_jobs)
        else:
            module, refitter, theta0, grid = build_refit_grid(self, X, data, metric)
        timings: dict[str, float] = {"setup": 0.0}
        info: dict[str, Any] = {"n_source": N, "metric": metric, "engine": (
            "sklearn" if sk else grid.engine if self.batched else "sequential")}

        run.show_progress = run.show_progress and ctx.is_main
        # The bar counts refits (G-Shapley: SGD steps), so it moves within a permutation -- on
        # digits one TMC permutation is ~1000 refits -- and says how many permutations are done.
        bar = run.progress(None, "TMC-Shapley" if self.method == "tmc" else "G-Shapley",
                           unit="refit" if self.method == "tmc" else "step")
        perms_done = [0]

        def permutation_done(n: int) -> None:
            perms_done[0] += n
            of = f" of {self.max_permutations}" if self.max_permutations else ""
            bar.set_postfix_str(f"{perms_done[0]}{of} permutations done", refresh=False)

        driver = make_driver(ctx, N, seed, max_permutations=self.max_permutations,
                                   convergence_tol=self.convergence_tol, check_every=self.check_every,
                                   budget=budget, on_complete=permutation_done)
        driver.on_refits = bar.update
        def where() -> str:
            if driver.issued == 0:
                return "the full-data refit" if self.method == "tmc" else "the learning-rate search"
            return f"permutation {driver.issued - 1} ({len(driver.completed)} completed)"

        tmc = self.method == "tmc"
        try:
            with naming_divergence(f"DataShapley ({'TMC' if tmc else 'G-Shapley'})", where,
                                   lr_name="refit_lr" if tmc else "g_learning_rate",
                                   lr=self.refit_lr if tmc else info.get("g_learning_rate", self.g_learning_rate)):
                if sk:
                    stopped = self._run_tmc_sklearn(refit, data, driver, info, timings, t_start)
                elif tmc:
                    stopped = self._run_tmc(refitter, grid, theta0, data, driver, info, timings, t_start)
                else:
                    stopped = self._run_gshapley(refitter, grid, module, data, driver, info, timings, t_start, seed)
            if ctx.enabled:
                stopped = driver.finish(stopped)
                info.update({"world_size": ctx.world_size, "rank": ctx.rank})
        finally:
            bar.close()

        mem = driver.marginals()
        n_done = len(mem)
        if n_done:
            values = mem.mean(0)
            stderr = mem.std(0, ddof=1) / np.sqrt(n_done) if n_done > 1 else None
        else:
            values, stderr = np.zeros(N), None
        stopped = stopped or driver.stop_reason()
        info.update({
            "permutations_done": n_done,
            "permutations_started": driver.issued,
            "convergence_error": driver.last_error,
        })
        if self.method == "tmc" and n_done:
            used = driver.used_indices()
            refits = [driver.stats[i][0] for i in used]
            info["mean_refits_per_permutation"] = float(np.mean(refits))
            info["truncated_fraction"] = float(np.mean([driver.stats[i][1] for i in used]))
        timings["valuation"] = time.perf_counter() - t_start - timings["setup"]
        return Estimate(values=values, stderr=stderr, counts=np.full(N, n_done, dtype=np.int64),
                        status={"max_time": "stopped", "converged": "converged"}.get(stopped, "completed"),
                        stop_reason=stopped, progress=f"{n_done} permutations",
                        info=info, timings=timings, snapshots=mem.T.copy() if self.keep_marginals else None)

    # ------------------------------------------------------------------------------------------
    def _run_tmc(self, refitter, grid, theta0, data, driver, info, timings, t_start):
        X, Y, Xt, Yt = data.x_source, data.y_source, data.x_target, data.y_target
        N = data.n_source
        ones = torch.ones(N, dtype=X.dtype, device=X.device)
        full_params = refitter.train(theta0, X, Y, ones)
        full = float(refitter.score(full_params, Xt, Yt))
        chance = chance_score(Yt, refitter.metric, data.n_classes)
        if data.classification:
            y_np = Y.cpu().numpy()
            required = np.unique(Yt.cpu().numpy())
        else:
            y_np = required = None
        info.update({"full_score": full, "chance_score": chance})
        timings["setup"] = time.perf_counter() - t_start

        def make_state(idx, perm):
            return PermState(idx, perm, cover_length(perm.numpy(), y_np, required), chance, full,
                             self.tolerance, self.truncation_patience)

        if self.batched:
            return tmc_batched(grid, X, Y, Xt, Yt, driver=driver, make_state=make_state,
                               n_slots=self.batch_permutations, chunk=self.chunk_size)
        return tmc_sequential(refitter, theta0, X, Y, Xt, Yt, driver=driver, make_state=make_state)

    def _run_tmc_sklearn(self, refit, data, driver, info, timings, t_start):
        X, Y, Xt, Yt = (t.numpy() for t in (data.x_source, data.y_source, data.x_target, data.y_target))
        full = refit.fit_score(X, Y, Xt, Yt)
        chance = chance_score(data.y_target, refit.metric, data.n_classes)
        y_np, required = (Y, np.unique(Yt)) if data.classification else (None, None)
        info.update({"full_score": full, "chance_score": chance})
        timings["setup"] = time.perf_counter() - t_start

        def make_state(idx, perm):
            return PermState(idx, perm, cover_length(perm.numpy(), y_np, required), chance, full,
                             self.tolerance, self.truncation_patience)

        return tmc_sklearn(refit, X, Y, Xt, Yt, driver=driver, make_state=make_state,
                           n_parallel=self.batch_permutations)

    def _run_gshapley(self, refitter, grid, module, data, driver, info, timings, t_start, seed):
        X, Y, Xt, Yt = data.x_source, data.y_source, data.x_target, data.y_target
        base = np.random.SeedSequence([seed, 7919])

        def init_fn(i: int):
            s = int(np.random.SeedSequence([seed, 104729, i]).generate_state(1)[0])
            return fresh_params(module, s)

        lr = self.g_learning_rate
        if lr is None:
            lr = self._search_lr(grid, module, X, Y, Xt, Yt, base)
            info["g_learning_rate_searched"] = lr
        info["g_learning_rate"] = lr
        timings["setup"] = time.perf_counter() - t_start
        if self.batched:
            return gshapley_batched(grid, init_fn, X, Y, Xt, Yt, lr=lr, driver=driver,
                                    n_slots=self.batch_permutations)
        return gshapley_sequential(refitter, init_fn, X, Y, Xt, Yt, lr=lr, driver=driver)

    def _search_lr(self, grid, module, X, Y, Xt, Yt, seed_seq) -> float:
        """The original `_one_step_lr`: 10**-i for i in 1..4.5 (step .5), 10 runs each, one epoch of
        SGD (batch size 1), keep the best mean - std of the target score. Runs batched in both modes."""
        cands = [10.0 ** (-i) for i in np.arange(1, 5, 0.5)]
        reps = 10
        st = seed_seq.generate_state(2)
        g = torch.Generator().manual_seed(int(st[0]))
        N = X.shape[0]
        perms = torch.stack([torch.randperm(N, generator=g) for _ in range(len(cands) * reps)]).to(X.device)
        inits = stack_params([fresh_params(module, int(st[1]) + j) for j in range(len(cands) * reps)])
        lrs = torch.tensor([c for c in cands for _ in range(reps)], dtype=X.dtype, device=X.device)
        scores = one_epoch_scores(grid, inits, X, Y, Xt, Yt, perms, lrs).to("cpu", torch.float64)
        scores = scores.numpy().reshape(len(cands), reps)
        crit = scores.mean(1) - scores.std(1)
        # a candidate with a diverged run is out (np.argmax would pick a NaN first)
        crit = np.where(np.isfinite(crit), crit, -np.inf)
        if not np.isfinite(crit).any():
            raise diverged("DataShapley (G-Shapley)", "the target score of every candidate learning rate",
                           float("nan"), f"the learning-rate search ({cands[0]:g} ... {cands[-1]:g})",
                           lr_name="g_learning_rate")
        return float(cands[int(np.argmax(crit))])
