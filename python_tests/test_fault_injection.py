"""Fault injection for DVGS: kill -9 at seeded moments then resume (bit for bit), truncated and
corrupted state files, two processes on one checkpoint folder, a changed model, bad inputs.

The killed runs are subprocesses running this file as a script (``python test_fault_injection.py
worker DIR MODE N``): the worker SIGKILLs itself at the N-th call of a chosen function (a
snapshot's chunk, the state write before/after its rename, an optimizer step) or is killed by
the parent after a seeded delay. Every resumed run must equal the uninterrupted run exactly.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dvgs_fast import DVGS
from dvgs_fast import runstate as dvgs_checkpoint
from dvgs_fast.runstate import CheckpointFiles, DirLock, read_state

HERE = Path(__file__).resolve()

# 150 source rows in chunks of 32 (5 per snapshot), 30 target rows in batches of 8 (4 steps per
# epoch), 3 epochs x 2 restarts: 24 snapshots, 120 chunks, 24 state writes, 24 optimizer steps.
CASE_KW = dict(epochs=3, restarts=2, target_batch_size=8, source_batch_size=32, seed=7, progress=False,
               keep_snapshots=True, lr=1e-2)
LIMITS = {"add": 120, "write-mid": 24, "write-after": 24, "step": 24}


def case_data():
    g = torch.Generator().manual_seed(0)
    xs, xt = torch.randn(150, 6, generator=g), torch.randn(30, 6, generator=g)
    w = torch.randn(6, 3, generator=g)
    ys, yt = (xs @ w).argmax(1), (xt @ w).argmax(1)
    ys[:30] = (ys[:30] + 1) % 3                    # some flipped labels
    return xs, ys, xt, yt


def case_model(act: type[nn.Module] = nn.Mish, p: float = 0.2, eps: float = 1e-5):
    def make():
        torch.manual_seed(1)     # same initial weights whatever the architecture's activation
        return nn.Sequential(nn.Linear(6, 16), nn.Dropout(p), act(), nn.LayerNorm(16, eps=eps), nn.Linear(16, 3))
    return make


def run_case(checkpoint_dir=None, model=None, **over):
    kw = {**CASE_KW, **over}
    return DVGS(model or case_model(), checkpoint_dir=checkpoint_dir, **kw).fit(*case_data())


@pytest.fixture(scope="module")
def uninterrupted():
    return run_case()


def _assert_same(res, full):
    np.testing.assert_array_equal(res.values, full.values)
    np.testing.assert_array_equal(np.asarray(res.snapshots), np.asarray(full.snapshots))
    np.testing.assert_array_equal(res.stderr, full.stderr)
    assert res.info["snapshots"] == full.info["snapshots"] and res.info["steps"] == full.info["steps"]


# ----------------------------------------------------------------------------- worker
def _worker_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    return env


def _spawn(directory: Path, mode: str, n: int = 0) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(HERE), "worker", str(directory), mode, str(n)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_worker_env())


def _wait_line(proc: subprocess.Popen, expected: str, timeout: float = 120.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        line = proc.stdout.readline()
        if line.strip() == expected:
            return
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"worker never printed {expected!r}: rc={proc.wait()} stderr={proc.stderr.read()[-3000:]}")


def _finish(proc: subprocess.Popen, timeout: float = 120.0) -> int:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode in (0, -signal.SIGKILL), f"worker failed (rc={proc.returncode}): {err[-3000:]}"
    return proc.returncode


def _worker(directory: str, mode: str, n: int) -> None:
    """Run the case with checkpoint_dir=directory, SIGKILLing this process at moment (mode, n)."""
    torch.set_num_threads(1)
    from dvgs_fast import _io
    from dvgs_fast.runstate import ValuesStore
    seen = {"n": 0}

    def die_at_nth() -> None:
        seen["n"] += 1
        if seen["n"] == n:
            os.kill(os.getpid(), signal.SIGKILL)

    def before(obj, name):
        real = getattr(obj, name)

        def wrapped(*a, **kw):
            die_at_nth()
            return real(*a, **kw)
        setattr(obj, name, wrapped)

    if mode == "add":                       # mid-snapshot: some chunks of snapshot k are summed
        before(ValuesStore, "add")
    elif mode == "step":
        before(torch.optim.Adam, "step")
    elif mode == "write-mid":               # temporary file written and synced, not yet renamed
        before(_io.os, "replace")
    elif mode in ("write-after", "hold"):
        real = dvgs_checkpoint.write_state

        def after(path, state):
            real(path, state)
            if mode == "hold":
                print("holding", flush=True)
                time.sleep(600)
            die_at_nth()
        dvgs_checkpoint.write_state = after
    print("ready", flush=True)
    run_case(directory)
    print("done", flush=True)


# ----------------------------------------------------------------------------- kill -9
def test_kill9_at_seeded_moments_then_resume_bit_for_bit(tmp_path, uninterrupted):
    """A chain of killed runs on one folder, each resuming the previous one's state and dying at
    a moment drawn with a fixed seed; the last resume (in this process) equals the
    uninterrupted run bit for bit."""
    rng = np.random.default_rng(20240613)
    kinds = ["add", "step", "write-after", "write-mid"]   # write-mid last: its temporary file is left
    rcs = []
    for kind in kinds:
        # within the first fifth of a run, so the chain never completes the run by itself
        n = int(rng.integers(1, LIMITS[kind] // (len(kinds) + 1)))
        rcs.append(_finish(_spawn(tmp_path, kind, n)))
    assert rcs == [-signal.SIGKILL] * len(kinds)
    state = read_state(CheckpointFiles(tmp_path))
    assert state is not None and 0 < state["k"] < uninterrupted.info["snapshots"]
    assert list(tmp_path.glob(".dvgs_checkpoint.pt.*.tmp"))       # left by the kill before a rename
    _assert_same(run_case(tmp_path), uninterrupted)
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))   # cleaned up


def test_kill9_after_seeded_delays_then_resume_bit_for_bit(tmp_path, uninterrupted):
    """kill -9 from outside after a seeded delay (wherever the run happens to be)."""
    delay = float(np.random.default_rng(7).uniform(0.05, 0.4))
    proc = _spawn(tmp_path, "time")
    _wait_line(proc, "ready")
    time.sleep(delay)
    proc.kill()
    _finish(proc)
    _assert_same(run_case(tmp_path), uninterrupted)


# ----------------------------------------------------------------------------- the lock
def test_second_process_is_refused_and_a_dead_holder_is_taken_over(tmp_path, uninterrupted):
    proc = _spawn(tmp_path, "hold")
    try:
        _wait_line(proc, "holding")             # the worker holds the folder (one state saved)
        with pytest.raises(ValueError, match=rf"checkpoint_dir: {tmp_path} is in use by another DVGS run "
                                             rf"\(pid {proc.pid} "):
            run_case(tmp_path)
    finally:
        proc.kill()                              # kill -9: the lock file stays, naming a dead pid
        proc.wait()
    assert f"pid {proc.pid}" in (tmp_path / "dvgs.lock").read_text()
    _assert_same(run_case(tmp_path), uninterrupted)      # taken over, resumed from the saved state
    assert (tmp_path / "dvgs.lock").read_text() == ""    # released: names no holder


def test_lock_within_one_process(tmp_path):
    files = CheckpointFiles(tmp_path)
    with DirLock(files):
        with pytest.raises(ValueError, match=f"pid {os.getpid()}"):
            DirLock(files).acquire()
        with pytest.raises(ValueError, match="in use by another DVGS run"):
            run_case(tmp_path)
    with DirLock(files):                         # released: free again
        pass


# ----------------------------------------------------------------------------- state files
class _Stop(Exception):
    pass


@pytest.fixture(scope="module")
def interrupted_dir(tmp_path_factory):
    """A folder holding the state of a run stopped after its 11th state write (k odd: the valid
    sums are in slot 1, the half-written slot 0 belongs to the next snapshot)."""
    d = tmp_path_factory.mktemp("interrupted")
    real = dvgs_checkpoint.write_state
    calls = {"n": 0}

    def dying(path, state):
        real(path, state)
        calls["n"] += 1
        if calls["n"] == 11:
            raise _Stop

    mp = pytest.MonkeyPatch()
    mp.setattr(dvgs_checkpoint, "write_state", dying)
    try:
        with pytest.raises(_Stop):
            run_case(d)
    finally:
        mp.undo()
    return d


def _valid_sums_range(d: Path) -> tuple[int, int]:
    """Byte range of the sums slot the saved state relies on."""
    k = read_state(CheckpointFiles(d))["k"]
    n = len(case_data()[0])
    with open(d / "dvgs_sums.npy", "rb") as fh:
        np.lib.format.read_magic(fh)
        np.lib.format.read_array_header_1_0(fh)
        offset = fh.tell()
    start = offset + (k % 2) * 2 * n * 8
    return start, start + 2 * n * 8


@pytest.mark.parametrize("name", ["dvgs_checkpoint.pt", "dvgs_sums.npy", "dvgs_snapshots.npy"])
@pytest.mark.parametrize("how", ["empty", "truncated", "flipped", "zeroed"])
def test_damaged_state_file_is_one_clear_error(tmp_path, interrupted_dir, uninterrupted, name, how):
    d = tmp_path / "ck"
    shutil.copytree(interrupted_dir, d)
    path = d / name
    data = bytearray(path.read_bytes())
    if name == "dvgs_sums.npy":
        lo, hi = _valid_sums_range(d)
    elif name == "dvgs_snapshots.npy":
        lo, hi = len(data) - 150 * 4 * 24, len(data) - 150 * 4 * 23    # column 0: a completed snapshot
    else:
        lo, hi = 0, len(data)
    if how == "empty":
        data = bytearray()
    elif how == "truncated":                     # what a crash mid-write of a plain file leaves
        data = data[:len(data) - 8]
    elif how == "flipped":
        data[(lo + hi) // 2] ^= 0x10
    else:                                        # zeroed: overwritten bytes inside the used region
        data[lo:lo + 16] = bytes(16)
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError) as info:
        run_case(d)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"checkpoint_dir: {d}") and "delete that folder" in msg
    assert name in msg
    shutil.rmtree(d)                              # the way out the message gives works
    _assert_same(run_case(d), uninterrupted)


def test_intact_copy_resumes(tmp_path, interrupted_dir, uninterrupted):
    """The damaged-file tests start from a state that does resume when left alone."""
    shutil.copytree(interrupted_dir, tmp_path / "ck")
    _assert_same(run_case(tmp_path / "ck"), uninterrupted)


def test_checkpoint_of_an_older_format_is_refused(tmp_path):
    run_case(tmp_path, epochs=1, restarts=1)
    torch.save({"k": 1, "seed": 7}, tmp_path / "dvgs_checkpoint.pt")     # version 1: no header
    with pytest.raises(ValueError, match=r"dvgs_checkpoint.pt is not a DVGS checkpoint of this version"):
        run_case(tmp_path, epochs=1, restarts=1)


# ----------------------------------------------------------------------------- another run
@pytest.mark.parametrize("first,second,match", [
    ({"model": case_model(nn.ReLU)}, {"model": case_model(nn.Tanh)}, "the model structure differs"),
    ({}, {"model": case_model(p=0.3)}, "the model structure differs"),
    ({}, {"model": case_model(eps=1e-3)}, "the model structure differs"),
    ({}, {"lr": 0.5}, r"settings differ \(lr: 0.01 -> 0.5\)"),
    ({}, {"source_batch_size": 16}, r"settings differ \(source_batch_size: 32 -> 16\)"),
    ({"loss": lambda o, y: nn.functional.cross_entropy(o, y, reduction="none")},
     {"loss": lambda o, y: nn.functional.cross_entropy(o, y, reduction="none", label_smoothing=0.1)},
     "the loss differs"),
], ids=["ReLU->Tanh", "dropout p", "LayerNorm eps", "lr", "source_batch_size", "custom loss"])
def test_resuming_another_run_is_refused(tmp_path, first, second, match):
    run_case(tmp_path, epochs=1, restarts=1, **first)
    with pytest.raises(ValueError, match=rf"^checkpoint_dir: {tmp_path}: holds a checkpoint of another run: {match}"):
        run_case(tmp_path, epochs=1, restarts=1, **second)
    run_case(tmp_path, epochs=1, restarts=1, **first)        # the same run still resumes


_USER_MODEL = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.a, self.b = nn.Linear(6, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.b(torch.{act}(self.a(x)))
"""


