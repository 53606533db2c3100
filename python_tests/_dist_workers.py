"""Spawned worker for the 2-process gloo tests (test_distributed_dvgs.py / test_distributed_shapley.py).

The cases are plain functions of keyword arguments, so the parent computes the single-process
reference with the very same code. One spawn runs a list of cases (torch import dominates the
start-up time of a spawned process).
"""
from __future__ import annotations

import os
import socket
import time
import traceback

import numpy as np
import torch
from torch import nn


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------ cases
def _data(n: int, m: int, d: int = 6, classes: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    xs, xt = torch.randn(n, d, generator=g), torch.randn(m, d, generator=g)
    w = torch.randn(d, classes, generator=g)
    ys, yt = (xs @ w).argmax(1), (xt @ w).argmax(1)
    ys[: n // 5] = (ys[: n // 5] + 1) % classes          # some flipped labels
    return xs, ys, xt, yt


def dvgs_case(n=50, m=24, dropout=0.3, checkpoint_dir=None, overflow_row=None, **kw):
    """A small MLP with dropout and LayerNorm; returns what the tests compare. overflow_row: that
    source row is set to 3e38 (finite, but its forward overflows: only its rank fails)."""
    from dvgs_fast import DVGS
    torch.manual_seed(5)
    net = nn.Sequential(nn.Linear(6, 16), nn.Dropout(dropout), nn.Mish(), nn.LayerNorm(16), nn.Linear(16, 3))
    kw = {"epochs": 3, "target_batch_size": 8, "source_batch_size": 8, "seed": 3, "progress": False,
          "lr": 1e-2, **kw}
    if checkpoint_dir is not None:
        kw["checkpoint_dir"] = checkpoint_dir
    xs, ys, xt, yt = _data(n, m)
    if overflow_row is not None:
        xs[overflow_row] = 3e38
    res = DVGS(net, **kw).fit(xs, ys, xt, yt)
    out = {"values": np.asarray(res.values), "k": res.info["snapshots"], "info": {
        k: res.info.get(k) for k in ("world_size", "rank", "shard", "steps")}}
    if checkpoint_dir is not None:
        out["files"] = sorted(os.listdir(checkpoint_dir))
    return out


def shapley_case(n=16, m=30, **kw):
    from dvgs_fast.methods.shapley import DataShapley
    kw = {"model": "logistic", "max_permutations": 6, "check_every": 4, "refit_steps": 15,
          "convergence_tol": None, "seed": 11, "progress": False, "truncation_patience": 3, **kw}
    res = DataShapley(**kw).fit(*_data(n, m, classes=2, seed=1))
    keys = ("stopped_by", "permutations_done", "permutations_started", "mean_refits_per_permutation",
            "world_size", "rank")
    return {"values": np.asarray(res.values), "info": {k: res.info.get(k) for k in keys}}


def semivalue_case(n=16, m=30, cls="DataBanzhaf", **kw):
    """The semivalue core's other samplers and the resampling phase on the sharded driver."""
    from dvgs_fast.methods import semivalues
    kw = {"refit_steps": 15, "check_every": 4, "seed": 11, "progress": False, **kw}
    res = getattr(semivalues, cls)(**kw).fit(*_data(n, m, classes=2, seed=1))
    keys = ("stopped_by", "subsets_done", "permutations_done", "resampling_samples", "world_size", "rank")
    out = {"values": np.asarray(res.values), "info": {k: res.info.get(k) for k in keys}}
    if res.resampling_stderr is not None:
        out["resampling_stderr"] = np.asarray(res.resampling_stderr)
    return out


def groundtruth_case(kind="lds", cache_dir=None):
    """A small MLP's LDS (2 seeds x 2 blocks) or LOO (4 blocks) ground truth, sharded by blocks."""
    from dvgs_fast.evaluate import counterfactual as cf
    xs, ys, xt, yt = _data(40, 10)
    rec = cf.TrainingRecipe(lambda: nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)), optimizer="adam",
                            lr=0.02, epochs=3, batch_size=8)
    kw = {"cache_dir": cache_dir, "progress": False}
    if kind == "lds":
        gt = cf.lds_ground_truth(rec, xs, ys, xt, yt, n_subsets=7, seeds=2, block_size=4, **kw)
    else:
        gt = cf.loo_ground_truth(rec, xs, ys, xt, yt, indices=9, seeds=1, block_size=3, **kw)
    return {"outputs": gt.outputs, "world_size": gt.info["world_size"], "status": gt.status}


def influence_case(n=45, m=5, solver="ekfac", factors_dir=None, **kw):
    """InfluenceFunction's fit() values and attribute() matrix on a small MLP (trained inside)."""
    from dvgs_fast.methods.influence import InfluenceFunction
    torch.manual_seed(5)
    net = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3)).double()
    xs, ys, xt, yt = (t.double() if t.is_floating_point() else t for t in _data(n, m))
    kw = {"epochs": 2, "source_batch_size": 8, "hessian_batch_size": 10, "seed": 3, "progress": False,
          "lr": 1e-2, "damping": 0.5, **kw}
    if factors_dir is not None:
        kw["factors_dir"] = factors_dir
    method = InfluenceFunction(net, solver=solver, **kw)
    res = method.fit(xs, ys, xt, yt)
    att = method.attribute(xs, ys, xt, yt, dtype="float64")
    return {"values": np.asarray(res.values), "scores": np.asarray(att.scores),
            "info": {k: res.info.get(k) for k in ("world_size", "rank", "n_hessian")}}


CASES = {"dvgs": dvgs_case, "shapley": shapley_case, "influence": influence_case, "groundtruth": groundtruth_case,
         "semivalue": semivalue_case}


# ------------------------------------------------------------------------------------ worker
def run_cases(rank: int, world: int, port: int, cases: list, q, linger_on_error: float = 0.0) -> None:
    """Join a gloo group on 127.0.0.1:port, run [(name, case, kwargs)], put (rank, {name: out}, err).

    linger_on_error: after a failure, report it and stay alive that long with the group open (a
    caller that catches the error, a notebook), instead of closing the connections at once."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    out, err = {}, None
    try:
        import torch.distributed as dist
        import datetime
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
        try:
            for name, case, kwargs in cases:
                kwargs = dict(kwargs)
                if kwargs.get("checkpoint_dir") is not None:      # a folder per rank would hide clashes
                    kwargs["checkpoint_dir"] = str(kwargs["checkpoint_dir"])
                out[name] = CASES[case](**kwargs)
        except Exception:  # noqa: BLE001
            if not linger_on_error:
                raise
            q.put((rank, out, traceback.format_exc()))
            time.sleep(linger_on_error)
            return
        finally:
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - reported to the parent
        err = traceback.format_exc()
    q.put((rank, out, err))


def spawn(cases: list, world: int = 2, timeout: float = 240.0) -> list[dict]:
    """Run `cases` on `world` spawned gloo processes; returns each rank's {name: out}, rank order."""
    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=run_cases, args=(r, world, port, cases, q)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        got = sorted((q.get(timeout=timeout) for _ in procs), key=lambda t: t[0])
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    errors = [e for _, _, e in got if e]
    if errors:
        raise AssertionError("a worker failed:\n" + "\n".join(errors))
    for p in procs:
        assert p.exitcode == 0, p.exitcode
    return [o for _, o, _ in got]
