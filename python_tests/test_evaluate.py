"""dvgs_fast.evaluate: metrics against hand-computed cases, curves, plots, input checks."""
from __future__ import annotations

import json

import numpy as np
import pytest

from dvgs_fast import evaluate as ev
from dvgs_fast.datasets import flip_labels, load_breast_cancer, make_split
from dvgs_fast.result import ValuationResult

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# 6 samples, the two lowest values are the corrupted ones
V = np.array([0.1, 0.2, 0.6, 0.7, 0.8, 0.9])
BAD = np.array([True, True, False, False, False, False])


# ---------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------


def test_auroc_auprc_hand_cases():
    assert ev.detection_auroc(V, BAD) == 1.0
    assert ev.detection_auprc(V, BAD) == 1.0
    assert ev.detection_auroc(-V, BAD) == 0.0  # exactly inverted ranking
    # one corrupted sample ranked 3rd lowest: pairs (bad, clean) correctly ordered = 7 of 8
    v = np.array([0.1, 0.5, 0.3, 0.7, 0.8, 0.9])
    assert ev.detection_auroc(v, BAD) == pytest.approx(7 / 8)
    # AP: hits at ranks 1 and 3 -> (1/1 + 2/3) / 2
    assert ev.detection_auprc(v, BAD) == pytest.approx((1 + 2 / 3) / 2)
    assert ev.detection_auroc(np.ones(6), BAD) == 0.5  # constant values: chance
    # bool, 0/1 ints, ValuationResult and torch tensors are all accepted
    res = ValuationResult(values=V, method="test")
    assert ev.detection_auroc(res, BAD.astype(int)) == 1.0
    torch = pytest.importorskip("torch")
    assert ev.detection_auroc(torch.tensor(V), torch.tensor(BAD)) == 1.0


def test_kmeans_f1_hand_cases():
    # two well separated groups: the low group is exactly the corrupted set
    assert ev.kmeans_f1(V, BAD) == 1.0
    # low cluster {0.1, 0.2, 0.25}: TP 2, FP 1, FN 0 -> F1 = 4 / 5
    v = np.array([0.1, 0.2, 0.25, 0.9, 0.95, 1.0])
    assert ev.kmeans_f1(v, BAD) == pytest.approx(0.8)
    assert ev.kmeans_f1(v, BAD) == ev.kmeans_f1(v, BAD)  # deterministic
    assert ev.kmeans_f1(np.ones(6), BAD) == 0.0  # no structure: nothing predicted noisy


def test_noise_spearman():
    sigma = np.array([3.0, 2.0, 1.0, 0.5, 0.2, 0.0])
    assert ev.noise_spearman(V, sigma) == pytest.approx(1.0)  # noisier -> lower value
    assert ev.noise_spearman(-V, sigma) == pytest.approx(-1.0)
    assert np.isnan(ev.noise_spearman(np.ones(6), sigma))
    with pytest.raises(ValueError, match="sigma"):
        ev.noise_spearman(V, sigma[:3])


@pytest.mark.parametrize("fn", [ev.detection_auroc, ev.detection_auprc, ev.kmeans_f1])
def test_input_validation(fn):
    with pytest.raises(ValueError, match="is_corrupted"):
        fn(V, BAD[:4])  # length mismatch
    bad_v = V.copy()
    bad_v[2] = np.nan
    with pytest.raises(ValueError, match="values.*NaN"):
        fn(bad_v, BAD)
    with pytest.raises(ValueError, match="is_corrupted.*both"):
        fn(V, np.zeros(6, bool))
    with pytest.raises(ValueError, match="is_corrupted"):
        fn(V, np.array([0, 1, 2, 0, 0, 0]))  # indices, not a mask
    with pytest.raises(ValueError, match="values"):
        fn(np.zeros((3, 2)), BAD)


# ---------------------------------------------------------------------------------------------
# discovery curve
# ---------------------------------------------------------------------------------------------


