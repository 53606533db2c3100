"""gradstore: the out-of-core [N, k] vector store and the blockwise products over it.

Writing: round trips in every dtype and block layout; a run killed (SIGKILL, an exception, a
stop rule) resumes to a file byte-identical to an uninterrupted run's; another run's folder, a
corrupted block, bad vectors are refused.
Scoring: gram, matmul_rows and score_into (with top-k) equal dense float64 products. (Two gloo
ranks writing one store: test_trak.py, in the same spawn as TRAK's torchrun case.)"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dvgs_fast import runstate
from dvgs_fast.attribution import ScoreSink
from dvgs_fast.gradstore import (GradientStore, StoreError, create_store, gram, matmul_rows, score_into,
                                 write_store)
from dvgs_fast.sources import TensorSource

HERE = Path(__file__).resolve().parent


def _case_data(n=203, d=6, k=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(d, k, generator=g)


def _compute(W, delay=0.0):
    def compute(x, _y):
        if delay:
            time.sleep(delay)
        return torch.tanh(x @ W), {"q": x[:, 0].abs()}
    return compute


def _write(directory, n=203, block=16, dtype="float32", delay=0.0, stop=None, fingerprint=None, **kw):
    x, W = _case_data(n)
    return write_store(directory, TensorSource(x), _compute(W, delay), dim=W.shape[1], dtype=dtype,
                       fingerprint=fingerprint or {"case": "tanh", "n": n}, aux={"q": "float32"}, block_rows=block,
                       checkpoint_every=0.0, stop=stop, **kw)


def _bytes(directory) -> tuple[bytes, bytes]:
    d = Path(directory)
    return (d / "features.npy").read_bytes(), (d / "aux_q.npy").read_bytes()


def kill_case(directory: str) -> None:
    """Run in a subprocess and killed with SIGKILL while writing (slow blocks)."""
    _write(directory, delay=0.15)


# ------------------------------------------------------------------------------ writing
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("n,block", [(203, 16), (1, 16), (32, 32)])
def test_round_trip(tmp_path, dtype, n, block):
    res = _write(tmp_path / "s", n=n, block=block, dtype=dtype)
    st = res.store
    assert res.status == "completed" and st.complete and (st.n, st.dim) == (n, 10) and st.dtype == np.dtype(dtype)
    x, W = _case_data(n)
    ref = torch.tanh(x @ W).numpy()
    tol = 1e-3 if dtype == "float16" else 1e-6
    np.testing.assert_allclose(st.array(), ref, atol=tol)
    np.testing.assert_allclose(np.load(st.path), ref, atol=tol)               # a plain .npy file
    np.testing.assert_allclose(st.aux("q"), x[:, 0].abs().numpy(), rtol=1e-6)
    rows = [(a, b) for a, b, _ in st.blocks(rows=7)]
    assert rows[0] == (0, min(7, n)) and rows[-1][1] == n
    got = torch.cat([blk for _, _, blk in st.blocks(rows=7)])
    np.testing.assert_allclose(got.numpy(), st.array().astype(np.float32), rtol=0, atol=0)
    assert st.nbytes == n * 10 * np.dtype(dtype).itemsize
    reopened = GradientStore.open(tmp_path / "s")
    assert reopened.fingerprint == {"case": "tanh", "n": n}
    again = _write(tmp_path / "s", n=n, block=block, dtype=dtype)              # complete: reused as is
    assert again.rows_written == 0


def test_resume_after_sigkill_gives_identical_bytes(tmp_path):
    ref = _write(tmp_path / "ref")
    target = tmp_path / "killed"
    code = (f"import sys; sys.path.insert(0, {str(HERE)!r}); from test_gradstore import kill_case; "
            f"kill_case({str(target)!r})")
    proc = subprocess.Popen([sys.executable, "-c", code], env=os.environ.copy())
    files = runstate.CheckpointFiles(target, None, method="GradStore")
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"the writer exited (rc {proc.returncode}) before it could be killed")
            if files.state.exists():
                try:
                    st = runstate.read_state(files)
                except runstate.CheckpointError:
                    st = None
                if st is not None and st["rows_done"] >= 48:
                    break
            time.sleep(0.05)
        else:
            pytest.fail("no checkpoint within 120 s")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    done = runstate.read_state(files)["rows_done"]
    assert 48 <= done < 203 and not GradientStore.open(target, require_complete=False).complete
    res = _write(target)
    assert res.status == "completed" and res.rows_written == 203 - done
    assert _bytes(target) == _bytes(tmp_path / "ref") and ref.store is not None


def test_resume_after_an_exception_and_after_stop(tmp_path, monkeypatch):
    ref = _bytes(_write(tmp_path / "ref").store.directory)
    calls = {"n": 0}
    x, W = _case_data()
    base = _compute(W)

    def failing(xb, yb):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return base(xb, yb)

    with pytest.raises(KeyboardInterrupt):
        write_store(tmp_path / "a", TensorSource(x), failing, dim=10, fingerprint={"case": "tanh", "n": 203},
                    aux={"q": "float32"}, block_rows=16, checkpoint_every=0.0)
    assert _write(tmp_path / "a").status == "completed" and _bytes(tmp_path / "a") == ref
    # a stop rule: "stopped", resumable
    seen = {"n": 0}

    def stop():
        seen["n"] += 1
        return seen["n"] >= 3

    res = _write(tmp_path / "b", stop=stop)
    assert res.status == "stopped" and res.store is None and res.rows_written == 48
    with pytest.raises(StoreError, match="not complete"):
        GradientStore.open(tmp_path / "b")
    assert _write(tmp_path / "b").rows_written == 203 - 48 and _bytes(tmp_path / "b") == ref


def test_refuses_another_run_a_corrupted_block_and_bad_vectors(tmp_path):
    _write(tmp_path / "s", stop=lambda: True)                                    # one block written
    with pytest.raises(StoreError, match="fingerprint"):
        _write(tmp_path / "s", fingerprint={"case": "other"})
    with pytest.raises(StoreError, match="dtype"):
        _write(tmp_path / "s", dtype="float16")
    path = tmp_path / "s" / "features.npy"
    raw = bytearray(path.read_bytes())
    raw[-(203 * 40) + 3] ^= 0xFF                                                 # a byte of row 0
    path.write_bytes(bytes(raw))
    with pytest.raises(runstate.CheckpointError, match="checksum"):
        _write(tmp_path / "s")
    x, W = _case_data()
    with pytest.raises(ValueError, match="row 5 is not finite"):
        write_store(tmp_path / "nan", TensorSource(x), lambda xb, yb: torch.where(
            torch.arange(xb.shape[0]).unsqueeze(1) == 5, float("nan"), xb @ W), dim=10, block_rows=16)
    with pytest.raises(ValueError, match="float16"):
        write_store(tmp_path / "big", TensorSource(x), lambda xb, yb: 1e6 * (xb @ W), dim=10, dtype="float16")
    with pytest.raises(ValueError, match="aux"):
        write_store(tmp_path / "aux", TensorSource(x), lambda xb, yb: xb @ W, dim=10, aux={"q": "float32"})
    with pytest.raises(ValueError, match="dtype"):
        create_store(tmp_path / "dt", 3, 2, dtype="int8")


def test_checked_rows_finds_the_non_finite_row_and_passes_finite_rows_whose_sum_overflows():
    """checked_rows tests the rows' sum first (NaN / Inf propagate into it) and looks row by row
    only when the sum is not finite: finite rows whose float32 sum overflows must pass, and
    each kind of non-finite entry must still name its row."""
    from dvgs_fast.gradstore import checked_rows
    big = np.full((4, 3), 3e38, dtype=np.float32)                  # finite; their sum is +inf
    np.testing.assert_array_equal(checked_rows(big, 10, 14, 3, np.dtype(np.float32)), big)
    for bad in (np.nan, np.inf, -np.inf):
        arr = np.ones((6, 3), dtype=np.float32)
        arr[4, 1] = bad
        with pytest.raises(ValueError, match="row 14 is not finite"):
            checked_rows(torch.from_numpy(arr), 10, 16, 3, np.dtype(np.float32))
    mixed = np.ones((3, 2), dtype=np.float32)
    mixed[0, 0], mixed[2, 1] = np.inf, -np.inf                      # their sum is NaN
    with pytest.raises(ValueError, match="row 0 is not finite"):
        checked_rows(mixed, 0, 3, 2, np.dtype(np.float32))
    assert checked_rows(np.zeros((0, 2)), 5, 5, 2, np.dtype(np.float32)).shape == (0, 2)


# ------------------------------------------------------------------------------ scoring
def _store(directory, F: torch.Tensor, dtype="float64"):
    return write_store(directory, TensorSource(F), lambda xb, yb: xb, dim=F.shape[1], dtype=dtype,
                       block_rows=13).store


@pytest.mark.parametrize("n,m", [(57, 9), (1, 1)])
def test_blockwise_products_equal_dense(tmp_path, n, m):
    g = torch.Generator().manual_seed(n)
    F1, F2 = torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randn(n, 3, generator=g, dtype=torch.float64)
    s1, s2 = _store(tmp_path / "a", F1), _store(tmp_path / "b", F2)
    torch.testing.assert_close(gram(s1, rows=4), F1.t() @ F1)
    V = torch.randn(8, 2, generator=g, dtype=torch.float64)
    F = torch.cat([F1, F2], 1)
    torch.testing.assert_close(matmul_rows([s1, s2], V, rows=5), F @ V)
    torch.testing.assert_close(matmul_rows([s1, s2], V, start=min(3, n - 1), stop=n), (F @ V)[min(3, n - 1):])
    Q = torch.randn(m, 8, generator=g, dtype=torch.float64)
    scale = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
    ref = 0.5 * (Q @ F.t()) * scale
    k = min(4, n)
    for qr, sr in [(None, None), (2, 3), (m, n)]:
        sink = ScoreSink(m, n, top_k=k, dtype=np.float64)
        assert score_into(sink, Q, [s1, s2], source_scale=scale.numpy(), weight=0.5, query_rows=qr, source_rows=sr)
        res = sink.finish("test")
        np.testing.assert_allclose(res.scores, ref.numpy(), rtol=1e-12, atol=1e-12)
        np.testing.assert_array_equal(res.top_indices, ref.topk(k, 1).indices.numpy())
        np.testing.assert_array_equal(res.bottom_indices, ref.topk(k, 1, largest=False).indices.numpy())
    # queries from a store (float32 on disk: float32 products)
    qs = _store(tmp_path / "q", Q.float(), dtype="float32")
    sink = ScoreSink(m, n, keep=False, top_k=k)
    score_into(sink, [qs], [s1, s2], query_rows=2, source_rows=4)
    np.testing.assert_array_equal(sink.finish("t").top_indices, (Q.float().double() @ F.t()).topk(k, 1).indices.numpy())


def test_scoring_input_errors_and_stop(tmp_path):
    g = torch.Generator().manual_seed(0)
    s1 = _store(tmp_path / "a", torch.randn(20, 4, generator=g, dtype=torch.float64))
    s2 = _store(tmp_path / "b", torch.randn(21, 4, generator=g, dtype=torch.float64))
    with pytest.raises(ValueError, match="rows"):
        matmul_rows([s1, s2], torch.zeros(8, 1))
    with pytest.raises(ValueError, match="queries"):
        score_into(ScoreSink(2, 20), torch.zeros(2, 5), s1)
    with pytest.raises(ValueError, match="source_scale"):
        score_into(ScoreSink(2, 20), torch.zeros(2, 4), s1, source_scale=np.ones(3))
    calls = []
    assert not score_into(ScoreSink(2, 20, keep=False, callback=lambda *a: calls.append(a[:4])), torch.zeros(2, 4), s1,
                          source_rows=5, stop=lambda: len(calls) >= 2)
    assert calls == [(0, 2, 0, 5), (0, 2, 5, 10)]
    with pytest.raises(StoreError, match="no gradient store"):
        GradientStore.open(tmp_path / "none")
