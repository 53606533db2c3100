"""DVGS: fast vs reference equality, the training-loop contract, checkpoint/resume, validation."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from dvgs_fast import DVGS, ValuationResult
from dvgs_fast import runstate as dvgs_checkpoint
from dvgs_fast.methods.dvgs import loop as dvgs_loop

ATOL = RTOL = 1e-5


def _data(n=60, m=24, d=6, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs, xt = torch.randn(n, d, generator=g), torch.randn(m, d, generator=g)
    w = torch.randn(d, classes, generator=g)
    ys, yt = (xs @ w).argmax(1), (xt @ w).argmax(1)
    ys[: n // 5] = (ys[: n // 5] + 1) % classes          # some noisy labels
    return xs, ys, xt, yt


def _run(model, xs, ys, xt, yt, backend, **kw):
    kw = {"epochs": 2, "target_batch_size": 10, "source_batch_size": 25, "seed": 3, "progress": False,
          "lr": 1e-2, **kw}
    return DVGS(model, backend=backend, **kw).fit(xs, ys, xt, yt)


def _assert_equal_backends(model, xs, ys, xt, yt, **kw):
    fast = _run(model, xs, ys, xt, yt, "fast", **kw)
    ref = _run(model, xs, ys, xt, yt, "reference", **kw)
    assert fast.info["snapshots"] == ref.info["snapshots"] > 0
    np.testing.assert_allclose(fast.values, ref.values, rtol=RTOL, atol=ATOL)
    assert np.std(ref.values) > 1e-4                      # not trivially equal
    return fast, ref


def _mlp(d=6, h=8, out=3, bias=True, norm=None):
    layers = [nn.Linear(d, h, bias=bias)]
    if norm == "layer":
        layers.append(nn.LayerNorm(h))
    elif norm == "instance":
        layers.append(nn.InstanceNorm1d(h))              # on [N, h]: per-sample, like the original DVGS NN
    layers += [nn.Mish(), nn.Linear(h, h, bias=bias), nn.Tanh(), nn.Linear(h, out, bias=bias)]
    return nn.Sequential(*layers)


# ----------------------------------------------------------------------------- equality
@pytest.mark.filterwarnings("ignore:input's size at dim=0")
@pytest.mark.parametrize("norm", [None, "layer", "instance"])
@pytest.mark.parametrize("bias", [True, False])
def test_mlp_fast_equals_reference(norm, bias):
    torch.manual_seed(0)
    _assert_equal_backends(_mlp(bias=bias, norm=norm), *_data())


@pytest.mark.parametrize("similarity", ["cosine", "dot", "projection", "distance"])
def test_similarities_fast_equals_reference(similarity):
    torch.manual_seed(1)
    _assert_equal_backends(_mlp(norm="layer"), *_data(), similarity=similarity)


def test_autoencoder_mse_without_labels():
    torch.manual_seed(2)
    xs, _, xt, _ = _data(d=10)
    ae = nn.Sequential(nn.Linear(10, 6), nn.ReLU(), nn.Linear(6, 3), nn.ReLU(), nn.Linear(3, 6), nn.ReLU(),
                       nn.Linear(6, 10))
    fast, ref = _assert_equal_backends(ae, xs, None, xt, None, loss="mse")
    assert fast.info["linear_ghost"] == ["0", "2", "4", "6"]


def test_mse_regression_with_1d_targets():
    torch.manual_seed(2)
    xs, _, xt, _ = _data()
    _assert_equal_backends(_mlp(out=1), xs, xs[:, 0] * 2, xt, xt[:, 0] * 2, loss="mse")


class _SeqNet(nn.Module):
    """Linear layers over tokens, a Linear used twice (shared weight), mean-pool, head."""

    def __init__(self, d=5, h=7, c=3):
        super().__init__()
        self.emb = nn.Linear(d, h)
        self.shared = nn.Linear(h, h)
        self.norm = nn.LayerNorm(h)
        self.head = nn.Linear(h, c)

    def forward(self, x):                        # x [N, T, d]
        z = torch.relu(self.emb(x))
        z = self.norm(self.shared(z) + self.shared(torch.sin(z)))
        return self.head(z.mean(1))


def test_sequence_inputs_and_shared_layer():
    torch.manual_seed(3)
    g = torch.Generator().manual_seed(0)
    xs, xt = torch.randn(40, 4, 5, generator=g), torch.randn(16, 4, 5, generator=g)
    ys, yt = torch.randint(0, 3, (40,), generator=g), torch.randint(0, 3, (16,), generator=g)
    fast, _ = _assert_equal_backends(_SeqNet(), xs, ys, xt, yt)
    assert set(fast.info["linear_ghost"]) == {"emb", "shared", "head"}
    assert fast.info["ghost_layers"] == ["norm"] and fast.info["per_layer_func"] == []


def test_conv_net():
    torch.manual_seed(4)
    g = torch.Generator().manual_seed(0)
    xs, xt = torch.randn(30, 2, 6, 6, generator=g), torch.randn(12, 2, 6, 6, generator=g)
    ys, yt = torch.randint(0, 3, (30,), generator=g), torch.randint(0, 3, (12,), generator=g)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(inplace=True),
                        nn.Conv2d(4, 4, 3), nn.InstanceNorm2d(4, affine=True), nn.ReLU(),
                        nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    fast, _ = _assert_equal_backends(net, xs, ys, xt, yt)
    assert fast.info["ghost_layers"] == ["0", "1", "3", "4"] and fast.info["per_layer_func"] == []


@pytest.mark.parametrize("grad_params", [["5"], ["0.weight"], ["0.bias", "3"], ["1"], "3.bias"])
def test_grad_params_subsets(grad_params):
    torch.manual_seed(5)
    fast, ref = _assert_equal_backends(_mlp(norm="layer"), *_data(), grad_params=grad_params)
    assert fast.params["grad_params"] == ([grad_params] if isinstance(grad_params, str) else grad_params)


class _Odd(nn.Module):
    """Parameters the per-layer routes cannot take: a bare parameter on a container, tied weights,
    an embedding, and an in-place activation right after a Linear."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.l1 = nn.Linear(6, 6)
        self.l2 = nn.Linear(6, 6)
        self.l2.weight = self.l1.weight             # tied
        self.scale = nn.Parameter(torch.ones(6) * 0.7)
        self.act = nn.ReLU(inplace=True)
        self.out = nn.Linear(6, 3)

    def forward(self, idx):                         # idx [N, T] token ids
        z = self.emb(idx).mean(1)
        z = self.act(self.l1(z))
        z = self.l2(z) * self.scale
        return self.out(z)


