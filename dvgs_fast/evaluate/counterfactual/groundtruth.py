"""Leave-one-out and random-subset (LDS) ground truth: the retrains, batched, cached, budgeted.

Both are the same computation: a list of row masks per seed, every mask retrained with the
recipe from the seed's initial weights (or from the seed's full-data model, ``warm_start_epochs``)
and every query's output recorded. The masks are cut into blocks of ``block_size`` retrains of one
seed; a block is trained as one batch of networks (retrain.py), saved whole (cache.py), and is
the unit of ``max_time`` (checked before each block) and of torchrun sharding (rank r computes a
contiguous range of the blocks; the outputs are all-reduced). Blocks are the same whatever the
number of ranks, so a run on 1 or 2 processes computes the same numbers.
"""
from __future__ import annotations

import contextlib
import hashlib
import time
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from dvgs_fast import _validation as V
from dvgs_fast.distributed import context_for
from dvgs_fast.methods.base import Budget

from ._data import Data, prepare
from .cache import GroundTruthCache, make_fingerprint
from .outputs import OUTPUTS, default_output
from .recipe import TrainingRecipe, as_recipe, check_seeds
from .results import GroundTruth, LDSGroundTruth, LOOGroundTruth
from .retrain import ENGINES, Retrainer


def loo_ground_truth(recipe: TrainingRecipe, x_source, y_source, x_query, y_query, *, indices: Any = None,
                     seeds: Any = 2, output: str | None = None, warm_start_epochs: int | None = None,
                     n_classes: int | None = None, subset_seed: int = 0, block_size: int = 128,
                     engine: str = "auto", cache_dir: Any = None, max_time: float | None = None,
                     progress: bool = True, distributed: bool | None = None) -> LOOGroundTruth:
    """Leave-one-out ground truth: for each left-out source row i and each seed, retrain without
    row i (same initial weights and data order as the reference trained on every row) and record
    every query's output. ``gt.effects[q, j]`` = output(all rows) - output(without indices[j]).

    indices            None: every source row; an int n: n rows drawn at random (``subset_seed``);
                       or the row indices themselves
    seeds              a count (0, 1, ...) or a list of seeds; the effect is averaged over them,
                       and two or more let ``seed_noise(gt)`` say how much they agree
    output             "margin" (classification default) or "neg_loss" (outputs.py)
    warm_start_epochs  None: every retrain trains from the seed's initialisation for
                       ``recipe.epochs``; an int: the seed's full-data model is trained first and
                       every retrain (the reference included) continues from it for this many
                       epochs with a fresh optimizer state
    block_size         retrains trained at once (and saved together)
    engine             "auto" (batched when the network allows), "batched", or "plain" (one torch
                       loop per retrain: the reference)
    cache_dir          a folder: a rerun with the same settings reuses it, an interrupted run
                       resumes (cache.py); None: nothing is saved
    max_time           seconds; a ground truth stopped by it says so (``status == "stopped"``)
    distributed        None: shard the retrains over torchrun's processes when launched by it
    """
    recipe = as_recipe(recipe)
    data = prepare(x_source, y_source, x_query, y_query, recipe, n_classes)
    N = data.n_source
    idx = _loo_indices(indices, N, subset_seed)
    opts = _common(recipe, data, seeds, output, warm_start_epochs, block_size, engine, max_time, progress,
                   default_order="shared")

    def masks_for(a: int, b: int) -> torch.Tensor:          # retrain 0: all rows; j >= 1: without idx[j - 1]
        m = torch.ones(b - a, N, dtype=torch.bool)
        for r, j in enumerate(range(a, b)):
            if j > 0:
                m[r, int(idx[j - 1])] = False
        return m

    extra = {"n_source": N, "n_left_out": int(len(idx)), "indices_digest": _digest(idx)}
    outputs, done, stopped, info, timings = _run("loo", recipe, data, opts, 1 + len(idx), masks_for, extra,
                                                 cache_dir, distributed)
    return LOOGroundTruth(outputs=outputs, done=done, seeds=opts["seeds"], output=opts["output"],
                          status="stopped" if stopped else "completed", stopped_by=stopped,
                          settings=info.pop("settings"), info=info, timings=timings, indices=idx)


