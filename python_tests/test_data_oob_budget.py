"""Data-OOB honours max_time inside a round of refits (issue 33, item 8): the budget used to be
checked only between rounds (10 models at first, up to batch_size=100 later), so one slow round
could overrun it many times over. Now the torch refits ask it at every optimizer step (a round
cut short is dropped: its models train together) and the scikit-learn refits before every model
(the models done in order are kept)."""
from __future__ import annotations

import time
import warnings

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin

from dvgs_fast import DataOOB


def _data(n=300, d=30):
    g = torch.Generator().manual_seed(0)
    xs, xt = torch.randn(n, d, generator=g), torch.randn(50, d, generator=g)
    w = torch.randn(d, generator=g)
    return xs, (xs @ w > 0).long(), xt, (xt @ w > 0).long()


def _fit(est):
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = est.fit(*_data())
    return res, time.perf_counter() - t0


def test_torch_refits_stop_within_a_step_of_the_budget():
    # one round of 10 logistic models x 200k full-batch steps: tens of seconds; the budget is 0.5 s
    est = DataOOB("logistic", n_estimators=1000, refit_steps=200_000, max_time=0.5, seed=0, progress=False)
    res, elapsed = _fit(est)
    assert res.status == "stopped" and res.info["stopped_by"] == "max_time"
    assert res.info["models_done"] == 0 and (res.counts == 0).all()     # the cut round is dropped
    assert elapsed < max(0.5, res.timings["setup"]) + 3.0, f"{elapsed:.1f} s for a 0.5 s budget"


class _Slow(ClassifierMixin, BaseEstimator):
    """A majority-class classifier that takes 0.25 s to fit."""

    def fit(self, x, y):
        time.sleep(0.25)
        self.classes_, counts = np.unique(y, return_counts=True)
        self.major_ = self.classes_[np.argmax(counts)]
        return self

    def predict(self, x):
        return np.full(len(x), self.major_)


def test_sklearn_refits_stop_before_the_next_model():
    est = DataOOB(_Slow(), n_estimators=40, batch_size=40, max_time=1.0, seed=0, progress=False)
    res, elapsed = _fit(est)
    assert res.status == "stopped"
    done = res.info["models_done"]
    assert 1 <= done < 10, done                   # about 1.0 / 0.25 models, kept in order
    assert elapsed < 1.0 + 0.25 + 1.5, f"{elapsed:.1f} s for a 1 s budget"
    full = DataOOB(_Slow(), n_estimators=done, seed=0, progress=False).fit(*_data())
    np.testing.assert_array_equal(res.values, full.values)      # the first `done` models of the full run


def test_derive_seed_keeps_its_values_and_returns_a_python_int():
    """numpy 1.x has no `uint64 >> int` (DataOOB crashed in derive_seed on numpy 1.26; the job
    .ci/oldest-deps runs the suite's DataOOB tests on numpy 1.23): the shift is done on a Python
    int, with the same bits as before (these seeds pick every bootstrap, snapshot and chunk)."""
    from dvgs_fast.methods.base import derive_seed
    from dvgs_fast.methods.dvgs.loop import chunk_seed, snapshot_seed
    assert derive_seed(1, 2) == 7764949442709860949 and type(derive_seed(1, 2)) is int
    seq = np.random.SeedSequence([3, 5, 0x44564753]).generate_state(1, dtype=np.uint64)
    assert snapshot_seed(3, 5) == int(seq[0]) >> 1
    assert chunk_seed(3, 5, 64) == int(np.random.SeedSequence([3, 5, 64, 0x43484E4B]).generate_state(
        1, dtype=np.uint64)[0]) >> 1