def test_fallback_routes_and_inplace_relu():
    torch.manual_seed(6)
    g = torch.Generator().manual_seed(0)
    xs, xt = torch.randint(0, 11, (30, 4), generator=g), torch.randint(0, 11, (12, 4), generator=g)
    ys, yt = torch.randint(0, 3, (30,), generator=g), torch.randint(0, 3, (12,), generator=g)
    # token ids are data, not features: keep them integer by passing a model that casts
    model = _Odd()
    wrapped = nn.Sequential(_ToLong(), model)
    fast, _ = _assert_equal_backends(wrapped, xs, ys, xt, yt)
    assert fast.info["linear_ghost"] == ["1.out"]
    assert fast.info["ghost_layers"] == ["1.emb"]
    # tied l1/l2 weight -> both modules; the bare parameter on a container
    assert sorted(fast.info["reference_route_params"]) == ["1.l1.bias", "1.l1.weight", "1.l2.bias", "1.scale"]


class _ToLong(nn.Module):
    def forward(self, x):
        return x.round().long()


def test_float64_model_matches_tightly():
    torch.manual_seed(7)
    xs, ys, xt, yt = _data()
    net = _mlp(norm="layer").double()
    fast = _run(net, xs.double(), ys, xt.double(), yt, "fast")
    ref = _run(net, xs.double(), ys, xt.double(), yt, "reference")
    np.testing.assert_allclose(fast.values, ref.values, rtol=1e-10, atol=1e-10)


def test_batchnorm_scores_with_running_statistics():
    """BatchNorm: G uses batch statistics (train mode), source gradients the running statistics
    (eval-mode BN), so a sample's score does not depend on which other samples share its chunk."""
    torch.manual_seed(8)
    net = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    data = _data()
    fast, ref = _assert_equal_backends(net, *data)
    chunked = _run(net, *data, "fast", source_batch_size=7)
    np.testing.assert_allclose(chunked.values, fast.values, rtol=1e-6, atol=1e-6)


def test_scoring_mode_leaves_model_unchanged():
    net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5))
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.get_rng_state()
    with dvgs_loop.ScoringMode(net, torch.device("cpu"), 123):
        assert not net[1].training and net[2].training
        net(torch.randn(5, 4))
        net[1].running_mean.add_(1.0)
    assert net[1].training
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state())          # target training's stream untouched


def test_dropout_backends_are_valid_draws():
    """With dropout both backends give valid draws of the same quantity: the target training is
    shared and the scoring draws from a per-snapshot stream, so each backend is reproducible,
    dropout is live (another seed changes the values) and the backends agree closely (on current
    torch they even draw identical masks, as both sample the [N, ...] mask in forward order)."""
    torch.manual_seed(9)
    net = nn.Sequential(nn.Linear(6, 32), nn.Dropout(0.3), nn.Mish(), nn.Linear(32, 3))
    data = _data(n=80)
    f1 = _run(net, *data, "fast", epochs=4)
    f2 = _run(net, *data, "fast", epochs=4)
    ref = _run(net, *data, "reference", epochs=4)
    np.testing.assert_array_equal(f1.values, f2.values)
    assert np.corrcoef(f1.values, ref.values)[0, 1] > 0.9
    other = _run(net, *data, "fast", epochs=4, seed=4)
    assert not np.allclose(other.values, f1.values, atol=1e-4)


