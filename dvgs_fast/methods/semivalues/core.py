"""The semivalue core: one sampler/utility loop for every retraining-based semivalue.

    utility  U(S) = target score of a refit on S (`utility.RefitUtility`: batched torch grid,
             sequential reference, or scikit-learn clones on joblib workers; cached by subset)
    sampler  "permutation": marginals along random permutations (TMC; `permutations.py`),
             weighted by the semivalue's importance weight of each position; the permutations
             may be group-ordered (asymmetric Shapley) -- or
             "msr": maximum sample reuse, one utility per random subset (Banzhaf; `msr.py`)
    driver   issues samples in a fixed order, folds them in order, checks the stopping rule
             (`driver.py`; sharded over torchrun ranks when launched so)
    weight   picks the method: Shapley, Beta(alpha, beta), Banzhaf (`weights.py`)

`Semivalue` is the configurable class; `DataShapley`, `BetaShapley`, `DataBanzhaf` and
`AsymmetricShapley` fix its weight and sampler. Optionally, after the main loop, the
resampling variance of the values (`resampling.py`) is estimated for ``result.ci(level)``.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from dvgs_fast import _validation as V
from dvgs_fast._utils import seed_everything
from dvgs_fast.distributed import context_for
from dvgs_fast.methods.base import Estimate, Run, Valuation
from dvgs_fast.methods.semivalues.accumulate import MarginalStats, MSRStats
from dvgs_fast.methods.semivalues.driver import make_driver
from dvgs_fast.methods.semivalues.msr import msr_draw, msr_loop
from dvgs_fast.methods.semivalues.permutations import (PermState, cover_length, tmc_batched, tmc_sequential,
                                                        tmc_sklearn, uniform_draw)
from dvgs_fast.methods.semivalues.stopping import HistoryDeviation, MaxUpdates, StoppingRule, find_rule
from dvgs_fast.methods.semivalues.utility import RefitUtility
from dvgs_fast.methods.semivalues.weights import (BanzhafWeight, BetaWeight, SemivalueWeight,
                                                  ShapleyWeight)
from dvgs_fast.refit.sklearn import is_sklearn_estimator

SAMPLERS = ("permutation", "msr")
ENGINES = ("auto", "vmap", "linear", "mlp")
RESAMPLING = ("pick_freeze", "double_mc")
METRICS = ("accuracy", "auc", "neg_log_loss", "neg_mse", "neg_mae", "r2")


def resolve_weight(weight: Any) -> SemivalueWeight:
    if isinstance(weight, SemivalueWeight):
        return weight
    if weight == "shapley":
        return ShapleyWeight()
    if weight == "banzhaf":
        return BanzhafWeight()
    if isinstance(weight, (tuple, list)) and len(weight) == 3 and weight[0] == "beta":
        return BetaWeight(weight[1], weight[2])
    raise ValueError(f"weight: expected 'shapley', 'banzhaf', ('beta', alpha, beta) or a SemivalueWeight, "
                     f"got {weight!r}")


class Semivalue(Valuation):
    """Monte-Carlo semivalues of the source samples from refits on subsets.

    Parameters
    ----------
    model : 'logistic' | 'mlp' | nn.Module | zero-argument factory | scikit-learn estimator
        The refit model ('logistic' = one nn.Linear; 'mlp' = Linear-ReLU-Linear with `hidden_dim`
        units). A torch model's current weights are the initial weights of every refit; every
        refit runs `refit_steps` full-batch steps of Adam/SGD with `refit_lr` (+ L2
        `weight_decay`). An sklearn estimator is cloned and fit per subset.
    weight : 'shapley' | 'banzhaf' | ('beta', alpha, beta) | a `weights.SemivalueWeight`.
    sampler : 'permutation' (any weight; TMC truncation applies) or 'msr' (Banzhaf only).
    loss : 'cross_entropy' (integer labels) or 'mse'.
    metric : the target score: classification 'accuracy' (default) | 'auc' | 'neg_log_loss';
        regression 'neg_mse' (default) | 'neg_mae' | 'r2'.
    tolerance, truncation_patience : TMC truncation (permutation sampler): a permutation stops
        after `truncation_patience` consecutive scores within tolerance x |full score| of the
        full-data score; later marginals are 0 (a bias that saves most refits). None: never.
    stop : a stopping rule (`stopping.py`), combined by '|' with `max_updates`; the result's
        info["stopped_by"] names the rule that ended the run.
    max_updates : stop after this many samples (permutations / MSR subsets).
    check_every : samples between checks of the stopping rule.
    max_time : wall-clock budget in seconds (status "stopped"; the samples done are used).
    batched : torch models: train many refits as one batch (default) or one at a time.
    batch_size : permutations in flight (permutation sampler) or subsets per batch (MSR).
    chunk_size : consecutive prefixes of a permutation trained together (batched permutations).
    batch_engine : 'auto' (hand-derived GEMMs for a linear model or a Linear-ReLU-Linear MLP, vmap
        otherwise) | 'vmap' | 'linear' | 'mlp'.
    dtype : 'float32' or 'float64' (torch refits).
    cache : cache every utility by subset hash (`cache.py`).
    n_jobs : joblib workers for an sklearn estimator (None: this process; -1: all cores).
    keep_marginals : keep every sample's weighted marginals ([N, samples] in result.snapshots).
    resampling_samples : > 0: after the main loop, estimate the variance of each value under
        resampling of the data from this many pairs (pick-and-freeze) / outer points
        (double Monte Carlo) of permutations with a shared first point (permutation sampler
        only); it gives ``result.ci(level)`` (see `resampling.py` for what it means).
    resampling_method : 'pick_freeze' (2 permutations per sample) or 'double_mc'.
    resampling_inner : permutations per outer point for 'double_mc'.
    distributed : None (automatic under torchrun), True (required) or False: sample p runs on
        rank p % world_size; every rank gets the same values as one process.

    At least one stopping rule is required (stop, max_updates or max_time).
    result.stderr is the Monte Carlo standard error over the samples; result.counts the samples
    folded (MSR: min of the in- and out-of-sample counts).
    """

    def __init__(self, model: Any = "logistic", weight: Any = "shapley", *, sampler: str = "permutation",
                 loss: str = "cross_entropy", metric: str | None = None, tolerance: float | None = 0.01,
                 truncation_patience: int = 5, stop: StoppingRule | None = None, max_updates: int | None = None,
                 check_every: int = 10, max_time: float | None = None, refit_steps: int = 100,
                 refit_lr: float = 0.1, refit_optimizer: str = "adam", weight_decay: float = 0.0,
                 hidden_dim: int = 100, batched: bool = True, batch_size: int = 16, chunk_size: int = 32,
                 batch_engine: str = "auto", n_classes: int | None = None, dtype: str = "float32",
                 cache: bool = True, n_jobs: int | None = None, keep_marginals: bool = False,
                 resampling_samples: int = 0, resampling_method: str = "pick_freeze", resampling_inner: int = 10,
                 device: Any = None, seed: int | None = None, progress: bool = True, distributed: bool | None = None,
                 num_threads: int | None = None):
        self.weight = resolve_weight(weight)
        self.sampler = V.check_choice(sampler, "sampler", SAMPLERS)
        if self.sampler == "msr" and not isinstance(self.weight, BanzhafWeight):
            raise ValueError(f"sampler: 'msr' estimates Banzhaf values only (weight={self.weight.describe()!r}); "
                             f"use sampler='permutation'")
        self.max_updates = V.check_optional_positive_int(max_updates, "max_updates")
        self.batch_size = V.check_positive_int(batch_size, "batch_size")
        self._init_common(model, loss=loss, metric=metric, tolerance=tolerance,
                          truncation_patience=truncation_patience, stop=stop, check_every=check_every,
                          refit_steps=refit_steps, refit_lr=refit_lr, refit_optimizer=refit_optimizer,
                          weight_decay=weight_decay, hidden_dim=hidden_dim, batched=batched, chunk_size=chunk_size,
                          batch_engine=batch_engine, n_classes=n_classes, dtype=dtype, cache=cache, n_jobs=n_jobs,
                          keep_marginals=keep_marginals, resampling_samples=resampling_samples,
                          resampling_method=resampling_method, resampling_inner=resampling_inner,
                          distributed=distributed)
        super().__init__(device=device, seed=seed, max_time=max_time, progress=progress, num_threads=num_threads)
        self._require_stop()

    # ------------------------------------------------------------------------------ settings
    def _init_common(self, model, *, loss, metric, tolerance, truncation_patience, stop, check_every, refit_steps,
                     refit_lr, refit_optimizer, weight_decay, hidden_dim, batched, chunk_size, batch_engine,
                     n_classes, dtype, cache, n_jobs, keep_marginals, resampling_samples, resampling_method,
                     resampling_inner, distributed) -> None:
        """The settings every semivalue shares, validated (ValueError naming the argument)."""
        sk = is_sklearn_estimator(model)
        self.model = model if sk else V.check_model_spec(model)
        if n_jobs is not None and (isinstance(n_jobs, bool) or not isinstance(n_jobs, (int, np.integer)) or n_jobs == 0):
            raise ValueError(f"n_jobs: expected None or a non-zero integer (-1 = all cores), got {n_jobs!r}")
        self.n_jobs = n_jobs
        self.loss = V.check_choice(loss, "loss", ("cross_entropy", "mse"))
        if metric is not None:
            V.check_choice(metric, "metric", METRICS)
        self.metric = metric
        self.tolerance = None if tolerance is None else V.check_positive_float(tolerance, "tolerance", allow_zero=True)
        self.truncation_patience = V.check_positive_int(truncation_patience, "truncation_patience")
        if stop is not None and not isinstance(stop, StoppingRule):
            raise ValueError(f"stop: expected a stopping rule (dvgs_fast.methods.semivalues.MaxUpdates, StderrBelow, "
                             f"...), got {type(stop).__name__}")
        self.stop = stop
        self.check_every = V.check_positive_int(check_every, "check_every")
        vars(self).update(V.check_refit_settings(refit_steps, refit_lr, refit_optimizer, weight_decay, hidden_dim))
        self.batched = V.check_bool(batched, "batched")
        self.chunk_size = V.check_positive_int(chunk_size, "chunk_size")
        self.batch_engine = V.check_choice(batch_engine, "batch_engine", ENGINES)
        if self.batch_engine == "linear" and self.model == "mlp":
            raise ValueError("batch_engine: 'linear' needs model='logistic' (or an nn.Linear), got 'mlp'")
        self.n_classes = V.check_optional_positive_int(n_classes, "n_classes")
        self.dtype = V.check_dtype(dtype)
        self.cache = V.check_bool(cache, "cache")
        self.keep_marginals = V.check_bool(keep_marginals, "keep_marginals")
        self.resampling_samples = V.check_positive_int(resampling_samples, "resampling_samples", allow_zero=True)
        self.resampling_method = V.check_choice(resampling_method, "resampling_method", RESAMPLING)
        self.resampling_inner = V.check_positive_int(resampling_inner, "resampling_inner")
        if self.resampling_method == "double_mc" and self.resampling_inner < 2:
            raise ValueError("resampling_inner: double_mc needs at least 2 permutations per outer point")
        if self.resampling_samples and self._sampler_name() != "permutation":
            raise ValueError("resampling_samples: the resampling variance is estimated from permutations; "
                             "it is not available with the MSR sampler")
        if self.resampling_samples == 1:
            raise ValueError("resampling_samples: needs at least 2 samples to estimate a variance")
        if distributed is not None and not isinstance(distributed, bool):
            raise ValueError(f"distributed: expected None, True or False, got {distributed!r}")
        self.distributed = distributed

    def _require_stop(self) -> None:
        if self._stop_rule() is None and self.max_time is None:
            raise ValueError(f"stop: {type(self).__name__} needs a stopping rule: set stop, max_updates or "
                             f"max_time (all are None, so it would run forever)")

    # ---- hooks the fixed-method subclasses override -------------------------------------------
    def _sampler_name(self) -> str:
        return getattr(self, "sampler", "permutation")

    def _weight(self) -> SemivalueWeight:
        return self.weight

    def _stop_rule(self) -> StoppingRule | None:
        rules = [r for r in (MaxUpdates(self.max_updates, label="max_updates") if self.max_updates else None,
                             self.stop) if r is not None]
        if not rules:
            return None
        rule = rules[0]
        for r in rules[1:]:
            rule = rule | r
        return rule

    def _draw(self, n: int):
        """What one permutation is (uniform here; group-ordered for asymmetric Shapley)."""
        return uniform_draw(n)

    def _batch_size(self) -> int:
        return self.batch_size

    def _sample_unit(self) -> str:
        return "subset" if self._sampler_name() == "msr" else "permutation"

    @property
    def name(self) -> str:
        w = self._weight()
        return {"shapley": "tmc_shapley", "banzhaf": "banzhaf", "beta": "beta_shapley"}.get(w.name, "semivalue")

    # ------------------------------------------------------------------------------------ fit
    def _fit(self, x_source, y_source, x_target, y_target, run: Run) -> Estimate:
        ctx = context_for(self.distributed, run.device)
        try:
            return self._fit_ctx(ctx, run, x_source, y_source, x_target, y_target)
        finally:
            ctx.close()                       # only if fit() initialised the process group

    def _prepare(self, ctx, run: Run, x_source, y_source, x_target, y_target):
        sk = is_sklearn_estimator(self.model)   # sklearn refits run on the CPU, in float64
        data = V.prepare_inputs(x_source, y_source, x_target, y_target, loss=self.loss, n_classes=self.n_classes,
                                device=torch.device("cpu") if sk else ctx.device_for(run.device),
                                dtype=torch.float64 if sk else self.dtype, flatten=sk or isinstance(self.model, str))
        metric = V.resolve_metric(self.metric, self.loss, n_classes=data.n_classes, default_cls="accuracy")
        run.seed = ctx.broadcast_object(run.seed)     # a drawn seed must be the same on every rank
        seed_everything(run.seed)
        self._check_data(data)
        return data, metric

    def _check_data(self, data) -> None:
        """Subclasses validate what depends on the data (asymmetric groups) before any refit."""

    def _fit_ctx(self, ctx, run: Run, x_source, y_source, x_target, y_target) -> Estimate:
        t_start = time.perf_counter()
        data, metric = self._prepare(ctx, run, x_source, y_source, x_target, y_target)
        u = RefitUtility(self, data, metric, run.seed, batched=self.batched, cache=self.cache, n_jobs=self.n_jobs)
        N = data.n_source
        label, lr_name, lr = self._divergence_names()
        with V.naming_divergence(label, lambda: "the full-data refit", lr_name=lr_name, lr=lr):
            full = u.full_score() if self._needs_full_score() else None
        info: dict[str, Any] = {"n_source": N, "metric": metric, "semivalue": self._weight().describe(),
                                "sampler": self._sampler_name(), "full_score": full, "chance_score": u.chance}
        timings = {"setup": time.perf_counter() - t_start}
        rule = self._stop_rule()
        if rule is not None:
            rule.reset()
        driver, stopped = self._run_main(ctx, run, u, rule, info)
        status, reason = driver.outcome(stopped)
        stats = driver.stats
        n_done = stats.samples
        values = stats.values() if n_done else np.zeros(N)
        stderr = stats.stderr() if n_done > 1 else None
        info.update(self._sample_info(driver))
        for r in find_rule(rule, HistoryDeviation):
            info["convergence_error"] = r.last_error
        resampling = None
        if self.resampling_samples and status == "stopped" and run.budget.time_up():
            info["resampling_skipped"] = "max_time ran out in the main loop"
        elif self.resampling_samples:
            from dvgs_fast.methods.semivalues.resampling import estimate_resampling_variance
            t0 = time.perf_counter()
            with V.naming_divergence(label, lambda: "the resampling phase", lr_name=lr_name, lr=lr):
                resampling, rinfo = estimate_resampling_variance(self, ctx, run, u)
            info.update(rinfo)
            timings["resampling"] = time.perf_counter() - t0
        info.update(u.info())
        if ctx.enabled:
            info.update({"world_size": ctx.world_size, "rank": ctx.rank})
        timings["valuation"] = time.perf_counter() - t_start - timings["setup"] - timings.get("resampling", 0.0)
        kept = driver.kept_matrix()
        return Estimate(values=values, stderr=stderr, counts=stats.counts() if n_done else np.zeros(N, dtype=np.int64),
                        status=status, stop_reason=reason, progress=f"{n_done} {self._sample_unit()}s",
                        info=info, timings=timings, snapshots=kept.T.copy() if kept is not None else None,
                        resampling_stderr=None if resampling is None else np.sqrt(resampling))

    def _run_main(self, ctx, run: Run, u: RefitUtility, rule, info):
        """The main sampling loop; returns (driver, what stopped the loop)."""
        N = u.n
        sampler = self._sampler_name()
        stats = (MSRStats if sampler == "msr" else MarginalStats)(N, rule.history_window() if rule else 0)
        run.show_progress = run.show_progress and ctx.is_main
        draw = msr_draw(N) if sampler == "msr" else self._draw(N)
        if sampler == "msr":        # one refit per subset: the bar counts subsets
            bar = run.progress(self._progress_total(rule), type(self).__name__, unit=self._sample_unit()[:4])
            on_complete = bar.update
        else:
            # A permutation is hundreds of refits (~1000 on digits): the bar counts refits, so it
            # moves within one, and says how many permutations are done.
            bar = run.progress(None, type(self).__name__, unit="refit")
            total, done = self._progress_total(rule), [0]

            def on_complete(n: int) -> None:
                done[0] += n
                of = f" of {total}" if total else ""
                bar.set_postfix_str(f"{done[0]}{of} {self._sample_unit()}s done", refresh=False)
        driver = make_driver(ctx, N, run.seed, draw=draw, stats=stats, stop=rule, check_every=self.check_every,
                             budget=run.budget, on_complete=on_complete, keep=self.keep_marginals)
        if sampler != "msr":
            driver.on_refits = bar.update
        label, lr_name, lr = self._divergence_names()
        try:
            with V.naming_divergence(label, lambda: self._where(driver), lr_name=lr_name, lr=lr):
                stopped = self._run_samples(u, driver, run, info)
            if ctx.enabled:
                stopped = driver.finish(stopped)
        finally:
            bar.close()
        return driver, stopped

    def _divergence_names(self) -> tuple[str, str, float | None]:
        """(the method's name, its learning-rate argument, that value) for the one message of a
        refit that diverged (`_validation.diverged`)."""
        return type(self).__name__, "refit_lr", self.refit_lr

    def _where(self, driver) -> str:
        """Which sample a divergence happened in (the sample last issued)."""
        if driver.issued == 0:
            return "the setup"
        return f"{self._sample_unit()} {driver.issued - 1} ({driver.stats.samples} completed)"

    def _run_samples(self, u: RefitUtility, driver, run: Run, info: dict) -> str | None:
        """The sampler's loop over `driver`'s samples; returns 'max_time' if time ran out."""
        if self._sampler_name() == "msr":
            return msr_loop(u, driver=driver, batch=self._batch_size())
        w = self._weight()
        return self._run_permutations(u, driver, None if w.is_shapley else w.permutation_weights(u.n))

    def _needs_full_score(self) -> bool:
        return self._sampler_name() == "permutation"        # the truncation rule compares with it

    def _progress_total(self, rule) -> int | None:
        return rule.max_samples() if rule is not None else None

    def _run_permutations(self, u: RefitUtility, driver, weights: np.ndarray | None) -> str | None:
        """Run the permutation loop that fits the model and settings over `driver`'s permutations."""
        full = u.full_score()
        keyed = u.cache is not None

        def make_state(idx, perm):
            p = perm.numpy()
            return PermState(idx, perm, cover_length(p, u.y_np, u.required), u.chance, full, self.tolerance,
                             self.truncation_patience, weights, u.hasher.of_prefixes(p) if keyed else None)

        if u.sklearn:
            return tmc_sklearn(u, driver=driver, make_state=make_state, n_parallel=self._batch_size())
        if self.batched:
            return tmc_batched(u, driver=driver, make_state=make_state, n_slots=self._batch_size(),
                               chunk=self.chunk_size)
        return tmc_sequential(u, driver=driver, make_state=make_state)

    def _sample_info(self, driver) -> dict[str, Any]:
        n = driver.stats.samples
        unit = self._sample_unit()
        out = {f"{unit}s_done": n, f"{unit}s_started": driver.issued}
        if unit == "permutation" and n:
            out["mean_refits_per_permutation"] = float(driver.extras_sum[0] / n)
            out["truncated_fraction"] = float(driver.extras_sum[1] / n)
        return out