def lds_ground_truth(recipe: TrainingRecipe, x_source, y_source, x_query, y_query, *, n_subsets: int = 100,
                     alpha: float = 0.5, seeds: Any = 2, output: str | None = None,
                     warm_start_epochs: int | None = None, n_classes: int | None = None, subset_seed: int = 0,
                     block_size: int = 128, engine: str = "auto", cache_dir: Any = None,
                     max_time: float | None = None, progress: bool = True,
                     distributed: bool | None = None) -> LDSGroundTruth:
    """Linear-datamodeling ground truth: ``n_subsets`` random subsets of ``int(alpha * N)`` source
    rows (drawn without replacement, ``subset_seed``; as dattri's ``retrain_lds``), each retrained
    with every seed; ``gt.actual[m, q]`` is query q's output after training on subset m, averaged
    over the seeds. Score an attribution with :func:`lds`. The other arguments are those of
    :func:`loo_ground_truth` (the default data order here is "subset": a subset is shuffled on its
    own, as a DataLoader over it would)."""
    recipe = as_recipe(recipe)
    data = prepare(x_source, y_source, x_query, y_query, recipe, n_classes)
    N = data.n_source
    M = V.check_positive_int(n_subsets, "n_subsets")
    if M < 3:
        raise ValueError(f"n_subsets: a rank correlation over subsets needs at least 3, got {M}")
    a = V.check_positive_float(alpha, "alpha")
    k = int(a * N)
    if not 1 <= k < N:
        raise ValueError(f"alpha: gives subsets of {k} of the {N} source rows; choose 0 < alpha < 1 with "
                         f"1 <= int(alpha * N) < N")
    rng = np.random.default_rng(V.check_positive_int(subset_seed, "subset_seed", allow_zero=True))
    masks = np.zeros((M, N), dtype=bool)
    for m in range(M):
        masks[m, rng.choice(N, k, replace=False)] = True
    opts = _common(recipe, data, seeds, output, warm_start_epochs, block_size, engine, max_time, progress,
                   default_order="subset")
    extra = {"n_source": N, "n_subsets": M, "alpha": a, "subset_size": k, "subsets_digest": _digest(masks)}
    outputs, done, stopped, info, timings = _run("lds", recipe, data, opts, M,
                                                 lambda i, j: torch.from_numpy(masks[i:j]), extra, cache_dir,
                                                 distributed)
    return LDSGroundTruth(outputs=outputs, done=done, seeds=opts["seeds"], output=opts["output"],
                          status="stopped" if stopped else "completed", stopped_by=stopped,
                          settings=info.pop("settings"), info=info, timings=timings, masks=masks)


def reference_model(recipe: TrainingRecipe, x_source, y_source, *, seed: int = 0,
                    n_classes: int | None = None) -> nn.Module:
    """The model a ground truth's retrains are compared with: trained on every source row with the
    recipe and seed ``seed`` (retrain 0 of a leave-one-out ground truth without a warm start) --
    the model whose attributions the ground truth judges. Returned in eval mode."""
    recipe = as_recipe(recipe)
    data = prepare(x_source, y_source, x_source[:1], y_source[:1], recipe, n_classes)
    seed = check_seeds([seed], "seed")[0]
    r = Retrainer(recipe, data, order=recipe.order_for("shared"), output=default_output(data.classification))
    trained = r.fit(torch.ones(1, data.n_source, dtype=torch.bool), seed, r.initial_params(seed))
    return r.module_with(r.params_of(trained, 0))


# ---------------------------------------------------------------------------------------------
def _loo_indices(indices: Any, N: int, subset_seed: Any) -> np.ndarray:
    if indices is None:
        return np.arange(N)
    if isinstance(indices, (int, np.integer)) and not isinstance(indices, bool):
        n = int(indices)
        if not 3 <= n <= N:
            raise ValueError(f"indices: the number of rows to leave out must be in [3, {N}], got {n}")
        rng = np.random.default_rng(V.check_positive_int(subset_seed, "subset_seed", allow_zero=True))
        return np.sort(rng.choice(N, n, replace=False))
    arr = np.asarray(indices)
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise ValueError(f"indices: expected None, a count or a 1-D array of row indices, got "
                         f"{arr.dtype} of shape {arr.shape}")
    if arr.size < 3:
        raise ValueError(f"indices: a rank correlation over left-out rows needs at least 3, got {arr.size}")
    if arr.min() < 0 or arr.max() >= N:
        raise ValueError(f"indices: must lie in [0, {N}), found range [{arr.min()}, {arr.max()}]")
    if np.unique(arr).size != arr.size:
        raise ValueError("indices: lists a row twice")
    return arr.astype(np.int64)


def _common(recipe: TrainingRecipe, data: Data, seeds, output, warm_start_epochs, block_size, engine,
            max_time, progress, *, default_order: str) -> dict[str, Any]:
    """Check the settings both kinds share (before any training)."""
    out = default_output(data.classification) if output is None else V.check_choice(output, "output", OUTPUTS)
    if out == "margin" and not data.classification:
        raise ValueError("output: 'margin' needs a classification recipe (loss='cross_entropy'); use 'neg_loss'")
    V.check_choice(engine, "engine", ENGINES)
    return {"seeds": check_seeds(seeds), "output": out,
            "warm_start_epochs": None if warm_start_epochs is None else V.check_positive_int(warm_start_epochs,
                                                                                             "warm_start_epochs"),
            "block_size": V.check_positive_int(block_size, "block_size"), "engine": engine,
            "max_time": V.check_optional_positive_float(max_time, "max_time"),
            "progress": V.check_bool(progress, "progress"), "order": recipe.order_for(default_order)}


def _digest(a: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(a).tobytes() + repr(a.shape).encode(), digest_size=10).hexdigest()


