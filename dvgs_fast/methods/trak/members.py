"""The models a projected-gradient method is computed at (TRAK's ensemble; LoGra's one model).

Three ways to get them:

* ``checkpoints=[...]`` (state dicts of ``model``, or modules): each one a member, as passed;
* ``epochs=0``: the model as passed is the one member;
* ``epochs>0``: ``n_models`` models trained on the source, each from its own initialisation
  (a factory is called under its own seed; a module's first copy starts from the weights passed,
  the others re-initialised with ``reset_parameters``), each on all source rows or a random
  ``subsample`` fraction of them, with ``n_checkpoints`` members per model, evenly spaced over
  its training steps (the last at the end) -- TRAK's ensemble over models and checkpoints.

Trained members are kept in ``store_dir`` (a checksummed state file) with a fingerprint of what
trained them, so a second call with the same settings, data and seed (``attribute()`` after a
torchrun ``featurize()``) loads them instead of training again.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dvgs_fast import runstate
from dvgs_fast._utils import build_model, make_optimizer, reset_parameters
from dvgs_fast.methods.base import derive_seed
from dvgs_fast.sources import source_identity

# What a trained member depends on (besides the data, the seed, the model and the loss).
TRAINING_SETTINGS = ("n_models", "epochs", "batch_size", "lr", "optimizer", "weight_decay", "subsample",
                     "n_checkpoints")


class Stopped(Exception):
    """The run's budget (max_time) ended it."""


@dataclass
class Member:
    model: nn.Module          # in eval mode, on the run's device
    label: str


def _state(model: nn.Module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def from_checkpoints(cfg, prep) -> list[Member]:
    out = []
    for j, ck in enumerate(cfg.member_weights):
        if isinstance(ck, nn.Module):
            m = copy.deepcopy(ck)
        else:
            m = copy.deepcopy(prep.model)
            try:
                m.load_state_dict(ck)
            except (RuntimeError, TypeError, AttributeError) as exc:
                raise ValueError(f"checkpoints: entry {j} does not load into the model ({type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0]})") from None
        out.append(Member(m.to(prep.xt.device).eval(), f"checkpoint {j}"))
    return out


def build(cfg, prep, run, store_dir: Path | None, ctx) -> tuple[list[Member], dict]:
    """The members and a description of how they were made. Under torchrun every rank trains
    the same members (same seed and data); rank 0 alone writes them to store_dir."""
    if cfg.member_weights is not None:
        return from_checkpoints(cfg, prep), {"members_from": "checkpoints"}
    if cfg.epochs == 0:
        return [Member(prep.model.eval(), "the model as passed")], {"members_from": "model"}
    if prep.xs is None:
        raise ValueError("x_source: training the models needs the source in memory; for a streamed source pass "
                         "trained models as checkpoints=[...] (state dicts) and epochs=0")
    files = fp = None
    if store_dir is not None:
        files = runstate.CheckpointFiles(Path(store_dir), None, method=f"{cfg.name}_models")
        settings = {k: getattr(cfg, k) for k in TRAINING_SETTINGS}
        h = runstate.new_hash()
        h.update(source_identity(prep.source))
        fp = runstate.fingerprint({"method": cfg.name, **settings}, run.seed, 1, prep.model, cfg.loss, h.digest())
        saved = runstate.read_state(files)               # written atomically: no lock needed to read
        ctx.barrier()                                    # every rank has read before rank 0 writes
        if saved is not None and saved["fingerprint"] == fp:
            members = []
            for label, state in zip(saved["labels"], saved["states"]):
                m = copy.deepcopy(prep.model)
                m.load_state_dict(state)
                members.append(Member(m.eval(), label))
            return members, {"members_from": "store_dir (trained earlier)"}
    members = []
    bar = run.progress(cfg.n_models * cfg.epochs, f"{type(cfg).__name__} training", unit="epoch")
    try:
        for j in range(cfg.n_models):
            members += _train_one(cfg, prep, run, j, bar)
    finally:
        bar.close()
    if files is not None and ctx.is_main:
        with runstate.DirLock(files):
            runstate.write_state(files.state, {"format": runstate.FORMAT, "fingerprint": fp,
                                               "labels": [m.label for m in members],
                                               "states": [_state(m.model) for m in members]})
    return members, {"members_from": "trained"}


def _train_one(cfg, prep, run, j: int, bar) -> list[Member]:
    seed = derive_seed(run.seed, 11, j)
    dev = prep.xt.device
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        if isinstance(cfg.model, nn.Module):
            model = copy.deepcopy(prep.model)
            if j > 0:
                reset_parameters(model)
        else:
            model = build_model(cfg.model).to(dev)
    model = model.to(dev)
    gen = torch.Generator().manual_seed(seed)
    n = prep.xs.shape[0]
    rows = torch.arange(n)
    if cfg.subsample < 1.0:
        rows = torch.randperm(n, generator=gen)[:max(1, round(cfg.subsample * n))].sort().values
    steps_per_epoch = math.ceil(len(rows) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    if cfg.n_checkpoints > total:
        raise ValueError(f"n_checkpoints: {cfg.n_checkpoints} checkpoints but a model trains only {total} steps")
    marks = [round(c * total / cfg.n_checkpoints) for c in range(1, cfg.n_checkpoints + 1)]
    opt = make_optimizer(cfg.optimizer, [p for p in model.parameters() if p.requires_grad], cfg.lr, cfg.weight_decay)
    out, step = [], 0
    what = "all rows" if cfg.subsample >= 1.0 else f"{len(rows)} of {n} rows"
    for epoch in range(cfg.epochs):
        model.train()
        for idx in rows[torch.randperm(len(rows), generator=gen)].split(cfg.batch_size):
            idx = idx.to(dev)
            opt.zero_grad(set_to_none=True)
            loss = prep.sample_loss(model(prep.xs[idx]), prep.ys[idx]).mean()
            loss.backward()
            opt.step()
            step += 1
            if not math.isfinite(float(loss.detach())):
                raise ValueError(f"lr: training model {j} diverged (loss {float(loss.detach())} at step {step}); "
                                 f"lower lr (now {cfg.lr:g})")
            if step in marks:
                snap = copy.deepcopy(model).eval()
                out.append(Member(snap, f"model {j} ({what}), step {step} of {total}"))
            if run.budget.exhausted():
                raise Stopped(f"max_time during the training of model {j}")
        bar.update(1)
    return out


__all__ = ["Member", "Stopped", "build", "from_checkpoints"]
