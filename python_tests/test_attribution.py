"""attribute(): the pairwise [n_query, n_source] scores of the gradient methods.

Checked against exact definitions in float64: grad-dot / grad-cos against explicit per-sample
gradients; TracIn and In-Run Data Shapley row by row against fit() with that one query as the
target set (the same training run); DVGS against explicit similarities at its one snapshot and,
for the dot similarity, its mean over the queries against fit(). The sink: memory-mapped output,
top-k, callbacks, blocks, and the input errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dvgs_fast import DVGS, GradCos, GradDot, InRunShapley, TracIn, TracInCheckpoints
from dvgs_fast.attribution import ScoreSink


def _data(n=26, m=5, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs, xq = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(m, d, generator=g, dtype=torch.float64)
    return xs, torch.randint(0, 3, (n,), generator=g), xq, torch.randint(0, 3, (m,), generator=g)


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3)).double()


def _cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Unflatten(1, (1, 5)), nn.Conv1d(1, 3, 2), nn.ReLU(), nn.Flatten(), nn.Linear(12, 3)).double()


def _explicit(model, x, y):
    params = [p for p in model.parameters()]
    rows = []
    for i in range(x.shape[0]):
        g = torch.autograd.grad(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), params)
        rows.append(torch.cat([t.reshape(-1) for t in g]))
    return torch.stack(rows)


# ----------------------------------------------------------------------------- grad-dot / grad-cos
@pytest.mark.parametrize("make", [_mlp, _cnn])
@pytest.mark.parametrize("n,m", [(26, 5), (1, 1)])
def test_grad_dot_and_cos_equal_explicit_gradients(make, n, m):
    xs, ys, xq, yq = _data(n, m)
    model = make()
    G, H = _explicit(model, xs, ys), _explicit(model, xq, yq)
    dot = GradDot(model, progress=False, seed=0, source_batch_size=7).attribute(
        xs, ys, xq, yq, query_batch_size=2, dtype="float64")
    np.testing.assert_allclose(dot.scores, (H @ G.t()).numpy(), rtol=1e-9, atol=1e-12)
    cos = GradCos(model, progress=False, seed=0).attribute(xs, ys, xq, yq, dtype="float64")
    ref = (H @ G.t()) / (H.norm(dim=1, keepdim=True) * G.norm(dim=1, keepdim=True).t())
    np.testing.assert_allclose(cos.scores, ref.numpy(), rtol=1e-9, atol=1e-12)
    # fit() is the mean over the target set
    val = GradDot(model, progress=False, seed=0).fit(xs, ys, xq, yq)
    np.testing.assert_allclose(val.values, (G @ H.mean(0)).numpy(), rtol=1e-9, atol=1e-12)


def test_grad_dot_trains_first_when_asked():
    xs, ys, xq, yq = _data()
    a = GradDot(_mlp(), epochs=2, batch_size=8, progress=False, seed=3).attribute(xs, ys, xq, yq, dtype="float64")
    b = GradDot(_mlp(), epochs=0, progress=False, seed=3).attribute(xs, ys, xq, yq, dtype="float64")
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-6        # the trained model scores differently
    c = GradDot(_mlp(), epochs=2, batch_size=8, progress=False, seed=3).attribute(xs, ys, xq, yq, dtype="float64")
    np.testing.assert_array_equal(np.asarray(a), np.asarray(c))        # same seed, same training


# ----------------------------------------------------------------------------- TracIn / In-Run / DVGS
@pytest.mark.parametrize("backend", ["fast", "reference"])
def test_tracin_rows_equal_fit_with_one_query(backend):
    xs, ys, xq, yq = _data(m=3)
    kw = dict(epochs=3, batch_size=8, n_checkpoints=3, lr=1e-2, progress=False, seed=1, source_batch_size=9,
              backend=backend)
    att = TracIn(_mlp(), **kw).attribute(xs, ys, xq, yq, dtype="float64", query_batch_size=2)
    for j in range(3):
        val = TracIn(_mlp(), **kw).fit(xs, ys, xq[j:j + 1], yq[j:j + 1])
        np.testing.assert_allclose(att.scores[j], val.values, rtol=1e-9, atol=1e-14)
    assert np.abs(att.scores).max() > 1e-4


def test_tracin_over_given_checkpoints_equals_explicit_sum():
    xs, ys, xq, yq = _data(m=4)
    cks = [_mlp(seed=s) for s in (1, 2, 3)]
    lrs = [0.1, 0.05, 0.2]
    att = TracInCheckpoints(_mlp(), [c.state_dict() for c in cks], lrs, progress=False, seed=0,
                            source_batch_size=9).attribute(xs, ys, xq, yq, dtype="float64", query_batch_size=3)
    ref = sum(lr * (_explicit(c, xq, yq) @ _explicit(c, xs, ys).t()) for c, lr in zip(cks, lrs))
    np.testing.assert_allclose(att.scores, ref.numpy(), rtol=1e-9, atol=1e-13)
    val = TracInCheckpoints(_mlp(), cks, lrs, progress=False, seed=0).fit(xs, ys, xq, yq)
    np.testing.assert_allclose(val.values, ref.mean(0).numpy(), rtol=1e-9, atol=1e-13)
    assert val.counts.tolist() == [3] * xs.shape[0] and np.isfinite(val.stderr).all()
    with pytest.raises(ValueError, match="lrs: 2 learning rates for 3 checkpoints"):
        TracInCheckpoints(_mlp(), cks, [0.1, 0.2])
    with pytest.raises(ValueError, match="checkpoints: item 0 does not fit"):
        TracInCheckpoints(_mlp(), [nn.Linear(5, 3).double()], progress=False).fit(xs, ys, xq, yq)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("make", [_mlp, _cnn])
def test_inrun_rows_equal_fit_with_one_query(optimizer, make):
    xs, ys, xq, yq = _data(m=3)
    kw = dict(epochs=2, batch_size=7, lr=5e-2, optimizer=optimizer, progress=False, seed=2)
    att = InRunShapley(make(), **kw).attribute(xs, ys, xq, yq, dtype="float64", query_batch_size=2)
    for j in range(3):
        val = InRunShapley(make(), **kw).fit(xs, ys, xq[j:j + 1], yq[j:j + 1])
        np.testing.assert_allclose(att.scores[j], val.values, rtol=1e-8, atol=1e-13)
    with pytest.raises(ValueError, match="order"):
        InRunShapley(make(), **{**kw, "optimizer": "sgd"}, order=2).attribute(xs, ys, xq, yq)


@pytest.mark.parametrize("similarity", ["cosine", "dot", "projection", "distance"])
def test_dvgs_attribute_at_its_one_snapshot(similarity):
    """epochs=1 with one target batch: one snapshot, taken before the first update (θ0)."""
    xs, ys, xq, yq = _data(m=4)
    model = _mlp()
    att = DVGS(model, epochs=1, target_batch_size=4, similarity=similarity, progress=False, seed=0,
               source_batch_size=10).attribute(xs, ys, xq, yq, dtype="float64", query_batch_size=3)
    G, H = _explicit(model, xs, ys), _explicit(model, xq, yq)
    dot = H @ G.t()
    ref = {"dot": dot, "cosine": dot / (H.norm(dim=1, keepdim=True) * G.norm(dim=1)),
           "projection": dot / H.norm(dim=1, keepdim=True),
           "distance": -torch.cdist(H, G)}[similarity]
    np.testing.assert_allclose(att.scores, ref.numpy(), rtol=1e-8, atol=1e-11)
    assert att.info["snapshots"] == 1


def test_dvgs_dot_attribute_mean_equals_fit():
    xs, ys, xq, yq = _data(m=6)
    kw = dict(epochs=3, target_batch_size=6, lr=1e-2, progress=False, seed=1, source_batch_size=8, similarity="dot")
    att = DVGS(_mlp(), **kw).attribute(xs, ys, xq, yq, dtype="float64")
    val = DVGS(_mlp(), **kw).fit(xs, ys, xq, yq)
    np.testing.assert_allclose(att.source_values(), val.values, rtol=1e-9, atol=1e-13)


# ----------------------------------------------------------------------------- output, top-k, errors
def test_out_file_top_k_callback_and_blocks(tmp_path):
    xs, ys, xq, yq = _data(n=23, m=7)
    method = GradDot(_mlp(), progress=False, seed=0, source_batch_size=5)
    full = method.attribute(xs, ys, xq, yq, dtype="float64")
    seen = []
    path = tmp_path / "scores.npy"
    res = method.attribute(xs, ys, xq, yq, out=path, top_k=4, query_batch_size=3, dtype="float64",
                           callback=lambda q0, q1, s0, s1, b: seen.append((q0, q1, s0, s1, b.copy())))
    assert res.path == path and path.is_file() and not list(tmp_path.glob(".*.tmp"))
    np.testing.assert_allclose(np.load(path), np.asarray(full), rtol=1e-12, atol=1e-15)
    order = np.argsort(-np.asarray(full), axis=1, kind="stable")[:, :4]
    np.testing.assert_array_equal(res.top_indices, order)
    np.testing.assert_allclose(res.top_scores, np.take_along_axis(np.asarray(full), order, 1))
    low = np.argsort(np.asarray(full), axis=1, kind="stable")[:, :4]
    np.testing.assert_array_equal(res.bottom_indices, low)
    rebuilt = np.zeros((7, 23))
    for q0, q1, s0, s1, b in seen:
        rebuilt[q0:q1, s0:s1] = b
    np.testing.assert_allclose(rebuilt, np.asarray(full))
    assert {(q0, s0) for q0, _, s0, _, _ in seen} == {(q, s) for q in (0, 3, 6) for s in (0, 5, 10, 15, 20)}


def test_keep_false_returns_only_top_k_even_when_accumulating():
    xs, ys, xq, yq = _data(m=4)
    kw = dict(epochs=2, batch_size=8, n_checkpoints=2, lr=1e-2, progress=False, seed=1)
    full = TracIn(_mlp(), **kw).attribute(xs, ys, xq, yq, dtype="float64")
    top = TracIn(_mlp(), **kw).attribute(xs, ys, xq, yq, keep=False, top_k=3, dtype="float64")
    assert top.scores is None
    with pytest.raises(ValueError, match="not kept"):
        np.asarray(top)
    np.testing.assert_array_equal(top.top_indices, np.argsort(-np.asarray(full), 1, kind="stable")[:, :3])


def test_sink_in_memory_limit_sends_large_accumulations_to_a_temporary_file(monkeypatch):
    from dvgs_fast.attribution import sink as S
    monkeypatch.setattr(S, "IN_MEMORY_BYTES", 8)
    s = ScoreSink(3, 4, accumulate=True)
    assert isinstance(s.matrix, np.memmap)
    s.add(0, 3, 0, 4, torch.ones(3, 4))
    s.add_columns(0, 3, torch.tensor([2, 0]), torch.full((3, 2), 2.0))
    res = s.finish("x")
    np.testing.assert_array_equal(np.asarray(res), [[3, 1, 3, 1]] * 3)


def test_attribute_input_errors(tmp_path):
    xs, ys, xq, yq = _data()
    m = GradDot(_mlp(), progress=False, seed=0)
    with pytest.raises(ValueError, match="x_query: is required"):
        m.attribute(xs, ys)
    with pytest.raises(ValueError, match="x_query: is empty"):
        m.attribute(xs, ys, xq[:0], yq[:0])
    with pytest.raises(ValueError, match="top_k"):
        m.attribute(xs, ys, xq, yq, top_k=0)
    with pytest.raises(ValueError, match="out:.*npy"):
        m.attribute(xs, ys, xq, yq, out=tmp_path / "scores.bin")
    with pytest.raises(ValueError, match="keep: False needs top_k"):
        m.attribute(xs, ys, xq, yq, keep=False)
    with pytest.raises(ValueError, match="y_query"):
        m.attribute(xs, ys, xq, torch.full_like(yq, 7))                # label out of range, named as the query's
    with pytest.raises(ValueError, match="x_query"):
        m.attribute(xs, ys, xq[:, :3], yq)                              # wrong feature count
    xq_nan = xq.clone()
    xq_nan[0, 0] = float("nan")
    with pytest.raises(ValueError, match="x_query"):
        m.attribute(xs, ys, xq_nan, yq)
    assert not list(tmp_path.iterdir())                                 # nothing half-written left behind