def _run(kind: str, recipe: TrainingRecipe, data: Data, opts: dict, n_jobs: int,
         masks_for: Callable[[int, int], torch.Tensor], extra: dict, cache_dir, distributed):
    """Compute (or read) every block of this rank's share; all-reduce. Returns (outputs [S, J, Q],
    done [S, J], stopped_by, info, timings)."""
    t_wall, t_cpu = time.perf_counter(), time.process_time()
    retrainer = Retrainer(recipe, data, order=opts["order"], output=opts["output"], engine=opts["engine"])
    settings = {"kind": kind, "recipe": recipe.settings(), "seeds": list(opts["seeds"]), "output": opts["output"],
                "data_order": opts["order"], "warm_start_epochs": opts["warm_start_epochs"],
                "block_size": opts["block_size"], "engine": retrainer.kind, "out_dim": data.out_dim, **extra}
    ctx = context_for(distributed, torch.device(recipe.device))
    try:
        return _run_blocks(kind, recipe, data, opts, n_jobs, masks_for, settings, retrainer, ctx, cache_dir,
                           t_wall, t_cpu)
    finally:
        ctx.close()                                   # only if this call initialised the process group


def _run_blocks(kind, recipe, data, opts, n_jobs, masks_for, settings, retrainer, ctx, cache_dir, t_wall, t_cpu):
    """This rank's blocks: read from the cache, or trained (until max_time), then gathered."""
    seeds, Q, B = opts["seeds"], data.n_query, opts["block_size"]
    cache = None
    if cache_dir is not None:
        fp = make_fingerprint(kind, settings, retrainer.template, recipe.loss, data.digest)
        cache = GroundTruthCache(cache_dir, kind, fp, rank=ctx.rank, world_size=ctx.world_size)
    blocks = [(si, a, min(a + B, n_jobs)) for si in range(len(seeds)) for a in range(0, n_jobs, B)]
    lo, hi = ctx.shard(len(blocks))
    outputs = np.zeros((len(seeds), n_jobs, Q))
    done = np.zeros((len(seeds), n_jobs))
    counts = np.zeros(3)                      # retrains computed, retrains read from the cache, CPU seconds
    budget = Budget(opts["max_time"])
    starts: dict[int, tuple] = {}
    from tqdm.auto import tqdm
    with contextlib.ExitStack() as stack:
        if cache is not None:
            stack.enter_context(cache)
        bar = stack.enter_context(tqdm(total=sum(b - a for _, a, b in blocks[lo:hi]), unit="retrain",
                                       desc=f"{kind.upper()} ground truth", leave=False, dynamic_ncols=True,
                                       disable=not (opts["progress"] and ctx.is_main)))
        for bi in range(lo, hi):
            si, a, b = blocks[bi]
            got = cache.load_block(bi, (b - a, Q)) if cache is not None else None
            if got is not None:
                counts[1] += b - a
            elif budget.time_up():
                continue                          # compute no more; finished blocks are still read
            else:
                if si not in starts:
                    starts[si] = _start(retrainer, seeds[si], opts["warm_start_epochs"], cache, data)
                start, epochs = starts[si]
                got = retrainer.outputs(retrainer.fit(masks_for(a, b), seeds[si], start, epochs))
                if not np.isfinite(got).all():
                    raise ValueError(f"recipe: a retrain of seed {seeds[si]} diverged (non-finite outputs); "
                                     f"lower the lr or add weight_decay")
                if cache is not None:
                    cache.save_block(bi, got)
                counts[0] += b - a
            outputs[si, a:b] = got
            done[si, a:b] = 1
            bar.update(b - a)
    counts[2] = time.process_time() - t_cpu
    if ctx.enabled:                           # ranks hold disjoint blocks: a sum gathers them
        outputs, done, counts = (ctx.all_reduce_sum(x) for x in (outputs, done, counts))
    info = {"settings": settings, **retrainer.info(), "world_size": ctx.world_size,
            "cache": None if cache is None else str(cache.dir)}
    timings = {"wall": time.perf_counter() - t_wall, "cpu": time.process_time() - t_cpu,
               "cpu_all_ranks": float(counts[2]), "retrains_computed": int(counts[0]),
               "retrains_cached": int(counts[1])}
    done = done > 0
    return outputs, done, (None if done.all() else "max_time"), info, timings


def _start(retrainer: Retrainer, seed: int, warm_epochs: int | None, cache, data: Data) -> tuple:
    """The weights a seed's retrains start from, and their epochs (None: the recipe's)."""
    init = retrainer.initial_params(seed)
    if warm_epochs is None:
        return init, None
    warm = cache.load_warm(seed) if cache is not None else None
    if warm is None:
        full = torch.ones(1, data.n_source, dtype=torch.bool)
        warm = retrainer.params_of(retrainer.fit(full, seed, init), 0)
        if cache is not None:
            cache.save_warm(seed, warm)
    return {k: v.to(device=data.x.device, dtype=data.x.dtype) for k, v in warm.items()}, warm_epochs


__all__ = ["loo_ground_truth", "lds_ground_truth", "reference_model", "GroundTruth"]
