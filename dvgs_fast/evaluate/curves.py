"""Curves: corrupted-sample discovery, and test performance after removing high/low-valued data."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ._checks import as_fractions, as_mask, as_values, rank_order

DEFAULT_DISCOVERY_FRACTIONS = np.linspace(0.0, 1.0, 21)
DEFAULT_REMOVAL_FRACTIONS = np.linspace(0.0, 0.5, 11)


@dataclass
class DiscoveryCurve:
    """found[i] = fraction of all corrupted samples among the ``fractions[i] * n`` lowest values.

    ``random`` is the expected curve of a random ranking (= fraction inspected) and ``optimal``
    the best possible one (all inspected samples corrupted until none is left).
    """

    fractions: np.ndarray
    found: np.ndarray
    random: np.ndarray
    optimal: np.ndarray
    n: int
    n_corrupted: int

    def auc(self) -> float:
        """Area under ``found`` over the fraction range, divided by the range (1 = perfect at once)."""
        span = float(self.fractions[-1] - self.fractions[0])
        if span <= 0:
            return float(self.found.mean())
        trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy < 2 has only trapz
        return float(trapezoid(self.found, self.fractions) / span)


def discovery_curve(values, is_corrupted, fractions=None, *, seed: int | None = 0) -> DiscoveryCurve:
    """Fraction of corrupted samples found when inspecting the lowest-valued samples first.

    fractions  fractions of the data inspected (default 0, 0.05, ..., 1); ``k = round(f * n)``
    seed       breaks ties in the values at random (reproducibly)
    """
    v = as_values(values)
    m = as_mask(is_corrupted, v.shape[0])
    fr = as_fractions(DEFAULT_DISCOVERY_FRACTIONS if fractions is None else fractions)
    n, n_bad = v.shape[0], int(m.sum())
    order = rank_order(v, seed)
    found_cum = np.concatenate([[0], np.cumsum(m[order])])  # corrupted among the k lowest
    k = np.rint(fr * n).astype(np.int64)
    return DiscoveryCurve(fractions=fr, found=found_cum[k] / n_bad, random=k / n,
                          optimal=np.minimum(k, n_bad) / n_bad, n=n, n_corrupted=n_bad)


# ---------------------------------------------------------------------------------------------
# removal curves
# ---------------------------------------------------------------------------------------------
class TorchClassifier:
    """Minimal sklearn-style wrapper that trains a fresh torch module (cross-entropy, Adam).

    Lets ``remove_curve(model=lambda: nn.Sequential(...))`` use a torch model: the factory is
    called for each fit, so every point of a curve starts from a new initialisation.
    """

    def __init__(self, factory: Callable[[], Any], *, epochs: int = 50, lr: float = 1e-3,
                 batch_size: int = 128, weight_decay: float = 0.0, seed: int = 0, device: str = "cpu"):
        self.factory, self.epochs, self.lr = factory, epochs, lr
        self.batch_size, self.weight_decay, self.seed, self.device = batch_size, weight_decay, seed, device
        self.module = None

    def fit(self, X, y):
        import torch
        g = torch.Generator().manual_seed(self.seed)
        torch.manual_seed(self.seed)
        self.module = self.factory().to(self.device)
        X = torch.as_tensor(np.asarray(X), dtype=torch.float32, device=self.device)
        y = torch.as_tensor(np.asarray(y), dtype=torch.long, device=self.device)
        opt = torch.optim.Adam(self.module.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        loss_fn = torch.nn.CrossEntropyLoss()
        self.module.train()
        n = X.shape[0]
        for _ in range(self.epochs):
            perm = torch.randperm(n, generator=g).to(self.device)
            for s in range(0, n, self.batch_size):
                idx = perm[s:s + self.batch_size]
                opt.zero_grad(set_to_none=True)
                loss_fn(self.module(X[idx]), y[idx]).backward()
                opt.step()
        return self

    def predict_proba(self, X):
        import torch
        self.module.eval()
        with torch.no_grad():
            out = self.module(torch.as_tensor(np.asarray(X), dtype=torch.float32, device=self.device))
            return torch.softmax(out, dim=1).cpu().numpy()

    def predict(self, X):
        return self.predict_proba(X).argmax(axis=1)


def default_model():
    """A fast, deterministic baseline: scikit-learn's LogisticRegression (lbfgs)."""
    from sklearn.linear_model import LogisticRegression
    return LogisticRegression(max_iter=500)


def _make_model(model, torch_options: dict | None = None):
    if model is None:
        return default_model()
    if hasattr(model, "fit") and not isinstance(model, type):
        from sklearn.base import clone  # an estimator instance: a fresh unfitted copy per point
        return clone(model)
    if not callable(model):
        raise ValueError(f"model: expected a zero-argument factory (e.g. a class or lambda), got "
                         f"{type(model).__name__}; pass `lambda: est` so every fit gets a fresh model")
    est = model()
    try:
        import torch
        if isinstance(est, torch.nn.Module):
            return TorchClassifier(model, **(torch_options or {}))
    except ImportError:  # pragma: no cover
        pass
    if not (hasattr(est, "fit") and hasattr(est, "predict")):
        raise ValueError(f"model: the factory returned {type(est).__name__}, which has no fit/predict "
                         f"and is not a torch nn.Module")
    return est


