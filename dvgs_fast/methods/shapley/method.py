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
refit); the permutations of a round run in parallel on `n_jobs` joblib workers.

TMC-Shapley is the Shapley case of the semivalue core (`dvgs_fast.methods.semivalues`: the
permutation loops, the driver and its stopping rules, the subset cache, the resampling
confidence intervals); G-Shapley, which trains by SGD along the permutation instead of refitting
prefixes, runs its own loops (`gshapley.py`) on the same driver.
"""
from __future__ import annotations

from typing import Any

from dvgs_fast import _validation as V
from dvgs_fast.methods.base import Valuation
from dvgs_fast.methods.semivalues.core import Semivalue
from dvgs_fast.methods.semivalues.stopping import HistoryDeviation, MaxUpdates, StoppingRule
from dvgs_fast.methods.semivalues.weights import ShapleyWeight
from dvgs_fast.methods.shapley.gshapley import run_gshapley
from dvgs_fast.refit.sklearn import is_sklearn_estimator

METHODS = ("tmc", "gshapley")


class DataShapley(Semivalue):
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
    tolerance : TMC truncation tolerance, relative to the full-data score (original: 0.01);
        None: no truncation (unbiased, every prefix refit).
    truncation_patience : consecutive within-tolerance points that truncate a permutation.
    max_permutations : permutation budget (None: until convergence or `max_time`).
    convergence_tol : the original stopping criterion (0.1; `semivalues.HistoryDeviation`); None
        disables it.
    stop : any further stopping rule (`semivalues.StderrBelow`, `RankStable`, `MaxTime`, ... and
        their `|` / `&` combinations), combined by `|` with the two above; `info["stopped_by"]`
        names the rule that ended the run.
    check_every : permutations between checks of the stopping rules (the original checks every 100).
    max_time : wall-clock budget in seconds (None: no limit). Values are then the mean over the
        permutations completed; `result.info` says how far it got.
    refit_steps, refit_lr, refit_optimizer, weight_decay : the TMC refit procedure (see module doc).
    g_learning_rate : G-Shapley SGD learning rate; None searches it as the original
        (10**-i, i in 1, 1.5, ..., 4.5; best mean - std of the one-epoch score over 10 runs).
    batched : train many prefix models at once (default) or run the sequential reference loop.
    batch_permutations : permutations in flight in the batched path (TMC slots / G-Shapley group).
    chunk_size : consecutive prefixes per permutation trained together in the batched TMC path.
    batch_engine : 'auto' (hand-derived GEMMs for a linear model or a Linear-ReLU-Linear MLP, vmap
        otherwise) | 'vmap' | 'linear' | 'mlp'.
    n_jobs : joblib workers for an sklearn estimator: the `batch_permutations` permutations of a
        round run in parallel (None: in this process; -1: all cores).
    dtype : 'float32' (default) or 'float64'. Both paths run the same arithmetic; they differ only in
        summation order, so in float64 they agree to ~1e-12 and discrete scores (accuracy) agree
        exactly; in float32 a refit whose target prediction sits within float32 rounding of the
        decision boundary may, rarely, score differently between the two paths.
    cache : cache prefix scores by subset hash (TMC; `semivalues.cache`).
    keep_marginals : store the [n_permutations, N] marginals in `result.snapshots` (transposed).
    resampling_samples, resampling_method, resampling_inner : TMC only: estimate each value's
        variance under resampling of the data (Wu et al. 2024) from this many pick-and-freeze
        pairs (or double Monte Carlo outer points) of permutations, for ``result.ci(level)``;
        see `semivalues.resampling`. 0 (default): not estimated.
    distributed : None (automatic under torchrun / an initialised process group), True (required)
        or False. Permutation p runs on rank p % world_size; marginals are all-reduced every
        `check_every` permutations and the stopping rules run on the reduced values, so the
        values equal a single-process run with the same seed (`semivalues.driver`).

    At least one stopping rule is required (max_permutations, convergence_tol, stop or max_time).
    result.stderr is the standard error of each value over the permutations (TMC marginals of a
    truncated tail are 0, as in the original); result.counts the permutations averaged.
    """

    def __init__(self, model: Any = "logistic", method: str = "tmc", *, loss: str = "cross_entropy",
                 metric: str | None = None, tolerance: float | None = 0.01, truncation_patience: int = 5,
                 max_permutations: int | None = None, convergence_tol: float | None = 0.1,
                 stop: StoppingRule | None = None, check_every: int = 100, max_time: float | None = None,
                 refit_steps: int = 100, refit_lr: float = 0.1, refit_optimizer: str = "adam",
                 weight_decay: float = 0.0, g_learning_rate: float | None = None, hidden_dim: int = 100,
                 batched: bool = True, batch_permutations: int = 16, chunk_size: int = 32,
                 batch_engine: str = "auto", n_classes: int | None = None, dtype: str = "float32",
                 cache: bool = True, keep_marginals: bool = False, n_jobs: int | None = None,
                 resampling_samples: int = 0, resampling_method: str = "pick_freeze", resampling_inner: int = 10,
                 device: Any = None, seed: int | None = None, progress: bool = True, num_threads: int | None = None,
                 distributed: bool | None = None):
        self.method = V.check_choice(method, "method", METHODS)
        if is_sklearn_estimator(model) and self.method != "tmc":
            raise ValueError(f"method: {method!r} trains a torch model by SGD steps; a scikit-learn estimator "
                             f"supports method='tmc' only")
        if self.method == "gshapley" and resampling_samples:
            raise ValueError("resampling_samples: the resampling variance is estimated for TMC (method='tmc') only")
        self.max_permutations = V.check_optional_positive_int(max_permutations, "max_permutations")
        self.convergence_tol = V.check_optional_positive_float(convergence_tol, "convergence_tol")
        self.g_learning_rate = V.check_optional_positive_float(g_learning_rate, "g_learning_rate")
        self.batch_permutations = V.check_positive_int(batch_permutations, "batch_permutations")
        self._init_common(model, loss=loss, metric=metric, tolerance=tolerance,
                          truncation_patience=truncation_patience, stop=stop, check_every=check_every,
                          refit_steps=refit_steps, refit_lr=refit_lr, refit_optimizer=refit_optimizer,
                          weight_decay=weight_decay, hidden_dim=hidden_dim, batched=batched, chunk_size=chunk_size,
                          batch_engine=batch_engine, n_classes=n_classes, dtype=dtype, cache=cache, n_jobs=n_jobs,
                          keep_marginals=keep_marginals, resampling_samples=resampling_samples,
                          resampling_method=resampling_method, resampling_inner=resampling_inner,
                          distributed=distributed)
        Valuation.__init__(self, device=device, seed=seed, max_time=max_time, progress=progress, num_threads=num_threads)
        if self._stop_rule() is None and self.max_time is None:
            raise ValueError("max_permutations: DataShapley needs a stopping rule: set max_permutations, "
                             "convergence_tol, stop or max_time (all are None, so it would run forever)")

    @property
    def name(self) -> str:  # the result's method name says which estimator ran
        return "tmc_shapley" if self.method == "tmc" else "g_shapley"

    def _weight(self):
        return ShapleyWeight()

    def _sampler_name(self) -> str:
        return "permutation"

    def _batch_size(self) -> int:
        return self.batch_permutations

    def _stop_rule(self) -> StoppingRule | None:
        rules = [r for r in (
            MaxUpdates(self.max_permutations, label="max_permutations") if self.max_permutations else None,
            HistoryDeviation(self.convergence_tol, 100, label="converged") if self.convergence_tol else None,
            self.stop) if r is not None]
        if not rules:
            return None
        rule = rules[0]
        for r in rules[1:]:
            rule = rule | r
        return rule

    def _divergence_names(self):
        if self.method == "tmc":
            return "DataShapley (TMC)", "refit_lr", self.refit_lr
        return "DataShapley (G-Shapley)", "g_learning_rate", self.g_learning_rate

    def _where(self, driver) -> str:
        if driver.issued == 0 and self.method == "gshapley":
            return "the learning-rate search"
        return super()._where(driver)

    def _needs_full_score(self) -> bool:
        return self.method == "tmc"

    def _run_samples(self, u, driver, run, info):
        if self.method == "tmc":
            return super()._run_samples(u, driver, run, info)
        return run_gshapley(u, driver, seed=run.seed, lr=self.g_learning_rate, batched=self.batched,
                            n_slots=self.batch_permutations, info=info)
