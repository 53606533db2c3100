"""DVGS preparation: fit()'s arguments -> a checked, typed run description (RunSpec).

Everything that can be wrong with the inputs is found here, before any training: shapes and
labels, the model's output against the loss (one forward of at most two samples of each set, so
N = 1 works), grad_params, class_weight, BatchNorm against a one-sample target batch, and a
checkpoint that belongs to another run.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dvgs_fast import _validation as V
from dvgs_fast._utils import as_model_input, build_model, embedding_hint, model_input_dtype, seed_everything
from dvgs_fast.distributed import DistContext
from dvgs_fast.methods.base import Run
from dvgs_fast import runstate
from dvgs_fast.grads import FastScorer, ReferenceScorer, SampleLoss, cast_labels, make_sample_loss
from dvgs_fast.runstate import CheckpointFiles, new_hash, update_with_tensor
from dvgs_fast.sources import Source, TensorSource, as_source, is_chunked_input, source_identity

EPS = 1e-8


@dataclass
class RunSpec:
    """Everything fit() derives from its arguments before training starts."""

    device: torch.device
    ctx: DistContext
    seed: int
    gen: torch.Generator            # the target shuffling stream
    model: nn.Module                # the working copy, on `device`
    names: list[str]                # compared parameters (grad_params resolved)
    dtype: torch.dtype              # the model's floating dtype; inputs are cast to it ...
    x_dtype: torch.dtype            # ... or stay int64 (token ids of an Embedding): the inputs' dtype
    source: Source                  # x_source (and y_source) rows, in memory or streamed
    source_labels: bool             # False: autoencoder, a source row's target is the row itself
    xt: torch.Tensor                # target set, on `device`
    yt: torch.Tensor | None         # None: autoencoder
    sample_loss: SampleLoss         # per-sample losses [N]
    batch_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]   # the target mini-batch loss
    scorer: Any                     # FastScorer | ReferenceScorer
    files: CheckpointFiles | None   # checkpoint_dir's files for this process (None: no checkpoints)
    state: dict | None              # the saved state to resume from
    fingerprint: dict | None

    @property
    def n_source(self) -> int:
        return len(self.source)

    @property
    def n_target(self) -> int:
        return int(self.xt.shape[0])


def make_losses(loss: Any, class_weight: torch.Tensor | None):
    """(per-sample loss [N], mean target loss) for the configured criterion."""
    per_sample = make_sample_loss(loss)
    if loss == "cross_entropy" and class_weight is not None:
        def batch(out, y):
            return F.cross_entropy(out, y, weight=class_weight)
    else:
        def batch(out, y):
            return per_sample(out, y).mean()
    return per_sample, batch


@contextlib.contextmanager
def _eval_probe(model: nn.Module):
    """A quick eval-mode, no-grad forward: no dropout randomness, no BatchNorm update."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _forward_probe(model: nn.Module, x: torch.Tensor, device, x_name: str, is_ce: bool) -> torch.Tensor:
    """The model's eval-mode output on (at most two) rows, checked: a model that cannot run on
    the data fails now, not after an hour of training."""
    with _eval_probe(model):
        try:
            out = model(x.to(device))
        except Exception as exc:
            raise ValueError(f"{x_name}: the model cannot run on samples of shape {tuple(x.shape[1:])} "
                             f"({type(exc).__name__}: {exc}){embedding_hint(model, x)}") from exc
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"model: must return a tensor, returned {type(out).__name__}")
    if is_ce and out.dim() < 2:
        raise ValueError(f"model: cross_entropy needs outputs [N, n_classes], got shape {tuple(out.shape)}")
    return out


def _loss_probe(sample_loss, out: torch.Tensor, x: torch.Tensor, y: torch.Tensor | None, device,
                set_name: str) -> None:
    """The per-sample loss of that output against the rows' targets (y, or x for autoencoders)."""
    target = x if y is None else y
    try:
        with torch.no_grad():
            per = sample_loss(out, target.to(device))
    except Exception as exc:
        raise ValueError(f"{'x_' if y is None else 'y_'}{set_name}: the loss cannot compare the model output "
                         f"{tuple(out.shape)} with targets {tuple(target.shape)} "
                         f"({type(exc).__name__}: {exc})") from exc
    if not isinstance(per, torch.Tensor) or tuple(per.shape) != (out.shape[0],):
        raise ValueError(f"loss: must return one loss per sample (shape [N]), got "
                         f"{tuple(per.shape) if isinstance(per, torch.Tensor) else type(per).__name__}")


def _check_batchnorm_batches(model: nn.Module, xt: torch.Tensor, batch_size: int, device) -> None:
    """Train-mode BatchNorm needs more than one value per channel: a target mini-batch of one
    sample (N_target = 1, or N_target % target_batch_size == 1) would crash mid-epoch."""
    bns = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    n = int(xt.shape[0])
    if not bns or not (n == 1 or batch_size == 1 or n % batch_size == 1):
        return
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    was_training = model.training
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
            model.train()
            model(xt[:1].to(device))
    except ValueError as exc:
        where = ("x_target: has 1 sample" if n == 1 else
                 f"target_batch_size: {n} target samples in mini-batches of {batch_size} leave one of 1 sample")
        raise ValueError(f"{where}, which BatchNorm ({bns[0]}) cannot normalise in train mode ({exc}); "
                         f"{'add target samples' if n == 1 else 'choose another target_batch_size'}") from None
    finally:
        model.load_state_dict(saved)
        model.train(was_training)