def test_thread_count_determinism_as_documented():
    """README, reproducibility: Linear/dropout/Mish MLPs give identical values with 1 and 2 threads;
    BatchNorm models with bias=False before the norm agree to rounding (a bias there would make
    Adam amplify the thread-dependent rounding of its zero gradient, see the DVGS docstring)."""
    data = _data(n=120, m=60, d=6)
    mlp = nn.Sequential(nn.Linear(6, 32), nn.Dropout(0.2), nn.Mish(), nn.Linear(32, 3))
    bn = nn.Sequential(nn.Linear(6, 32, bias=False), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 3))
    out = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        try:
            out[threads] = [_run(m, *data, "fast", epochs=3, target_batch_size=20).values for m in (mlp, bn)]
        finally:
            torch.set_num_threads(1)
    np.testing.assert_array_equal(out[1][0], out[2][0])
    np.testing.assert_allclose(out[1][1], out[2][1], rtol=0, atol=1e-5 * np.abs(out[1][1]).max())


def test_source_chunking_does_not_change_values():
    torch.manual_seed(10)
    data = _data()
    net = _mlp(norm="layer")
    a = _run(net, *data, "fast", source_batch_size=60)
    b = _run(net, *data, "fast", source_batch_size=7)
    np.testing.assert_allclose(a.values, b.values, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- loop contract
def test_snapshots_counter_restarts_and_result():
    torch.manual_seed(11)
    model = _mlp()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    xs, ys, xt, yt = _data(m=25)                 # 3 steps per epoch with batch 10
    res = _run(model, xs, ys, xt, yt, "fast", epochs=3, restarts=2, compute_every=4, keep_snapshots=True)
    # 2 restarts * 3 epochs * 3 steps = 18 steps; the counter is global: steps 0,4,...,16 -> 5
    assert res.info["snapshots"] == 5 and res.info["steps"] == 18
    assert res.snapshots.shape == (60, 5) and isinstance(res.snapshots, np.memmap)
    np.testing.assert_allclose(res.snapshots.mean(1), res.values, rtol=1e-6, atol=1e-7)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())   # caller's copy untouched
    assert set(res.timings) >= {"setup", "train", "score", "total"}
    assert res.method == "dvgs" and res.params["similarity"] == "cosine"
    df = res.to_dataframe()
    assert len(df) == 60


def test_save_load_roundtrip(tmp_path):
    res = _run(lambda: _mlp(), *_data(), "fast", keep_snapshots=True)
    path = res.save(tmp_path / "dvgs")
    back = ValuationResult.load(path)
    np.testing.assert_array_equal(back.values, res.values)
    np.testing.assert_array_equal(back.snapshots, np.asarray(res.snapshots))
    assert back.params == res.params and back.info["snapshots"] == res.info["snapshots"]


def test_factory_and_seed_reproducible():
    a = _run(lambda: _mlp(), *_data(), "fast")
    b = _run(lambda: _mlp(), *_data(), "fast")
    np.testing.assert_array_equal(a.values, b.values)
    c = _run(lambda: _mlp(), *_data(), "fast", seed=None)
    assert isinstance(c.info["seed"], int)


def test_fit_under_no_grad():
    data = _data()
    plain = _run(_mlp, *data, "fast", seed=5)
    with torch.no_grad():
        inside = _run(_mlp, *data, "fast", seed=5)
    np.testing.assert_array_equal(plain.values, inside.values)


def test_progress_bar(capsys):
    _run(_mlp(), *_data(), "fast", progress=False)
    assert capsys.readouterr().err == ""
    _run(_mlp(), *_data(), "fast", progress=True)
    assert "snapshots" in capsys.readouterr().err


def test_class_weight():
    torch.manual_seed(12)
    net, data = _mlp(), _data()
    plain = _run(net, *data, "fast")
    w = _run(net, *data, "fast", class_weight=[1.0, 3.0, 0.5])
    assert not np.allclose(plain.values, w.values, atol=1e-3)        # the target gradient changed
    assert w.params["class_weight"] == [1.0, 3.0, 0.5]
    bal_fast = _run(net, *data, "fast", class_weight="balanced")
    bal_ref = _run(net, *data, "reference", class_weight="balanced")
    np.testing.assert_allclose(bal_fast.values, bal_ref.values, rtol=RTOL, atol=ATOL)


