"""TracIn-CP (Pruthi, Liu, Kale, Sundararajan 2020, "Estimating Training Data Influence by
Tracing Gradient Descent"), valued against a target set.

The model is trained on the source set (shuffled mini-batches, SGD or Adam, starting from the
weights passed). At ``n_checkpoints`` checkpoints θ_1..θ_K, evenly spaced over the training
steps (after steps round(c·S/K), c = 1..K, so the last is the trained model), every source
sample z_i is credited with

    η_c ⟨∇ℓ(z_i; θ_c), ∇L_T(θ_c)⟩,       L_T = the mean loss over the whole target set,

and its value is the sum over the checkpoints: TracInCP(z_i, target) summed over the target
samples (divided by their number). η_c is the learning rate at the checkpoint; with Adam the
plain gradients are used, scaled by lr, as in the paper's experiments (for Adam's preconditioned
step see InRunShapley). Positive: the sample's gradient pointed downhill for the target loss.

Scoring runs in eval mode (no dropout; BatchNorm with its running statistics), so every sample's
gradient is its own and deterministic. The per-sample inner products are DVGS's scorers with
similarity "dot": backend="fast" never forms per-sample gradients (the gradient engine's ghost
statistics per layer, dvgs_fast.grads), "reference" forms them with torch.func (the baseline).

Like DVGS (and with the same shared machinery, dvgs_fast.sources and dvgs_fast.runstate):

* x_source may be a chunked source that need not fit in memory (a GctxReader, a map-style torch
  Dataset, or a zero-argument callable returning an iterator of (x, y) chunks). Training then
  streams it once per epoch, block by block (``source_batch_size`` rows), shuffling rows within
  each block (``shuffle="block"``, blocks in file order); scoring streams it once per checkpoint.
  In memory the default is a full shuffle (``shuffle="full"``); ``shuffle="block"`` in memory
  gives exactly the values of the same rows streamed.
* torchrun: every rank trains the same model (same seed, same data, no gradient exchange) and
  scores a contiguous range of whole ``source_batch_size`` blocks; sums are all-reduced, so every
  rank returns the complete values, equal to a single-process run.
* ``checkpoint_dir``: the state is saved after every TracIn checkpoint (model, optimizer, RNG
  states, position in the epoch; the per-sample sums are a checksummed memory-mapped file), so a
  killed run resumes after its last completed checkpoint with identical values; the folder is
  locked against a second process and its fingerprint refuses a different run.
"""
from __future__ import annotations

import math
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from dvgs_fast import _validation as V
from dvgs_fast._utils import make_optimizer
from dvgs_fast.distributed import PeerFailed, context_for
from dvgs_fast.methods import _grad_training as T
from dvgs_fast.methods.base import Estimate, Run, Valuation
from dvgs_fast import runstate
from dvgs_fast.attribution import AttributionMixin, ScoreSink, one_process, query_error
from dvgs_fast.attribution.gradient_pairs import factors_fn, query_factors, score_pass
from dvgs_fast.grads import FastScorer, ReferenceScorer, cast_labels
from dvgs_fast.sources import SourceLengthError, source_identity

SHUFFLES = ("full", "block")


