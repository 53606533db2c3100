"""Any scikit-learn estimator as the refit model of a valuation method.

The batched torch models (`dvgs_fast.refit.models` / `.batched`) stay the fast default; this
adapter lets a method refit *any* estimator that has ``fit`` and ``predict`` (and, for
probability metrics, ``predict_proba``): each refit works on a fresh ``sklearn.base.clone`` of
the template, so refits never share state, and independent refits run in parallel with joblib.

API (used by LeaveOneOut, DataShapley, DataOOB and DVRL's predictor)::

    from dvgs_fast.refit.sklearn import SklearnRefit, is_sklearn_estimator

    is_sklearn_estimator(obj) -> bool        # duck-typed: fit + predict/predict_proba + get_params
    r = SklearnRefit(estimator, classification=True, n_classes=2, metric="accuracy",
                     seed=0, n_jobs=None)
    m = r.fit(x, y)                          # a fitted clone; x, y numpy arrays or tensors (any device)
    m = r.fit(x, y, rows=idx)                # on x[idx], y[idx] (repeats allowed: bootstrap samples)
    m = r.fit(x, y, sample_weight=w)         # passed to fit if the estimator takes it, else
                                             # integer weights become repeated rows (0/1 = a subset)
    r.predict_proba(m, x) -> [n, n_classes] float64 (classification; every class has its column,
                                             also when the refit saw only some classes)
    r.predict(m, x)       -> [n] class indices (classification) / float64 predictions (regression)
    r.score(m, xt, yt)    -> float, the target metric (higher is better; sklearn.metrics)
    r.fit_score(x, y, xt, yt, rows=None, sample_weight=None, seed=None) -> float
    r.fit_score_many(x, y, xt, yt, row_sets, seeds=None) -> np.ndarray [len(row_sets)], in
                                             parallel over `n_jobs` joblib workers
    r.map(fn, arg_tuples) -> list            # fn(*args) for each, in parallel (fn must pickle)
    r.workers() -> int                       # processes `map` uses (1 for n_jobs None / 1)

Metrics (the same names as the torch path, `dvgs_fast.refit.models.score_outputs`):
classification 'accuracy' | 'neg_log_loss' | 'auc' (binary); regression 'neg_mse' | 'neg_mae' |
'r2'. 'neg_log_loss' needs ``predict_proba``; 'auc' uses ``predict_proba``, else
``decision_function``, else ``predict``.

Degenerate refits never raise (many estimators refuse a one-class training set): a training set
with a single class predicts that class with probability 1; an empty one predicts uniform class
probabilities (classification) or 0 (regression).

Reproducibility: with ``seed`` set, every ``random_state`` parameter of the clone that the user
left at None (nested ones too, e.g. inside a Pipeline) is set to it (``fit(..., seed=)``
overrides per refit); explicit random states are kept.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import numpy as np

CLASSIFICATION_METRICS = ("accuracy", "auc", "neg_log_loss")
REGRESSION_METRICS = ("neg_mse", "neg_mae", "r2")


def is_sklearn_estimator(obj: Any) -> bool:
    """True for an (unfitted or fitted) scikit-learn-style estimator instance (not a class)."""
    if isinstance(obj, type):
        return False
    try:  # a torch module is never an sklearn estimator, even if it grew a fit method
        import torch
        if isinstance(obj, torch.nn.Module):
            return False
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return (callable(getattr(obj, "fit", None)) and callable(getattr(obj, "get_params", None))
            and (callable(getattr(obj, "predict", None)) or callable(getattr(obj, "predict_proba", None))))


def to_numpy(x: Any) -> np.ndarray:
    """A tensor (any device) or array-like -> numpy array (no copy when already one)."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


class _Constant:
    """What a degenerate training set (empty, or one class) predicts."""

    def __init__(self, proba: np.ndarray | None, value: float = 0.0):
        self.proba = proba          # [n_classes] for classification, None for regression
        self.value = value


