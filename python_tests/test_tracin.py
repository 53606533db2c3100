"""TracIn-CP: against a brute-force float64 replay (per-sample gradients one by one at every
checkpoint), fast vs reference, chunked sources, checkpoint/resume, 2 gloo ranks, budgets, errors."""
from __future__ import annotations

import copy
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dvgs_fast import TracIn
from dvgs_fast._utils import seed_everything
from dvgs_fast.methods.base import BudgetWarning
from dvgs_fast import runstate as ckpt_mod


def _data(n=14, m=9, d=4, classes=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    xs, xt = torch.randn(n, d, generator=g, dtype=dtype), torch.randn(m, d, generator=g, dtype=dtype)
    w = torch.randn(d, classes, generator=g, dtype=dtype)
    ys, yt = (xs @ w).argmax(1), (xt @ w).argmax(1)
    ys[: n // 4] = (ys[: n // 4] + 1) % classes
    return xs, ys, xt, yt


def _mlp(d=4, h=6, out=3, seed=0, dropout=0.0, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, h), nn.Dropout(dropout), nn.Tanh(), nn.Linear(h, out)).to(dtype)


def _ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


def _brute_force(model, xs, ys, xt, yt, *, epochs, batch_size, lr, n_checkpoints, optimizer="sgd", seed=0,
                 shuffle="full", block=None):
    """Replay the training with torch's optimizer; at each checkpoint every sample's gradient by
    its own autograd call (eval mode), the target gradient from the mean target loss."""
    model = copy.deepcopy(model)
    gen = seed_everything(seed)
    opt = (torch.optim.SGD if optimizer == "sgd" else torch.optim.Adam)(model.parameters(), lr=lr)
    n = xs.shape[0]

    def epoch_batches():
        if shuffle == "full":
            return list(torch.randperm(n, generator=gen).split(batch_size))
        out = []
        for a in range(0, n, block):
            out += [idx + a for idx in torch.randperm(min(block, n - a), generator=gen).split(batch_size)]
        return out

    spe = math.ceil(n / batch_size) if shuffle == "full" else sum(
        math.ceil(min(block, n - a) / batch_size) for a in range(0, n, block))
    total = epochs * spe
    marks = {round(c * total / n_checkpoints) for c in range(1, n_checkpoints + 1)}
    values, per_ckpt, step = np.zeros(n), [], 0
    params = list(model.parameters())
    for _ in range(epochs):
        for idx in epoch_batches():
            model.train()
            opt.zero_grad()
            _ce(model(xs[idx]), ys[idx]).mean().backward()
            opt.step()
            step += 1
            if step in marks:
                model.eval()
                G = torch.autograd.grad(_ce(model(xt), yt).mean(), params)
                c = np.array([lr * sum(float((a * b).sum()) for a, b in zip(
                    torch.autograd.grad(_ce(model(xs[i:i + 1]), ys[i:i + 1]).sum(), params), G)) for i in range(n)])
                values += c
                per_ckpt.append(c)
    return values, np.stack(per_ckpt, 1)


def _fit(model, data, **kw):
    kw = {"epochs": 3, "batch_size": 4, "lr": 0.1, "optimizer": "sgd", "n_checkpoints": 3, "seed": 0,
          "progress": False, **kw}
    return TracIn(model, **kw).fit(*data)


# ------------------------------------------------------------------------- vs brute force
@pytest.mark.parametrize("optimizer,lr", [("sgd", 0.2), ("adam", 0.02)])
@pytest.mark.parametrize("backend", ["fast", "reference"])
def test_matches_brute_force(optimizer, lr, backend):
    data = _data()
    model = _mlp(seed=1)
    res = _fit(model, data, optimizer=optimizer, lr=lr, backend=backend, n_checkpoints=4, keep_snapshots=True)
    want, cols = _brute_force(model, *data, epochs=3, batch_size=4, lr=lr, n_checkpoints=4, optimizer=optimizer)
    np.testing.assert_allclose(res.values, want, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(np.asarray(res.snapshots), cols, rtol=1e-9, atol=1e-12)
    assert np.std(want) > 1e-4
    np.testing.assert_array_equal(res.counts, 4)
    se = np.sqrt(4 * cols.var(1, ddof=1))              # stderr of a sum of 4 contributions
    np.testing.assert_allclose(res.stderr, se, rtol=1e-8)
    assert res.info["checkpoint_steps"] == [3, 6, 9, 12] and res.info["checkpoints"] == 4


def test_one_checkpoint_after_one_full_batch_step():
    data = _data(n=8)
    model = _mlp(seed=2)
    res = _fit(model, data, epochs=1, batch_size=8, n_checkpoints=1, lr=0.5)
    want, _ = _brute_force(model, *data, epochs=1, batch_size=8, lr=0.5, n_checkpoints=1)
    np.testing.assert_allclose(res.values, want, rtol=1e-10, atol=1e-13)
    assert np.isnan(res.stderr).all()                  # one contribution: no spread


def test_block_shuffle_matches_brute_force_and_streamed_sources():
    data = _data(n=17)
    model = _mlp(seed=3)
    res = _fit(model, data, shuffle="block", source_batch_size=6, n_checkpoints=2)
    want, _ = _brute_force(model, *data, epochs=3, batch_size=4, lr=0.1, n_checkpoints=2, shuffle="block", block=6)
    np.testing.assert_allclose(res.values, want, rtol=1e-9, atol=1e-12)
    assert res.info["shuffle"] == "block" and res.info["steps"] == 3 * 6
    # the same rows streamed by an iterator factory (uneven chunks) and by a torch Dataset
    xs, ys, xt, yt = data

    def chunks():
        for a, b in ((0, 5), (5, 6), (6, 17)):
            yield xs[a:b].numpy(), ys[a:b].numpy()

    streamed = _fit(model, (chunks, None, xt, yt), source_batch_size=6, n_checkpoints=2)
    assert streamed.info["shuffle"] == "block"
    np.testing.assert_allclose(streamed.values, res.values, rtol=1e-12, atol=1e-15)
    ds = torch.utils.data.TensorDataset(xs, ys)
    from_ds = _fit(model, (ds, None, xt, yt), source_batch_size=6, n_checkpoints=2)
    np.testing.assert_allclose(from_ds.values, res.values, rtol=1e-12, atol=1e-15)


# ------------------------------------------------------------------------ fast == reference
def _cnn(dtype=torch.float32):
    torch.manual_seed(4)
    return nn.Sequential(nn.Unflatten(1, (2, 4, 4)), nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
                         nn.Flatten(), nn.Dropout(0.2), nn.Linear(48, 8), nn.LayerNorm(8), nn.Mish(),
                         nn.Linear(8, 3)).to(dtype)


def test_fast_equals_reference_cnn_with_batchnorm_and_dropout():
    """Scoring runs in eval mode: BatchNorm's running statistics, no dropout, so both backends see
    the same per-sample functions (and the training, with dropout, is identical)."""
    g = torch.Generator().manual_seed(5)
    xs, xt = torch.randn(22, 32, generator=g), torch.randn(10, 32, generator=g)
    ys, yt = torch.randint(0, 3, (22,), generator=g), torch.randint(0, 3, (10,), generator=g)
    kw = dict(epochs=2, batch_size=5, lr=0.05, n_checkpoints=3)
    fast = _fit(_cnn(), (xs, ys, xt, yt), backend="fast", **kw)
    ref = _fit(_cnn(), (xs, ys, xt, yt), backend="reference", **kw)
    scale = np.abs(ref.values).max()
    assert scale > 0 and np.std(ref.values) > 1e-3 * scale
    np.testing.assert_allclose(fast.values, ref.values, rtol=1e-5, atol=1e-5 * scale)
    assert fast.info["ghost_layers"] == ["1", "2", "7"] and fast.info["slow_route_layers"] == []


# ------------------------------------------------------------------------ checkpoint / resume
class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("kill_after", [1, 2])
def test_checkpoint_resume_matches_uninterrupted(tmp_path, monkeypatch, kill_after):
    data = _data(n=15, dtype=torch.float32)
    model = _mlp(seed=6, dropout=0.3, dtype=torch.float32)
    kw = dict(epochs=3, batch_size=4, n_checkpoints=5, keep_snapshots=True)       # checkpoints mid-epoch
    full = _fit(model, data, **kw)
    real = ckpt_mod.write_state
    calls = {"n": 0}

    def dying(path, state):
        real(path, state)
        calls["n"] += 1
        if calls["n"] == kill_after:
            raise _Interrupt

    monkeypatch.setattr(ckpt_mod, "write_state", dying)
    with pytest.raises(_Interrupt):
        _fit(model, data, checkpoint_dir=tmp_path, **kw)
    monkeypatch.setattr(ckpt_mod, "write_state", real)
    resumed = _fit(model, data, checkpoint_dir=tmp_path, **kw)
    np.testing.assert_array_equal(resumed.values, full.values)
    np.testing.assert_array_equal(np.asarray(resumed.snapshots), np.asarray(full.snapshots))
    # a different run in the same folder is refused, naming what differs
    with pytest.raises(ValueError, match="checkpoint_dir.*lr"):
        _fit(model, data, checkpoint_dir=tmp_path, lr=0.2, **kw)


def test_checkpoint_files_and_lock_are_named_after_tracin(tmp_path):
    """TracIn's files and lock are its own: a DVGS run holding the same folder does not block it,
    another TracIn run does, and the error names TracIn."""
    data = _data(n=9, dtype=torch.float32)
    model = _mlp(seed=2, dtype=torch.float32)
    kw = dict(epochs=1, batch_size=4, n_checkpoints=2)
    dvgs_lock = ckpt_mod.DirLock(ckpt_mod.CheckpointFiles(tmp_path)).acquire()
    try:
        _fit(model, data, checkpoint_dir=tmp_path, **kw)
    finally:
        dvgs_lock.release()
    names = {p.name for p in tmp_path.iterdir()}
    assert {"tracin_checkpoint.pt", "tracin_sums.npy", "tracin.lock"} <= names
    assert not any(n.startswith("dvgs_") for n in names)
    other = ckpt_mod.DirLock(ckpt_mod.CheckpointFiles(tmp_path, method="TracIn")).acquire()
    try:
        with pytest.raises(ValueError, match="in use by another TracIn run"):
            _fit(model, data, checkpoint_dir=tmp_path, **kw)
    finally:
        other.release()


# ------------------------------------------------------------------------------ torchrun
def _tracin_case(n=22, block=4, checkpoint_dir=None):
    """A small case both the parent and the 2 gloo workers run."""
    torch.manual_seed(7)
    net = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.2), nn.Mish(), nn.Linear(8, 3))
    kw = dict(epochs=2, batch_size=5, lr=0.05, optimizer="sgd", n_checkpoints=3, source_batch_size=block, seed=3,
              progress=False)
    if checkpoint_dir is not None:
        kw["checkpoint_dir"] = checkpoint_dir
    res = TracIn(net, **kw).fit(*_data(n, dtype=torch.float32))
    return {"values": np.asarray(res.values), "shard": res.info.get("shard"), "world": res.info.get("world_size")}