class TracIn(AttributionMixin, Valuation):
    """TracIn-CP: each source sample's gradient agreement with the target loss, summed over
    checkpoints of a training run on the source set.

    >>> res = TracIn(model, epochs=20, n_checkpoints=5).fit(x_source, y_source, x_target, y_target)
    >>> res.values           # [N_source]; low / negative: likely harmful (e.g. a flipped label)

    model              nn.Module (deep-copied; its weights are the start) or a zero-argument factory.
    loss               "cross_entropy", "mse", or a callable (output, target) -> per-sample losses [N].
                       With "mse"/callable the labels may be None (autoencoder: the target is the input).
    epochs, batch_size, lr, optimizer ("sgd" | "adam" | "adamw"), weight_decay   the training. The
                       defaults (Adam, lr 1e-3, 50 epochs) fit the model well enough that the
                       class prior does not dominate the target gradient (UCI Adult, 20% flipped,
                       seeds 0-4: SGD lr 0.01 x 10 epochs gave AUROC 0.43 +- 0.32, seeds inverted;
                       these defaults 0.750 +- 0.066).
    n_checkpoints      K checkpoints, evenly spaced over the training steps, the last at its end.
    grad_params        None (all trainable parameters) or names / module-name prefixes compared.
    backend            "fast" (ghost statistics) or "reference" (torch.func per-sample gradients).
    source_batch_size  rows scored at once (bounds memory); the block size of a streamed source.
    target_batch_size  target rows per forward when the target gradient is taken (bounds memory).
    shuffle            None: "full" in memory, "block" for a chunked source (see the module docstring).
    checkpoint_dir, keep_snapshots, distributed   as DVGS (resume, [N, K] per-checkpoint
                       contributions in result.snapshots, torchrun).
    max_time           wall-clock budget (s), checked after every training step: a stopped run
                       returns the sums over the checkpoints reached, status "stopped".

    result.values: sum over checkpoints; result.counts: checkpoints scored; result.stderr:
    sqrt(counts · var) of the per-checkpoint contributions (NaN below two).

    attribute(x_source, y_source, x_query, y_query): the [n_query, n_source] matrix
    Σ_c η_c ⟨∇ℓ(z_i; θ_c), ∇ℓ(q_j; θ_c)⟩ over the same training run (TracInCP per pair), from the
    engine's factored per-sample gradients (cross_gram: no per-sample gradient for Linear/conv
    layers). Its mean over the queries is fit()'s value with the queries as the target set. It
    runs in one process and keeps no checkpoint_dir (a run is re-trained, not resumed).
    """

    name = "tracin"
    requires_labels = False
    attribute_accumulates = True

    def __init__(self, model: nn.Module | Callable[[], nn.Module], loss: str | Callable = "cross_entropy",
                 epochs: int = 50, batch_size: int = 64, lr: float = 1e-3, optimizer: str = "adam",
                 weight_decay: float = 0.0, n_checkpoints: int = 5, grad_params: Any = None,
                 backend: str = "fast", source_batch_size: int = 1024, target_batch_size: int = 1024,
                 shuffle: str | None = None, checkpoint_dir: str | os.PathLike | None = None,
                 keep_snapshots: bool = False, distributed: bool | None = None, device: Any = None,
                 seed: int | None = None, max_time: float | None = None, progress: bool = True):
        self.optimizer, self.backend, self.grad_params = T.check_common(loss, optimizer, backend, grad_params, model)
        self.model, self.loss = model, loss
        self.epochs = V.check_positive_int(epochs, "epochs")
        self.batch_size = V.check_positive_int(batch_size, "batch_size")
        self.lr = V.check_positive_float(lr, "lr")
        self.weight_decay = V.check_positive_float(weight_decay, "weight_decay", allow_zero=True)
        self.n_checkpoints = V.check_positive_int(n_checkpoints, "n_checkpoints")
        self.source_batch_size = V.check_positive_int(source_batch_size, "source_batch_size")
        self.target_batch_size = V.check_positive_int(target_batch_size, "target_batch_size")
        self.shuffle = None if shuffle is None else V.check_choice(shuffle, "shuffle", SHUFFLES)
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        self.keep_snapshots = V.check_bool(keep_snapshots, "keep_snapshots")
        if distributed is not None and not isinstance(distributed, bool):
            raise ValueError(f"distributed: expected None, True or False, got {distributed!r}")
        self.distributed = distributed
        super().__init__(device=device, seed=seed, max_time=max_time, progress=progress)

    # ------------------------------------------------------------------------------------------
    def _fit(self, x_source, y_source, x_target, y_target, run: Run) -> Estimate:
        t_start = time.perf_counter()
        timings = {"setup": 0.0, "train": 0.0, "score": 0.0, "checkpoint": 0.0}
        ctx = context_for(self.distributed, run.device)
        lock = None
        try:
            files = None
            if self.checkpoint_dir is not None:
                files = runstate.CheckpointFiles(self.checkpoint_dir, ctx.rank if ctx.enabled else None,
                                                 method="TracIn")
                lock = runstate.DirLock(files).acquire()
            state = runstate.read_state(files) if files is not None else None
            seed = self.seed if self.seed is not None else (int(state["seed"]) if state is not None else run.seed)
            ctx.check_peers()                          # a rank whose folder failed stops every rank now
            seed = ctx.broadcast_object(seed)          # a drawn seed must be the same on every rank
            run.seed = seed
            device = ctx.device_for(run.device)
            prep = T.prepare(self, x_source, y_source, x_target, y_target, device, seed, chunked_ok=True)
            fp = None
            if files is not None:
                fp = self._fingerprint(prep, seed, ctx.world_size)
                if state is not None:
                    runstate.compare(state["fingerprint"], fp, files)
            timings["setup"] = time.perf_counter() - t_start
            est = _Loop(self, prep, ctx, files, state, fp, seed, timings, run).run()
        except Exception as exc:
            # Launched without torchrun, nothing else stops the other ranks: they learn of this
            # failure at their next sync point (every collective is preceded by one).
            if ctx.enabled and not isinstance(exc, PeerFailed):
                ctx.check_peers(exc)                   # re-raises exc
            raise
        finally:
            if lock is not None:
                lock.release()
            ctx.close()
        est.timings = timings
        return est

    def _attribute(self, x_source, y_source, x_query, y_query, sink: ScoreSink, run: Run, query_batch_size: int):
        timings = {"setup": 0.0, "train": 0.0, "score": 0.0, "checkpoint": 0.0}
        ctx = one_process(self.distributed, run.device)
        try:
            try:
                prep = T.prepare(self, x_source, y_source, x_query, y_query, ctx.device_for(run.device), run.seed,
                                 chunked_ok=True)
            except ValueError as exc:
                raise query_error(exc) from None
            loop = _AttributeLoop(self, prep, ctx, None, None, None, run.seed, timings, run)
            loop.sink, loop.query_batch_size = sink, query_batch_size
            est = loop.run()
        finally:
            ctx.close()
        if est.status == "stopped":
            raise ValueError(f"max_time: the budget ran out after {est.progress}; attribute() returns no partial "
                             f"matrix (raise max_time)")
        return {**est.info, "timings": timings,
                **({"note": "checkpoint_dir is not used by attribute()"} if self.checkpoint_dir else {})}

    def _fingerprint(self, prep: T.Prepared, seed: int, world_size: int) -> dict:
        h = runstate.new_hash()
        h.update(source_identity(prep.source))
        for t in (prep.xt, prep.yt):
            runstate.update_with_tensor(h, t)
        settings = {"method": self.name, **self.settings(), "source_labels": prep.source_labels}
        return runstate.fingerprint(settings, seed, world_size, prep.model, self.loss, h.digest())


