"""DVGS: data valuation by gradient similarity (public class, validation, the training loop).

The algorithm, as the original DVGS code runs it: the model is trained only on the target
(clean) set. Each epoch shuffles the target into mini-batches; for each mini-batch the target
loss and its gradient G over `grad_params` are computed in train mode. When the global step
counter (never reset, also not between restarts) is a multiple of `compute_every`, every
source sample's own loss gradient g_i is compared with G before the optimizer step, and that
snapshot is kept. Then the optimizer steps on the target loss. `restarts` re-initialize model
and optimizer. The value of a source sample is the mean of its similarities over all snapshots.

Both backends share this loop (same seed -> same target training, same G); they only differ
in the snapshot scorer (reference.py: explicit per-sample gradients; fast.py: per-layer
statistics).

Decisions worth knowing:
* Restart 0 trains the model as passed (a deep copy, or the factory's output); restarts 1, 2, ...
  call `reset_parameters()` on every submodule that has it and build a fresh optimizer.
* Dropout stays active for the source gradients, with an independent mask per source sample.
  The scoring draws from its own random stream, seeded per snapshot from `seed`, so the target
  training (and hence G) is identical whichever backend runs and however it consumes randomness.
  Each source chunk after the first (rows [a, a + source_batch_size)) is reseeded from
  (seed, snapshot, a), so a chunk's masks do not depend on which process scores it.
* Distributed (torchrun, `distributed=`): every rank trains the identical target model (same
  seed, same data; G needs no communication) and scores a contiguous range of whole source
  chunks; the per-sample sums are all-reduced at the end (zeros outside a rank's range, so the
  sum is exact). Values equal a single-process run with the same seed and source_batch_size,
  dropout included. Checkpoints are per rank (`dvgs_checkpoint.rank<r>.pt`; snapshots likewise,
  holding only that rank's rows); resume with the same number of ranks.
* BatchNorm: the target gradient G is taken in train mode with batch statistics (as in the
  original). A per-sample gradient is not defined under batch statistics (a batch of one has
  no variance; a batch of many couples the samples), so while scoring, BatchNorm layers run in
  eval mode: each source sample is normalised with the running statistics, independently of
  the other samples in its chunk, and the running statistics are not updated by the scoring.
  Early in training the running statistics are still close to their initial values, so with
  BatchNorm early snapshots compare G against source gradients of a slightly different
  function; prefer LayerNorm/InstanceNorm/GroupNorm when that matters. Buffers of all other
  modules are restored after each snapshot, so scoring never changes the model.
* class_weight only shapes the target loss (a weighted mean, like nn.CrossEntropyLoss(weight=)).
  A source sample's loss is the criterion applied to that sample alone, where the weight
  cancels (w * l / w), exactly as in the original.
"""
from __future__ import annotations

import hashlib
import io
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dvgs_fast import _validation as V
from dvgs_fast._io import atomic_write_bytes
from dvgs_fast._utils import build_model, iter_chunks, make_optimizer, reset_parameters, seed_everything
from dvgs_fast.distributed import context_for
from dvgs_fast.methods.base import Estimate, Run, Valuation
from dvgs_fast.result import stats_from_sums
from dvgs_fast.methods.dvgs.fast import FastScorer
from dvgs_fast.methods.dvgs.reference import ReferenceScorer
from dvgs_fast.methods.dvgs._values_store import ValuesStore
from dvgs_fast.methods.dvgs.sources import SourceRows, as_source, is_chunked_input, is_source_view

SIMILARITIES = ("cosine", "dot", "projection", "distance")
BACKENDS = ("fast", "reference")
OPTIMIZERS = ("adam", "adamw", "sgd")
_CKPT_NAME = "dvgs_checkpoint.pt"
_SNAP_NAME = "dvgs_snapshots.npy"
_EPS = 1e-8