def _worker(rank, world, port, ck, q):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    out, err = {}, None
    try:
        import datetime
        import torch.distributed as dist
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
        try:
            out["plain"] = _tracin_case()
            out["ckpt"] = _tracin_case(checkpoint_dir=ck)
            out["files"] = sorted(os.listdir(ck))
        finally:
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - reported to the parent
        import traceback
        err = traceback.format_exc()
    q.put((rank, out, err))


def test_two_gloo_ranks_equal_single_process(tmp_path, monkeypatch):
    import torch.multiprocessing as mp
    from _dist_workers import free_port
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    single = _tracin_case()
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, str(tmp_path), q)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        got = sorted((q.get(timeout=240) for _ in procs), key=lambda t: t[0])
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    errors = [e for _, _, e in got if e]
    assert not errors, "\n".join(errors)
    assert np.std(single["values"]) > 1e-4
    for r, (_, out, _) in enumerate(got):
        np.testing.assert_allclose(out["plain"]["values"], single["values"], rtol=1e-6, atol=1e-9)
        np.testing.assert_array_equal(out["ckpt"]["values"], out["plain"]["values"])
        assert out["plain"]["world"] == 2
        assert {"tracin_checkpoint.rank0.pt", "tracin_checkpoint.rank1.pt"} <= set(out["files"])
    assert got[0][1]["plain"]["shard"] == [0, 12] and got[1][1]["plain"]["shard"] == [12, 22]