def test_edited_user_model_class_is_refused(tmp_path, monkeypatch):
    """The user edits their model file between the killed run and the rerun: same class name,
    same parameters, another function (relu -> tanh inside forward)."""
    import importlib
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    src = tmp_path / "dvgs_fi_user_model.py"
    src.write_text(_USER_MODEL.format(act="relu"))
    mod = importlib.import_module("dvgs_fi_user_model")
    try:
        run_case(tmp_path / "ck", model=mod.Net, epochs=1, restarts=1)
        src.write_text(_USER_MODEL.format(act="tanh"))
        mod = importlib.reload(mod)
        with pytest.raises(ValueError, match=r"holds a checkpoint of another run: the model structure differs;"):
            run_case(tmp_path / "ck", model=mod.Net, epochs=1, restarts=1)
    finally:
        sys.modules.pop("dvgs_fi_user_model", None)


def test_changed_data_is_refused(tmp_path):
    xs, ys, xt, yt = case_data()
    DVGS(case_model(), checkpoint_dir=tmp_path, **{**CASE_KW, "epochs": 1}).fit(xs, ys, xt, yt)
    xs2 = xs.clone()
    xs2[77, 3] += 1e-3                           # one value of one row
    with pytest.raises(ValueError, match="the data differs"):
        DVGS(case_model(), checkpoint_dir=tmp_path, **{**CASE_KW, "epochs": 1}).fit(xs2, ys, xt, yt)