class DVGS(Valuation):
    """Data Valuation by Gradient Similarity.

    >>> res = DVGS(model, loss="cross_entropy", epochs=100).fit(x_source, y_source, x_target, y_target)
    >>> res.values          # [N_source], higher = more valuable

    model             nn.Module (deep-copied; yours is not changed) or a zero-argument factory.
    loss              "cross_entropy" (integer labels, output [N, C]), "mse", or a callable
                      (output, target) -> per-sample losses [N]. With "mse"/callable,
                      y_source/y_target may be None: the target is the input (autoencoders).
    epochs, restarts  target-training epochs per restart; number of restarts.
    lr, optimizer, weight_decay   "adam" | "adamw" | "sgd" on all model parameters.
    compute_every     take a similarity snapshot every this many target steps (global count).
    target_batch_size / source_batch_size   target mini-batch; source chunk (bounds memory).
    similarity        "cosine" | "dot" | "projection" | "distance" (-|g_i - G|).
    grad_params       None (all trainable parameters), or parameter names / module-name prefixes
                      (e.g. ["net.4"] selects net.4.weight and net.4.bias) compared by the
                      similarity. Training always updates every parameter.
    class_weight      None, a per-class weight sequence, or "balanced" (from y_target) for the
                      cross-entropy target loss.
    backend           "fast" (default) or "reference" (torch.func per-sample gradients).
    device            None: where tensor inputs live, else CUDA when available, else CPU.
    seed              makes the run reproducible (int); None draws one (stored in result.info).
    max_time          wall-clock budget in seconds, checked after every snapshot; a run stopped by
                      it returns the mean over the snapshots taken, with status "stopped".
    progress          tqdm bar over epochs with the snapshot count.
    checkpoint_dir    save state after every snapshot and epoch (model, optimizer, RNG states,
                      counters; the per-sample sums are a memory-mapped file there); a rerun
                      with the same directory and arguments resumes from the last completed
                      snapshot, even mid-epoch, and gives the same values as an uninterrupted run.

    x_source may also be a chunked source that need not fit in memory (see sources.py): a
    GctxReader (``load_lincs(..., chunked=True)``), a map-style torch Dataset (items x or (x, y)),
    or a zero-argument callable returning an iterator of (x_chunk, y_chunk_or_None) chunks. It is
    re-read once per snapshot (IO-bound for huge files) and gives the same values as the same
    rows in memory. The running sums are always memory-mapped (checkpoint_dir, else a temp file).
    keep_snapshots    keep every snapshot: result.snapshots is a memory-mapped [N, K] array
                      (in checkpoint_dir, else an anonymous temporary file). Distributed: only
                      this rank's rows (result.info["shard"]) are filled.

    result.stderr is each value's standard error over all snapshots of all restarts (NaN with
    fewer than two); result.counts the number of snapshots averaged.
    distributed       None: automatic (a torchrun launch with WORLD_SIZE > 1, or an initialised
                      process group); True: require it; False: run alone even under torchrun.
                      Source chunks are split across ranks; see the module docstring.
    """

    name = "dvgs"
    requires_labels = False      # autoencoders: y = x when both label sets are None

    def __init__(self, model: nn.Module | Callable[[], nn.Module], loss: str | Callable = "cross_entropy",
                 epochs: int = 100, restarts: int = 1, lr: float = 1e-3, optimizer: str = "adam",
                 weight_decay: float = 0.0, compute_every: int = 1, target_batch_size: int = 512,
                 source_batch_size: int = 1024, similarity: str = "cosine", grad_params: Any = None,
                 class_weight: Any = None, backend: str = "fast", device: Any = None, seed: int | None = None,
                 progress: bool = True, checkpoint_dir: str | os.PathLike | None = None,
                 keep_snapshots: bool = False, distributed: bool | None = None, max_time: float | None = None):
        if not isinstance(model, nn.Module) and not callable(model):
            raise ValueError(f"model: expected an nn.Module or a zero-argument callable returning one, "
                             f"got {type(model).__name__}")
        if not callable(loss):
            V.check_choice(loss, "loss", V.LOSSES)
        self.model = model
        self.loss = loss
        self.epochs = V.check_positive_int(epochs, "epochs")
        self.restarts = V.check_positive_int(restarts, "restarts")
        self.lr = V.check_positive_float(lr, "lr")
        self.optimizer = V.check_choice(optimizer.lower() if isinstance(optimizer, str) else optimizer,
                                        "optimizer", OPTIMIZERS)
        self.weight_decay = V.check_positive_float(weight_decay, "weight_decay", allow_zero=True)
        self.compute_every = V.check_positive_int(compute_every, "compute_every")
        self.target_batch_size = V.check_positive_int(target_batch_size, "target_batch_size")
        self.source_batch_size = V.check_positive_int(source_batch_size, "source_batch_size")
        self.similarity = V.check_choice(similarity, "similarity", SIMILARITIES)
        self.backend = V.check_choice(backend, "backend", BACKENDS)
        if grad_params is not None:
            if isinstance(grad_params, str):
                grad_params = [grad_params]
            grad_params = list(grad_params)
            if not grad_params or not all(isinstance(g, str) for g in grad_params):
                raise ValueError(f"grad_params: expected None or a non-empty list of parameter names, "
                                 f"got {grad_params!r}")
        self.grad_params = grad_params
        if class_weight is not None and loss != "cross_entropy":
            raise ValueError(f"class_weight: only used with loss='cross_entropy', got loss={loss!r}")
        if isinstance(class_weight, str) and class_weight != "balanced":
            raise ValueError(f"class_weight: expected None, 'balanced' or a sequence of weights, got {class_weight!r}")
        self.class_weight = class_weight
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        self.keep_snapshots = bool(keep_snapshots)
        if distributed is not None and not isinstance(distributed, bool):
            raise ValueError(f"distributed: expected None, True or False, got {distributed!r}")
        self.distributed = distributed
        super().__init__(device=device, seed=seed, max_time=max_time, progress=progress)

    # ------------------------------------------------------------------------------------------
    def _fit(self, x_source, y_source, x_target, y_target, base_run: Run) -> Estimate:
        """Train on the target set, scoring the source set."""
        t_start = time.perf_counter()
        timings = {"setup": 0.0, "train": 0.0, "score": 0.0, "checkpoint": 0.0}
        ctx = context_for(self.distributed, base_run.device)
        try:
            run = _prepare(self, x_source, y_source, x_target, y_target, ctx, base_run)
            timings["setup"] = time.perf_counter() - t_start
            est = _train_and_score(self, run, timings, base_run)
        finally:
            ctx.close()                       # only if fit() initialised the process group
        est.info.update({"n_source": run.n_source, "n_target": run.n_target, **run.scorer.describe()})
        est.timings = timings
        return est


