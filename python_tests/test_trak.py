"""TRAK and LoGraInfluence: exact formulas in float64, the regularisation rule, the ensemble,
store reuse and budgets, streamed sources, torchrun.

* k = the full dimension (every projection side the identity) and λ = 0: TRAK equals the exact
  after-kernel formula φ_q (GᵀG)⁺ Gᵀ · Q on explicit margin gradients (torch.func);
* a random projection and λ > 0: the stores hold P g (the member's own seeded projector on
  explicit gradients) and the scores are the formula on those features;
* LoGra: g_q (GᵀG/N + λI)⁻¹ g_i on explicit loss gradients (cross-entropy, an MSE autoencoder);
* the rule for λ reads the training features only: a query's scores do not depend on the other
  queries, λ is the same for any query set."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn

from dvgs_fast import grads
from dvgs_fast.gradstore import GradientStore
from dvgs_fast.methods.base import derive_seed
from dvgs_fast.methods.trak import TRAK, LoGraInfluence
from dvgs_fast.methods.trak.outputs import margin

CE = grads.make_sample_loss("cross_entropy")


def _data(n=40, m=6, d=4, classes=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    xs, xq = torch.randn(n, d, generator=g, dtype=dtype), torch.randn(m, d, generator=g, dtype=dtype)
    return xs, torch.randint(0, classes, (n,), generator=g), xq, torch.randint(0, classes, (m,), generator=g)


def _mlp(seed=0, d=4, classes=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 5), nn.Tanh(), nn.Linear(5, classes)).double()


def _flat(model, x, y, fn):
    names = [k for k, _ in model.named_parameters()]
    g = grads.per_sample_grads(model, names, x, y, fn)
    return torch.cat([g[k].reshape(x.shape[0], -1) for k in names], 1).detach()


def _q(model, x, y):
    with torch.no_grad():
        return 1 - torch.softmax(model(x), 1).gather(1, y.reshape(-1, 1)).squeeze(1)


def _lam(G, reg):
    return reg * float((G * G).sum()) / G.shape[1]


# ------------------------------------------------------------------------------ exact formulas
@pytest.mark.parametrize("n,m", [(40, 6), (1, 1)])
def test_full_dimension_without_regularisation_is_the_exact_after_kernel(n, m):
    xs, ys, xq, yq = _data(n, m)
    members = [_mlp(0), _mlp(1)]
    kw = dict(proj_dim=10_000, regularization=0.0, store_dtype="float64", progress=False, seed=0)
    res = TRAK(_mlp(), checkpoints=[mm.state_dict() for mm in members], **kw).attribute(xs, ys, xq, yq,
                                                                                          dtype="float64")
    ref, qbar = 0, 0
    for mm in members:
        G, H = _flat(mm, xs, ys, margin), _flat(mm, xq, yq, margin)
        ref = ref + H @ torch.linalg.pinv(G.t() @ G, hermitian=True) @ G.t() / 2
        qbar = qbar + _q(mm, xs, ys) / 2
    ref = ref * qbar
    top = np.abs(ref.numpy()).max()
    assert top > 1e-3
    # (GᵀG is singular: the margin ignores a shift of all logits; pinv's cut-off vs ours: ~1e-8)
    np.testing.assert_allclose(res.scores, ref.numpy(), rtol=1e-6, atol=1e-7 * top)
    assert res.info["dim_per_member"] == sum(p.numel() for p in members[0].parameters())
    assert all(k["lambda"] == 0.0 for k in res.info["kernels"])
    assert res.params["checkpoints"] == "2 given"          # the settings name them, without the weights
    val = TRAK(_mlp(), checkpoints=[mm.state_dict() for mm in members], **kw).fit(xs, ys, xq, yq)
    np.testing.assert_allclose(val.values, ref.mean(0).numpy(), rtol=1e-6, atol=1e-7 * top)


@pytest.mark.parametrize("structure", ["khatri_rao", "kronecker", "dense"])
def test_projected_regularised_scores_equal_the_formula_on_the_stored_features(tmp_path, structure):
    xs, ys, xq, yq = _data(50, 5)
    model = _mlp(3)
    reg, seed = 0.05, 7
    res = TRAK(model, proj_dim=20, regularization=reg, store_dtype="float64", store_dir=tmp_path, progress=False,
               projection_structure=structure, seed=seed).attribute(xs, ys, xq, yq, dtype="float64", top_k=3)
    st = GradientStore.open(tmp_path / "member_00")
    P = grads.Projector(20, seed=derive_seed(seed, 13, 0), structure=structure)
    f = grads.FastScorer(model, [k for k, _ in model.named_parameters()], margin, "dot", owner="t").record(
        xs[:2], ys[:2]).factors()
    P.plan(f)
    names = [k for k, _ in model.named_parameters()]
    Phi = P.project_gradients(grads.per_sample_grads(model, names, xs, ys, margin))
    phi = P.project_gradients(grads.per_sample_grads(model, names, xq, yq, margin))
    np.testing.assert_allclose(st.array(), Phi.numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(st.aux("q"), _q(model, xs, ys).numpy(), rtol=1e-6)
    A = Phi.t() @ Phi
    lam = _lam(Phi, reg)
    ref = phi @ torch.linalg.solve(A + lam * torch.eye(P.dim, dtype=torch.float64), Phi.t()) * _q(model, xs, ys)
    np.testing.assert_allclose(res.scores, ref.numpy(), rtol=1e-7, atol=1e-10)
    np.testing.assert_array_equal(res.top_indices, ref.topk(3, 1).indices.numpy())
    assert res.info["kernels"][0]["lambda"] == pytest.approx(lam, rel=1e-9)


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_logra_equals_damped_fisher_influence(loss):
    xs, ys, xq, yq = _data(30, 4)
    if loss == "mse":                                   # an autoencoder: the target is the input
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 4)).double()
        ys = yq = None
        ts, tq = xs, xq
    else:
        model, ts, tq = _mlp(2), ys, yq
    fn = grads.make_sample_loss(loss)
    res = LoGraInfluence(model, loss=loss, proj_dim=10_000, damping=0.2, store_dtype="float64", progress=False,
                         seed=0).attribute(xs, ys, xq, yq, dtype="float64")
    G, H = _flat(model, xs, ts, fn), _flat(model, xq, tq, fn)
    F = G.t() @ G / len(xs)
    lam = 0.2 * float(torch.diagonal(F).sum()) / F.shape[0]
    ref = H @ torch.linalg.solve(F + lam * torch.eye(F.shape[0], dtype=torch.float64), G.t())
    np.testing.assert_allclose(res.scores, ref.numpy(), rtol=1e-7, atol=1e-10)
    assert res.info["damping"] == 0.2


# ------------------------------------------------------------------------------ the rule for λ
def test_regularisation_never_looks_at_the_queries():
    xs, ys, xq, yq = _data(40, 8)
    kw = dict(proj_dim=15, regularization=0.3, progress=False, seed=1, store_dtype="float64")
    both = TRAK(_mlp(), **kw).attribute(xs, ys, xq, yq, dtype="float64")
    first = TRAK(_mlp(), **kw).attribute(xs, ys, xq[:3], yq[:3], dtype="float64")
    other = TRAK(_mlp(), **kw).attribute(xs, ys, -3 * xq[3:], yq[3:], dtype="float64")
    np.testing.assert_allclose(first.scores, both.scores[:3], rtol=1e-12, atol=1e-14)
    lams = [r.info["kernels"][0]["lambda"] for r in (both, first, other)]
    assert lams[0] > 0 and lams[0] == lams[1] == lams[2]


# ------------------------------------------------------------------------------ ensemble and stores
def test_trained_ensemble_members_and_reproducibility():
    xs, ys, xq, yq = _data(36, 4, dtype=torch.float32)
    kw = dict(n_models=2, n_checkpoints=2, subsample=0.5, epochs=2, batch_size=8, lr=1e-2, proj_dim=12,
              progress=False)
    make = lambda: nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))   # noqa: E731
    a = TRAK(make, seed=4, **kw).attribute(xs, ys, xq, yq)
    b = TRAK(make, seed=4, **kw).attribute(xs, ys, xq, yq)
    c = TRAK(make, seed=5, **kw).attribute(xs, ys, xq, yq)
    np.testing.assert_array_equal(a.scores, b.scores)
    assert np.abs(a.scores - c.scores).max() > 1e-4
    labels = [m["member"] for m in a.info["members"]]
    assert labels == ["model 0 (18 of 36 rows), step 3 of 6", "model 0 (18 of 36 rows), step 6 of 6",
                      "model 1 (18 of 36 rows), step 3 of 6", "model 1 (18 of 36 rows), step 6 of 6"]
    assert a.info["members_from"] == "trained" and len(a.info["kernels"]) == 4


def test_store_dir_reuse_budget_resume_and_memmap_output(tmp_path):
    xs, ys, xq, yq = _data(60, 5, dtype=torch.float32)
    make = lambda: nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))   # noqa: E731
    kw = dict(n_models=2, epochs=2, batch_size=8, proj_dim=16, source_batch_size=8, progress=False, seed=2)
    ref = TRAK(make, **kw).attribute(xs, ys, xq, yq, top_k=4)
    with pytest.raises(ValueError, match="max_time"):                   # stopped while training
        TRAK(make, store_dir=tmp_path / "a", max_time=1e-9, **kw).attribute(xs, ys, xq, yq)
    out = tmp_path / "scores.npy"
    again = TRAK(make, store_dir=tmp_path / "a", **kw).attribute(xs, ys, xq, yq, out=out, top_k=4)
    np.testing.assert_allclose(np.load(out), ref.scores, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(again.top_indices, ref.top_indices)
    assert again.info["members_from"] == "trained"
    reused = TRAK(make, store_dir=tmp_path / "a", **kw).attribute(xs, ys, xq, yq, keep=False, top_k=4)
    assert reused.info["members_from"] == "store_dir (trained earlier)" and reused.scores is None
    assert all(m["rows_written"] == 0 for m in reused.info["members"])
    np.testing.assert_array_equal(reused.top_indices, ref.top_indices)
    desc = TRAK(make, store_dir=tmp_path / "a", **kw).featurize(xs, ys)
    assert desc["status"] == "completed" and len(desc["stores"]) == 2
    with pytest.raises(ValueError, match="store_dir"):                  # another projection, same folder
        TRAK(make, store_dir=tmp_path / "a", **{**kw, "proj_dim": 17}).attribute(xs, ys, xq, yq)
    # stopped while featurising: the next call resumes the store where it stopped
    members = [_mlp(0).float().state_dict(), _mlp(1).float().state_dict()]
    ck = dict(checkpoints=members, proj_dim=16, source_batch_size=8, progress=False, seed=2)
    whole = TRAK(_mlp().float(), **ck).fit(xs, ys, xq, yq)
    with pytest.warns(UserWarning, match="stopped"):
        part = TRAK(_mlp().float(), store_dir=tmp_path / "b", max_time=1e-9, **ck).fit(xs, ys, xq, yq)
    assert part.status == "stopped" and (part.counts == 0).all()
    done = TRAK(_mlp().float(), store_dir=tmp_path / "b", **ck).fit(xs, ys, xq, yq)
    assert done.info["members"][0]["rows_written"] == 60 - 8 and done.info["members"][1]["rows_written"] == 60
    np.testing.assert_allclose(done.values, whole.values, rtol=1e-6, atol=1e-8)


def test_logra_on_a_streamed_source_equals_in_memory():
    xs, _, xq, _ = _data(45, 3, dtype=torch.float32)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 3), nn.Mish(), nn.Linear(3, 4))
    kw = dict(loss="mse", proj_dim=10, source_batch_size=8, progress=False, seed=0)
    mem = LoGraInfluence(model, **kw).attribute(xs, None, xq, None)
    chunks = lambda: iter([xs[:20], xs[20:31], xs[31:]])                       # noqa: E731
    streamed = LoGraInfluence(model, **kw).attribute(chunks, None, xq, None)
    np.testing.assert_allclose(streamed.scores, mem.scores, rtol=1e-5, atol=1e-6)
    vals = LoGraInfluence(model, **kw).fit(chunks, None, xq, None)
    np.testing.assert_allclose(vals.values, np.asarray(mem.scores).mean(0), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("kw,match", [
    ({"loss": "mse"}, "loss"), ({"n_models": 2}, "epochs"), ({"subsample": 1.5, "epochs": 1}, "subsample"),
    ({"checkpoints": [], "epochs": 0}, "checkpoints"), ({"projection": "sparse"}, "projection"),
    ({"store_dtype": "int8"}, "store_dtype"), ({"regularization": -1.0}, "regularization"),
    ({"proj_dim": 0}, "proj_dim"), ({"layer_dims": [3]}, "layer_dims")])
def test_bad_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        TRAK(_mlp(), **kw)


def test_bad_inputs_fail_before_any_work(tmp_path):
    xs, ys, xq, yq = _data(20, 3)
    t = TRAK(_mlp(), proj_dim=8, progress=False, seed=0)
    with pytest.raises(ValueError, match="y_query"):
        t.attribute(xs, ys, xq, torch.tensor([0, 1, 7]))
    bad = xs.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="x_source"):
        t.attribute(bad, ys, xq, yq)
    with pytest.raises(ValueError, match="checkpoints: entry 0"):
        TRAK(_mlp(), checkpoints=[{"nope": torch.zeros(1)}], progress=False).attribute(xs, ys, xq, yq)
    with pytest.raises(ValueError, match="store_dir"):
        t.featurize(xs, ys)
    with pytest.raises(ValueError, match="x_source"):
        TRAK(lambda: _mlp(), n_models=1, epochs=1, progress=False).attribute(lambda: iter([xs]), ys, xq, yq)
    with pytest.raises(ValueError, match="x_query"):
        LoGraInfluence(_mlp(), progress=False).attribute(xs, ys, None, None)


# ------------------------------------------------------------------------------ torchrun
def _store_case(directory, ctx=None):
    from dvgs_fast.gradstore import write_store
    from dvgs_fast.sources import TensorSource
    g = torch.Generator().manual_seed(0)
    x, W = torch.randn(203, 6, generator=g), torch.randn(6, 10, generator=g)
    return write_store(directory, TensorSource(x), lambda xb, yb: (torch.tanh(xb @ W), {"q": xb[:, 0].abs()}),
                       dim=10, aux={"q": "float32"}, block_rows=16, checkpoint_every=0.0, ctx=ctx)


def _trak_case(store_dir=None):
    xs, ys, xq, yq = _data(37, 5, dtype=torch.float32)
    make = lambda: nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))   # noqa: E731
    res = TRAK(make, n_models=2, epochs=2, batch_size=8, proj_dim=16, source_batch_size=8, store_dir=store_dir,
               progress=False, seed=3).fit(xs, ys, xq, yq)
    return {"values": np.asarray(res.values), "world": res.info.get("world_size"), "shard": res.info.get("shard")}


def _worker(rank, world, port, tmp, q):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    out, err = {}, None
    try:
        import datetime
        import torch.distributed as dist
        from dvgs_fast.distributed import DistContext
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
        try:
            res = _store_case(os.path.join(tmp, "raw"), DistContext.from_env())
            out["rows"] = res.rows
            out["trak"] = _trak_case()
            out["trak_dir"] = _trak_case(os.path.join(tmp, "trak"))
        finally:
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - reported to the parent
        import traceback
        err = traceback.format_exc()
    q.put((rank, out, err))


def test_two_gloo_ranks_equal_one_process(tmp_path, monkeypatch):
    """Two ranks: the raw store's bytes, and TRAK's values (featurisation, ΦᵀΦ and the values sharded)."""
    import torch.multiprocessing as mp
    from _dist_workers import free_port
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    raw = _store_case(tmp_path / "ref").store
    single = _trak_case()
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, str(tmp_path / "dist"), q)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        got = sorted((q.get(timeout=300) for _ in procs), key=lambda t: t[0])
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    errors = [e for _, _, e in got if e]
    assert not errors, "\n".join(errors)
    assert [tuple(o["rows"]) for _, o, _ in got] == [(0, 112), (112, 203)]        # whole 16-row blocks each
    for name in ("features.npy", "aux_q.npy"):
        assert (tmp_path / "dist" / "raw" / name).read_bytes() == (raw.directory / name).read_bytes()
    assert np.std(single["values"]) > 1e-4
    for _, out, _ in got:
        np.testing.assert_allclose(out["trak"]["values"], single["values"], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(out["trak_dir"]["values"], single["values"], rtol=1e-5, atol=1e-7)
        assert out["trak"]["world"] == 2
    assert got[0][1]["trak"]["shard"] == [0, 19] and got[1][1]["trak"]["shard"] == [19, 37]
