"""InfluenceFunction as a user runs it: factors_dir (reuse across calls, refusal of another
computation's folder naming what differs, resume after a kill equal to an uninterrupted run, the
trained model kept), max_time, training a factory model, input errors before any work, two gloo
ranks equal to one process, and the command line (--method influence --solver ...)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from dvgs_fast import grads, runstate
from dvgs_fast.methods.base import BudgetWarning
from dvgs_fast.methods.influence import InfluenceFunction
from dvgs_fast.methods.influence import method as method_mod

KW = dict(progress=False, seed=0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _data(n=40, m=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs, xq = torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randn(m, 5, generator=g, dtype=torch.float64)
    return xs, torch.randint(0, 3, (n,), generator=g), xq, torch.randint(0, 3, (m,), generator=g)


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3)).double()


class _Count:
    """Counts calls of a wrapped function (how many blocks a fit really processed)."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *a, **k):
        self.calls += 1
        return self.fn(*a, **k)


# ----------------------------------------------------------------------------- factors_dir
def test_factors_dir_reuses_the_curvature_and_refuses_another(tmp_path, monkeypatch):
    xs, ys, xq, yq = _data()
    model = _mlp()
    count = _Count(grads.fisher_factors)
    monkeypatch.setattr(grads, "fisher_factors", count)
    kw = dict(solver="ekfac", hessian_batch_size=10, factors_dir=tmp_path, **KW)
    first = InfluenceFunction(model, **kw).attribute(xs, ys, xq, yq, dtype="float64")
    assert count.calls == 4                                        # 4 blocks; the second pass on the kept recordings
    assert first.info["left_out"] == ["1.weight", "1.bias"]          # the LayerNorm: no Kronecker factors
    again = InfluenceFunction(model, **kw).attribute(xs, ys, xq, yq, dtype="float64")
    assert count.calls == 4                                        # loaded, nothing refitted
    np.testing.assert_array_equal(np.asarray(again), np.asarray(first))
    other = InfluenceFunction(model, **{**kw, "damping": 0.3}).fit(xs, ys, xq, yq)   # damping: applied at solve time
    assert count.calls == 4 and other.info["damping"] == {"0": 0.3, "3": 0.3}
    with pytest.raises(ValueError, match=r"factors_dir: .*settings differ \(fisher: 'ggn' -> 'empirical'\)"):
        InfluenceFunction(model, **{**kw, "fisher": "empirical"}).fit(xs, ys, xq, yq)
    with pytest.raises(ValueError, match="factors_dir: .*the trained weights differ"):
        InfluenceFunction(_mlp(seed=1), **kw).fit(xs, ys, xq, yq)
    # another solver keeps its own files in the same folder
    InfluenceFunction(model, **{**kw, "solver": "direct"}).fit(xs, ys, xq, yq)
    assert {p.name for p in tmp_path.glob("*.pt")} == {"influence_ekfac_checkpoint.pt",
                                                        "influence_direct_checkpoint.pt"}


@pytest.mark.parametrize("solver", ["ekfac", "direct", "datainf"])
def test_killed_fit_resumes_to_the_uninterrupted_values(tmp_path, monkeypatch, solver):
    xs, ys, xq, yq = _data(n=50)
    model = _mlp()
    kw = dict(solver=solver, hessian_batch_size=10, damping=0.5, **KW)
    ref = InfluenceFunction(model, **kw).fit(xs, ys, xq, yq).values
    monkeypatch.setattr(method_mod, "SAVE_EVERY_S", 0.0)           # save after every block / column chunk
    real = runstate.write_state
    writes = []

    def dying(path, state):
        writes.append(path)
        if len(writes) == 3:
            raise KeyboardInterrupt                                  # killed while saving its 3rd state
        real(path, state)

    monkeypatch.setattr(runstate, "write_state", dying)
    with pytest.raises(KeyboardInterrupt):
        InfluenceFunction(model, factors_dir=tmp_path, **kw).fit(xs, ys, xq, yq)
    monkeypatch.setattr(runstate, "write_state", real)
    saved = runstate.read_state(runstate.CheckpointFiles(tmp_path, None, method=f"influence_{solver}"))
    assert saved is not None                                         # a partial state was kept
    count = _Count(grads.fisher_factors)
    monkeypatch.setattr(grads, "fisher_factors", count)
    res = InfluenceFunction(model, factors_dir=tmp_path, **kw).fit(xs, ys, xq, yq)
    np.testing.assert_allclose(res.values, ref, rtol=1e-12, atol=1e-15)
    if solver == "ekfac":
        # resumed after the 2 blocks saved: the 3 left, then the second pass records only the 2
        # blocks this process did not record itself (the others' recordings were kept)
        assert count.calls == 3 + 2