# ---------------------------------------------------------------------- options and budgets
def test_budget_stops_cleanly():
    data = _data(n=20)
    with pytest.warns(BudgetWarning, match="stopped early by max_time"):
        res = _fit(_mlp(), data, max_time=1e-9)
    assert res.status == "stopped" and res.info["steps"] == 1 and res.info["checkpoints"] == 0
    assert (res.counts == 0).all() and (res.values == 0).all()


def test_grad_params_and_autoencoder():
    data = _data()
    model = _mlp(seed=8)
    head = _fit(model, data, grad_params=["3"], epochs=1, batch_size=14, n_checkpoints=1)
    xs, ys, xt, yt = data
    moved = copy.deepcopy(model)
    opt = torch.optim.SGD(moved.parameters(), lr=0.1)
    _ce(moved(xs), ys).mean().backward()
    opt.step()
    moved.eval()
    p = list(moved[3].parameters())
    G = torch.autograd.grad(_ce(moved(xt), yt).mean(), p)
    want = [0.1 * sum(float((a * b).sum()) for a, b in zip(
        torch.autograd.grad(_ce(moved(xs[i:i + 1]), ys[i:i + 1]).sum(), p), G)) for i in range(14)]
    np.testing.assert_allclose(head.values, want, rtol=1e-10, atol=1e-13)
    g = torch.Generator().manual_seed(9)
    xs, xt = torch.randn(12, 5, generator=g), torch.randn(6, 5, generator=g)
    ae = nn.Sequential(nn.Linear(5, 2), nn.Tanh(), nn.Linear(2, 5))
    res = TracIn(ae, loss="mse", epochs=2, batch_size=4, seed=0, progress=False).fit(xs, None, xt, None)
    assert np.isfinite(res.values).all() and np.std(res.values) > 0


