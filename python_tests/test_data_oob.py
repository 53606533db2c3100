"""DataOOB (Kwon & Zou 2023) on the batched torch refits, against a loop that refits one model per
bootstrap on the repeated rows (not a weight mask) and averages the out-of-bag scores by hand."""
from __future__ import annotations

import types
import warnings

import numpy as np
import pytest
import torch

from dvgs_fast import DataOOB
from dvgs_fast.methods.base import BudgetWarning
from dvgs_fast.methods.data_oob import bootstrap_rows
from dvgs_fast.refit.batched import build_refit_grid
from dvgs_fast.refit.models import Refitter

from _tasks import flipped_task

torch.set_num_threads(1)


def _data(seed, N, d=4, classes=3, regression=False):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(N, d))
    w = rng.normal(size=(d, classes))
    if regression:
        y = X @ w[:, 0] + 0.3 * rng.normal(size=N)
    else:
        y = np.argmax(X @ w + rng.gumbel(size=(N, classes)), 1)
    return X, y, X[:5], y[:5]


def loop_reference(X, y, seed, n_estimators, n_draw, *, regression=False, steps=30, lr=0.1):
    """One sequential refit per bootstrap on X[rows] (rows repeated), scored on the rows it missed."""
    N = X.shape[0]
    Xt = torch.tensor(X, dtype=torch.float64)
    Yt = torch.tensor(y, dtype=torch.float64 if regression else torch.long)
    out_dim = 1 if regression else int(y.max()) + 1
    data = types.SimpleNamespace(out_dim=out_dim, classification=not regression)
    est = types.SimpleNamespace(model="logistic", hidden_dim=100, dtype=torch.float64, batch_engine="auto",
                                refit_steps=steps, refit_lr=lr, refit_optimizer="adam", weight_decay=0.0)
    torch.manual_seed(seed)                          # the method seeds its initial weights so
    _, refitter, theta0, _ = build_refit_grid(est, Xt, data, "accuracy")
    assert isinstance(refitter, Refitter)
    scores = [[] for _ in range(N)]
    for b in range(n_estimators):
        rows = bootstrap_rows(seed, b, N, n_draw)
        r = torch.from_numpy(rows)
        p = refitter.train(theta0, Xt[r], Yt[r], torch.ones(len(rows), dtype=torch.float64))
        with torch.no_grad():
            out = refitter.forward(p, Xt)
        for i in sorted(set(range(N)) - set(rows.tolist())):
            if regression:
                scores[i].append(-float(out[i, 0] - Yt[i]) ** 2)
            else:
                scores[i].append(float(int(out[i].argmax()) == int(Yt[i])))
    values = np.array([np.mean(s) if s else 0.0 for s in scores])
    counts = np.array([len(s) for s in scores])
    stderr = np.array([np.std(s, ddof=1) / np.sqrt(len(s)) if len(s) > 1 else np.nan for s in scores])
    return values, stderr, counts


@pytest.mark.parametrize("N,B,max_samples,regression", [(30, 9, None, False), (25, 6, 0.5, True),
                                                        (12, 5, 4, False), (1, 3, None, False)])
def test_matches_loop_over_bootstraps(N, B, max_samples, regression):
    X, y, Xt, yt = _data(N, N, regression=regression)
    m = DataOOB(n_estimators=B, max_samples=max_samples, batch_size=4, refit_steps=30, dtype="float64",
                loss="mse" if regression else "cross_entropy", seed=5, progress=False)
    res = m.fit(X, y, Xt, yt)
    n_draw = N if max_samples is None else (max(1, round(max_samples * N)) if isinstance(max_samples, float)
                                             else max_samples)
    v, se, c = loop_reference(X, y, 5, B, n_draw, regression=regression)
    np.testing.assert_array_equal(res.counts, c)
    np.testing.assert_allclose(res.values, v, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(res.stderr, se, rtol=1e-6, atol=1e-9, equal_nan=True)
    assert res.status == "completed" and res.info["models_done"] == B


def test_never_out_of_bag_and_batch_size_invariance():
    X, y, Xt, yt = _data(1, 40)
    a = DataOOB(n_estimators=3, seed=0, batch_size=1, dtype="float64", progress=False).fit(X, y, Xt, yt)
    b = DataOOB(n_estimators=3, seed=0, batch_size=64, dtype="float64", progress=False).fit(X, y, Xt, yt)
    np.testing.assert_allclose(a.values, b.values, rtol=0, atol=1e-12)
    never = a.counts == 0
    assert never.any(), "with 3 bootstraps of 40 some sample is in all of them"
    assert (a.values[never] == 0).all() and np.isnan(a.stderr[never]).all()
    assert a.info["never_out_of_bag"] == int(never.sum())


def test_finds_flipped_labels_breast_cancer():
    from dvgs_fast.evaluate import detection_auroc
    xs, y_noisy, xt, yt, flipped = flipped_task(300, 100, 100, split_seed=0, flip_seed=0)
    res = DataOOB(seed=0, progress=False).fit(xs, y_noisy, xt, yt)
    assert detection_auroc(res.values, flipped) >= 0.9
    assert res.counts.min() > 0 and np.isfinite(res.stderr).all()


def test_max_time_stops():
    X, y, Xt, yt = _data(2, 20)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        res = DataOOB(n_estimators=50, max_time=1e-9, seed=0, progress=False).fit(X, y, Xt, yt)
    assert res.status == "stopped" and res.info["stopped_by"] == "max_time"
    assert (res.counts == 0).all()
    assert any(issubclass(x.category, BudgetWarning) for x in w)


class _SlowLogistic:
    """An sklearn estimator whose fit sleeps: a round of 100 would take 5 s."""

    def __init__(self):
        from sklearn.linear_model import LogisticRegression
        self.inner = LogisticRegression(max_iter=50)

    def get_params(self, deep=True):
        return {}

    def set_params(self, **params):
        return self

    def fit(self, X, y, sample_weight=None):
        import time
        time.sleep(0.05)
        self.inner.fit(X, y)
        self.classes_ = self.inner.classes_
        return self

    def predict(self, X):
        return self.inner.predict(X)


def test_max_time_shrinks_rounds_of_slow_models():
    """The budget is checked between rounds; rounds are sized from the measured cost per model,
    so a slow model stops near max_time instead of a whole 100-model round (5 s) later: a short
    first round measures the cost, then rounds shrink to the time left (not asserted on the wall
    clock, which a loaded machine stretches)."""
    X, y, Xt, yt = _data(3, 40)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BudgetWarning)
        res = DataOOB(model=_SlowLogistic(), n_estimators=200, batch_size=100, n_jobs=1, max_time=0.6,
                      seed=0, progress=False).fit(X, y, Xt, yt)
    assert res.status == "stopped" and 0 < res.info["models_done"] < 100


def test_bad_input():
    X, y, Xt, yt = _data(3, 10)
    for kw, name in [(dict(n_estimators=0), "n_estimators"), (dict(max_samples=1.5), "max_samples"),
                     (dict(max_samples=0), "max_samples"), (dict(max_samples="all"), "max_samples"),
                     (dict(n_jobs=0), "n_jobs"), (dict(model="tree"), "model"), (dict(loss="hinge"), "loss")]:
        with pytest.raises(ValueError, match=name):
            DataOOB(**kw)
    with pytest.raises(ValueError, match="max_samples"):
        DataOOB(max_samples=11, progress=False).fit(X, y, Xt, yt)
    with pytest.raises(ValueError, match="y_source"):
        DataOOB(progress=False).fit(X, y[:-1], Xt, yt)