# ============================================================================== losses
def _make_losses(loss: Any, class_weight: torch.Tensor | None):
    """(per-sample loss [N], mean target loss) for the configured criterion."""
    if loss == "cross_entropy":
        def per_sample(out, y):
            return F.cross_entropy(out, y, reduction="none").reshape(out.shape[0], -1).mean(1)

        def batch(out, y):
            if class_weight is None:
                return per_sample(out, y).mean()
            return F.cross_entropy(out, y, weight=class_weight)
    elif loss == "mse":
        def per_sample(out, y):
            return (out - y.reshape(out.shape)).square().reshape(out.shape[0], -1).mean(1)

        def batch(out, y):
            return per_sample(out, y).mean()
    else:
        per_sample = loss

        def batch(out, y):
            return loss(out, y).mean()
    return per_sample, batch


# ============================================================================== preparation
class _Run:
    """Everything fit() derives from its arguments before training starts."""


def _prepare(cfg: DVGS, x_source, y_source, x_target, y_target, ctx, base_run: Run) -> _Run:
    device = ctx.device_for(base_run.device)      # distributed: a bare 'cuda' is this rank's GPU

    if is_chunked_input(x_source):
        # Out of core (sources.py): a GctxReader, torch Dataset or iterator factory, streamed
        # batch by batch each snapshot; checked up front on its first rows, then as it streams.
        xs = SourceRows(as_source(x_source, y_source))
    else:
        xs = V.as_float_tensor(x_source, "x_source")
    xt = V.as_float_tensor(x_target, "x_target")
    V.check_same_features(xs, xt, "x_source", "x_target")
    is_ce = cfg.loss == "cross_entropy"

    def labels(y, x, name):
        if y is None:
            if is_ce:
                raise ValueError(f"{name}: labels are required for loss='cross_entropy'")
            return None                                  # autoencoder: the target is the input
        if is_ce or cfg.loss == "mse":
            t = V.as_labels(y, name, loss=cfg.loss)
        else:
            t = y.detach() if isinstance(y, torch.Tensor) else torch.as_tensor(np.asarray(y))
            if t.dim() == 0 or t.shape[0] == 0:
                raise ValueError(f"{name}: is empty (0 labels)")
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name}: contains NaN/Inf")
        V.check_same_length(x, t, "x_source" if name == "y_source" else "x_target", name)
        return t

    if is_source_view(xs):
        ys = xs.labels if y_target is not None else None   # no y_target: autoencoder
        if ys is None and is_ce:
            raise ValueError("y_source: labels are required for loss='cross_entropy' (a chunked source "
                             "yields (x, y) chunks, or pass y_source as an array)")
    else:
        ys = labels(y_source, xs, "y_source")
    yt = labels(y_target, xt, "y_target")
    if (ys is None) != (yt is None):
        raise ValueError(f"{'y_target' if yt is None else 'y_source'}: is None but "
                         f"{'y_source' if yt is None else 'y_target'} is given; pass both or neither")

    run = _Run()
    run.device = device
    run.ctx = ctx
    # Distributed: one checkpoint (and snapshot file) per rank.
    run.ckpt_name = _CKPT_NAME if not ctx.enabled else _CKPT_NAME.replace(".pt", f".rank{ctx.rank}.pt")
    run.snap_name = _SNAP_NAME if not ctx.enabled else _SNAP_NAME.replace(".npy", f".rank{ctx.rank}.npy")
    # A resumed run without an explicit seed must reuse the interrupted run's seed.
    seed = cfg.seed
    ckpt = None
    if cfg.checkpoint_dir is not None and (cfg.checkpoint_dir / run.ckpt_name).exists():
        ckpt = torch.load(cfg.checkpoint_dir / run.ckpt_name, map_location="cpu", weights_only=False)
        if seed is None:
            seed = int(ckpt["seed"])
    if seed is None:
        seed = base_run.seed
    seed = ctx.broadcast_object(seed)    # a drawn seed must be the same on every rank
    run.seed = base_run.seed = seed
    run.gen = seed_everything(seed)

    model = build_model(cfg.model, "model")
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise ValueError("model: has no trainable parameters")
    dtype = next(p.dtype for _, p in params if p.is_floating_point())
    model.to(device)
    xs, xt = xs.to(dtype), xt.to(dtype)
    if ys is not None and ys.is_floating_point():
        ys, yt = ys.to(dtype), yt.to(dtype)

    # grad_params: exact names or module prefixes; each entry must select something.
    if cfg.grad_params is None:
        names = [n for n, _ in params]
    else:
        all_named = dict(model.named_parameters())
        names = []
        for entry in cfg.grad_params:
            hit = [n for n in all_named if n == entry or n.startswith(entry + ".")]
            if not hit:
                raise ValueError(f"grad_params: {entry!r} names no parameter of the model "
                                 f"(parameters: {', '.join(list(all_named)[:20])}"
                                 f"{', ...' if len(all_named) > 20 else ''})")
            frozen = [n for n in hit if not all_named[n].requires_grad]
            if frozen:
                raise ValueError(f"grad_params: {frozen[0]!r} does not require grad")
            names += [n for n in hit if n not in names]
        order = {n: i for i, (n, _) in enumerate(model.named_parameters())}
        names.sort(key=order.__getitem__)

    # A quick eval-mode forward on two target samples checks output/label compatibility now,
    # not after an hour of training (eval mode: no dropout randomness, no BatchNorm update).
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            probe_out = model(xt[:2].to(device))
    except Exception as exc:
        raise ValueError(f"x_target: the model cannot run on samples of shape {tuple(xt.shape[1:])} "
                         f"({type(exc).__name__}: {exc})") from exc
    finally:
        model.train(was_training)
    if not isinstance(probe_out, torch.Tensor):
        raise ValueError(f"model: must return a tensor, returned {type(probe_out).__name__}")

    class_weight = None
    if is_ce:
        if probe_out.dim() < 2:
            raise ValueError(f"model: cross_entropy needs outputs [N, n_classes], got shape {tuple(probe_out.shape)}")
        n_classes = int(probe_out.shape[1])
        for y, name in ((ys, "y_source"), (yt, "y_target")):
            if is_source_view(y):
                continue                         # streamed: labels are checked by the loss
            lo, hi = int(y.min()), int(y.max())
            if lo < 0 or hi >= n_classes:
                raise ValueError(f"{name}: labels must be in [0, {n_classes}) (the model has {n_classes} outputs), "
                                 f"found range [{lo}, {hi}]")
        if cfg.class_weight is not None:
            if isinstance(cfg.class_weight, str):      # "balanced", from the target labels
                counts = torch.bincount(yt, minlength=n_classes).to(torch.float64)
                w = torch.where(counts > 0, len(yt) / (n_classes * counts.clamp_min(1)), torch.zeros_like(counts))
            else:
                cw = cfg.class_weight
                w = (cw.detach().cpu() if isinstance(cw, torch.Tensor) else torch.as_tensor(np.asarray(cw, dtype=np.float64)))
                w = w.to(torch.float64).reshape(-1)
                if w.numel() != n_classes:
                    raise ValueError(f"class_weight: has {w.numel()} entries but the model has {n_classes} classes")
                if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or not bool((w > 0).any()):
                    raise ValueError("class_weight: weights must be finite, >= 0 and not all zero")
            class_weight = w.to(dtype=dtype, device=device)
    sample_loss, batch_loss = _make_losses(cfg.loss, class_weight)

    ys_ = xs[:2] if ys is None else ys[:2]
    try:
        with torch.no_grad():
            model.eval()
            per = sample_loss(probe_out, ys_.to(device))
    except Exception as exc:
        raise ValueError(f"{'y_source' if ys is not None else 'x_source'}: the loss cannot compare the model "
                         f"output {tuple(probe_out.shape)} with targets {tuple(ys_.shape)} "
                         f"({type(exc).__name__}: {exc})") from exc
    finally:
        model.train(was_training)
    if not isinstance(per, torch.Tensor) or tuple(per.shape) != (probe_out.shape[0],):
        raise ValueError(f"loss: must return one loss per sample (shape [N]), got "
                         f"{tuple(per.shape) if isinstance(per, torch.Tensor) else type(per).__name__}")

    run.model, run.names, run.dtype = model, names, dtype
    run.xs, run.ys, run.xt, run.yt = xs, ys, xt.to(device), (None if yt is None else yt.to(device))
    run.n_source, run.n_target = xs.shape[0], xt.shape[0]
    run.sample_loss, run.batch_loss = sample_loss, batch_loss
    scorer_cls = FastScorer if cfg.backend == "fast" else ReferenceScorer
    run.scorer = scorer_cls(model, names, sample_loss, cfg.similarity, _EPS)
    run.ckpt = ckpt
    run.fingerprint = _fingerprint(cfg, run) if cfg.checkpoint_dir is not None else None
    if ckpt is not None and ckpt["fingerprint"] != run.fingerprint:
        raise ValueError(f"checkpoint_dir: {cfg.checkpoint_dir} holds a checkpoint of a different run "
                         f"(settings, data or model differ); use another directory or delete "
                         f"{cfg.checkpoint_dir / run.ckpt_name}")
    return run