# ----------------------------------------------------------------------------- bad inputs
def test_divergence_names_the_step_and_suggests_a_lower_lr():
    xs, ys, xt, yt = case_data()
    # The loss itself, or (first) every source gradient, stops being finite: both name the step.
    with pytest.raises(ValueError, match=r"^lr: training diverged in DVGS: .* at restart 0, epoch \d+, step \d+ "
                                         r"\(global step \d+\).*lower lr \(now 1e\+08\)"):
        DVGS(case_model(p=0.0), optimizer="sgd", lr=1e8, epochs=5, target_batch_size=8, progress=False,
             seed=0).fit(xs * 1e3, ys, xt * 1e3, yt)
    # Snapshots only at step 0: the non-finite target loss itself is what stops the run.
    with pytest.raises(ValueError, match=r"^lr: training diverged in DVGS: the target loss is (nan|inf) at restart 0, "
                                         r"epoch \d+, step \d+ \(global step \d+\); lower lr \(now 1e\+08\)"):
        DVGS(case_model(p=0.0), optimizer="sgd", lr=1e8, epochs=5, target_batch_size=8, compute_every=10**6,
             progress=False, seed=0).fit(xs * 1e3, ys, xt * 1e3, yt)


def test_deferred_divergence_check_names_the_first_bad_step():
    """The CUDA path records the first non-finite step on the device and reads it at the next
    synchronisation point (run here on CPU tensors: the logic is device-independent)."""
    from dvgs_fast.methods.dvgs.loop import _DivergenceWatch, _Position
    watch = _DivergenceWatch(torch.device("cpu"), _Position(epochs=3, steps_per_epoch=4), lr=0.1, lazy=True)
    for step, v in enumerate([1.0, 2.0, 3.0, 4.0, 5.0, float("nan"), 7.0, float("inf")]):
        watch.observe(torch.tensor(v), step)
        if step == 4:
            watch.check()                          # nothing bad yet
    with pytest.raises(ValueError, match=r"^lr: training diverged in DVGS: the target loss is nan at restart 0, "
                                         r"epoch 1, step 1 \(global step 5\); lower lr \(now 0.1\)"):
        watch.check()


