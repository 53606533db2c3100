"""DVGS: fast vs reference backend, interleaved in one run at 1 thread (CPU and wall time,
bench/_timing.py), end to end and per snapshot; and the fast snapshot against one plain batched
forward+backward of the same samples (the bound on any per-sample-gradient scorer).

    pytest bench/bench_dvgs.py -m "not slow"     # short runs of both backends (~3 min)
    pytest bench/bench_dvgs.py                   # + 300-snapshot reference, autoencoder reference

Two Adult networks (real UCI Adult when ../shared/data has it, else generated data of that shape;
1000 source / 400 target, 20% flipped labels):
  plain  MLP 108-100-100-2, Mish, dropout 0.25, target batch 512, source batch 1024 (defaults);
  paper  the DVGS paper's exp1 network and settings: 108-100-100-2, Mish, InstanceNorm1d (per
         sample), dropout 0.5, target batch 500, source batch 400, Adam lr 1e-3.
Both backends share the target-training step (forward + backward + Adam on a target batch) and
differ only in the snapshot (scoring the source samples); timings["train"] / ["score"] of each
fit are in extra_info, so the end-to-end ratio can be read against that shared part.
Autoencoder: 978-256-64-256-978 (LINCS-shaped), MSE, N = 20,000 generated source samples.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _timing import Comparison, record
from dvgs_fast import DVGS
from dvgs_fast.grads import FastScorer

warnings.filterwarnings("ignore", message="input's size at dim")  # InstanceNorm1d on [N, h], as the original


# ------------------------------------------------------------------------------ workloads
def plain_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(108, 100), nn.Dropout(0.25), nn.Mish(),
                         nn.Linear(100, 100), nn.Dropout(0.25), nn.Mish(), nn.Linear(100, 2))


def paper_mlp() -> nn.Module:
    """The DVGS paper's Adult network: per-sample InstanceNorm1d after each hidden block."""
    return nn.Sequential(nn.Linear(108, 100), nn.Dropout(0.5), nn.Mish(), nn.InstanceNorm1d(100),
                         nn.Linear(100, 100), nn.Dropout(0.5), nn.Mish(), nn.InstanceNorm1d(100),
                         nn.Linear(100, 2))


CONFIGS = {
    "plain": (plain_mlp, {}),
    "paper": (paper_mlp, {"target_batch_size": 500, "source_batch_size": 400, "lr": 1e-3}),
}


def ae_model() -> nn.Module:
    return nn.Sequential(nn.Linear(978, 256), nn.ReLU(), nn.Linear(256, 64), nn.ReLU(),
                         nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 978))


_ADULT = None


def adult_data():
    """Real Adult task when available (with the flipped-label mask), else generated data."""
    global _ADULT
    if _ADULT is None:
        try:
            from dvgs_fast.datasets import flip_labels, load_adult, make_split
            ds = load_adult()
            sp = make_split(ds.X, ds.y, 1000, 400, 0, seed=0, train_idx=np.arange(ds.meta["n_train"]))
            ys, flipped = flip_labels(sp.y_source, 0.2, seed=0)
            _ADULT = (sp.x_source, ys, sp.x_target, sp.y_target, flipped, "adult")
        except Exception:   # no data folder: same shapes, generated
            g = np.random.default_rng(0)
            x = (g.random((1400, 108)) < 0.15).astype(np.float32)
            y = (x[:, :10].sum(1) > 1.5).astype(np.int64)
            _ADULT = (x[:1000], y[:1000], x[1000:], y[1000:], None, "generated (Adult-shaped)")
    return _ADULT


def ae_data(n=20_000, m=400):
    g = torch.Generator().manual_seed(0)
    basis = torch.randn(32, 978, generator=g) / 6
    xs = torch.randn(n, 32, generator=g) @ basis + 0.1 * torch.randn(n, 978, generator=g)
    xt = torch.randn(m, 32, generator=g) @ basis + 0.1 * torch.randn(m, 978, generator=g)
    return xs, xt


FAST, REF = 'DVGS(backend="fast")', 'DVGS(backend="reference")'


def _split(res) -> dict:
    """What a fit spent on the shared target step and on scoring (wall seconds)."""
    snaps = max(1, int(res.info.get("snapshots", 1)))
    return {"train_s": res.timings.get("train"), "score_s": res.timings.get("score"), "snapshots": snaps,
            "score_s_per_snapshot": res.timings.get("score", float("nan")) / snaps}


def _adult_pair(benchmark, config, epochs, restarts, rounds, group):
    make, kw = CONFIGS[config]
    xs, ys, xt, yt, flipped, data = adult_data()
    seen = {}

    def fit(backend):
        def run():
            res = DVGS(make, backend=backend, epochs=epochs, restarts=restarts, seed=0, progress=False,
                       **kw).fit(xs, ys, xt, yt)
            seen[backend] = res
            return res.values
        return run

    cmp = Comparison({FAST: fit("fast"), REF: fit("reference")}).run(benchmark, rounds, group)
    extra = {"config": config, "data": data, "epochs": epochs, "restarts": restarts,
             "fast": _split(seen["fast"]), "reference": _split(seen["reference"])}
    f, r = extra["fast"], extra["reference"]
    extra["per_snapshot_score_ratio"] = r["score_s_per_snapshot"] / f["score_s_per_snapshot"]
    if flipped is not None:
        from dvgs_fast.evaluate import detection_auroc
        extra["auroc_fast"] = detection_auroc(seen["fast"].values, flipped)
        extra["auroc_reference"] = detection_auroc(seen["reference"].values, flipped)
    record(benchmark, cmp, REF, threads=1, **extra)


