"""Any scikit-learn estimator as the refit model: the adapter (dvgs_fast.refit.sklearn) against
direct sklearn calls, and LeaveOneOut / DataShapley (TMC) / DataOOB with sklearn estimators
against direct loops and, qualitatively, against the batched torch path."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import accuracy_score, log_loss, mean_squared_error, roc_auc_score
from sklearn.neighbors import KNeighborsClassifier
from sklearn.svm import LinearSVC
from sklearn.tree import DecisionTreeClassifier
from threadpoolctl import threadpool_limits

from dvgs_fast import DataOOB, DataShapley, LeaveOneOut, ValuationResult
from dvgs_fast.methods.base import BudgetWarning
from dvgs_fast.refit.sklearn import SklearnRefit, is_sklearn_estimator

from _tasks import flipped_task

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def one_blas_thread():
    # tiny refits: BLAS threads only add overhead (and oversubscribe the shared CI cores)
    with threadpool_limits(1):
        yield


def _data(seed, N, d=5, classes=2, n_target=30):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(N + n_target, d))
    w = rng.normal(size=(d, classes))
    y = np.argmax(X @ w + 0.5 * rng.gumbel(size=(N + n_target, classes)), 1)
    return X[:N], y[:N], X[N:], y[N:]


def _breast_cancer(n_source, seed=0):
    return flipped_task(n_source, 100, 100, split_seed=seed, flip_seed=seed)


# ------------------------------------------------------------------------------------ adapter
def test_is_sklearn_estimator():
    assert is_sklearn_estimator(LogisticRegression()) and is_sklearn_estimator(Ridge())
    assert not is_sklearn_estimator(LogisticRegression)          # a class, not an estimator
    assert not is_sklearn_estimator(torch.nn.Linear(2, 2))
    assert not is_sklearn_estimator("logistic") and not is_sklearn_estimator(lambda: None)


def test_adapter_scores_match_sklearn():
    X, y, Xt, yt = _data(0, 60, classes=3)
    est = LogisticRegression(C=3.0)
    ref = clone(est).fit(X, y)
    for metric, expect in [("accuracy", accuracy_score(yt, ref.predict(Xt))),
                           ("neg_log_loss", -log_loss(yt, ref.predict_proba(Xt), labels=[0, 1, 2]))]:
        r = SklearnRefit(est, classification=True, n_classes=3, metric=metric)
        assert r.fit_score(torch.tensor(X), torch.tensor(y), Xt, yt) == pytest.approx(expect, abs=1e-12)
    assert not hasattr(est, "coef_"), "the template itself is never fitted"
    Xb, yb, Xtb, ytb = _data(1, 50)
    r = SklearnRefit(LinearSVC(), classification=True, metric="auc")   # no predict_proba: decision_function
    m = clone(LinearSVC()).fit(Xb, yb)
    assert r.fit_score(Xb, yb, Xtb, ytb) == pytest.approx(roc_auc_score(ytb, m.decision_function(Xtb)), abs=1e-12)
    yr = Xb @ np.arange(5.0)
    r = SklearnRefit(Ridge(), classification=False, metric="neg_mse")
    m = Ridge().fit(Xb, yr)
    assert r.fit_score(Xb, yr, Xb, yr) == pytest.approx(-mean_squared_error(yr, m.predict(Xb)), abs=1e-12)


def test_adapter_degenerate_subsets_and_class_columns():
    X, y, Xt, yt = _data(2, 40, classes=3)
    r = SklearnRefit(LogisticRegression(), classification=True, n_classes=3, metric="neg_log_loss")
    two = np.flatnonzero(y != 2)                           # a refit that never saw class 2
    p = r.predict_proba(r.fit(X, y, rows=two), Xt)
    assert p.shape == (len(Xt), 3) and (p[:, 2] == 0).all()
    np.testing.assert_allclose(p.sum(1), 1.0)
    one = np.flatnonzero(y == 1)[:3]                       # one class: that class with probability 1
    np.testing.assert_array_equal(r.predict_proba(r.fit(X, y, rows=one), Xt), np.tile([0.0, 1.0, 0.0], (len(Xt), 1)))
    empty = r.fit(X, y, rows=np.array([], dtype=np.int64))   # nothing: uniform
    np.testing.assert_allclose(r.predict_proba(empty, Xt), 1 / 3)
    assert np.isfinite(r.score(empty, Xt, yt))
    with pytest.raises(ValueError, match="metric"):
        SklearnRefit(LinearSVC(), classification=True, metric="neg_log_loss")
    with pytest.raises(ValueError, match="model"):
        SklearnRefit("logistic", classification=True)
    with pytest.raises(ValueError, match="n_jobs"):
        SklearnRefit(Ridge(), classification=False, n_jobs=0)


def test_adapter_weights_rows_and_seeds():
    X, y, Xt, yt = _data(3, 30)
    w = np.random.default_rng(0).integers(0, 3, 30)
    rows = np.repeat(np.arange(30), w)
    # KNeighborsClassifier.fit takes no sample_weight: integer weights become repeated rows
    knn = SklearnRefit(KNeighborsClassifier(3), classification=True)
    np.testing.assert_array_equal(knn.predict(knn.fit(X, y, sample_weight=w), Xt),
                                  knn.predict(knn.fit(X, y, rows=rows), Xt))
    with pytest.raises(ValueError, match="sample_weight"):
        knn.fit(X, y, sample_weight=w + 0.5)
    # LogisticRegression takes sample_weight: passed through, zero weights drop rows
    lr = SklearnRefit(LogisticRegression(), classification=True)
    ref = LogisticRegression().fit(X[w > 0], y[w > 0], sample_weight=w[w > 0])
    np.testing.assert_allclose(lr.fit(X, y, sample_weight=w).coef_, ref.coef_, rtol=1e-10, atol=1e-12)
    # seeds reach every random_state left at None; explicit ones are kept
    tree = SklearnRefit(DecisionTreeClassifier(max_features=2), classification=True, seed=7)
    assert tree.fit(X, y).random_state == 7 and tree.fit(X, y, seed=9).random_state == 9
    kept = SklearnRefit(DecisionTreeClassifier(random_state=1), classification=True, seed=7)
    assert kept.fit(X, y).random_state == 1
    many = lr.fit_score_many(X, y, Xt, yt, [np.arange(10), np.arange(5, 30), rows])
    np.testing.assert_allclose(many, [lr.fit_score(X, y, Xt, yt, rows=r) for r in
                                      (np.arange(10), np.arange(5, 30), rows)], rtol=0, atol=0)


# -------------------------------------------------------------------------------- leave-one-out
def test_loo_sklearn_equals_direct_loop():
    X, y, Xt, yt = _data(4, 25)
    est = LogisticRegression(C=5.0)
    res = LeaveOneOut(est, seed=0, batch_size=7, progress=False).fit(X, y, Xt, yt)

    def score(rows):
        m = clone(est).fit(X[rows], y[rows])
        return -log_loss(yt, m.predict_proba(Xt), labels=[0, 1])

    full = score(np.arange(25))
    ref = np.array([full - score(np.delete(np.arange(25), i)) for i in range(25)])
    np.testing.assert_allclose(res.values, ref, rtol=1e-9, atol=1e-12)
    assert res.info["engine"] == "sklearn" and res.info["metric"] == "neg_log_loss"
    assert res.params["model"] == "LogisticRegression(C=5.0)"
    # regression, and a budget stop leaves unvalued points with counts 0
    yr = X @ np.arange(5.0)
    r2 = LeaveOneOut(Ridge(), loss="mse", seed=0, max_points=10, batch_size=4, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BudgetWarning)
        out = r2.fit(X, yr, Xt, Xt @ np.arange(5.0))
    assert out.status == "stopped" and (out.counts == 1).sum() == 10


def test_loo_sklearn_matches_torch_qualitatively(tmp_path):
    Xs, ys, Xt, yt, flipped = _breast_cancer(80)
    torch_res = LeaveOneOut(seed=0, progress=False).fit(Xs, ys, Xt, yt)
    sk = LeaveOneOut(LogisticRegression(C=10.0), seed=0, progress=False).fit(Xs, ys, Xt, yt)
    assert spearmanr(sk.values, torch_res.values)[0] > 0.6
    tree = LeaveOneOut(DecisionTreeClassifier(max_depth=3), metric="accuracy", seed=0, progress=False).fit(Xs, ys, Xt, yt)
    assert np.isfinite(tree.values).all() and (tree.counts == 1).all()
    path = sk.save(tmp_path / "loo")                     # sklearn settings are stored as text
    assert ValuationResult.load(path).params["model"] == "LogisticRegression(C=10.0)"


# --------------------------------------------------------------------------------- TMC-Shapley
def tmc_reference(est, X, y, Xt, yt, *, seed, n_perm, tol=0.01, patience=5):
    """Truncated Monte-Carlo Shapley, written out plainly (Ghorbani & Zou 2019, module doc of tmc.py)."""
    N = len(X)

    def score(rows):
        return accuracy_score(yt, clone(est).fit(X[rows], y[rows]).predict(Xt))

    full = score(np.arange(N))
    chance = np.bincount(yt).max() / len(yt)
    required = set(np.unique(yt).tolist())
    gen = torch.Generator().manual_seed(seed)
    mem = []
    for _ in range(n_perm):
        perm = torch.randperm(N, generator=gen).numpy()
        marg, prev, counter = np.zeros(N), chance, 0
        for n, i in enumerate(perm):
            new = score(perm[:n + 1]) if required <= set(y[perm[:n + 1]].tolist()) else prev
            marg[i] = new - prev
            prev = new
            if abs(new - full) <= tol * abs(full):
                counter += 1
                if counter >= patience:
                    break
            else:
                counter = 0
        mem.append(marg)
    return np.mean(mem, 0)


def test_tmc_sklearn_equals_direct_loop():
    X, y, Xt, yt = _data(5, 18)
    est = LogisticRegression(C=10.0)
    res = DataShapley(est, max_permutations=4, batch_permutations=3, seed=3, progress=False).fit(X, y, Xt, yt)
    np.testing.assert_allclose(res.values, tmc_reference(est, X, y, Xt, yt, seed=3, n_perm=4), rtol=0, atol=1e-12)
    assert res.info["engine"] == "sklearn" and (res.counts == 4).all()
    with pytest.raises(ValueError, match="method"):
        DataShapley(est, method="gshapley", max_permutations=2)


def test_tmc_sklearn_matches_torch_qualitatively():
    Xs, ys, Xt, yt, flipped = _breast_cancer(30)
    kw = dict(max_permutations=12, seed=0, progress=False)
    torch_res = DataShapley(**kw).fit(Xs, ys, Xt, yt)
    sk = DataShapley(LogisticRegression(C=10.0), **kw).fit(Xs, ys, Xt, yt)
    assert spearmanr(sk.values, torch_res.values)[0] > 0.5
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        stopped = DataShapley(DecisionTreeClassifier(), max_time=1e-6, convergence_tol=None, seed=0,
                              progress=False).fit(Xs, ys, Xt, yt)
    assert stopped.status == "stopped" and any(issubclass(x.category, BudgetWarning) for x in w)


# ------------------------------------------------------------------------------------- Data-OOB
def test_data_oob_sklearn_matches_torch_and_finds_flips():
    from dvgs_fast.evaluate import detection_auroc
    Xs, ys, Xt, yt, flipped = _breast_cancer(200)
    torch_res = DataOOB(n_estimators=100, seed=0, progress=False).fit(Xs, ys, Xt, yt)
    lr = DataOOB(LogisticRegression(C=10.0), n_estimators=100, seed=0, progress=False).fit(Xs, ys, Xt, yt)
    np.testing.assert_array_equal(lr.counts, torch_res.counts)       # the same bootstraps
    assert spearmanr(lr.values, torch_res.values)[0] > 0.7
    assert detection_auroc(lr.values, flipped) >= 0.9
    tree = DataOOB(DecisionTreeClassifier(), n_estimators=100, seed=0, progress=False).fit(Xs, ys, Xt, yt)
    assert detection_auroc(tree.values, flipped) >= 0.9
    assert tree.info["engine"] == "sklearn"


def test_data_oob_sklearn_regression_direct():
    X, _, Xt, _ = _data(6, 30)
    y = X @ np.arange(5.0) + np.random.default_rng(0).normal(size=30)
    res = DataOOB(Ridge(), n_estimators=4, loss="mse", seed=2, progress=False).fit(X, y, Xt, Xt[:, 0])
    from dvgs_fast.methods.data_oob import bootstrap_rows
    scores = [[] for _ in range(30)]
    for b in range(4):
        rows = bootstrap_rows(2, b, 30, 30)
        pred = Ridge().fit(X[rows], y[rows]).predict(X)
        for i in set(range(30)) - set(rows.tolist()):
            scores[i].append(-(pred[i] - y[i]) ** 2)
    np.testing.assert_allclose(res.values, [np.mean(s) if s else 0.0 for s in scores], rtol=1e-10, atol=1e-12)


def test_parallel_workers_give_the_same_values():
    """n_jobs=2 (joblib's process workers: the estimator, the arrays and PermState are pickled)."""
    X, y, Xt, yt = _data(7, 20)
    est = DecisionTreeClassifier(max_depth=2)
    for make in (lambda j: DataOOB(est, n_estimators=6, batch_size=6, n_jobs=j, seed=1, progress=False),
                 lambda j: DataShapley(est, max_permutations=4, batch_permutations=4, n_jobs=j, seed=1,
                                       progress=False),
                 lambda j: LeaveOneOut(est, metric="accuracy", n_jobs=j, seed=1, progress=False)):
        a, b = make(None).fit(X, y, Xt, yt), make(2).fit(X, y, Xt, yt)
        np.testing.assert_array_equal(a.values, b.values)
        np.testing.assert_array_equal(a.counts, b.counts)