class SklearnRefit:
    """Refits clones of an sklearn estimator and scores them (see the module docstring).

    estimator       the template: never fitted itself (``sklearn.base.clone`` per refit)
    classification  True: labels are class indices 0..n_classes-1; False: float targets
    n_classes       number of classes (classification; inferred from y at each fit if None)
    metric          target metric for `score` (default: accuracy / neg_mse)
    seed            random_state for clones whose random_state is None (None: left alone)
    n_jobs          joblib workers for `fit_score_many` / `map` (None or 1: in this process)
    name            the argument name in error messages
    """

    def __init__(self, estimator: Any, *, classification: bool, n_classes: int | None = None,
                 metric: str | None = None, seed: int | None = None, n_jobs: int | None = None,
                 name: str = "model"):
        if not is_sklearn_estimator(estimator):
            raise ValueError(f"{name}: expected a scikit-learn estimator (fit + predict/predict_proba + "
                             f"get_params), got {type(estimator).__name__}")
        self.estimator = estimator
        self.classification = bool(classification)
        self.n_classes = n_classes
        if metric is None:
            metric = "accuracy" if self.classification else "neg_mse"
        allowed = CLASSIFICATION_METRICS if self.classification else REGRESSION_METRICS
        if metric not in allowed:
            raise ValueError(f"metric: unknown value {metric!r} for "
                             f"{'classification' if self.classification else 'regression'}; "
                             f"choose one of {', '.join(map(repr, allowed))}")
        if metric == "neg_log_loss" and not hasattr(estimator, "predict_proba"):
            raise ValueError(f"metric: 'neg_log_loss' needs probabilities but {type(estimator).__name__} has no "
                             f"predict_proba; use metric='accuracy' (or an estimator with predict_proba)")
        if self.classification and not (hasattr(estimator, "predict") or hasattr(estimator, "predict_proba")):
            raise ValueError(f"{name}: {type(estimator).__name__} has neither predict nor predict_proba")
        self.metric = metric
        self.seed = seed
        if n_jobs is not None and (isinstance(n_jobs, bool) or not isinstance(n_jobs, (int, np.integer))
                                   or n_jobs == 0):
            raise ValueError(f"n_jobs: expected None or a non-zero integer (-1 = all cores), got {n_jobs!r}")
        self.n_jobs = None if n_jobs is None else int(n_jobs)
        self.name = name

    # ---------------------------------------------------------------------------------- fitting
    def fit(self, x: Any, y: Any, *, rows: Any = None, sample_weight: Any = None, seed: int | None = None):
        """A fitted clone on (x[rows], y[rows]) (rows may repeat), optionally weighted."""
        x, y = to_numpy(x), to_numpy(y)
        if rows is not None:
            rows = to_numpy(rows).astype(np.int64, copy=False)
            x, y = x[rows], y[rows]
        fit_kw = {}
        if sample_weight is not None:
            w = to_numpy(sample_weight).astype(np.float64, copy=False).reshape(-1)
            if w.shape[0] != x.shape[0]:
                raise ValueError(f"sample_weight: has {w.shape[0]} entries for {x.shape[0]} rows")
            if _takes_sample_weight(self.estimator):
                keep = w > 0           # zero weight = not in the training set (also for degenerate checks)
                x, y, w = x[keep], y[keep], w[keep]
                fit_kw["sample_weight"] = w
            elif np.all(w == np.round(w)) and np.all(w >= 0):
                rep = np.repeat(np.arange(w.shape[0]), w.astype(np.int64))
                x, y = x[rep], y[rep]
            else:
                raise ValueError(f"sample_weight: {type(self.estimator).__name__}.fit takes no sample_weight and "
                                 f"the weights are not integer multiplicities")
        x = x.reshape(x.shape[0], int(np.prod(x.shape[1:])))
        if self.classification:
            y = y.astype(np.int64, copy=False)
            k = self._n_classes(y)
            if y.shape[0] == 0:
                return _Constant(np.full(k, 1.0 / k))
            present = np.unique(y)
            if present.shape[0] < 2:
                p = np.zeros(k)
                p[int(present[0])] = 1.0
                return _Constant(p)
        elif y.shape[0] == 0:
            return _Constant(None, 0.0)
        est = _clone_seeded(self.estimator, self.seed if seed is None else seed)
        est.fit(x, y, **fit_kw)
        return est

    def _n_classes(self, *ys: np.ndarray) -> int:
        if self.n_classes is not None:
            return int(self.n_classes)
        return max(2, max((int(y.max()) + 1 for y in ys if y.shape[0]), default=2))

    # ------------------------------------------------------------------------------- predicting
    def predict_proba(self, fitted: Any, x: Any) -> np.ndarray:
        """[n, n_classes] class probabilities (hard 0/1 rows for an estimator without predict_proba)."""
        if not self.classification:
            raise ValueError("predict_proba: a regression refit has no class probabilities")
        x = _as_2d(to_numpy(x))
        n = x.shape[0]
        if isinstance(fitted, _Constant):
            return np.broadcast_to(fitted.proba, (n, fitted.proba.shape[0])).astype(np.float64)
        cls = np.asarray(fitted.classes_).astype(np.int64)
        k = max(self._n_classes(), int(cls.max()) + 1)
        out = np.zeros((n, k), dtype=np.float64)
        if hasattr(fitted, "predict_proba"):
            # An estimator fitted on float32 rows returns float32 probabilities, whose rows sum to 1
            # only to ~1e-7; scikit-learn's log_loss checks float64 sums to 1.5e-8 and warns.
            p = np.asarray(fitted.predict_proba(x), dtype=np.float64)
            s = p.sum(1, keepdims=True)
            out[:, cls] = np.divide(p, s, out=p, where=s > 0)
        else:
            out[np.arange(n), np.asarray(fitted.predict(x)).astype(np.int64)] = 1.0
        return out

    def predict(self, fitted: Any, x: Any) -> np.ndarray:
        """Class indices (classification) or float64 predictions (regression), shape [n]."""
        x = _as_2d(to_numpy(x))
        if isinstance(fitted, _Constant):
            if self.classification:
                return np.full(x.shape[0], int(np.argmax(fitted.proba)), dtype=np.int64)
            return np.full(x.shape[0], fitted.value, dtype=np.float64)
        if self.classification:
            if hasattr(fitted, "predict"):
                return np.asarray(fitted.predict(x)).astype(np.int64)
            return np.asarray(fitted.classes_)[np.argmax(fitted.predict_proba(x), 1)].astype(np.int64)
        return np.asarray(fitted.predict(x), dtype=np.float64).reshape(x.shape[0], -1)[:, 0]

    def _binary_score(self, fitted: Any, x: np.ndarray) -> np.ndarray:
        """A score monotone in P(class 1), for AUC."""
        if isinstance(fitted, _Constant) or hasattr(fitted, "predict_proba"):
            return self.predict_proba(fitted, x)[:, 1]
        if hasattr(fitted, "decision_function"):
            d = np.asarray(fitted.decision_function(x), dtype=np.float64)
            if d.ndim == 1:        # sklearn's binary decision_function is for classes_[1]
                return d if int(np.asarray(fitted.classes_)[-1]) == 1 else -d
            return self.predict_proba(fitted, x)[:, 1]
        return (self.predict(fitted, x) == 1).astype(np.float64)

    # --------------------------------------------------------------------------------- scoring
    def score(self, fitted: Any, x: Any, y: Any, metric: str | None = None) -> float:
        """The target metric of a fitted refit (higher is better)."""
        from sklearn import metrics as skm
        metric = self.metric if metric is None else metric
        x, y = _as_2d(to_numpy(x)), to_numpy(y).reshape(-1)
        if metric == "accuracy":
            return float(skm.accuracy_score(y.astype(np.int64), self.predict(fitted, x)))
        if metric == "neg_log_loss":
            p = self.predict_proba(fitted, x)
            return -float(skm.log_loss(y.astype(np.int64), p, labels=np.arange(p.shape[1])))
        if metric == "auc":
            y = y.astype(np.int64)
            if np.unique(y).shape[0] < 2:   # undefined: chance, as the torch path
                return 0.5
            return float(skm.roc_auc_score(y, self._binary_score(fitted, x)))
        pred = self.predict(fitted, x)
        if metric == "neg_mse":
            return -float(skm.mean_squared_error(y, pred))
        if metric == "neg_mae":
            return -float(skm.mean_absolute_error(y, pred))
        if metric == "r2":
            return float(skm.r2_score(y, pred))
        raise ValueError(f"metric: unknown value {metric!r}")

    def fit_score(self, x: Any, y: Any, x_target: Any, y_target: Any, *, rows: Any = None,
                  sample_weight: Any = None, seed: int | None = None) -> float:
        return self.score(self.fit(x, y, rows=rows, sample_weight=sample_weight, seed=seed), x_target, y_target)

    # ---------------------------------------------------------------------------------- parallel
    def map(self, fn: Callable[..., Any], arg_tuples: Iterable[tuple]) -> list:
        """[fn(*args) for args in arg_tuples], over `n_jobs` joblib workers when n_jobs is not 1.

        With several workers, fn and its arguments are pickled (joblib memory-maps large arrays),
        so fn must be a module-level function."""
        arg_tuples = list(arg_tuples)
        if self.n_jobs in (None, 1) or len(arg_tuples) <= 1:
            return [fn(*a) for a in arg_tuples]
        from joblib import Parallel, delayed
        return Parallel(n_jobs=self.n_jobs)(delayed(fn)(*a) for a in arg_tuples)

    def fit_score_many(self, x: Any, y: Any, x_target: Any, y_target: Any, row_sets: Sequence[Any],
                       seeds: Sequence[int | None] | None = None) -> np.ndarray:
        """Target scores of one refit per row set (each an index array; repeats allowed)."""
        x, y, xt, yt = (to_numpy(a) for a in (x, y, x_target, y_target))
        seeds = [None] * len(row_sets) if seeds is None else list(seeds)
        if len(seeds) != len(row_sets):
            raise ValueError(f"seeds: {len(seeds)} seeds for {len(row_sets)} row sets")
        # one task per worker, not per refit: the arrays are pickled once per task
        parts = [p for p in np.array_split(np.arange(len(row_sets)), max(1, min(len(row_sets), self.workers())))
                 if len(p)]
        res = self.map(_fit_score_chunk, [(self, x, y, xt, yt, [row_sets[i] for i in p], [seeds[i] for i in p])
                                          for p in parts])
        return np.asarray([v for chunk in res for v in chunk], dtype=np.float64)

    def workers(self) -> int:
        """How many processes `map` uses (joblib.effective_n_jobs; 1 for n_jobs=None)."""
        if self.n_jobs in (None, 1):
            return 1
        from joblib import effective_n_jobs
        return int(effective_n_jobs(self.n_jobs))


def _fit_score_chunk(refit: SklearnRefit, x, y, xt, yt, row_sets, seeds) -> list[float]:
    return [refit.fit_score(x, y, xt, yt, rows=r, seed=s) for r, s in zip(row_sets, seeds)]


def _as_2d(x: np.ndarray) -> np.ndarray:
    return x.reshape(x.shape[0], int(np.prod(x.shape[1:])))


def _takes_sample_weight(est: Any) -> bool:
    from sklearn.utils.validation import has_fit_parameter
    try:
        return bool(has_fit_parameter(est, "sample_weight"))
    except (TypeError, ValueError):  # pragma: no cover - exotic fit signatures
        return False


def _clone_seeded(est: Any, seed: int | None) -> Any:
    """sklearn.base.clone, with every random_state left at None set to `seed` (if given)."""
    from sklearn.base import clone
    c = clone(est)
    if seed is None:
        return c
    params = c.get_params(deep=True)
    fix = {k: int(seed) % (2 ** 32) for k, v in params.items()
           if (k == "random_state" or k.endswith("__random_state")) and v is None}
    if fix:
        c.set_params(**fix)
    return c