@pytest.mark.parametrize("config", ["plain", "paper"])
def test_adult_short(benchmark, config):
    """1 restart x 10 epochs (10 snapshots), both backends, 3 interleaved rounds."""
    _adult_pair(benchmark, config, 10, 1, 3, f"DVGS Adult {config} network, 1 restart x 10 epochs, 1 thread(s)")


@pytest.mark.slow
@pytest.mark.parametrize("config", ["plain", "paper"])
def test_adult_full(benchmark, config):
    """3 restarts x 100 epochs (300 snapshots), both backends, one round."""
    _adult_pair(benchmark, config, 100, 3, 1, f"DVGS Adult {config} network, 3 restarts x 100 epochs, 1 thread(s)")


@pytest.mark.parametrize("config", ["plain", "paper"])
def test_adult_full_fast_only(benchmark, config):
    """The 300-snapshot run of the fast backend alone (its reference pair is slow-marked)."""
    make, kw = CONFIGS[config]
    xs, ys, xt, yt, flipped, data = adult_data()
    seen = {}

    def run():
        seen["r"] = DVGS(make, backend="fast", epochs=100, restarts=3, seed=0, progress=False, **kw).fit(xs, ys, xt, yt)
        return seen["r"].values

    cmp = Comparison({FAST: run}).run(benchmark, 1, f"DVGS Adult {config} network, 3 restarts x 100 epochs "
                                                    f"(fast only), 1 thread(s)")
    extra = {"config": config, "data": data, "fast": _split(seen["r"])}
    if flipped is not None:
        from dvgs_fast.evaluate import detection_auroc
        extra["auroc_fast"] = detection_auroc(seen["r"].values, flipped)
    record(benchmark, cmp, None, threads=1, **extra)


# ------------------------------------------------------------------------------ autoencoder
def _ae_fit(backend, xs, xt):
    return DVGS(ae_model, loss="mse", backend=backend, epochs=1, seed=0, progress=False,
                source_batch_size=1024).fit(xs, None, xt, None)


@pytest.mark.slow
def test_ae_snapshot_pair(benchmark):
    """One epoch = one snapshot over N = 20k, both backends (the reference takes minutes)."""
    xs, xt = ae_data()
    cmp = Comparison({FAST: lambda: _ae_fit("fast", xs, xt).values,
                      REF: lambda: _ae_fit("reference", xs, xt).values}, warmup=0).run(
        benchmark, 1, "DVGS autoencoder 978-256-64-256-978, N=20k, 1 snapshot, 1 thread(s)")
    record(benchmark, cmp, REF, threads=1, n_source=xs.shape[0])


def test_ae_snapshot_fast(benchmark):
    xs, xt = ae_data()
    cmp = Comparison({FAST: lambda: _ae_fit("fast", xs, xt).values}).run(
        benchmark, 3, "DVGS autoencoder 978-256-64-256-978, N=20k, 1 snapshot (fast only), 1 thread(s)")
    record(benchmark, cmp, None, threads=1, n_source=xs.shape[0])


# ------------------------------------------------------------------------------ snapshot bound
def _overhead_setup(kind):
    torch.manual_seed(0)
    if kind in ("plain", "paper"):
        model = CONFIGS[kind][0]()
        xs, ys, *_ = adult_data()
        x, y = torch.as_tensor(xs, dtype=torch.float32), torch.as_tensor(ys)
        chunk = 1024 if kind == "plain" else 400

        def loss(o, t):
            return F.cross_entropy(o, t, reduction="none")
    else:
        model = ae_model()
        x, _ = ae_data()
        y, chunk = x, 1024

        def loss(o, t):
            return (o - t).square().mean(1)
    model.train()
    names = [n for n, _ in model.named_parameters()]
    G = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    return model, x, y, loss, names, G, chunk


@pytest.mark.parametrize("kind", ["plain", "paper", "ae"])
def test_snapshot_vs_plain_fwd_bwd(benchmark, kind):
    """A fast snapshot against one plain batched forward+backward (all parameter gradients) over
    the same source samples in the same chunks: no per-sample scorer can beat the latter by much,
    so the fast snapshot / plain ratio is how close the engine is to its bound."""
    model, x, y, loss, names, G, chunk = _overhead_setup(kind)
    scorer = FastScorer(model, names, loss, "cosine")
    tgt = scorer.target(G)
    chunks = [(a, min(a + chunk, x.shape[0])) for a in range(0, x.shape[0], chunk)]

    def plain():
        for a, b in chunks:
            model.zero_grad(set_to_none=True)
            loss(model(x[a:b]), y[a:b]).sum().backward()

    def fast():
        for a, b in chunks:
            scorer.score(x[a:b], y[a:b], tgt)

    cmp = Comparison({"plain batched forward+backward": plain, "DVGS fast snapshot": fast}).run(
        benchmark, 20 if kind != "ae" else 5, f"DVGS snapshot vs plain forward+backward, {kind}, "
                                               f"N={x.shape[0]}, chunks of {chunk}, 1 thread(s)")
    record(benchmark, cmp, "plain batched forward+backward", threads=1, n_source=int(x.shape[0]), chunk=chunk)