def test_factory_model_is_trained_once_and_kept(tmp_path, monkeypatch):
    xs, ys, xq, yq = _data()
    trained = []
    real = method_mod.T.train_plain
    monkeypatch.setattr(method_mod.T, "train_plain", lambda *a, **k: (trained.append(1), real(*a, **k)))
    kw = dict(solver="cg", epochs=3, lr=0.05, damping=1.0, factors_dir=tmp_path, **KW)
    a = InfluenceFunction(lambda: _mlp(), **kw).fit(xs, ys, xq, yq)
    b = InfluenceFunction(lambda: _mlp(), **kw).fit(xs, ys, xq, yq)
    assert len(trained) == 1 and a.info["epochs"] == 3
    np.testing.assert_array_equal(a.values, b.values)
    untrained = InfluenceFunction(_mlp(), solver="cg", damping=1.0, **KW).fit(xs, ys, xq, yq)
    assert untrained.info["epochs"] == 0 and np.abs(untrained.values - a.values).max() > 1e-6
    assert InfluenceFunction(lambda: _mlp(), epochs=None, **KW).settings()["epochs"] is None


def test_max_time_stops_fit_and_attribute(tmp_path):
    xs, ys, xq, yq = _data()
    with pytest.warns(BudgetWarning):
        res = InfluenceFunction(_mlp(), solver="ekfac", max_time=1e-9, factors_dir=tmp_path, **KW).fit(xs, ys, xq, yq)
    assert res.status == "stopped" and res.info["stopped_by"] == "max_time" and (res.counts == 0).all()
    with pytest.raises(ValueError, match="max_time"):
        InfluenceFunction(_mlp(), solver="cg", max_time=1e-9, **KW).attribute(xs, ys, xq, yq)
    # the folder holds the stopped run's state; without a budget the run completes from it
    done = InfluenceFunction(_mlp(), solver="ekfac", factors_dir=tmp_path, **KW).fit(xs, ys, xq, yq)
    ref = InfluenceFunction(_mlp(), solver="ekfac", **KW).fit(xs, ys, xq, yq)
    np.testing.assert_allclose(done.values, ref.values, rtol=1e-12)


@pytest.mark.parametrize("solver", ["cg", "datainf"])
def test_max_time_running_out_while_preconditioning(monkeypatch, solver):
    """The budget ends inside the queries' preconditioning (CG's iterations, DataInf's passes),
    after the curvature: fit() returns "stopped" with nothing scored, attribute() a one-line
    max_time error (not a bare internal exception)."""
    from dvgs_fast.methods import base
    from dvgs_fast.methods.influence import method as M
    xs, ys, xq, yq = _data()
    # the clock runs out at the first budget check inside precondition()
    monkeypatch.setattr(base.Budget, "time_up", lambda self: getattr(self, "_armed", False))
    real = M.SOLVERS[solver].precondition

    def armed(self, prob, G):
        prob.run.budget._armed = True
        return real(self, prob, G)
    monkeypatch.setattr(M.SOLVERS[solver], "precondition", armed)
    monkeypatch.setattr(M.SOLVERS[solver], "hessian_row_scores", lambda *a: None)
    with pytest.warns(BudgetWarning):
        res = InfluenceFunction(_mlp(), solver=solver, damping=1.0, max_time=1e6, **KW).fit(xs, ys, xq, yq)
    assert res.status == "stopped" and (res.counts == 0).all()
    with pytest.raises(ValueError, match="max_time: the budget ran out while preconditioning"):
        InfluenceFunction(_mlp(), solver=solver, damping=1.0, max_time=1e6, **KW).attribute(xs, ys, xq, yq)


