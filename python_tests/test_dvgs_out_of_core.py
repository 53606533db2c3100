"""DVGS out of core: chunked sources give the in-memory values exactly; memory-mapped sums;
checkpoint/resume at snapshot granularity (killed mid-snapshot, mid-epoch)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from dvgs_fast import DVGS
from dvgs_fast import grads as dvgs_fast_mod
from dvgs_fast.runstate import CheckpointFiles, read_state
from dvgs_fast.sources import (DatasetSource, GctxSource, IteratorSource, TensorSource, as_source)

LINCS = "lincs/modzs_n272x978.gctx"


def _ae(d=978, h=32, c=8, dropout=0.0):
    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(d, h), nn.Dropout(dropout), nn.Mish(), nn.Linear(h, c), nn.Mish(),
                             nn.Linear(c, h), nn.Mish(), nn.Linear(h, d))
    return make


def _mlp(d=6, k=3):
    def make():
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(d, 16), nn.Dropout(0.2), nn.Mish(), nn.LayerNorm(16), nn.Linear(16, k))
    return make


def _cls_data(n=50, nt=24, d=6, seed=0):
    rng = np.random.default_rng(seed)
    xs = rng.standard_normal((n, d)).astype(np.float32)
    ys = rng.integers(0, 3, n)
    xt = rng.standard_normal((nt, d)).astype(np.float32)
    yt = rng.integers(0, 3, nt)
    return xs, ys, xt, yt


class _Rows(torch.utils.data.Dataset):
    def __init__(self, x, y=None):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i] if self.y is None else (self.x[i], self.y[i])


def _factory(x, y=None, sizes=(7, 13, 1, 20)):
    calls = {"n": 0}

    def make():
        calls["n"] += 1
        a, j = 0, 0
        while a < len(x):
            b = min(a + sizes[j % len(sizes)], len(x))
            yield (x[a:b], None if y is None else y[a:b])
            a, j = b, j + 1
    return make, calls


# ----------------------------------------------------------------------------- equality
@pytest.fixture(scope="module")
def lincs_reader(data_root):
    from dvgs_fast.datasets import load_lincs
    path = data_root / LINCS
    if not path.exists():
        pytest.skip(f"{LINCS} not found under {data_root}")
    # chunk_size 50 does not divide the source batch (40): chunks are re-cut at the same rows
    return load_lincs(path, landmark_only=True, zscore=True, chunked=True, chunk_size=50, fill_missing=0.0)


def test_gctx_chunked_equals_in_memory(lincs_reader):
    X = lincs_reader.to_array()
    kw = dict(loss="mse", epochs=2, target_batch_size=32, source_batch_size=40, seed=3, progress=False,
              keep_snapshots=True)
    xt = X[:64]
    mem = DVGS(_ae(dropout=0.1), **kw).fit(X, None, xt, None)
    ooc = DVGS(_ae(dropout=0.1), **kw).fit(lincs_reader, None, xt, None)
    assert ooc.info["snapshots"] == mem.info["snapshots"] == 4
    np.testing.assert_array_equal(ooc.values, mem.values)
    np.testing.assert_array_equal(np.asarray(ooc.snapshots), np.asarray(mem.snapshots))
    assert ooc.info["n_source"] == 272


def test_dataset_and_iterator_sources_equal_in_memory():
    xs, ys, xt, yt = _cls_data()
    kw = dict(epochs=2, target_batch_size=8, source_batch_size=16, seed=5, progress=False)
    mem = DVGS(_mlp(), **kw).fit(xs, ys, xt, yt)
    ds = DVGS(_mlp(), **kw).fit(_Rows(torch.from_numpy(xs), torch.from_numpy(ys)), None, xt, yt)
    np.testing.assert_array_equal(ds.values, mem.values)
    make, calls = _factory(xs, ys)
    it = DVGS(_mlp(), **kw).fit(make, None, xt, yt)
    np.testing.assert_array_equal(it.values, mem.values)
    # called anew per pass: the length count, the probe, and once per snapshot (at least)
    assert calls["n"] >= mem.info["snapshots"] + 1
    # labels kept in memory next to an x-only Dataset
    ds2 = DVGS(_mlp(), **kw).fit(_Rows(xs), ys, xt, yt)
    np.testing.assert_array_equal(ds2.values, mem.values)


def test_slices_and_chunks():
    x = np.arange(50 * 3, dtype=np.float32).reshape(50, 3)
    make, _ = _factory(x)
    for src in (TensorSource(torch.from_numpy(x)), IteratorSource(make), DatasetSource(_Rows(x), block=9)):
        if isinstance(src, IteratorSource):
            src.count()
        got = [(a, b) for a, b, _, _ in src.iter_chunks(5, 41, 8)]
        assert got == [(5, 13), (13, 21), (21, 29), (29, 37), (37, 41)]
        sl = src.slice(10, 30)
        assert len(sl) == 20
        rows = torch.cat([xb for _, _, xb, _ in sl.iter_chunks(size=6)])
        np.testing.assert_array_equal(rows.numpy(), x[10:30])
        assert [(a, b) for a, b, _, _ in sl.iter_chunks(4, 20, 7)] == [(4, 11), (11, 18), (18, 20)]


def test_gctx_source_slice(lincs_reader):
    src = GctxSource(lincs_reader)
    part = torch.cat([x for _, _, x, _ in src.slice(100, 200).iter_chunks(size=33)]).numpy()
    np.testing.assert_array_equal(part, lincs_reader.read(100, 200))


# ----------------------------------------------------------------------------- validation
def test_nan_chunk_is_named():
    xs, ys, xt, yt = _cls_data()
    bad = xs.copy()
    bad[37, 2] = np.nan
    make, _ = _factory(bad, ys)
    with pytest.raises(ValueError, match=r"rows 21:41 .*row 37"):
        as_source(make)
    # a Dataset is checked as it streams (first batch at setup, the rest in the snapshot pass)
    with pytest.raises(ValueError, match=r"x_source: rows 32:48 .*row 37"):
        DVGS(_mlp(), epochs=1, source_batch_size=16, progress=False, seed=0).fit(
            _Rows(bad, ys), None, xt, yt)


def test_bad_chunked_inputs():
    xs, ys, xt, yt = _cls_data()
    with pytest.raises(ValueError, match="iterator"):
        DVGS(_mlp(), progress=False).fit(lambda: 3, None, xt, yt)
    make, _ = _factory(xs[:, :4], ys)
    with pytest.raises(ValueError, match="x_target"):
        DVGS(_mlp(), progress=False).fit(make, None, xt, yt)
    with pytest.raises(ValueError, match="y_source"):
        DVGS(_mlp(), progress=False).fit(_Rows(xs), None, xt, yt)
    with pytest.raises(ValueError, match="y_source"):
        DVGS(_mlp(), progress=False).fit(_Rows(xs), ys[:10], xt, yt)


# ----------------------------------------------------------------------------- resume
class _Killed(Exception):
    pass


def _kill_after(monkeypatch, n_calls):
    real = dvgs_fast_mod.FastScorer.score
    seen = {"n": 0}

    def dying(self, x, y, target):
        seen["n"] += 1
        if seen["n"] > n_calls:
            raise _Killed
        return real(self, x, y, target)

    monkeypatch.setattr(dvgs_fast_mod.FastScorer, "score", dying)
    return real


@pytest.mark.parametrize("kind,kill_at", [("memory", 11), ("memory", 22), ("iterator", 4), ("iterator", 11)])
def test_resume_mid_epoch_equals_uninterrupted(tmp_path, monkeypatch, kind, kill_at):
    """50 source rows / batch 16 = 4 score calls per snapshot; 24 target rows / batch 8 = 3 steps
    per epoch. kill_at 4 = just after snapshot 0; 11 = inside snapshot 2 (mid-epoch, sums
    half-written); 22 = inside snapshot 5 (restart 1). Dropout on: RNG states must be restored."""
    xs, ys, xt, yt = _cls_data()
    kw = dict(epochs=2, restarts=2, target_batch_size=8, source_batch_size=16, seed=11, progress=False,
              keep_snapshots=True)

    def src():
        return xs if kind == "memory" else _factory(xs, ys)[0]

    def y():
        return ys if kind == "memory" else None

    full = DVGS(_mlp(), **kw).fit(src(), y(), xt, yt)
    assert full.info["snapshots"] == 12
    real = _kill_after(monkeypatch, kill_at)
    with pytest.raises(_Killed):
        DVGS(_mlp(), checkpoint_dir=tmp_path, **kw).fit(src(), y(), xt, yt)
    monkeypatch.setattr(dvgs_fast_mod.FastScorer, "score", real)
    ck = read_state(CheckpointFiles(tmp_path))
    assert ck["k"] == kill_at // 4                     # resumes from the last completed snapshot
    assert (tmp_path / "dvgs_sums.npy").exists()
    res = DVGS(_mlp(), checkpoint_dir=tmp_path, **kw).fit(src(), y(), xt, yt)
    np.testing.assert_array_equal(res.values, full.values)
    np.testing.assert_array_equal(np.asarray(res.snapshots), np.asarray(full.snapshots))
    assert res.info["snapshots"] == full.info["snapshots"] and res.info["steps"] == full.info["steps"]


def test_resume_gctx_source(tmp_path, monkeypatch, lincs_reader):
    X = lincs_reader.to_array()
    xt = X[200:240]
    kw = dict(loss="mse", epochs=2, target_batch_size=16, source_batch_size=100, seed=2, progress=False)
    full = DVGS(_ae(h=16, c=4), **kw).fit(lincs_reader, None, xt, None)
    real = _kill_after(monkeypatch, 7)                  # 3 calls per snapshot: inside snapshot 2
    with pytest.raises(_Killed):
        DVGS(_ae(h=16, c=4), checkpoint_dir=tmp_path, **kw).fit(lincs_reader, None, xt, None)
    monkeypatch.setattr(dvgs_fast_mod.FastScorer, "score", real)
    res = DVGS(_ae(h=16, c=4), checkpoint_dir=tmp_path, **kw).fit(lincs_reader, None, xt, None)
    np.testing.assert_array_equal(res.values, full.values)
    sums = np.load(tmp_path / "dvgs_sums.npy", mmap_mode="r")
    np.testing.assert_allclose(sums[res.info["snapshots"] % 2, 0] / res.info["snapshots"], res.values, rtol=0, atol=0)


def test_slice_of_a_source_values_that_range():
    """A sub-range source (what one rank of a sharded run scores) gives the values of those rows."""
    xs, ys, xt, yt = _cls_data()
    kw = dict(epochs=1, target_batch_size=8, source_batch_size=16, seed=4, progress=False)
    mem = DVGS(_mlp(), **kw).fit(xs[16:48], ys[16:48], xt, yt)
    make, _ = _factory(xs, ys)
    part = DVGS(_mlp(), **kw).fit(as_source(make).slice(16, 48), None, xt, yt)
    np.testing.assert_array_equal(part.values, mem.values)


def test_source_identity_is_hashed_in_blocks():
    """The fingerprint hashes an in-memory source block by block (no whole copy): the digest is
    that of the plain bytes, whatever the block size or memory layout, and it sees one changed
    value."""
    import hashlib
    from dvgs_fast.runstate import update_with_tensor
    x = torch.randn(301, 7, generator=torch.Generator().manual_seed(0))

    def digest(t, block):
        h = hashlib.blake2b(digest_size=16)
        update_with_tensor(h, t, block_bytes=block)
        return h.hexdigest()
    plain = hashlib.blake2b(repr(((301, 7), "torch.float32")).encode() + x.numpy().tobytes(), digest_size=16)
    assert digest(x, 1 << 24) == digest(x, 64) == digest(x.t().contiguous().t(), 100) == plain.hexdigest()
    y = x.clone()
    y[300, 6] = torch.nextafter(y[300, 6], torch.tensor(1e9))
    assert digest(y, 64) != digest(x, 64)
    assert TensorSource(x).identity() != TensorSource(y).identity()