def test_discovery_curve_hand_case():
    v = np.array([0.1, 0.5, 0.3, 0.7, 0.8, 0.9])  # corrupted at ranks 1 and 3
    c = ev.discovery_curve(v, BAD, fractions=[0, 1 / 6, 2 / 6, 3 / 6, 1])
    np.testing.assert_allclose(c.found, [0, 0.5, 0.5, 1.0, 1.0])
    np.testing.assert_allclose(c.optimal, [0, 0.5, 1.0, 1.0, 1.0])
    np.testing.assert_allclose(c.random, [0, 1 / 6, 2 / 6, 3 / 6, 1])
    perfect = ev.discovery_curve(V, BAD)
    np.testing.assert_allclose(perfect.found, perfect.optimal)
    assert perfect.fractions[0] == 0 and perfect.fractions[-1] == 1
    assert perfect.auc() > c.auc()
    with pytest.raises(ValueError, match="fractions"):
        ev.discovery_curve(V, BAD, fractions=[0.5, 1.5])


def test_discovery_ties_are_random_not_positional():
    # constant values must not look perfect just because the corrupted samples come first
    n = 2000
    bad = np.zeros(n, bool)
    bad[:200] = True
    c = ev.discovery_curve(np.zeros(n), bad, fractions=[0.1, 0.5])
    np.testing.assert_allclose(c.found, [0.1, 0.5], atol=0.07)


# ---------------------------------------------------------------------------------------------
# removal curves
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def noisy_cancer():
    d = load_breast_cancer()
    sp = make_split(d.X, d.y, 300, 0, 200, seed=0)
    y_noisy, bad = flip_labels(sp.y_source, 0.3, seed=0)
    return sp, y_noisy, bad


def test_remove_curves_with_oracle_values(noisy_cancer):
    sp, y_noisy, bad = noisy_cancer
    from sklearn.neighbors import KNeighborsClassifier
    oracle = np.where(bad, 0.0, 1.0) + 0.01 * np.random.default_rng(0).random(len(bad))
    fr = [0.0, 0.3, 0.5]
    # 1-NN memorises every label, so flipped labels hurt it visibly (logistic regression
    # shrugs off 30% symmetric noise on this easy set)
    knn = lambda: KNeighborsClassifier(1)  # noqa: E731
    low = ev.remove_low_curve(oracle, sp.x_source, y_noisy, sp.x_test, sp.y_test, fractions=fr, model=knn)
    high = ev.remove_high_curve(oracle, sp.x_source, y_noisy, sp.x_test, sp.y_test, fractions=fr, model=knn)
    assert low.scores[0] == high.scores[0]  # nothing removed: same model, same data
    np.testing.assert_array_equal(low.n_kept, [300, 210, 150])
    # removing the 30% flipped labels first helps; removing clean data first hurts
    assert low.scores[1] > low.scores[0] + 0.15
    assert high.scores[2] < low.scores[2] - 0.3
    default = ev.remove_low_curve(oracle, sp.x_source, y_noisy, sp.x_test, sp.y_test, fractions=fr)
    assert np.all(default.scores > 0.85)  # the LogisticRegression default
    assert low.mode == "low" and high.metric == "accuracy"


def test_remove_curve_models_and_metrics(noisy_cancer):
    sp, y_noisy, bad = noisy_cancer
    from sklearn.neighbors import KNeighborsClassifier
    v = -bad.astype(float)
    c = ev.remove_curve(v, sp.x_source, y_noisy, sp.x_test, sp.y_test, mode="low",
                        fractions=[0.0, 0.2], model=KNeighborsClassifier(5), metric="balanced_accuracy")
    assert c.scores.shape == (2,) and np.all((0 <= c.scores) & (c.scores <= 1))
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 30x2 model: thread start-up costs more than it saves on busy CI
    try:
        c2 = ev.remove_curve(v, sp.x_source, y_noisy, sp.x_test, sp.y_test, mode="low", fractions=[0.3],
                             model=lambda: torch.nn.Linear(30, 2), torch_options={"epochs": 10, "lr": 0.05},
                             metric=lambda yt, yp: float(np.mean(yt == yp)))
    finally:
        torch.set_num_threads(threads)
    assert 0.5 < c2.scores[0] <= 1.0
    # a kept set with a single class predicts that class instead of failing
    y1 = np.where(bad, 1, 0)
    c3 = ev.remove_curve(-bad.astype(float), sp.x_source, y1, sp.x_test, sp.y_test, mode="low",
                         fractions=[0.5])
    assert c3.scores[0] == pytest.approx(np.mean(sp.y_test == 0))