# ----------------------------------------------------------------------------- input errors
@pytest.mark.parametrize("kw, needle", [
    ({"solver": "newton"}, "solver"), ({"damping": -1.0}, "damping"), ({"fisher": "true"}, "fisher"),
    ({"optimizer": "adamw"}, "optimizer"), ({"rank": 0}, "rank"), ({"dtype": "float16"}, "dtype"),
    ({"hessian_batch_size": 0}, "hessian_batch_size"), ({"distributed": "yes"}, "distributed"),
    ({"solver": "ekfac", "fisher": "sampled", "loss": lambda o, y: (o - y).square().sum(1)}, "fisher"),
])
def test_bad_settings_fail_in_the_constructor(kw, needle):
    with pytest.raises(ValueError, match=needle):
        InfluenceFunction(_mlp(), **{**KW, **kw})


def test_bad_inputs_fail_before_any_work(monkeypatch):
    xs, ys, xq, yq = _data()
    count = _Count(grads.fisher_factors)
    monkeypatch.setattr(grads, "fisher_factors", count)
    m = InfluenceFunction(_mlp(), **KW)
    bad = xq.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="x_query"):
        m.attribute(xs, ys, bad, yq)
    with pytest.raises(ValueError, match="y_query"):
        m.attribute(xs, ys, xq, yq + 5)
    with pytest.raises(ValueError, match="x_target"):
        m.fit(xs, ys, bad, yq)
    with pytest.raises(ValueError, match="x_source"):
        m.fit(xs[:0], ys[:0], xq, yq)
    with pytest.raises(ValueError, match="hessian_samples: 41 is more than the 40"):
        InfluenceFunction(_mlp(), hessian_samples=41, **KW).fit(xs, ys, xq, yq)
    monkeypatch.setattr(method_mod, "MAX_DIRECT_PARAMS", 50)
    with pytest.raises(ValueError, match="solver: 'direct' forms the 91 x 91 Hessian"):
        InfluenceFunction(_mlp(), solver="direct", **KW).fit(xs, ys, xq, yq)
    with pytest.raises(ValueError, match="solver: 'kfac' covers Linear"):
        InfluenceFunction(_mlp(), solver="kfac", grad_params=["1"], **KW).fit(xs, ys, xq, yq)
    assert count.calls == 0


# ----------------------------------------------------------------------------- torchrun
@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    from _dist_workers import spawn
    ck = tmp_path_factory.mktemp("influence_dist")
    # ekfac: factor blocks split 3 + 2 over the ranks, saved per rank; cg: HVPs all-reduced;
    # datainf: 37 rows, uneven source blocks
    cases = [("ekfac", "influence", {"solver": "ekfac", "factors_dir": str(ck)}), ("cg", "influence", {"solver": "cg"}),
             ("datainf", "influence", {"solver": "datainf", "n": 37})]
    return spawn(cases, world=2)


@pytest.mark.parametrize("name,kw", [("ekfac", {"solver": "ekfac"}), ("cg", {"solver": "cg"}),
                                     ("datainf", {"solver": "datainf", "n": 37})])
def test_two_gloo_ranks_equal_one_process(two_ranks, name, kw, monkeypatch):
    from _dist_workers import influence_case
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ref = influence_case(**kw)
    for r, out in enumerate(two_ranks):
        got = out[name]
        assert got["info"]["world_size"] == 2 and got["info"]["rank"] == r
        np.testing.assert_allclose(got["values"], ref["values"], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(got["scores"], ref["scores"], rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------- command line
def test_command_line_influence_and_compare(tmp_path, capsys):
    from dvgs_fast.cli import main
    out = tmp_path / "run"
    rc = main(["run", "--method", "influence", "--solver", "datainf", "--epochs", "5", "--n-source", "120",
               "--n-target", "40", "--no-curves", "--no-progress", "--threads", "1", "--out", str(out)])
    _, err = capsys.readouterr()
    assert rc == 0, err
    m = json.loads((out / "metrics.json").read_text())
    assert m["method"] == "influence" and m["method_settings"]["solver"] == "datainf"
    assert 0 <= m["metrics"]["auroc"] <= 1
    rc = main(["run", "--method", "dvgs", "--solver", "cg", "--no-progress", "--out", str(tmp_path / "x")])
    _, err = capsys.readouterr()
    assert rc == 2 and "--solver" in err                              # a method without solvers refuses it
    # compare: --solver goes to the influence runs only
    rc = main(["compare", "--method", "influence,random", "--solver", "kfac", "--epochs", "3", "--n-source", "80",
               "--n-target", "30", "--no-curves", "--no-progress", "--threads", "1", "--out", str(tmp_path / "c")])
    _, err = capsys.readouterr()
    assert rc == 0, err
