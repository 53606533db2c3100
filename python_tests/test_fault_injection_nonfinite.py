"""Fault injection, non-finite training: no method returns NaN (or NaN-derived) values as a
result. For every method and route, a model whose output is NaN from the start is refused as
``model: <Method>: ... before any update, at <where>``, and a training that diverges later (a
learning rate far too large) as ``<its lr>: training diverged in <Method>: <what> is nan at
<epoch/step/refit>``; the base class refuses whatever a method lets through.

The diverging model is finite at its initial weights and gives NaN once a weight exceeds 5 in
magnitude (written with torch.where, so it also runs under vmap in the batched refits): any
learning rate of 1e3 gets it there within a step or two.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import dvgs_fast as D
from dvgs_fast._validation import NonFiniteError
from dvgs_fast.methods.base import Estimate


def _data(n=60, t=20):
    g = torch.Generator().manual_seed(0)
    xs, xt = torch.randn(n, 5, generator=g), torch.randn(t, 5, generator=g)
    w = torch.randn(5, 3, generator=g)
    return xs, (xs @ w).argmax(1), xt, (xt @ w).argmax(1)


class NaNOutput(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(5, 3)

    def forward(self, x):
        return self.lin(x) * float("nan")


class BlowUp(nn.Module):
    """Finite until a weight of its layer exceeds 5 in magnitude, NaN from then on."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(5, 3)

    def forward(self, x):
        out = self.lin(x)
        return torch.where(self.lin.weight.abs().amax() < 5.0, out, torch.full_like(out, float("nan")))


BIG = 1e3
quiet = dict(seed=0, progress=False)
# name -> (factory(model, lr), the lr argument's name, the method's name in messages)
METHODS = {
    "dvgs": (lambda m, lr: D.DVGS(m, epochs=2, lr=lr, **quiet), "lr", "DVGS"),
    "tracin": (lambda m, lr: D.TracIn(m, epochs=2, n_checkpoints=2, lr=lr, **quiet), "lr", "TracIn"),
    "in_run": (lambda m, lr: D.InRunShapley(m, epochs=2, lr=lr, **quiet), "lr", "InRunShapley"),
    "lossval": (lambda m, lr: D.LossVal(m, epochs=2, lr=lr, **quiet), "lr", "LossVal"),
    "loo": (lambda m, lr: D.LeaveOneOut(m, refit_steps=5, refit_lr=lr, **quiet), "refit_lr", "LeaveOneOut"),
    "loo_sequential": (lambda m, lr: D.LeaveOneOut(m, refit_steps=5, refit_lr=lr, batched=False, **quiet),
                       "refit_lr", "LeaveOneOut"),
    "data_oob": (lambda m, lr: D.DataOOB(m, n_estimators=10, refit_steps=5, refit_lr=lr, **quiet), "refit_lr",
                 "DataOOB"),
    "dvrl": (lambda m, lr: D.DVRL(m, n_iterations=5, predictor_lr=lr, **quiet), "predictor_lr", "DVRL"),
    "tmc": (lambda m, lr: D.DataShapley(m, max_permutations=2, refit_steps=5, refit_lr=lr, **quiet),
            "refit_lr", "DataShapley (TMC)"),
    "tmc_sequential": (lambda m, lr: D.DataShapley(m, max_permutations=2, refit_steps=5, refit_lr=lr,
                                                   batched=False, **quiet), "refit_lr", "DataShapley (TMC)"),
    "gshapley": (lambda m, lr: D.DataShapley(m, method="gshapley", max_permutations=2, g_learning_rate=lr,
                                             **quiet), "g_learning_rate", "DataShapley (G-Shapley)"),
    "gshapley_sequential": (lambda m, lr: D.DataShapley(m, method="gshapley", max_permutations=2,
                                                        g_learning_rate=lr, batched=False, **quiet),
                            "g_learning_rate", "DataShapley (G-Shapley)"),
}
# what the refusal of a NaN-output model names first, per family
FIRST = {"dvgs": "the target loss", "tracin": "the source loss", "in_run": "the source loss",
         "lossval": "the loss"}


@pytest.mark.parametrize("method", list(METHODS))
def test_model_with_nan_output_is_refused_before_any_update(method):
    make, _, label = METHODS[method]
    what = FIRST.get(method, "the model's output")
    with pytest.raises(NonFiniteError) as info:
        make(NaNOutput, 1e-2).fit(*_data())
    msg = str(info.value)
    owner = label.split(" (")[0]          # checked in the refit setup DataShapley's estimators share
    assert msg.startswith(f"model: {owner}: {what}") and "is nan before any update, at " in msg, msg
    assert "\n" not in msg