def test_breast_cancer_flipped_labels_are_found():
    from dvgs_fast.datasets import flip_labels, load_dataset
    from dvgs_fast.evaluate import detection_auroc
    sp = load_dataset("breast_cancer").split(n_source=200, n_target=80, n_test=50, seed=0)
    y_noisy, flipped = flip_labels(sp.y_source, 0.2, seed=0)
    d = sp.x_source.shape[1]
    torch.manual_seed(0)
    res = TracIn(nn.Sequential(nn.Linear(d, 32), nn.ReLU(), nn.Linear(32, 2)), epochs=15, batch_size=32, lr=0.1,
                 optimizer="sgd", seed=0, progress=False).fit(sp.x_source, y_noisy, sp.x_target, sp.y_target)
    assert detection_auroc(res.values, flipped) > 0.65


# ------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("kw,match", [
    (dict(n_checkpoints=0), "n_checkpoints"), (dict(optimizer="lbfgs"), "optimizer"),
    (dict(shuffle="random"), "shuffle"), (dict(source_batch_size=0), "source_batch_size"),
    (dict(backend="x"), "backend"), (dict(distributed="yes"), "distributed"),
    (dict(keep_snapshots="no"), "keep_snapshots"),
])
def test_bad_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        TracIn(_mlp(), **kw)


def test_bad_inputs_fail_before_training():
    data = _data(n=10)
    with pytest.raises(ValueError, match="n_checkpoints: 50 checkpoints but the training has only 9 steps"):
        _fit(_mlp(), data, n_checkpoints=50)
    xs, ys, xt, yt = data
    with pytest.raises(ValueError, match="y_target"):
        _fit(_mlp(), (xs, ys, xt, yt + 7))
    with pytest.raises(ValueError, match="y_source"):
        _fit(_mlp(), (xs, None, xt, yt))
    bn = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).double()
    with pytest.raises(ValueError, match=r"batch_size: 3 leaves a training batch of one sample.*BatchNorm1d"):
        _fit(bn, data, batch_size=3)


@pytest.mark.filterwarnings("ignore:overflow encountered")
def test_diverging_training_names_the_step():
    xs, _, xt, _ = _data(n=10)
    ae = nn.Sequential(nn.Linear(4, 4)).double()
    with pytest.raises(ValueError, match=r"lr: training diverged in TracIn: the source loss is (nan|inf) at "
                                         r"epoch \d+, step \d+"):
        TracIn(ae, loss="mse", epochs=50, batch_size=5, lr=1e3, optimizer="sgd", progress=False).fit(xs, None, xt, None)