_METRICS = ("accuracy", "balanced_accuracy", "f1_macro")


def _score(metric, y_true, y_pred) -> float:
    from sklearn import metrics as skm
    if callable(metric):
        return float(metric(y_true, y_pred))
    if metric == "accuracy":
        return float(skm.accuracy_score(y_true, y_pred))
    if metric == "balanced_accuracy":
        return float(skm.balanced_accuracy_score(y_true, y_pred))
    return float(skm.f1_score(y_true, y_pred, average="macro"))


@dataclass
class RemovalCurve:
    """Test score after removing the ``fractions`` of samples with the highest/lowest values."""

    fractions: np.ndarray
    scores: np.ndarray
    n_kept: np.ndarray
    mode: str
    metric: str
    label: str | None = None
    info: dict[str, Any] = field(default_factory=dict)


def remove_curve(values, x_train, y_train, x_test, y_test, *, mode: str = "high", fractions=None,
                 model=None, metric="accuracy", seed: int | None = 0, label: str | None = None,
                 torch_options: dict | None = None, progress: bool = False) -> RemovalCurve:
    """Retrain on the data left after removing high- (or low-) valued samples; score on the test set.

    values          one value per training sample
    mode            "high": remove the top fraction first (a good valuation makes the score
                    drop fast); "low": remove the bottom fraction first (the score should hold
                    or rise, as corrupted samples go first)
    fractions       fractions removed, each in [0, 1) (default 0, 0.05, ..., 0.5)
    model           zero-argument factory of a fresh model for each point: an sklearn-style
                    estimator (fit/predict) or a torch ``nn.Module`` (trained by
                    :class:`TorchClassifier`); an sklearn estimator instance is cloned per
                    point; default LogisticRegression
    metric          "accuracy", "balanced_accuracy", "f1_macro" or ``f(y_true, y_pred)``
    seed            breaks ties in the values at random (reproducibly)
    torch_options   keyword arguments of :class:`TorchClassifier` (epochs, lr, batch_size,
                    device, ...) when ``model`` builds a torch module
    label           name of the method, used as the legend entry by the plots

    If the kept data hold a single class, the model is skipped and that class is predicted.
    """
    from .._validation import check_choice
    v = as_values(values)
    check_choice(mode, "mode", ("high", "low"))
    if not callable(metric):
        check_choice(metric, "metric", _METRICS)
    X = np.asarray(x_train)
    y = np.asarray(y_train)
    Xt = np.asarray(x_test)
    yt = np.asarray(y_test)
    if X.shape[0] != v.shape[0]:
        raise ValueError(f"x_train: has {X.shape[0]} rows but values has {v.shape[0]}")
    if y.shape[0] != v.shape[0]:
        raise ValueError(f"y_train: has {y.shape[0]} labels but values has {v.shape[0]}")
    if Xt.shape[0] != yt.shape[0] or Xt.shape[0] == 0:
        raise ValueError(f"y_test: has {yt.shape[0]} labels but x_test has {Xt.shape[0]} rows")
    for name, a in (("x_train", X), ("x_test", Xt)):
        if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
            raise ValueError(f"{name}: contains NaN/Inf")
    if X.ndim > 2:  # images etc.: flatten for sklearn models; torch factories see flat input too
        X, Xt = X.reshape(X.shape[0], -1), Xt.reshape(Xt.shape[0], -1)
    fr = as_fractions(DEFAULT_REMOVAL_FRACTIONS if fractions is None else fractions, allow_one=False)
    n = v.shape[0]
    order = rank_order(v, seed, descending=(mode == "high"))  # removal order
    n_remove = np.floor(fr * n + 1e-9).astype(np.int64)
    if np.any(n - n_remove < 1):
        raise ValueError("fractions: every point must keep at least one training sample")
    scores = np.empty(fr.shape[0])
    it = range(fr.shape[0])
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc=f"remove-{mode}")
    for i in it:
        keep = np.sort(order[n_remove[i]:])
        yk = y[keep]
        classes = np.unique(yk)
        if classes.size < 2:
            pred = np.full(yt.shape[0], classes[0])
        else:
            est = _make_model(model, torch_options)
            est.fit(X[keep], yk)
            pred = est.predict(Xt)
        scores[i] = _score(metric, yt, pred)
    return RemovalCurve(fractions=fr, scores=scores, n_kept=n - n_remove, mode=mode,
                        metric=metric if isinstance(metric, str) else getattr(metric, "__name__", "custom"),
                        label=label)


def remove_high_curve(values, x_train, y_train, x_test, y_test, **kw) -> RemovalCurve:
    """:func:`remove_curve` with ``mode="high"``."""
    return remove_curve(values, x_train, y_train, x_test, y_test, mode="high", **kw)


def remove_low_curve(values, x_train, y_train, x_test, y_test, **kw) -> RemovalCurve:
    """:func:`remove_curve` with ``mode="low"``."""
    return remove_curve(values, x_train, y_train, x_test, y_test, mode="low", **kw)