def _fingerprint(cfg: DVGS, run: _Run) -> str:
    """Hash of everything that determines the values: settings, data and the initial model."""
    h = hashlib.blake2b(digest_size=16)
    s = cfg.settings()
    for k in ("source_batch_size",   # chunking does not change the values beyond rounding
              "max_time", "checkpoint_dir", "distributed", "device"):   # a resume may change these
        s.pop(k)
    s["seed"] = run.seed
    s["keep_snapshots"] = cfg.keep_snapshots    # resuming must find the snapshot file it wrote
    if run.ctx.enabled:                 # a rank's rows depend on the number of ranks and the chunk size
        s["world_size"] = run.ctx.world_size
        s["source_batch_size"] = cfg.source_batch_size
    h.update(repr(sorted(s.items())).encode())
    for t in (run.xs, run.ys, run.xt, run.yt):
        if is_source_view(t):
            if t is run.xs:
                h.update(t.identity())           # chunked source: its identity, not its bytes
            continue
        if t is not None:
            h.update(repr((tuple(t.shape), str(t.dtype))).encode())
            h.update(_raw_bytes(t))
    for k, v in run.model.state_dict().items():
        h.update(k.encode())
        h.update(_raw_bytes(v))
    return h.hexdigest()


def _raw_bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


# ============================================================================== the loop
class _ScoringMode:
    """While scoring: BatchNorm in eval mode (running statistics, see the module docstring),
    every buffer restored afterwards, and randomness from the snapshot's own stream."""

    def __init__(self, model: nn.Module, device: torch.device, snap_seed: int):
        self.model, self.device, self.snap_seed = model, device, snap_seed

    def __enter__(self):
        self.bn = [m for m in self.model.modules()
                   if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
        for m in self.bn:
            m.eval()
        self.buffers = [(b, b.detach().clone()) for b in self.model.buffers()]
        self.rng = torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else [])
        self.rng.__enter__()
        torch.manual_seed(self.snap_seed)
        return self

    def __exit__(self, *exc):
        self.rng.__exit__(*exc)
        with torch.no_grad():
            for b, saved in self.buffers:
                b.copy_(saved)
        for m in self.bn:
            m.train()
        return False


