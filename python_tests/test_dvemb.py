"""DataValueEmbedding: against a brute-force float64 replay (explicit per-sample gradients at every
step, the recursion written out), the training against a counterfactual TrainingRecipe's reference
run, the embedding against actual trajectory-specific leave-one-out, the Adam preconditioning,
reuse, store_dir and input errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import nn

from dvgs_fast.evaluate import TrainingRecipe, loo_ground_truth, reference_model
from dvgs_fast.methods.dvemb import DataValueEmbedding


def _data(n=40, m=6, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs, xq = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(m, d, generator=g, dtype=torch.float64)
    return xs, torch.randint(0, 3, (n,), generator=g), xq, torch.randint(0, 3, (m,), generator=g)


def _factory():
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _per_sample(model, x, y):
    ps = list(model.parameters())
    out = []
    for i in range(x.shape[0]):
        g = torch.autograd.grad(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), ps)
        out.append(torch.cat([t.reshape(-1) for t in g]))
    return torch.stack(out)


def _brute_force(xs, ys, xq, yq, *, epochs, batch_size, lr, seed):
    """The recursion of Wang et al. (as dattri computes it) on explicit per-sample gradients of
    the same SGD run (same initial weights and order: the recipe's conventions)."""
    torch.manual_seed(seed)
    model = _factory()
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    steps = []
    for _ in range(epochs):
        for idx in torch.randperm(xs.shape[0], generator=gen).split(batch_size):
            steps.append((idx, _per_sample(model, xs[idx], ys[idx]), lr / idx.shape[0]))
            opt.zero_grad()
            F.cross_entropy(model(xs[idx]), ys[idx]).backward()
            opt.step()
    p = steps[0][1].shape[1]
    M = torch.zeros(p, p, dtype=torch.float64)
    E = torch.zeros(xs.shape[0], p, dtype=torch.float64)
    for idx, g, eta in reversed(steps):
        e = eta * g - eta * (g @ M.t())
        E[idx] += e
        M += e.t() @ g
    return E @ _per_sample(model, xq, yq).t(), model


@pytest.mark.parametrize("batch_size, group_rows, recursion", [
    (8, 256, "embedding"), (7, 1, "embedding"), (7, 15, "embedding"), (8, 24, "embedding"),
    (8, 256, "query"), (7, 1, "query"), (7, 15, "query")])
def test_equals_brute_force_recursion_without_projection(monkeypatch, batch_size, group_rows, recursion):
    """The recursion goes in groups of steps (M updated once per group): one step per group,
    groups that split at an uneven last batch, and all 15-18 steps in one group. The query route
    reads the store in blocks of whole steps of the same sizes."""
    from dvgs_fast.methods.dvemb import embedding, query_recursion
    monkeypatch.setattr(embedding, "_GROUP_ROWS", group_rows)
    monkeypatch.setattr(query_recursion, "_READ_ROWS", group_rows)
    xs, ys, xq, yq = _data()
    kw = dict(epochs=3, batch_size=batch_size, lr=0.1, seed=4)
    ref, model = _brute_force(xs, ys, xq, yq, **kw)
    att = DataValueEmbedding(_factory, proj_dim=10_000, store_dtype="float64", progress=False, recursion=recursion,
                             **kw).attribute(xs, ys, xq, yq, dtype="float64")
    assert att.info["proj_dim"] == 75                       # every parameter, unprojected (the identity)
    assert att.info["recursion"] == recursion
    np.testing.assert_allclose(att.scores, ref.t().numpy(), rtol=1e-8, atol=1e-12)
    assert np.abs(att.scores).max() > 1e-3


def test_training_is_the_recipes_reference_run():
    xs, ys, xq, yq = _data()
    dve = DataValueEmbedding(_factory, epochs=2, batch_size=8, lr=0.1, seed=3, progress=False)
    dve.attribute(xs, ys, xq, yq)
    recipe = TrainingRecipe(_factory, optimizer="sgd", lr=0.1, epochs=2, batch_size=8, dtype=torch.float64)
    want = reference_model(recipe, xs, ys, seed=3)
    got = dve._cache.state
    for k, v in want.state_dict().items():
        torch.testing.assert_close(got[k], v, rtol=1e-12, atol=1e-14)


def test_tracks_trajectory_specific_leave_one_out():
    """A small, smooth run: the embedding's scores rank the actual effect of removing each row from
    the same run (same initial weights and order) closely; projected to k < p still well."""
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(60, 5, generator=g, dtype=torch.float64)
    w = torch.randn(5, 3, generator=g, dtype=torch.float64)
    ys = (xs @ w).argmax(1)
    ys[:8] = (ys[:8] + 1) % 3
    xq, yq = xs[:10] + 0.1, ys[:10]
    kw = dict(epochs=4, batch_size=10, lr=0.2, seed=0)
    recipe = TrainingRecipe(_factory, optimizer="sgd", lr=0.2, epochs=4, batch_size=10, dtype=torch.float64,
                            data_order="shared")
    gt = loo_ground_truth(recipe, xs, ys, xq, yq, indices=None, seeds=[0], output="neg_loss", progress=False)
    for k in (10_000, 32):
        att = DataValueEmbedding(_factory, proj_dim=k, progress=False, **kw).attribute(xs, ys, xq, yq,
                                                                                    dtype="float64")
        rho = np.mean([spearmanr(att.scores[q], gt.effects[q]).statistic for q in range(10)])
        assert rho > (0.85 if k > 75 else 0.6), (k, rho)       # measured 0.91 / 0.76


def test_adam_preconditioned_steps_and_float16_store(tmp_path):
    xs, ys, xq, yq = _data()
    kw = dict(epochs=2, batch_size=8, lr=0.01, optimizer="adam", seed=1, progress=False)
    a = DataValueEmbedding(_factory, proj_dim=10_000, **kw).attribute(xs, ys, xq, yq, dtype="float64")
    b = DataValueEmbedding(_factory, proj_dim=10_000, store_dtype="float16", **kw).attribute(xs, ys, xq, yq,
                                                                                           dtype="float64")
    assert np.isfinite(a.scores).all() and np.abs(a.scores).max() > 1e-4
    np.testing.assert_allclose(b.scores, a.scores, rtol=2e-2, atol=2e-3 * np.abs(a.scores).max())
    sgd = DataValueEmbedding(_factory, proj_dim=10_000, **{**kw, "optimizer": "sgd"}).attribute(xs, ys, xq, yq)
    assert np.abs(np.asarray(sgd) - a.scores).max() > 1e-4    # Adam's preconditioning is applied


def test_fit_is_the_mean_and_reuses_the_embedding(tmp_path):
    xs, ys, xq, yq = _data()
    dve = DataValueEmbedding(_factory, epochs=2, batch_size=8, lr=0.1, proj_dim=64, seed=2, progress=False,
                             store_dir=tmp_path / "dve")
    att = dve.attribute(xs, ys, xq, yq, dtype="float64")
    val = dve.fit(xs, ys, xq, yq)
    assert val.info["reused"] == "memory"
    np.testing.assert_allclose(val.values, att.source_values(), rtol=1e-5, atol=1e-9)
    again = DataValueEmbedding(_factory, epochs=2, batch_size=8, lr=0.1, proj_dim=64, seed=2, progress=False,
                               store_dir=tmp_path / "dve").attribute(xs, ys, xq, yq, dtype="float64")
    assert again.info["reused"] == "store_dir"
    np.testing.assert_allclose(again.scores, att.scores, rtol=1e-5, atol=1e-8)
    with pytest.raises(ValueError, match="checkpoint_dir.*another run"):
        DataValueEmbedding(_factory, epochs=2, batch_size=8, lr=0.2, proj_dim=64, seed=2, progress=False,
                           store_dir=tmp_path / "dve").fit(xs, ys, xq, yq)


def test_query_route_equals_embedding_route_and_auto_picks_the_cheaper(tmp_path):
    """Projected, float32 store, SGD and Adam: the scores without E equal those through E; "auto"
    takes the query route for fewer queries than dimensions (here 6 < 64) and E for more (40 > 8);
    fit() (one mean target vector) by the query route equals attribute()'s source values."""
    xs, ys, xq, yq = _data()
    for opt, lr in (("sgd", 0.1), ("adam", 0.01)):
        kw = dict(epochs=2, batch_size=8, lr=lr, optimizer=opt, proj_dim=64, seed=5, progress=False)
        e = DataValueEmbedding(_factory, recursion="embedding", **kw).attribute(xs, ys, xq, yq, dtype="float64")
        q = DataValueEmbedding(_factory, **kw)
        a = q.attribute(xs, ys, xq, yq, dtype="float64")
        assert (e.info["recursion"], a.info["recursion"]) == ("embedding", "query")
        assert q._cache.E is None
        np.testing.assert_allclose(a.scores, e.scores, rtol=1e-4, atol=1e-5 * np.abs(e.scores).max())
        assert np.abs(e.scores).max() > 1e-3
        v = q.fit(xs, ys, xq, yq)
        assert (v.info["recursion"], v.info["reused"]) == ("query", "memory")
        np.testing.assert_allclose(v.values, e.source_values(), rtol=1e-4, atol=1e-5 * np.abs(e.scores).max())
    many = DataValueEmbedding(_factory, epochs=1, batch_size=8, lr=0.1, proj_dim=8, seed=5, progress=False)
    assert many.attribute(xs, ys, xs, ys).info["recursion"] == "embedding"
    assert many._cache.E is not None


def test_query_route_in_store_dir_then_embedding_reused(tmp_path):
    """store_dir: a query-route run keeps the recorded steps and no E; a later "embedding" call
    forms E there from those steps (no retraining) and a third process reuses it."""
    xs, ys, xq, yq = _data()
    kw = dict(epochs=2, batch_size=8, lr=0.1, proj_dim=64, seed=2, progress=False, store_dir=tmp_path / "dve")
    first = DataValueEmbedding(_factory, recursion="query", **kw)
    a = first.attribute(xs, ys, xq, yq, dtype="float64")
    assert not (tmp_path / "dve" / "embedding.npy").exists()
    b = DataValueEmbedding(_factory, recursion="embedding", **kw).attribute(xs, ys, xq, yq, dtype="float64")
    assert (b.info["reused"], b.info["recursion"]) == ("store_dir", "embedding")
    assert (tmp_path / "dve" / "embedding.npy").exists() and not list((tmp_path / "dve").glob("*.partial*"))
    np.testing.assert_allclose(b.scores, a.scores, rtol=1e-4, atol=1e-5 * np.abs(a.scores).max())
    c = DataValueEmbedding(_factory, recursion="query", **kw).attribute(xs, ys, xq, yq, dtype="float64")
    assert (c.info["reused"], c.info["recursion"]) == ("store_dir", "embedding")    # E exists: scored with it
    np.testing.assert_allclose(c.scores, b.scores, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("on_disk", [False, True])
def test_recorded_steps_kept_until_close(monkeypatch, on_disk):
    """Without store_dir the steps are kept in memory (or, above the budget, in a temporary folder)
    for a later call, with the same scores either way; a run on another source or close() drops them."""
    from dvgs_fast.methods.dvemb import method
    xs, ys, xq, yq = _data()
    kw = dict(epochs=1, batch_size=8, lr=0.1, proj_dim=16, seed=0, progress=False)
    want = DataValueEmbedding(_factory, **kw).attribute(xs, ys, xq, yq, dtype="float64")
    if on_disk:
        monkeypatch.setattr(method, "_IN_MEMORY", 0)
    dve = DataValueEmbedding(_factory, **kw)
    got = dve.attribute(xs, ys, xq, yq, dtype="float64")
    np.testing.assert_allclose(got.scores, want.scores, rtol=1e-6, atol=1e-9)
    assert got.info["recorded_in"] == ("disk" if on_disk else "memory")
    folder = dve._cache.folder
    assert (folder / "trajectory").is_dir() == on_disk
    dve.fit(xs[:30], ys[:30], xq, yq)                      # another source: the first run's steps go
    assert not folder.exists()
    folder = dve._cache.folder
    dve.close()
    assert not folder.exists() and dve._cache is None


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("recursion", ["embedding", "query"])
@pytest.mark.parametrize("on_disk", [False, True])
def test_steps_kept_as_kronecker_sides_give_the_formed_rows_scores(monkeypatch, tmp_path, optimizer, recursion,
                                                                    on_disk):
    """With every layer Kronecker-projected, a step is kept as its sides (k_out + k_in per layer)
    and read back as formed rows: the same scores as the run that stores the formed rows
    (projects_sides forced off), float64 store, either recursion, SGD ([g]) and Adam ([g | u]),
    in memory and on disk; the recorded bytes shrink by the rows' ratio."""
    from dvgs_fast import grads
    from dvgs_fast.methods.dvemb import method
    xs, ys, xq, yq = _data()
    kw = dict(epochs=2, batch_size=8, lr=0.05, optimizer=optimizer, proj_dim=30, store_dtype="float64",
              projection_structure="kronecker", recursion=recursion, seed=0, progress=False)
    if on_disk:
        monkeypatch.setattr(method, "_IN_MEMORY", 0)
    got = DataValueEmbedding(_factory, store_dir=tmp_path / "s" if on_disk else None, **kw).attribute(
        xs, ys, xq, yq, dtype="float64")
    assert got.info["recorded_as"] == "kronecker sides"
    monkeypatch.setattr(grads.Projector, "projects_sides", lambda self, f: self.plan(f) and False)
    want = DataValueEmbedding(_factory, store_dir=tmp_path / "r" if on_disk else None, **kw).attribute(
        xs, ys, xq, yq, dtype="float64")
    assert want.info["recorded_as"] == "projected gradients"
    np.testing.assert_allclose(got.scores, want.scores, rtol=1e-10, atol=1e-12 * np.abs(want.scores).max())
    P = grads.Projector(30, structure="kronecker").plan_layers(
        [{"name": "0", "kind": "rows", "d_out": 8, "d_in": 6}, {"name": "2", "kind": "rows", "d_out": 3, "d_in": 9}])
    assert got.info["recorded_bytes"] * P.dim == want.info["recorded_bytes"] * P.side_dim


_FIRST = {"linear": lambda: _factory(),
          "flatten": lambda: nn.Sequential(nn.Flatten(), *_factory()),
          "in-place": lambda: nn.Sequential(nn.Hardtanh(-0.5, 0.5, inplace=True), *_factory()),
          "dropout": lambda: nn.Sequential(nn.Dropout(0.2), *_factory())}


@pytest.mark.parametrize("structure", ["kronecker", "khatri_rao"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("first, kept", [("linear", "0"), ("flatten", "1"), ("in-place", None), ("dropout", None)])
def test_first_layer_input_sides_kept_per_sample(monkeypatch, structure, optimizer, first, kept):
    """The input side of the layer reading the model's input as it is (the first Linear, after a
    Flatten or nothing) is projected once per source sample, not at every step: the same scores
    as the run projecting it at every step (float64, SGD and Adam, both structures). Not kept
    where the layer's input is not the batch's rows: an in-place op on the batch before it (its
    version counter) or a Dropout (a new tensor)."""
    from dvgs_fast.methods.dvemb import trajectory
    xs, ys, xq, yq = _data()
    if first == "flatten":
        xs, xq = xs.reshape(-1, 1, 5), xq.reshape(-1, 1, 5)
    kw = dict(epochs=2, batch_size=8, lr=0.05, optimizer=optimizer, proj_dim=12, store_dtype="float64",
              projection_structure=structure, recursion="query", seed=0, progress=False)
    got = DataValueEmbedding(_FIRST[first], **kw).attribute(xs, ys, xq, yq, dtype="float64")
    assert got.info["input_sides"] == kept
    monkeypatch.setattr(trajectory, "_INPUT_SIDES_BYTES", 0)
    want = DataValueEmbedding(_FIRST[first], **kw).attribute(xs, ys, xq, yq, dtype="float64")
    assert want.info["input_sides"] is None
    np.testing.assert_allclose(got.scores, want.scores, rtol=1e-10, atol=1e-12 * np.abs(want.scores).max())


def test_store_dir_recorded_with_another_projection_is_refused(tmp_path, monkeypatch):
    """A store_dir whose steps were projected otherwise than this version plans the same layers
    (an earlier split of k over a layer's sides) is refused by name before any scoring; its state
    with or without the projector's fingerprint (states written before it was kept)."""
    import json
    from dvgs_fast import runstate
    from dvgs_fast.grads import project
    xs, ys, xq, yq = _data()
    kw = dict(epochs=1, batch_size=8, lr=0.1, proj_dim=30, projection_structure="kronecker", seed=0, progress=False,
              store_dir=tmp_path / "s")
    real = project._split
    monkeypatch.setattr(project, "_split", lambda k, d_out, d_in: (1, min(k, d_in)))      # another rule
    DataValueEmbedding(_factory, **kw).attribute(xs, ys, xq, yq)
    monkeypatch.setattr(project, "_split", real)
    with pytest.raises(runstate.CheckpointError, match="another projection"):
        DataValueEmbedding(_factory, **kw).attribute(xs, ys, xq, yq)
    files = runstate.CheckpointFiles(tmp_path / "s", method="DVEmb")
    state = runstate.read_state(files)
    del state["projector"]
    runstate.write_state(files.state, state)
    with pytest.raises(runstate.CheckpointError, match="another projection"):
        DataValueEmbedding(_factory, **kw).attribute(xs, ys, xq, yq)


def test_training_killed_in_store_dir_starts_over(tmp_path, monkeypatch):
    """A run killed during its training leaves a partial trajectory in store_dir (and no state):
    the next run trains again from the start into it, with the uninterrupted run's scores."""
    from dvgs_fast.methods.dvemb import trajectory
    xs, ys, xq, yq = _data()
    kw = dict(epochs=2, batch_size=8, lr=0.1, proj_dim=16, seed=0, progress=False)
    want = DataValueEmbedding(_factory, **kw).attribute(xs, ys, xq, yq, dtype="float64")
    real, calls = trajectory.T.recorded_step, [0]

    def killed(*a, **k):
        calls[0] += 1
        if calls[0] == 4:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(trajectory.T, "recorded_step", killed)
    with pytest.raises(KeyboardInterrupt):
        DataValueEmbedding(_factory, store_dir=tmp_path / "dve", **kw).fit(xs, ys, xq, yq)
    monkeypatch.setattr(trajectory.T, "recorded_step", real)
    got = DataValueEmbedding(_factory, store_dir=tmp_path / "dve", **kw).attribute(xs, ys, xq, yq, dtype="float64")
    assert got.info["recorded_in"] == "disk"
    np.testing.assert_allclose(got.scores, want.scores, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("recursion", ["embedding", "query"])
def test_max_time_in_the_recursion_keeps_the_recorded_training(monkeypatch, recursion):
    """The budget running out in the recursion (after the training) is a one-line max_time error
    (also with Adam, whose divergence advice must not be appended), and the next call on the same
    instance starts at the recursion with the recorded steps, giving the full run's scores."""
    from dvgs_fast.methods import base
    from dvgs_fast.methods.dvemb import method
    xs, ys, xq, yq = _data()
    kw = dict(epochs=2, batch_size=8, lr=0.01, optimizer="adam", proj_dim=32, seed=0, progress=False,
              recursion=recursion)
    want = DataValueEmbedding(_factory, **kw).attribute(xs, ys, xq, yq, dtype="float64")
    trained = []
    real_record = method.record_training

    def record(*a, **k):                                   # the clock runs out once the training is done
        out = real_record(*a, **k)
        trained.append(1)
        return out
    monkeypatch.setattr(method, "record_training", record)
    monkeypatch.setattr(base.Budget, "time_up", lambda self: bool(trained))
    dve = DataValueEmbedding(_factory, max_time=1e6, **kw)
    with pytest.raises(ValueError, match=r"^max_time: the budget ran out during the (embedding|query) recursion"
                                         r"[^;]*; it needs every step \(raise max_time; the recorded training is "
                                         r"kept for the next call\)$"):
        dve.attribute(xs, ys, xq, yq)
    trained.clear()
    got = dve.attribute(xs, ys, xq, yq, dtype="float64")
    assert got.info["reused"] == "memory" and not trained     # not trained again
    np.testing.assert_allclose(got.scores, want.scores, rtol=1e-6, atol=1e-9)


def test_input_errors():
    xs, ys, xq, yq = _data()
    with pytest.raises(ValueError, match="proj_dim"):
        DataValueEmbedding(_factory, proj_dim=0)
    with pytest.raises(ValueError, match="store_dtype"):
        DataValueEmbedding(_factory, store_dtype="int8")
    with pytest.raises(ValueError, match="recursion"):
        DataValueEmbedding(_factory, recursion="forward")
    with pytest.raises(ValueError, match="y_query"):
        DataValueEmbedding(_factory, epochs=1, progress=False).attribute(xs, ys, xq, torch.full_like(yq, 9))
    with pytest.raises(ValueError, match="lr: training diverged|beyond float32.s range"):
        DataValueEmbedding(lambda: nn.Linear(5, 3).double(), epochs=3, lr=1e300, progress=False).attribute(
            xs * 1e100, ys, xq, yq)