def _class_weight(cfg, yt: torch.Tensor, n_classes: int, dtype, device) -> torch.Tensor | None:
    if cfg.class_weight is None:
        return None
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
    return w.to(dtype=dtype, device=device)


def prepare(cfg, x_source, y_source, x_target, y_target, ctx: DistContext, base_run: Run,
            files: CheckpointFiles | None) -> RunSpec:
    """Check the inputs against the settings and the model; load the checkpoint to resume from.

    `files` is the checkpoint folder's files for this process, already locked by the caller."""
    device = ctx.device_for(base_run.device)      # distributed: a bare 'cuda' is this rank's GPU
    is_ce = cfg.loss == "cross_entropy"

    if is_chunked_input(x_source):
        # Out of core (sources.py): a GctxReader, torch Dataset or iterator factory, streamed
        # batch by batch each snapshot; checked up front on its first rows, then as it streams.
        source = as_source(x_source, y_source)
        xs = None
        first = source.probe(2)          # one read of the first rows serves every check below
    else:
        xs = V.as_float_tensor(x_source, "x_source", keep_integers=True)    # token ids stay integer
        source = first = None
    xt = V.as_float_tensor(x_target, "x_target", keep_integers=True)
    V.check_same_features(first[2] if xs is None else xs, xt, "x_source", "x_target")

    if xs is None:
        source_labels = y_target is not None and first[3] is not None   # no y_target: autoencoder
        if y_target is not None and not source_labels and is_ce:
            raise ValueError("y_source: labels are required for loss='cross_entropy' (a chunked source "
                             "yields (x, y) chunks, or pass y_source as an array)")
        ys = None
    else:
        ys = V.labels_for_loss(y_source, xs, "y_source", cfg.loss)
        source_labels = ys is not None
    yt = V.labels_for_loss(y_target, xt, "y_target", cfg.loss)
    if source_labels != (yt is not None):
        raise ValueError(f"{'y_target' if yt is None else 'y_source'}: is None but "
                         f"{'y_source' if yt is None else 'y_target'} is given; pass both or neither")

    # A resumed run without an explicit seed must reuse the interrupted run's seed.
    state = runstate.read_state(files) if files is not None else None
    seed = cfg.seed
    if seed is None and state is not None:
        seed = int(state["seed"])
    if seed is None:
        seed = base_run.seed
    ctx.check_peers()                    # a rank whose folder or inputs failed stops every rank now
    seed = ctx.broadcast_object(seed)    # a drawn seed must be the same on every rank
    base_run.seed = seed
    gen = seed_everything(seed)

    model = build_model(cfg.model, "model")
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise ValueError("model: has no trainable parameters")
    dtype = next(p.dtype for _, p in params if p.is_floating_point())
    model.to(device)
    x_dtype = model_input_dtype(model, xt[:2].to(device), dtype)     # int64 for an Embedding's token ids
    xt = as_model_input(xt, x_dtype)
    yt = cast_labels(yt, dtype)
    if xs is not None:
        source = TensorSource(as_model_input(xs, x_dtype), cast_labels(ys, dtype))
    names = V.resolve_grad_params(model, cfg.grad_params)

    # The model's output against each set's targets, on at most two rows of each (N = 1 works).
    m = min(2, int(xt.shape[0]))
    out_t = _forward_probe(model, xt[:m], device, "x_target", is_ce)
    _, _, x_probe, y_probe = first if first is not None else source.probe(2)
    x_probe = as_model_input(x_probe, x_dtype)
    y_probe = cast_labels(y_probe, dtype) if source_labels else None
    out_s = _forward_probe(model, x_probe, device, "x_source", is_ce)
    class_weight = None
    if is_ce:
        n_classes = int(out_t.shape[1])
        for y, name in ((ys, "y_source"), (yt, "y_target")):
            if y is None:
                continue                         # streamed: labels are checked by the loss
            lo, hi = int(y.min()), int(y.max())
            if lo < 0 or hi >= n_classes:
                raise ValueError(f"{name}: labels must be in [0, {n_classes}) (the model has {n_classes} outputs), "
                                 f"found range [{lo}, {hi}]")
        class_weight = _class_weight(cfg, yt, n_classes, dtype, device)
    sample_loss, batch_loss = make_losses(cfg.loss, class_weight)
    _loss_probe(sample_loss, out_t, xt[:m], None if yt is None else yt[:m], device, "target")
    _loss_probe(sample_loss, out_s, x_probe, y_probe, device, "source")
    _check_batchnorm_batches(model, xt, cfg.target_batch_size, device)

    scorer_cls = FastScorer if cfg.backend == "fast" else ReferenceScorer
    scorer = scorer_cls(model, names, sample_loss, cfg.similarity, EPS)

    fp = None
    if files is not None:
        h = new_hash()
        h.update(source_identity(source))
        for t in (xt, yt):
            if t is not None:
                update_with_tensor(h, t)
        settings = cfg.settings()
        settings["source_labels"] = source_labels
        fp = runstate.fingerprint(settings, seed, ctx.world_size, model, cfg.loss, h.digest())
        if state is not None:
            runstate.compare(state["fingerprint"], fp, files)
    return RunSpec(device=device, ctx=ctx, seed=seed, gen=gen, model=model, names=names, dtype=dtype, x_dtype=x_dtype,
                   source=source, source_labels=source_labels, xt=xt.to(device),
                   yt=None if yt is None else yt.to(device), sample_loss=sample_loss, batch_loss=batch_loss,
                   scorer=scorer, files=files, state=state, fingerprint=fp)


__all__ = ["RunSpec", "prepare", "make_losses", "EPS"]