def test_remove_curve_validation(noisy_cancer):
    sp, y_noisy, _ = noisy_cancer
    v = np.zeros(300)
    with pytest.raises(ValueError, match="mode"):
        ev.remove_curve(v, sp.x_source, y_noisy, sp.x_test, sp.y_test, mode="middle")
    with pytest.raises(ValueError, match="x_train"):
        ev.remove_curve(v[:10], sp.x_source, y_noisy, sp.x_test, sp.y_test)
    with pytest.raises(ValueError, match="y_test"):
        ev.remove_curve(v, sp.x_source, y_noisy, sp.x_test, sp.y_test[:5])
    with pytest.raises(ValueError, match="fractions"):
        ev.remove_curve(v, sp.x_source, y_noisy, sp.x_test, sp.y_test, fractions=[1.0])
    with pytest.raises(ValueError, match="metric"):
        ev.remove_curve(v, sp.x_source, y_noisy, sp.x_test, sp.y_test, metric="rmse")
    with pytest.raises(ValueError, match="model"):
        ev.remove_curve(v, sp.x_source, y_noisy, sp.x_test, sp.y_test, model=lambda: object())


# ---------------------------------------------------------------------------------------------
# summarize
# ---------------------------------------------------------------------------------------------


def test_summarize(noisy_cancer):
    sigma = np.array([3.0, 2.0, 1.0, 0.5, 0.2, 0.0])
    s = ev.summarize(V, BAD, sigma)
    assert s["n"] == 6 and s["n_corrupted"] == 2
    assert s["auroc"] == 1.0 and s["auprc"] == 1.0 and s["kmeans_f1"] == 1.0
    assert s["noise_spearman"] == pytest.approx(1.0)
    assert s["discovery@0.5"] == 1.0 and 0 < s["discovery_auc"] <= 1
    json.dumps(s)  # plain Python types, ready for a CLI / results file
    assert set(ev.summarize(V)) == {"n", "value_mean", "value_std", "value_min", "value_max"}
    sp, y_noisy, bad = noisy_cancer
    full = ev.summarize(-bad.astype(float), bad, x_train=sp.x_source, y_train=y_noisy,
                        x_test=sp.x_test, y_test=sp.y_test, removal_fractions=[0.0, 0.3])
    assert len(full["remove_high"]["scores"]) == 2 and full["remove_low"]["fractions"] == [0.0, 0.3]
    json.dumps(full)
    with pytest.raises(ValueError, match="x_train"):
        ev.summarize(V, BAD, x_train=np.zeros((6, 2)))


# ---------------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------------


def _is_png(path):
    data = path.read_bytes()
    return len(data) > 1000 and data[:8] == PNG_MAGIC


def test_plots_write_pngs(tmp_path, noisy_cancer):
    rng = np.random.default_rng(0)
    bad = rng.random(300) < 0.2
    good_values = np.where(bad, 0.0, 1.0) + rng.normal(0, 0.5, 300)
    p1 = ev.plot_discovery_curve({"method": good_values, "random": rng.random(300)}, bad,
                                 tmp_path / "disc.png")
    assert p1 == tmp_path / "disc.png" and _is_png(p1)
    p2 = ev.plot_value_histogram(good_values, bad, tmp_path / "sub" / "hist.png", bins=20)
    assert _is_png(p2)
    assert _is_png(ev.plot_value_histogram(np.ones(10), np.zeros(10, bool), tmp_path / "flat.png"))
    sp, y_noisy, bad_s = noisy_cancer
    v = -bad_s.astype(float)
    curves = [ev.remove_curve(v, sp.x_source, y_noisy, sp.x_test, sp.y_test, mode=m,
                              fractions=[0.0, 0.2, 0.4], label="oracle") for m in ("high", "low")]
    p3 = ev.plot_remove_curves(curves, tmp_path / "remove.png")
    assert _is_png(p3)
    assert _is_png(ev.plot_remove_curves({"oracle": curves[0]}, tmp_path / "remove1.png"))
    with pytest.raises(ValueError, match="path"):
        ev.plot_value_histogram(good_values, bad, tmp_path / "hist.pdf")
    with pytest.raises(ValueError, match="curves"):
        ev.plot_remove_curves([], tmp_path / "empty.png")


def test_plots_leave_pyplot_alone(tmp_path):
    import matplotlib
    backend = matplotlib.get_backend()
    ev.plot_discovery_curve(V, BAD, tmp_path / "d.png")
    assert matplotlib.get_backend() == backend
    import sys
    if "matplotlib.pyplot" in sys.modules:
        import matplotlib.pyplot as plt
        assert plt.get_fignums() == []