class _Loop:
    """The training run, the checkpoint schedule and the scoring of one fit()."""

    def __init__(self, cfg: TracIn, prep: T.Prepared, ctx, files, state, fingerprint, seed: int, timings, run: Run):
        self.cfg, self.prep, self.ctx, self.files, self.state = cfg, prep, ctx, files, state
        self.fingerprint, self.seed, self.timings, self.budget = fingerprint, seed, timings, run.budget
        self.model, self.device = prep.model, prep.xt.device
        self.source, self.n = prep.source, len(prep.source)
        self.shuffle = cfg.shuffle or ("block" if self.source.chunked else "full")
        sbs = cfg.source_batch_size
        if self.shuffle == "full":
            self.steps_per_epoch = math.ceil(self.n / cfg.batch_size)
        else:                                  # every block's rows in batches of their own
            full, rest = divmod(self.n, sbs)
            self.steps_per_epoch = full * math.ceil(sbs / cfg.batch_size) + math.ceil(rest / cfg.batch_size)
        total = cfg.epochs * self.steps_per_epoch
        if cfg.n_checkpoints > total:
            raise ValueError(f"n_checkpoints: {cfg.n_checkpoints} checkpoints but the training has only {total} "
                             f"steps ({cfg.epochs} epochs x {self.steps_per_epoch}); lower n_checkpoints")
        self.total_steps = total
        self.ckpt_steps = [round(c * total / cfg.n_checkpoints) for c in range(1, cfg.n_checkpoints + 1)]
        self._check_batchnorm(sbs)
        params = dict(self.model.named_parameters())
        self.selected = [params[nm] for nm in prep.names]
        scorer_cls = FastScorer if cfg.backend == "fast" else ReferenceScorer
        kw = {"owner": "TracIn"} if cfg.backend == "fast" else {}
        self.scorer = scorer_cls(self.model, prep.names, prep.sample_loss, "dot", **kw)
        n_chunks = math.ceil(self.n / sbs)
        c0, c1 = ctx.shard(n_chunks)
        self.lo, self.hi = min(c0 * sbs, self.n), min(c1 * sbs, self.n)
        if ctx.enabled and ctx.is_main and n_chunks < ctx.world_size:
            warnings.warn(f"TracIn: {self.n} source samples make fewer blocks of source_batch_size={sbs} than there "
                          f"are ranks ({ctx.world_size}); some ranks have nothing to score. Lower source_batch_size.",
                          RuntimeWarning, stacklevel=4)

    def _check_batchnorm(self, sbs: int) -> None:
        """Train-mode BatchNorm cannot normalise a batch of one sample: refuse such a batching now."""
        bns = T.batchnorm_layers(self.model)
        if not bns:
            return
        b = self.cfg.batch_size
        sizes = {self.n % b} if self.shuffle == "full" else {(sbs % b), (self.n % sbs) % b}
        if b == 1 or 1 in sizes or self.n == 1:
            raise ValueError(f"batch_size: {b} leaves a training batch of one sample (N_source={self.n}"
                             f"{'' if self.shuffle == 'full' else f', blocks of {sbs}'}), which {bns[0]} cannot "
                             f"normalise in train mode; choose another batch_size")

    # ------------------------------------------------------------------------------------------
    def _epoch_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This epoch's training batches, in order, drawing the order from the shuffle stream."""
        cfg, gen, dev, dt = self.cfg, self.prep.shuffle, self.device, self.prep.dtype
        if self.shuffle == "full":
            xs, ys = self.prep.xs, self.prep.ys
            for idx in torch.randperm(self.n, generator=gen).to(dev).split(cfg.batch_size):
                yield xs[idx], ys[idx]
            return
        for _, _, x, y in self.source.iter_chunks(0, self.n, cfg.source_batch_size):
            x = x.to(device=dev, dtype=self.prep.x_dtype)
            y = x if not self.prep.source_labels else cast_labels(y, dt).to(dev)
            for idx in torch.randperm(x.shape[0], generator=gen).to(dev).split(cfg.batch_size):
                yield x[idx], y[idx]

    def _target_gradient(self) -> dict[str, torch.Tensor]:
        """∇ of the mean target loss (eval mode), accumulated over blocks of target_batch_size."""
        xt, yt, m = self.prep.xt, self.prep.yt, self.prep.xt.shape[0]
        total = None
        for a in range(0, m, self.cfg.target_batch_size):
            b = min(a + self.cfg.target_batch_size, m)
            loss = self.prep.sample_loss(self.model(xt[a:b]), yt[a:b]).sum() / m
            g = torch.autograd.grad(loss, self.selected, allow_unused=True)
            g = [torch.zeros_like(p) if t is None else t for t, p in zip(g, self.selected)]
            total = g if total is None else [u + v for u, v in zip(total, g)]
        return dict(zip(self.prep.names, total))

    def _score(self, k: int, store, step: int) -> None:
        """Checkpoint k: every source row of this rank, η ⟨g_i, G⟩ (eval mode)."""
        cfg, dev, dt = self.cfg, self.device, self.prep.dtype
        was = self.model.training
        self.model.eval()
        try:
            with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
                target = self.scorer.target(self._target_gradient())
                for a, b, x, y in self.source.iter_chunks(self.lo, self.hi, cfg.source_batch_size):
                    x = x.to(device=dev, dtype=self.prep.x_dtype)
                    y = x if not self.prep.source_labels else cast_labels(y, dt).to(dev)
                    c = (self.scorer.score(x, y, target).detach().to(torch.float64) * cfg.lr).cpu().numpy()
                    if not np.isfinite(c).all():
                        i = a + int(np.flatnonzero(~np.isfinite(c))[0])
                        raise ValueError(f"x_source: the gradient of source row {i} is not finite at checkpoint {k} "
                                         f"(step {step}): rescale the inputs or lower lr (now {cfg.lr:g})")
                    store.add(k, a, b, c)
        except SourceLengthError as exc:
            raise ValueError(f"x_source: the stream yielded {'more' if exc.more else 'fewer'} rows on the pass of "
                             f"checkpoint {k}: {exc.got} rows, but {exc.expected} when it was counted; a streamed "
                             f"source must yield the same rows on every pass") from None
        finally:
            self.model.train(was)

    # ------------------------------------------------------------------------------------------
    def run(self) -> Estimate:
        cfg, model, dev, timings = self.cfg, self.model, self.device, self.timings
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = make_optimizer(cfg.optimizer, trainable, cfg.lr, cfg.weight_decay)
        epoch, pos, step, k = 0, 0, 0, 0
        snap_digests: list[str] = []
        st = self.state
        if st is not None:
            model.load_state_dict(st["model"])
            opt.load_state_dict(st["optimizer"])
            torch.set_rng_state(st["rng_cpu"])
            if dev.type == "cuda" and st.get("rng_cuda") is not None:
                torch.cuda.set_rng_state(st["rng_cuda"], dev)
            self.prep.shuffle.set_state(st["rng_shuffle"])
            epoch, pos, step, k = int(st["epoch"]), int(st["pos"]), int(st["step"]), int(st["k"])
            snap_digests = list(st["snap_digests"])
        store = runstate.open_store(self.files, self.n, state=st, n_snapshots=cfg.n_checkpoints,
                                    keep_snapshots=cfg.keep_snapshots, snapshot_dtype=np.float64)
        snaps = store.snapshots
        sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
        bad_loss = None
        stopped = None
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.epochs, initial=epoch, disable=not (cfg.progress and self.ctx.is_main),
                   desc=f"TracIn ({cfg.backend})", unit="epoch", leave=False)

        def save(pos_: int, epoch_rng) -> None:
            t0 = time.perf_counter()
            store.flush()
            if snaps is not None:
                while len(snap_digests) < k:
                    snap_digests.append(store.column_digest(len(snap_digests)))
            runstate.write_state(self.files.state, {
                "format": runstate.FORMAT, "fingerprint": self.fingerprint, "seed": self.seed,
                "epoch": epoch, "pos": pos_, "step": step, "k": k, "model": model.state_dict(),
                "optimizer": opt.state_dict(), "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None,
                "rng_shuffle": epoch_rng, "sums_digest": store.slot_digest(k), "snap_digests": snap_digests})
            timings["checkpoint"] += time.perf_counter() - t0

        try:
            while epoch < cfg.epochs and not stopped:
                epoch_rng = self.prep.shuffle.get_state()     # a mid-epoch resume redraws this epoch's order
                t0 = time.perf_counter()
                for bi, (xb, yb) in enumerate(self._epoch_batches()):
                    if bi < pos:
                        continue                               # done before the resume
                    model.train()
                    opt.zero_grad(set_to_none=True)
                    loss = self.prep.sample_loss(model(xb), yb).mean()
                    loss.backward()
                    opt.step()
                    if dev.type == "cpu":
                        if not math.isfinite(float(loss.detach())):
                            raise V.diverged("TracIn", "the source loss", float(loss.detach()),
                                             f"epoch {epoch}, step {step}", lr=cfg.lr, before_training=step == 0)
                    else:                                      # no per-step sync on GPU: checked at checkpoints
                        bad = ~torch.isfinite(loss.detach())
                        bad_loss = bad if bad_loss is None else bad_loss | bad
                    step += 1
                    if k < len(self.ckpt_steps) and step == self.ckpt_steps[k]:
                        sync()
                        if bad_loss is not None and bool(bad_loss):
                            raise V.diverged("TracIn", "a source loss", float("nan"),
                                             f"a step before checkpoint {k} (step {step})", lr=cfg.lr)
                        t1 = time.perf_counter()
                        timings["train"] += t1 - t0
                        self._score(k, store, step)
                        k += 1
                        sync()
                        t0 = time.perf_counter()
                        timings["score"] += t0 - t1
                        if self.files is not None:
                            save(bi + 1, epoch_rng)
                        self.ctx.check_peers()         # a rank whose rows failed stops every rank now
                    if self.budget.max_time is not None:
                        # Every rank decides alike (rank 0's clock).
                        self.ctx.check_peers()
                        stopped = self.ctx.broadcast_object(self.budget.exhausted())
                        if stopped:
                            break
                timings["train"] += time.perf_counter() - t0
                if stopped:
                    break
                pos = 0
                epoch += 1
                bar.update(1)
        finally:
            bar.close()
        self.ctx.check_peers()                         # before the last collective, as in the loop
        sums = np.array(store.sums_after(k))
        if self.ctx.enabled:
            sums = self.ctx.all_reduce_sum(sums)
        counts = np.full(self.n, k, dtype=np.int64)
        values, stderr = T.finish_sums(sums[0], sums[1], counts)
        store.flush()
        info = {"n_source": self.n, "n_target": int(self.prep.xt.shape[0]), "steps": step,
                "steps_planned": self.total_steps, "checkpoints": k, "checkpoint_steps": self.ckpt_steps,
                "shuffle": self.shuffle, **self.scorer.describe()}
        if self.ctx.enabled:
            info.update({"world_size": self.ctx.world_size, "rank": self.ctx.rank, "shard": [self.lo, self.hi]})
        return Estimate(values=values, stderr=stderr, counts=counts, status="stopped" if stopped else "completed",
                        stop_reason=stopped, info=info, snapshots=None if snaps is None else snaps[:, :k],
                        progress=f"{k} of {cfg.n_checkpoints} checkpoints")