def test_non_finite_model_output_before_training():
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 3)

        def forward(self, x):
            return self.lin(x) * float("inf")

    xs, ys, xt, yt = case_data()
    with pytest.raises(ValueError, match=r"^model: DVGS: the target loss is nan before any update"):
        DVGS(Broken(), epochs=1, progress=False, seed=0).fit(xs, ys, xt, yt)


def test_overflowing_source_row_is_named():
    xs, ys, xt, yt = case_data()
    xs = xs.clone()
    xs[40] = 3e38                                # finite, but its forward overflows in float32
    with pytest.raises(ValueError, match=r"^x_source: the similarity of source row 40 is not finite at snapshot 0, "
                                         r"at restart 0, epoch 0, step 0 \(global step 0\) \(1 of rows 32:64\)"):
        DVGS(case_model(p=0.0), epochs=1, progress=False, seed=0, source_batch_size=32).fit(xs, ys, xt, yt)


def _stream(xs, ys, rows_on_later_passes: int):
    calls = {"n": 0}

    def make():
        calls["n"] += 1
        n = len(xs) if calls["n"] == 1 else rows_on_later_passes      # pass 1 counts the rows
        x, y = torch.cat([xs, xs]), torch.cat([ys, ys])
        for a in range(0, n, 20):
            yield x[a:min(a + 20, n)], y[a:min(a + 20, n)]
    return make


@pytest.mark.parametrize("rows,word", [(131, "fewer"), (150 + 7, "more")])
def test_stream_changing_length_is_named(rows, word):
    xs, ys, xt, yt = case_data()
    with pytest.raises(ValueError, match=rf"x_source: the stream yielded {word} rows on the pass of snapshot 0, "
                                         rf"at restart 0, epoch 0, step 0 \(global step 0\): {rows} rows, but 150 "
                                         rf"when it was counted"):
        DVGS(case_model(), epochs=1, progress=False, seed=0, source_batch_size=32).fit(
            _stream(xs, ys, rows), None, xt, yt)


def test_batchnorm_with_a_one_sample_target_batch():
    xs, ys, xt, yt = case_data()
    bn = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(ValueError, match=r"^target_batch_size: 29 target samples in mini-batches of 7 leave one "
                                         r"of 1 sample, which BatchNorm \(1\)"):
        DVGS(bn, epochs=1, target_batch_size=7, progress=False).fit(xs, ys, xt[:29], yt[:29])
    with pytest.raises(ValueError, match=r"^x_target: has 1 sample, which BatchNorm \(1\)"):
        DVGS(bn, epochs=1, progress=False).fit(xs, ys, xt[:1], yt[:1])


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "worker":
    _worker(sys.argv[2], sys.argv[3], int(sys.argv[4]))