def _snapshot_seed(seed: int, k: int) -> int:
    return int(np.random.SeedSequence([seed, k, 0x44564753]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _chunk_seed(seed: int, k: int, start: int) -> int:
    return int(np.random.SeedSequence([seed, k, start, 0x43484E4B]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _rank_rows(run: _Run, chunk: int) -> tuple[int, int]:
    """This rank's source rows: a contiguous range of whole chunks (the chunk grid of a
    single-process run), so every chunk's dropout masks are the same as there."""
    n_chunks = math.ceil(run.n_source / chunk)
    c0, c1 = run.ctx.shard(n_chunks)
    return min(c0 * chunk, run.n_source), min(c1 * chunk, run.n_source)


def _save_checkpoint(path: Path, state: dict) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def _train_and_score(cfg: DVGS, run: _Run, timings: dict, base_run: Run) -> Estimate:
    from tqdm.auto import tqdm

    model, device, scorer = run.model, run.device, run.scorer
    steps_per_epoch = math.ceil(run.n_target / cfg.target_batch_size)
    n_total = math.ceil(cfg.restarts * cfg.epochs * steps_per_epoch / cfg.compute_every)
    selected = [(n, p) for n, p in model.named_parameters() if n in set(run.names)]
    optimizer = make_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.weight_decay)
    restart, epoch, step, k = 0, 0, 0, 0
    pos = 0                   # next target batch of the current epoch (a resume may start mid-epoch)
    ckpt = run.ckpt
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng_cpu"])
        if device.type == "cuda" and ckpt.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng_cuda"], device)
        run.gen.set_state(ckpt["rng_shuffle"])
        restart, epoch, step, k = ckpt["restart"], ckpt["epoch"], ckpt["step"], ckpt["k"]
        pos = int(ckpt.get("pos", 0))
    # Per-sample running sums (and kept snapshots) live in memory-mapped files, written as computed.
    store = ValuesStore(run.n_source, cfg.checkpoint_dir, resume=ckpt is not None, n_snapshots=n_total,
                        keep_snapshots=cfg.keep_snapshots,
                        snapshot_dtype=np.float64 if run.dtype == torch.float64 else np.float32,
                        sums_name=run.snap_name.replace("snapshots", "sums"), snap_name=run.snap_name)
    snaps = store.snapshots
    ckpt_path = cfg.checkpoint_dir / run.ckpt_name if cfg.checkpoint_dir is not None else None
    ctx = run.ctx
    lo, hi = _rank_rows(run, cfg.source_batch_size)
    if ctx.enabled and ctx.is_main and math.ceil(run.n_source / cfg.source_batch_size) < ctx.world_size:
        import warnings
        warnings.warn(f"DVGS: {run.n_source} source samples make fewer chunks of source_batch_size="
                      f"{cfg.source_batch_size} than there are ranks ({ctx.world_size}); some ranks have "
                      f"nothing to score. Lower source_batch_size to spread the scoring.", RuntimeWarning,
                      stacklevel=3)
    stopped = None
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    xs, ys = run.xs, run.ys

    def save(pos: int, rng_shuffle) -> None:
        # The sums/snapshots files first, then the small state file (atomic): after a crash the
        # state file never names a snapshot whose sums are not on disk (see _values_store.py).
        store.flush()
        _save_checkpoint(ckpt_path, {
            "fingerprint": run.fingerprint, "seed": run.seed, "restart": restart, "epoch": epoch, "pos": pos,
            "step": step, "k": k, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "rng_shuffle": rng_shuffle})

    bar = tqdm(total=cfg.restarts * cfg.epochs, initial=restart * cfg.epochs + epoch,
               disable=not (cfg.progress and ctx.is_main),
               desc=f"DVGS ({cfg.backend})", unit="epoch", leave=False)
    bar.set_postfix(snapshots=k)
    try:
        while restart < cfg.restarts:
            if restart > 0 and epoch == 0 and pos == 0:
                reset_parameters(model)
                optimizer = make_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.weight_decay)
            while epoch < cfg.epochs:
                epoch_rng = run.gen.get_state()      # a mid-epoch resume redraws this epoch's order
                perm = torch.randperm(run.n_target, generator=run.gen).to(device)
                batches = perm.split(cfg.target_batch_size)
                for bi in range(pos, len(batches)):
                    idx = batches[bi]
                    t0 = time.perf_counter()
                    model.train()
                    optimizer.zero_grad(set_to_none=True)
                    xb = run.xt[idx]
                    yb = xb if run.yt is None else run.yt[idx]
                    loss = run.batch_loss(model(xb), yb)
                    loss.backward()
                    if step % cfg.compute_every == 0:
                        G = {n: (p.grad.detach() if p.grad is not None else torch.zeros_like(p))
                             for n, p in selected}
                        sync()
                        t1 = time.perf_counter()
                        timings["train"] += t1 - t0
                        with _ScoringMode(model, device, _snapshot_seed(run.seed, k)):
                            target = scorer.target(G)
                            for a, b in iter_chunks(hi - lo, cfg.source_batch_size):
                                a, b = a + lo, b + lo
                                if a > 0:        # chunk 0 keeps the snapshot's own stream
                                    torch.manual_seed(_chunk_seed(run.seed, k, a))
                                x = xs[a:b].to(device, non_blocking=True)
                                y = x if ys is None else ys[a:b].to(device, non_blocking=True)
                                sim = scorer.score(x, y, target)
                                store.add(k, a, b, sim.detach().cpu().numpy())
                        k += 1
                        sync()
                        t0 = time.perf_counter()
                        timings["score"] += t0 - t1
                    optimizer.step()
                    step += 1
                    timings["train"] += time.perf_counter() - t0
                    if ckpt_path is not None and (step - 1) % cfg.compute_every == 0 and bi + 1 < len(batches):
                        # Snapshot granularity: a run killed mid-epoch resumes after its last snapshot.
                        t0 = time.perf_counter()
                        save(pos=bi + 1, rng_shuffle=epoch_rng)
                        timings["checkpoint"] += time.perf_counter() - t0
                    # Every rank decides alike (rank 0's clock), so all stop after the same snapshot.
                    if (step - 1) % cfg.compute_every == 0 and base_run.budget.max_time is not None:
                        stopped = ctx.broadcast_object(base_run.budget.exhausted())
                        if stopped:
                            break
                if stopped:
                    break
                pos = 0
                epoch += 1
                if epoch == cfg.epochs:
                    restart, epoch = restart + 1, 0
                if ckpt_path is not None:
                    t0 = time.perf_counter()
                    save(pos=0, rng_shuffle=run.gen.get_state())
                    timings["checkpoint"] += time.perf_counter() - t0
                bar.set_postfix(snapshots=k, refresh=False)
                bar.update(1)
                if epoch == 0:
                    break                       # restart finished: go reset for the next one
            if stopped:
                break
    finally:
        bar.close()
    sums = np.array(store.sums_after(k))          # [2, N]: sum of similarities and of their squares
    if ctx.enabled:                     # zeros outside each rank's rows: the sum is exact
        sums = ctx.all_reduce_sum(sums)
    counts = np.full(run.n_source, k, dtype=np.int64)
    values, stderr = stats_from_sums(sums[0], sums[1], counts)
    store.flush()
    info = {"steps": step, "snapshots": k, "snapshots_planned": n_total}
    if ctx.enabled:
        info.update({"world_size": ctx.world_size, "rank": ctx.rank, "shard": [lo, hi]})
    return Estimate(values=values, stderr=stderr, counts=counts, status="stopped" if stopped else "completed",
                    stop_reason=stopped, info=info,
                    snapshots=None if snaps is None else snaps[:, :k], progress=f"{k} of {n_total} snapshots")
