"""Ghost layers and the gradient methods on them (issue 19), CPU.

    python bench/bench_ghost_methods.py            # everything; writes bench/results/cpu_ghost_methods.json
    python bench/bench_ghost_methods.py --quick    # small sizes (what `pytest bench -m "not slow"` runs)

1. Per snapshot (one DVGS scoring pass over N source samples), three routes side by side:
   `fast` (this issue's ghost routes for Conv / Embedding / norms, Linear as before), `per_layer`
   (the previous fast route for those layers: per-layer torch.func vmap), `reference`
   (vmap(grad) of the whole model + torch cosine). Workloads: the DVGS repo's CIFAR-10 exp3 head
   2048-100-100-10 on [N, 2048] features, a small conv net on 32x32x3 images (3 conv layers with
   GroupNorm), a text model (Embedding 5000x64 + LayerNorm + mean + Linear) on 32 tokens. Also the
   dot-only fast pass (what TracIn / In-Run Shapley / similarity "dot" use).
2. In-Run Data Shapley's cost vs plain training of the same model on the same batches (same
   seed, same steps): SGD order 1 with the whole target set per step and with target
   mini-batches of B/4 and B/16 (auto dot route: pairwise ghost dot where cheaper), B/16 forced
   onto the materialised dot, SGD order 2 (the HVP term), Adam order 1 vs plain Adam training
   (`--inrun-only` re-measures this part alone, exp3 head at B=128 and B=512). Also plain SGD
   training that gathers its batches into a reused buffer (`plain_prealloc`, see there). The
   issue's goal: <= 1.3x.
3. Detection AUROC of 20% flipped labels, breast_cancer and UCI Adult (real data), seeds 0-4,
   for InRunShapley and TracIn with their defaults on the command line's default MLP.

Method: 1 intra-op thread (pinned and recorded); CPU time (time.process_time) and wall time
(time.perf_counter) of every call; the compared sides interleaved round by round in one process
(so load from other jobs hits all sides alike); medians over rounds; load average recorded
before and after. Timings on a shared machine are noisy: read the ratios, not the absolutes.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

torch.set_num_threads(1)

from dvgs_fast._utils import seed_everything  # noqa: E402
from dvgs_fast.grads import FastScorer, ReferenceScorer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "cpu_ghost_methods.json"


# ------------------------------------------------------------------------------ workloads
def exp3_head() -> nn.Module:
    return nn.Sequential(nn.Linear(2048, 100), nn.Mish(), nn.Linear(100, 100), nn.Mish(), nn.Linear(100, 10))


def cnn32() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 3, padding=1), nn.GroupNorm(4, 32), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(64, 10))


def cnn32_wide() -> nn.Module:
    """Wider deep layers (128 and 256 channels at 8x8 and 4x4): few positions, many weights, where
    materialised per-sample gradients are large and the Gram form pays."""
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(64, 128, 3, padding=1), nn.GroupNorm(8, 128), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(128, 256, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(256, 10))


class TextNet(nn.Module):
    def __init__(self, vocab=5000, dim=64, classes=2):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, classes)

    def forward(self, ids):
        return self.fc(self.norm(self.emb(ids.long())).mean(1))


def _inputs(kind: str, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    if kind == "exp3_head":
        return torch.relu(torch.randn(n, 2048, generator=g)), torch.randint(0, 10, (n,), generator=g)
    if kind in ("cnn32", "cnn32_wide"):
        return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)
    ids = torch.randint(0, 5000, (n, 32), generator=g)
    return ids, torch.randint(0, 2, (n,), generator=g)


MODELS = {"exp3_head": exp3_head, "cnn32": cnn32, "cnn32_wide": cnn32_wide, "text": TextNet}


def _ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


def _timed(fn):
    c0, w0 = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.process_time() - c0, time.perf_counter() - w0


def _interleaved(sides: dict, rounds: int) -> dict:
    """{side: {"cpu": median s, "wall": median s}}; one warm-up call each, then round-robin with
    the order rotated every round: a call after one that freed a similar amount of memory
    skips the page faults of fresh allocations (expensive in this VM), which otherwise favours
    whichever side runs in that position (measured: up to 1.5x on the conv workloads)."""
    for fn in sides.values():
        fn()
    keys = list(sides)
    cpu = {k: [] for k in sides}
    wall = {k: [] for k in sides}
    for r in range(rounds):
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:
            _, c, w = _timed(sides[k])
            cpu[k].append(c)
            wall[k].append(w)
    return {k: {"cpu": statistics.median(cpu[k]), "wall": statistics.median(wall[k]), "rounds": rounds} for k in sides}


# --------------------------------------------------------------------------- 1. per snapshot
def _force_per_layer(scorer: FastScorer) -> FastScorer:
    """The previous fast route for the new ghost layers: their per-layer torch.func vmap."""
    for m, kind, w, b in scorer.ghost:
        full = [(local, nm) for local, nm in (("weight", w), ("bias", b)) if nm]
        scorer.generic.append((m, full))
    scorer.ghost = []
    scorer._warned = True        # it is slow on purpose here: no SlowRouteWarning
    return scorer


def bench_snapshot(kind: str, n: int, rounds: int, chunk: int) -> dict:
    torch.manual_seed(0)
    model = MODELS[kind]()
    model.train()
    x, y = _inputs(kind, n)
    names = [nm for nm, _ in model.named_parameters()]
    G = {nm: torch.randn_like(p) for nm, p in model.named_parameters()}
    fast = FastScorer(model, names, _ce, "cosine")
    per_layer = _force_per_layer(FastScorer(model, names, _ce, "cosine"))
    ref = ReferenceScorer(model, names, _ce, "cosine")
    chunks = [(a, min(a + chunk, n)) for a in range(0, n, chunk)]

    def run(scorer, need_sq=True):
        tgt = scorer.target(G)
        out = []
        for a, b in chunks:
            if isinstance(scorer, FastScorer) and not need_sq:
                out.append(scorer.stats(x[a:b], y[a:b], G, need_sq=False)[0])
            else:
                out.append(scorer.score(x[a:b], y[a:b], tgt))
        return torch.cat(out)

    params = [p for _, p in model.named_parameters()]

    def plain():
        # The floor of any snapshot: one ordinary forward + backward of the same chunks (the
        # per-sample statistics need at least the activations and output gradients this computes).
        for a, b in chunks:
            torch.autograd.grad(_ce(model(x[a:b]), y[a:b]).mean(), params)

    sides = {"fast": lambda: run(fast), "fast_dot_only": lambda: run(fast, False),
             "per_layer": lambda: run(per_layer), "reference": lambda: run(ref), "plain_fwd_bwd": plain}
    res = _interleaved(sides, rounds)
    res["fast_over_plain_fwd_bwd"] = res["fast"]["cpu"] / res["plain_fwd_bwd"]["cpu"]
    a, b = run(fast).double(), run(ref).double()
    res["max_abs_diff_fast_vs_reference"] = float((a - b).abs().max())
    res["routes"] = fast.describe()["routes"]
    res.update(n=n, chunk=chunk)
    return res


# --------------------------------------------------------------------------- 2. In-Run overhead
# (N source, M target, batch size B, epochs) per workload
INRUN_FULL = {"exp3_head": (4096, 512, 128, 3), "exp3_head_b512": (4096, 512, 512, 3), "cnn32": (1024, 128, 64, 1),
              "text": (4096, 512, 64, 2)}

def _plain_training(model, xs, ys, epochs, batch_size, lr, seed, optimizer="sgd"):
    gen = seed_everything(seed)
    opt = (torch.optim.SGD if optimizer == "sgd" else torch.optim.Adam)(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(xs.shape[0], generator=gen).split(batch_size):
            opt.zero_grad(set_to_none=True)
            _ce(model(xs[idx]), ys[idx]).mean().backward()
            opt.step()


def _plain_training_prealloc(model, xs, ys, epochs, batch_size, lr, seed):
    """Plain SGD training that gathers each batch into one reused buffer: xs[idx] allocates a fresh
    [B, ...] tensor per step, and a fresh large allocation costs page faults in this VM (B=128 on
    the exp3 head: ~10% of a step). In-Run's fused pass reuses its buffers, so this side shows how
    much of its ratio that saving accounts for."""
    gen = seed_everything(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    model.train()
    bx = torch.empty((batch_size, *xs.shape[1:]), dtype=xs.dtype)
    by = torch.empty((batch_size, *ys.shape[1:]), dtype=ys.dtype)
    for _ in range(epochs):
        for idx in torch.randperm(xs.shape[0], generator=gen).split(batch_size):
            b = idx.shape[0]
            opt.zero_grad(set_to_none=True)
            _ce(model(torch.index_select(xs, 0, idx, out=bx[:b])), torch.index_select(ys, 0, idx, out=by[:b])
                ).mean().backward()
            opt.step()


def bench_inrun(kind: str, n: int, m: int, batch_size: int, epochs: int, rounds: int) -> dict:
    """Plain training vs In-Run Shapley on the same batches. SGD order 1 (auto route: pairwise
    ghost dot where cheaper; the fused target pass where the model allows it, result
    info["target_pass"]) with the whole target set and target mini-batches of B/4 and B/16;
    the same B/16 with the separate eval-mode target pass, and forced onto the materialised
    route (which keeps the separate pass: the implementation before the pairwise dot); Adam
    order 1 (materialised: P is elementwise) against plain Adam training; SGD order 2."""
    from dvgs_fast import InRunShapley
    model_kind = kind.split("_b")[0]          # exp3_head_b512: the exp3 head at another batch size
    xs, ys = _inputs(model_kind, n, seed=1)
    xt, yt = _inputs(model_kind, m, seed=2)
    xs, xt = xs.float(), xt.float()          # TextNet casts ids back to long
    torch.manual_seed(0)
    init = MODELS[model_kind]()
    import copy
    small, tiny = max(1, batch_size // 4), max(1, batch_size // 16)
    lr = {"sgd": 0.01, "adam": 1e-3}
    last = {}

    def inrun(key, optimizer="sgd", separate=False, **kw):
        def go():
            method = InRunShapley(init, epochs=epochs, batch_size=batch_size, lr=lr[optimizer],
                                  optimizer=optimizer, seed=0, progress=False, **kw)
            if separate:
                method._allow_fused = False          # the separate eval-mode target pass
            last[key] = method.fit(xs, ys, xt, yt)
        return go

    sides = {"plain": lambda: _plain_training(copy.deepcopy(init), xs, ys, epochs, batch_size, lr["sgd"], 0),
             "plain_prealloc": lambda: _plain_training_prealloc(copy.deepcopy(init), xs, ys, epochs, batch_size,
                                                                lr["sgd"], 0),
             "order1_full_target": inrun("order1_full_target"),
             f"order1_target_{small}": inrun(f"order1_target_{small}", target_batch_size=small),
             f"order1_target_{tiny}": inrun(f"order1_target_{tiny}", target_batch_size=tiny),
             f"order1_target_{tiny}_separate": inrun(f"order1_target_{tiny}_separate", target_batch_size=tiny,
                                                     separate=True),
             f"order1_target_{tiny}_materialised": inrun(f"order1_target_{tiny}_materialised",
                                                         target_batch_size=tiny, dot_route="materialised"),
             f"order2_target_{small}": inrun(f"order2_target_{small}", target_batch_size=small, order=2),
             "plain_adam": lambda: _plain_training(copy.deepcopy(init), xs, ys, epochs, batch_size, lr["adam"], 0,
                                                   "adam"),
             f"adam_order1_target_{tiny}": inrun(f"adam_order1_target_{tiny}", "adam", target_batch_size=tiny)}
    res = _interleaved(sides, rounds)
    for k in list(sides):
        if not k.startswith("plain"):
            base = res["plain_adam" if k.startswith("adam") else "plain"]
            res[k]["ratio_cpu"] = res[k]["cpu"] / base["cpu"]
            res[k]["ratio_wall"] = res[k]["wall"] / base["wall"]
            if not k.startswith("adam"):
                res[k]["ratio_cpu_vs_prealloc"] = res[k]["cpu"] / res["plain_prealloc"]["cpu"]
            res[k]["dot_routes"] = last[k].info["dot_routes"]
            res[k]["target_pass"] = last[k].info["target_pass"]
            res[k]["phase_wall_s"] = {p: round(last[k].timings[p], 4) for p in ("setup", "target", "train", "values")}
    res.update(n=n, m=m, batch_size=batch_size, epochs=epochs,
               steps=epochs * -(-n // batch_size))
    return res


# --------------------------------------------------------------------------- 3. detection
def bench_detection(dataset: str, seeds, quick: bool) -> dict:
    """The methods' defaults (Adam lr 1e-3, 50 epochs, batch 64) on the command line's default
    tabular MLP (in-100-100-2, Mish, dropout 0.5, LayerNorm without affine)."""
    from dvgs_fast import InRunShapley, TracIn
    from dvgs_fast.cli._models import mlp
    from dvgs_fast.datasets import flip_labels, load_dataset
    from dvgs_fast.evaluate import detection_auroc
    n_s, n_t = (300, 100) if dataset == "breast_cancer" else (1000, 400)
    ds = load_dataset(dataset)
    settings = {"epochs": 5} if quick else {}
    out = {"settings": settings or "method defaults", "model": "cli mlp(d, 2, dropout=0.5)", "n_source": n_s,
           "n_target": n_t, "noise": "label:0.2"}
    for name, make in (("inrun_shapley", lambda: InRunShapley), ("tracin", lambda: TracIn)):
        aurocs, secs = [], []
        for seed in seeds:
            sp = ds.split(n_source=n_s, n_target=n_t, n_test=50, seed=seed)
            y_noisy, flipped = flip_labels(sp.y_source, 0.2, seed=seed)
            d = sp.x_source.shape[1]
            t0 = time.process_time()
            res = make()(lambda: mlp(d, 2, dropout=0.5), seed=seed, progress=False, **settings).fit(
                sp.x_source, y_noisy, sp.x_target, sp.y_target)
            secs.append(time.process_time() - t0)
            aurocs.append(detection_auroc(res.values, flipped))
        out[name] = {"auroc": aurocs, "auroc_mean": float(np.mean(aurocs)), "auroc_2sd": float(2 * np.std(aurocs)),
                     "cpu_s_median": statistics.median(secs)}
    return out


# ------------------------------------------------------------------------------------ driver
def machine() -> dict:
    cpu = ""
    try:
        cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "")
    except OSError:
        pass
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M"), "loadavg_start": os.getloadavg()}


def run_all(quick: bool) -> dict:
    out = {"machine": machine(), "quick": quick}
    sizes = {"exp3_head": (256, 256), "cnn32": (64, 64), "cnn32_wide": (32, 32), "text": (256, 256)} if quick else \
        {"exp3_head": (2048, 1024), "cnn32": (256, 128), "cnn32_wide": (128, 64), "text": (2048, 1024)}
    rounds = 2 if quick else 6
    out["snapshot"] = {k: bench_snapshot(k, n, rounds, chunk) for k, (n, chunk) in sizes.items()}
    inrun_cfg = {"exp3_head": (512, 128, 128, 1), "cnn32": (128, 32, 32, 1), "text": (512, 128, 64, 1)} if quick else \
        INRUN_FULL
    out["inrun_overhead"] = {k: bench_inrun(k, *cfg, rounds=rounds) for k, cfg in inrun_cfg.items()}
    seeds = [0] if quick else [0, 1, 2, 3, 4]
    out["detection"] = {d: bench_detection(d, seeds, quick) for d in (["breast_cancer"] if quick else
                                                                      ["breast_cancer", "adult"])}
    out["machine"]["loadavg_end"] = os.getloadavg()
    return out


def summary(res: dict) -> str:
    lines = [f"machine: {res['machine']}"]
    for k, r in res["snapshot"].items():
        lines.append(f"snapshot {k} (N={r['n']}): " + ", ".join(
            f"{s} {r[s]['cpu'] * 1e3:.1f} ms cpu / {r[s]['wall'] * 1e3:.1f} ms wall"
            for s in ("fast", "fast_dot_only", "per_layer", "reference"))
            + f"; ref/fast {r['reference']['cpu'] / r['fast']['cpu']:.1f}x, per_layer/fast "
            f"{r['per_layer']['cpu'] / r['fast']['cpu']:.1f}x (cpu); max|diff| {r['max_abs_diff_fast_vs_reference']:.2g}")
    for k, r in res["inrun_overhead"].items():
        if k == "machine":
            continue
        lines.append(f"inrun {k} (N={r['n']}, M={r['m']}, B={r['batch_size']}, {r['steps']} steps): plain "
                     f"{r['plain']['cpu']:.3f} s cpu (adam {r['plain_adam']['cpu']:.3f} s); " + ", ".join(
                         f"{s} {v['ratio_cpu']:.2f}x cpu / {v['ratio_wall']:.2f}x wall"
                         + (f" ({v['target_pass']})" if "target_pass" in v else "")
                         for s, v in r.items() if isinstance(v, dict) and "ratio_cpu" in v))
    for d, r in res["detection"].items():
        if d == "machine":
            continue
        lines.append(f"detection {d}: " + ", ".join(
            f"{m} AUROC {r[m]['auroc_mean']:.3f} {['%.3f' % a for a in r[m]['auroc']]} ({r[m]['cpu_s_median']:.1f} s cpu)"
            for m in ("inrun_shapley", "tracin")))
    return "\n".join(lines)


def test_ghost_methods_quick(capsys):
    """The quick sizes (pytest bench -m "not slow"); prints the summary."""
    res = run_all(quick=True)
    for r in res["snapshot"].values():
        assert r["max_abs_diff_fast_vs_reference"] < 1e-3
    with capsys.disabled():
        print("\n" + summary(res))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--snapshot-only", metavar="KIND,N,CHUNK", help="re-measure one snapshot workload and merge "
                    "it into the existing results file")
    ap.add_argument("--detection-only", action="store_true", help="re-run part 3 and merge it into the results file")
    ap.add_argument("--inrun-only", action="store_true", help="re-run part 2 (full sizes) and merge it into the "
                    "results file")
    args = ap.parse_args()
    if args.inrun_only:
        res = json.loads(Path(args.out).read_text())
        m0 = machine()
        res["inrun_overhead"] = {k: bench_inrun(k, *cfg, rounds=6) for k, cfg in INRUN_FULL.items()}
        res["inrun_overhead"]["machine"] = {**m0, "loadavg_end": os.getloadavg()}
    elif args.detection_only:
        res = json.loads(Path(args.out).read_text())
        res["detection"] = {d: bench_detection(d, [0, 1, 2, 3, 4], False) for d in ("breast_cancer", "adult")}
        res["detection"]["machine"] = {**machine(), "loadavg_end": os.getloadavg()}
    elif args.snapshot_only:
        kind, n, chunk = args.snapshot_only.split(",")
        res = json.loads(Path(args.out).read_text())
        res["snapshot"][kind] = bench_snapshot(kind, int(n), 6, int(chunk))
        res["snapshot"][kind]["machine"] = {**machine(), "loadavg_end": os.getloadavg()}
    else:
        res = run_all(args.quick)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1, default=float))
    print(summary(res))
    sys.exit(0)