def test_numpy_inputs_and_custom_loss():
    torch.manual_seed(13)
    xs, ys, xt, yt = _data()

    def huber(out, y):
        return nn.functional.huber_loss(out, y, reduction="none").mean(1)

    ys_f = nn.functional.one_hot(ys, 3).float().numpy()
    yt_f = nn.functional.one_hot(yt, 3).float().numpy()
    _assert_equal_backends(_mlp(), xs.numpy(), ys_f, xt.numpy(), yt_f, loss=huber)


# ----------------------------------------------------------------------------- checkpointing
class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("kill_after", [1, 3, 4])
def test_checkpoint_resume_matches_uninterrupted(tmp_path, monkeypatch, kill_after):
    """Kill a run after `kill_after` saved epochs (3 = just after restart 0 ended, so the resumed
    run must re-initialise the model first; 4 = inside restart 1), rerun with
    the same checkpoint_dir: values and snapshots equal an uninterrupted run exactly. Dropout is
    on, so the RNG states must be restored too."""
    net = nn.Sequential(nn.Linear(6, 16), nn.Dropout(0.2), nn.Mish(), nn.LayerNorm(16), nn.Linear(16, 3))
    data = _data()
    kw = {"epochs": 3, "restarts": 2, "keep_snapshots": True, "seed": 21}
    full = _run(net, *data, "fast", **kw)

    real_save = dvgs_checkpoint.write_state
    calls = {"n": 0}

    def dying_save(path, state):
        real_save(path, state)
        calls["n"] += 1
        if calls["n"] == kill_after:
            raise _Interrupt

    monkeypatch.setattr(dvgs_checkpoint, "write_state", dying_save)
    with pytest.raises(_Interrupt):
        _run(net, *data, "fast", checkpoint_dir=tmp_path, **kw)
    monkeypatch.setattr(dvgs_checkpoint, "write_state", real_save)
    resumed = _run(net, *data, "fast", checkpoint_dir=tmp_path, **kw)
    np.testing.assert_array_equal(resumed.values, full.values)
    np.testing.assert_array_equal(np.asarray(resumed.snapshots), np.asarray(full.snapshots))
    assert resumed.info["snapshots"] == full.info["snapshots"]
    # A finished checkpoint is reused as is.
    again = _run(net, *data, "fast", checkpoint_dir=tmp_path, **kw)
    np.testing.assert_array_equal(again.values, full.values)


def test_checkpoint_of_another_run_is_refused(tmp_path):
    data = _data()
    _run(_mlp(), *data, "fast", checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        _run(_mlp(), *data, "fast", checkpoint_dir=tmp_path, lr=0.5)


# ----------------------------------------------------------------------------- validation
def _bad(match, *args, model=None, **kw):
    xs, ys, xt, yt = _data()
    args = args or (xs, ys, xt, yt)
    with pytest.raises(ValueError, match=match):
        DVGS(model or _mlp(), progress=False, **kw).fit(*args)


def test_validation_errors():
    xs, ys, xt, yt = _data()
    _bad("y_source", xs, ys[:-1], xt, yt)
    _bad("y_target", xs, ys, xt, yt[:-2])
    nan = xs.clone()
    nan[3, 2] = float("nan")
    _bad("x_source", nan, ys, xt, yt)
    inf = xt.clone()
    inf[0, 0] = float("inf")
    _bad("x_target", xs, ys, inf, yt)
    _bad("x_target", xs, ys, xt[:0], yt[:0])
    _bad("y_source", xs, ys.float(), xt, yt)
    _bad("y_target", xs, ys, xt, yt + 0.5)
    _bad("y_source", xs, ys + 3, xt, yt)               # model has 3 outputs
    _bad("y_target", xs, ys, xt, yt - 1)
    _bad("similarity", similarity="euclid")
    _bad("loss", loss="hinge")
    _bad("backend", backend="gpu")
    _bad("optimizer", optimizer="lbfgs")
    _bad("grad_params", grad_params=["nope"])
    _bad("grad_params", grad_params=[])
    _bad("epochs", epochs=0)
    _bad("x_target", xs, ys, xt[:, :4], yt)
    _bad("y_source", xs, None, xt, yt)
    _bad("class_weight", class_weight=[1.0, 2.0])
    _bad("class_weight", class_weight=[1.0, 2.0, 1.0], loss="mse")
    _bad("model", model=nn.Sequential(nn.Linear(6, 3)).requires_grad_(False))
    _bad("loss", loss=lambda o, y: (o - y).square().mean())    # not per-sample


def test_mismatched_devices():
    xs, ys, xt, yt = _data()
    meta = torch.empty(xt.shape, device="meta")
    _bad("devices", xs, ys, meta, yt)