@pytest.mark.parametrize("method", list(METHODS))
def test_diverging_training_is_refused_naming_method_step_and_value(method):
    make, lr_name, label = METHODS[method]
    with pytest.raises(NonFiniteError) as info:
        make(BlowUp, BIG).fit(*_data())
    msg = str(info.value)
    assert msg.startswith(f"{lr_name}: training diverged in {label}: "), msg
    assert " is nan at " in msg and f"lower {lr_name} (now 1000)" in msg and "\n" not in msg
    where = msg.split(" is nan at ", 1)[1]
    assert any(w in where for w in ("epoch", "step", "refit", "permutation", "bootstrap", "model's training")), msg


def test_lossval_with_a_huge_lr_is_refused():
    """Issue 33: LossVal at lr 1e5..1e8 returned all-NaN weights as "completed"."""
    for lr in (1e5, 1e8):
        with pytest.raises(NonFiniteError, match=r"^lr: training diverged in LossVal: .* at .*epoch \d+"):
            D.LossVal(lambda: nn.Linear(5, 3), epochs=3, lr=lr, **quiet).fit(*_data())


def test_dvrl_selection_probabilities_that_are_nan_are_named():
    """A NaN value estimator used to end in torch's `Expected p_in >= 0 && p_in <= 1`."""
    est = D.DVRL("logistic", n_iterations=3, **quiet)
    from dvgs_fast.methods import dvrl
    real = dvrl.ValueEstimator.forward

    def nan_forward(self, x, y, d):
        return real(self, x, y, d) * float("nan")

    mp = pytest.MonkeyPatch()
    mp.setattr(dvrl.ValueEstimator, "forward", nan_forward)
    try:
        with pytest.raises(NonFiniteError, match=r"^learning_rate: training diverged in DVRL: a selection "
                                                 r"probability of the value estimator is nan at iteration 0"):
            est.fit(*_data())
    finally:
        mp.undo()


@pytest.mark.parametrize("all_bad", [False, True])
def test_gshapley_learning_rate_search_skips_a_diverging_candidate(monkeypatch, all_bad):
    """The searched learning rate is never one whose runs diverged (np.argmax picks a NaN first);
    when every candidate diverged the run is refused."""
    from dvgs_fast.methods.shapley import gshapley as shapley_method   # the search lives there

    def scores(grid, inits, X, Y, Xt, Yt, perms, lrs):
        s = torch.where(lrs == lrs.max(), 0.9, 0.5).to(torch.float64)     # lr 0.1 scores best ...
        s[0] = float("nan")                                              # ... but one of its runs diverged
        return torch.full_like(s, float("nan")) if all_bad else s

    monkeypatch.setattr(shapley_method, "one_epoch_scores", scores)
    est = D.DataShapley("logistic", method="gshapley", max_permutations=1, **quiet)
    if all_bad:
        with pytest.raises(NonFiniteError, match=r"^g_learning_rate: training diverged in DataShapley \(G-Shapley\): "
                                                 r"the target score of every candidate learning rate is nan at the "
                                                 r"learning-rate search"):
            est.fit(*_data())
        return
    res = est.fit(*_data())
    assert res.info["g_learning_rate_searched"] != pytest.approx(0.1)
    assert np.isfinite(res.values).all()


@pytest.mark.parametrize("method", ["knn_shapley", "random"])
def test_methods_without_training_refuse_nan_inputs(method):
    xs, ys, xt, yt = _data()
    xs = xs.clone()
    xs[7, 2] = float("nan")
    m = D.KNNShapley(k=3, **quiet) if method == "knn_shapley" else D.RandomValuation(**quiet)
    with pytest.raises(ValueError, match=r"^x_source: contains 1 NaN/Inf"):
        m.fit(xs, ys, xt, yt)


@pytest.mark.parametrize("cls", [D.RandomValuation, D.KNNShapley, D.LeaveOneOut])
def test_base_class_never_returns_nan_values(cls, monkeypatch):
    """The last guard of Valuation.fit: a method that lets NaN through gets no result."""
    def nan_fit(self, xs, ys, xt, yt, run):
        v = np.zeros(len(xs))
        v[3] = np.nan
        return Estimate(values=v)

    monkeypatch.setattr(cls, "_fit", nan_fit)
    with pytest.raises(NonFiniteError, match=rf"^model: {cls.__name__} produced 1 non-finite value\(s\) "
                                             rf"\(sample 3: nan\)"):
        cls(progress=False).fit(*_data())