class _AttributeLoop(_Loop):
    """The same training run; at each checkpoint, every (query, source) pair's η⟨g_i, g_q⟩ goes
    into the attribute() sink, and its mean over the queries into the per-sample sums (so the
    run's values are fit()'s with the queries as the target)."""

    sink: ScoreSink
    query_batch_size: int

    def _score(self, k: int, store, step: int) -> None:
        cfg, dev, dt = self.cfg, self.device, self.prep.dtype
        m = self.prep.xt.shape[0]
        was = self.model.training
        self.model.eval()

        def blocks():
            for a, b, x, y in self.source.iter_chunks(self.lo, self.hi, cfg.source_batch_size):
                x = x.to(device=dev, dtype=dt)
                yield a, b, x, (x if not self.prep.source_labels else cast_labels(y, dt).to(dev))

        try:
            with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
                fo = factors_fn(self.scorer)
                queries = query_factors(fo, self.prep.xt, self.prep.yt, self.query_batch_size, False)
                sums = score_pass(fo, blocks(), queries, self.sink, weight=cfg.lr)
                if sums is not None:
                    store.add(k, self.lo, self.hi, (sums / m).numpy())
        except SourceLengthError as exc:
            raise ValueError(f"x_source: the stream yielded {'more' if exc.more else 'fewer'} rows on the pass of "
                             f"checkpoint {k}: {exc.got} rows, but {exc.expected} when it was counted") from None
        finally:
            self.model.train(was)
