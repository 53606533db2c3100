"""The thread rule (dvgs_fast.threads): one thread for small work, the idle cores for large work,
an explicit count as given; every method records the count and the reason; the caller's
setting is restored after fit."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from dvgs_fast import DVGS, DataShapley, KNNShapley, RandomValuation, threads
from dvgs_fast.cli._models import autoencoder, convnet, mlp


def test_choose_small_work_is_one_thread_and_explicit_wins():
    c = threads.choose(None, 10 ** 7, what="DVGS")
    assert c.n == 1 and "DVGS" in c.reason and "one thread" in c.reason
    assert threads.choose(3, 10 ** 7) == threads.ThreadChoice(3, "set explicitly")
    assert threads.choose(3, None).n == 3


@pytest.mark.parametrize("load, cores, want", [(0.0, 8, 8), (5.2, 8, 3), (7.9, 8, 1), (30.0, 8, 1), (0.4, 2, 2)])
def test_large_work_takes_the_idle_cores(monkeypatch, load, cores, want):
    monkeypatch.setattr(threads, "available_cores", lambda: cores)
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (load, load, load))
    c = threads.choose(None, threads.PARALLEL_MIN_MACS)
    assert c.n == want and f"load average {load:.1f}" in c.reason
    assert threads.choose(None, None).n == want            # unknown size: the same as large


def test_largest_layer_macs_against_hand_counts():
    # the reference: rows x in x out of the largest Linear; conv: out_c x in_c x k x k x H x W
    assert threads.largest_layer_macs(lambda: mlp(108, 2, 100, 0.5, 2), (108,), 1000) == 1000 * 108 * 100
    assert threads.largest_layer_macs(autoencoder(978), (978,), 4096) == 4096 * 978 * 256
    assert threads.largest_layer_macs(lambda: convnet((3, 32, 32), 10), (3, 32, 32), 7) == 7 * 32 * 16 * 9 * 16 * 16
    assert threads.largest_layer_macs(nn.Linear(5, 3), (5,), 1) == 15
    assert threads.largest_layer_macs("not a model", (5,), 1) is None
    # token ids (integer inputs) reach an Embedding model as integers; the Linear after it counts
    emb = nn.Sequential(nn.Embedding(100, 16), nn.Flatten(), nn.Linear(16 * 5, 2))
    ids = np.zeros((40, 5), dtype=np.int64)
    assert threads.model_work(emb, ids, None, ids[:10], [8]) == 8 * 80 * 2


def test_estimate_leaves_the_model_and_the_random_stream_alone():
    m = nn.Linear(4, 2)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    torch.manual_seed(0)
    a = torch.rand(3)
    torch.manual_seed(0)
    threads.largest_layer_macs(lambda: mlp(4, 2), (4,), 10)   # a factory built on the meta device
    threads.largest_layer_macs(m, (4,), 10)
    assert torch.equal(torch.rand(3), a)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items()) and m.weight.device.type == "cpu"


def _task(n=60, d=5, seed=0):
    g = np.random.default_rng(seed)
    x = g.standard_normal((n, d)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    return x[:40], y[:40], x[40:], y[40:]


def test_fit_records_threads_and_restores_the_callers_setting():
    xs, ys, xt, yt = _task()
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = []

        class Spy(RandomValuation):
            def _fit(self, *a):
                seen.append(torch.get_num_threads())
                return super()._fit(*a)

        r = Spy(seed=0, progress=False).fit(xs, ys, xt, yt)
        assert seen == [1] and r.info["threads"] == 1 and "one thread" in r.info["threads_reason"]
        r = Spy(seed=0, progress=False, num_threads=2).fit(xs, ys, xt, yt)
        assert seen[-1] == 2 and r.info["threads"] == 2 and r.info["threads_reason"] == "set explicitly"
        assert torch.get_num_threads() == 2                 # the caller's setting is back
        assert "num_threads" not in r.params               # not a setting: info says what ran
    finally:
        torch.set_num_threads(before)


def test_methods_estimate_their_work():
    xs, ys, xt, yt = _task()
    fac = lambda: nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 2))  # noqa: E731
    assert DVGS(fac, target_batch_size=10, source_batch_size=30)._thread_work(xs, ys, xt) == 30 * 5 * 8
    assert DataShapley(max_permutations=1)._thread_work(xs, ys, xt) == 40 * 5 * 2     # logistic: d x classes
    assert KNNShapley(k=3)._thread_work(xs, ys, xt) == 20 * 40 * 5                    # a block of distances
    assert RandomValuation()._thread_work(xs, ys, xt) == 0
    with pytest.raises(ValueError, match="num_threads"):
        RandomValuation(num_threads=0)
