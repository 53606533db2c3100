"""Pinned values: DVGS, TracIn and In-Run Data Shapley on fixed seeds, as they were before the
gradient engine moved out of the DVGS package (issue 27, commit 9260ff2). A refactor that changes
any of these changed behaviour.

Float64 models, one thread. The three values and the sum are compared to 1e-10 relative (a
different BLAS or CPU kernel may move the last bits); the SHA-256 of all values is compared
exactly where the arithmetic is the one they were recorded with (torch 2.13.0, CPU capability
AVX2, one thread), which is what "bit-identical" means here.

A checkpoint written before the move (python_tests/data/checkpoint_before_engine_move/, made at
9260ff2 by killing DVGS and TracIn runs after their second saved state) must resume after it and
give the uninterrupted run's values.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dvgs_fast import DVGS, InRunShapley, TracIn

DATA = Path(__file__).parent / "data" / "checkpoint_before_engine_move"
RECORDED_ON = ("2.13.0", "AVX2")


def _data(n=40, m=16, d=6, classes=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    xs, xt = torch.randn(n, d, generator=g, dtype=dtype), torch.randn(m, d, generator=g, dtype=dtype)
    w = torch.randn(d, classes, generator=g, dtype=dtype)
    ys, yt = (xs @ w).argmax(1), (xt @ w).argmax(1)
    ys[: n // 5] = (ys[: n // 5] + 1) % classes
    return xs, ys, xt, yt


def mlp(dtype=torch.float64):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 8), nn.Mish(),
                         nn.Linear(8, 3)).to(dtype)


def cnn():
    torch.manual_seed(1)
    return nn.Sequential(nn.Unflatten(1, (1, 6)), nn.Conv1d(1, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(16, 3)).double()


CASES = {
 "dvgs_fast_mlp": lambda: DVGS(mlp(), epochs=2, target_batch_size=8, source_batch_size=16, lr=1e-2, seed=3, progress=False),
 "dvgs_reference_mlp": lambda: DVGS(mlp(), backend="reference", epochs=2, target_batch_size=8, source_batch_size=16, lr=1e-2, seed=3, progress=False),
 "dvgs_fast_cnn": lambda: DVGS(cnn(), epochs=2, target_batch_size=8, source_batch_size=16, lr=1e-2, seed=4, progress=False),
 "tracin_fast_mlp": lambda: TracIn(mlp(), epochs=3, batch_size=8, lr=1e-2, n_checkpoints=3, seed=5, progress=False),
 "tracin_fast_cnn": lambda: TracIn(cnn(), epochs=2, batch_size=8, lr=1e-2, n_checkpoints=2, seed=5, progress=False),
 "inrun_sgd_pairwise": lambda: InRunShapley(mlp(), epochs=2, batch_size=8, lr=5e-2, optimizer="sgd", dot_route="pairwise", seed=6, progress=False),
 "inrun_sgd_auto": lambda: InRunShapley(mlp(), epochs=2, batch_size=8, lr=5e-2, optimizer="sgd", target_batch_size=4, seed=6, progress=False),
 "inrun_adam_cnn": lambda: InRunShapley(cnn(), epochs=2, batch_size=8, lr=1e-2, seed=7, progress=False),
 "inrun_sgd_order2": lambda: InRunShapley(mlp(), epochs=1, batch_size=8, lr=5e-2, optimizer="sgd", order=2, seed=8, progress=False),
}

PINS = {
    "dvgs_fast_mlp": ("a5fe460f66483c1b", [-0.17250190484862088, 0.1837815087963977, -0.23352220977911348], 0.17540286326790183),
    "dvgs_reference_mlp": ("7ee9b7667bd0f0bc", [-0.1725019048486209, 0.18378150879639765, -0.23352220977911348], 0.175402863267902),
    "dvgs_fast_cnn": ("0d72b081d33a18d2", [0.05243089077717963, 0.04360064048715608, -0.18089071215204378], 0.3349664109613021),
    "tracin_fast_mlp": ("31e747a58f3ff543", [-0.0024883721450044112, 0.004413092512474752, -0.004748847840758202], -0.002450663027011016),
    "tracin_fast_cnn": ("ad2c5785faace843", [-0.00354108464696236, 0.017684690497151337, -0.020158062364101594], -0.05195344692377794),
    "inrun_sgd_pairwise": ("7185cfe33173b7b3", [-0.001125016401703042, 0.0015974841738507165, -0.0018992304390802678], 0.0063928900936974665),
    "inrun_sgd_auto": ("c736b784513d2163", [0.0005214360002156741, 0.003370401657537694, 6.178577768446865e-05], 0.027377695668455528),
    "inrun_adam_cnn": ("7fa06ef7e47519c9", [-0.0016510289652277143, 0.020519579613049115, 0.0002438091122742925], -0.019493545721445432),
    "inrun_sgd_order2": ("c22678eeb99f9ec4", [-0.0006028414606402747, 0.0008085180579859788, -0.0010045386870643222], 0.0033774550951365494),
}


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("case", sorted(CASES))
def test_values_pinned_before_engine_move(case, one_thread):
    v = np.asarray(CASES[case]().fit(*_data()).values, dtype=np.float64)
    sha, first, total = PINS[case]
    np.testing.assert_allclose(v[:3], first, rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(v.sum(), total, rtol=1e-10, atol=1e-15)
    here = (torch.__version__.split("+")[0], torch.backends.cpu.get_cpu_capability())
    if here == RECORDED_ON:
        assert hashlib.sha256(v.tobytes()).hexdigest()[:16] == sha, f"{case}: not bit-identical"


def _ckpt_data():
    g = torch.Generator().manual_seed(0)
    xs, xt = torch.randn(40, 6, generator=g), torch.randn(16, 6, generator=g)
    w = torch.randn(6, 3, generator=g)
    return xs, (xs @ w).argmax(1), xt, (xt @ w).argmax(1)


def _ckpt_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.2), nn.Mish(), nn.LayerNorm(8), nn.Linear(8, 3))


CKPT_RUNS = {
    "dvgs": lambda d: DVGS(_ckpt_net(), epochs=2, restarts=2, target_batch_size=8, source_batch_size=16, lr=1e-2,
                           seed=21, checkpoint_dir=d, progress=False, keep_snapshots=True),
    "tracin": lambda d: TracIn(_ckpt_net(), epochs=3, batch_size=8, lr=1e-2, n_checkpoints=3, seed=22,
                               checkpoint_dir=d, progress=False),
}


@pytest.mark.parametrize("method", sorted(CKPT_RUNS))
def test_checkpoint_written_before_engine_move_resumes(method, tmp_path, one_thread):
    folder = tmp_path / method
    shutil.copytree(DATA / method, folder)
    # The folder's state is read and its fingerprint compared first: a fingerprint that changed
    # with the move would be refused here (CheckpointError), not silently restarted.
    resumed = CKPT_RUNS[method](folder).fit(*_ckpt_data())
    whole = CKPT_RUNS[method](None).fit(*_ckpt_data())
    np.testing.assert_array_equal(resumed.values, whole.values)
    recorded = json.loads((DATA / "uninterrupted_values.json").read_text())[method]
    np.testing.assert_allclose(resumed.values, recorded, rtol=1e-5, atol=1e-7)
