"""DVGS: data valuation by gradient similarity, the public class.

The work is split by job: prepare.py turns fit()'s arguments into a checked, typed RunSpec;
loop.py trains on the target set and scores the source set (a dvgs_fast.sources.Source, in
memory or streamed). What DVGS shares with the other gradient methods lives outside this
package: the two scorers (dvgs_fast.grads: FastScorer, ReferenceScorer) and the run state
(dvgs_fast.runstate: fingerprint, lock, checksummed state files, memory-mapped per-sample sums).

The algorithm, as the original DVGS code runs it: the model is trained only on the target
(clean) set. Each epoch shuffles the target into mini-batches; for each mini-batch the target
loss and its gradient G over `grad_params` are computed in train mode. When the global step
counter (never reset, also not between restarts) is a multiple of `compute_every`, every
source sample's own loss gradient g_i is compared with G before the optimizer step, and that
snapshot is kept. Then the optimizer steps on the target loss. `restarts` re-initialize model
and optimizer. The value of a source sample is the mean of its similarities over all snapshots.

Both backends share this loop (same seed -> same target training, same G); they only differ
in the snapshot scorer (ReferenceScorer: explicit per-sample gradients; FastScorer: per-layer
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

import os
import time
from pathlib import Path
from typing import Any, Callable

from torch import nn

from dvgs_fast import _validation as V
from dvgs_fast.distributed import PeerFailed, context_for
from dvgs_fast.methods.base import Estimate, Run, Valuation
from dvgs_fast.runstate import CheckpointFiles, DirLock
from dvgs_fast.attribution import AttributionMixin, ScoreSink, one_process, query_error
from dvgs_fast.attribution.gradient_pairs import factors_fn, query_factors, score_pass
from dvgs_fast.grads import cast_labels
from dvgs_fast.methods.dvgs.loop import train_and_score
from dvgs_fast.methods.dvgs.prepare import EPS, prepare
from dvgs_fast.ops.similarity import SIMILARITIES

BACKENDS = ("fast", "reference")
OPTIMIZERS = ("adam", "adamw", "sgd")


class DVGS(AttributionMixin, Valuation):
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
                      Guarantees (dvgs_fast.runstate; python_tests/test_fault_injection.py):
                      * killed at any moment (kill -9 included), the rerun equals an
                        uninterrupted run bit for bit;
                      * a folder never mixes runs: a resume whose settings, seed, data, model
                        structure (module types and hyper-parameters, the source of your own
                        module classes, parameter/buffer names and shapes), initial weights or
                        loss differ is refused, naming what differs (max_time, device and
                        distributed may change; the number of ranks may not);
                      * one process at a time: a second one is refused naming the holder's pid;
                        the lock of a killed process is taken over;
                      * every state file's size and checksum is verified on resume (a truncated
                        or overwritten dvgs_sums.npy, a damaged checkpoint);
                      * every such problem is one ValueError line naming checkpoint_dir and the
                        way out: delete the folder or pass another one.

    x_source may also be a chunked source that need not fit in memory (see dvgs_fast.sources): a
    GctxReader (``load_lincs(..., chunked=True)``), a map-style torch Dataset (items x or (x, y)),
    or a zero-argument callable returning an iterator of (x_chunk, y_chunk_or_None) chunks. It is
    re-read once per snapshot (IO-bound for huge files) and gives the same values as the same
    rows in memory; a stream must yield the same rows on every pass (fewer or more: a ValueError
    naming the snapshot's pass and both counts). The running sums are always memory-mapped
    (checkpoint_dir, else a temp file).
    keep_snapshots    keep every snapshot: result.snapshots is a memory-mapped [N, K] array
                      (in checkpoint_dir, else an anonymous temporary file). Distributed: only
                      this rank's rows (result.info["shard"]) are filled.
    distributed       None: automatic (a torchrun launch with WORLD_SIZE > 1, or an initialised
                      process group); True: require it; False: run alone even under torchrun.
                      Source chunks are split across ranks; see the module docstring.

    attribute(x_source, y_source, x_query, y_query): DVGS per query. The model is trained on the
    queries (they take the target set's place, as in fit()), and at every snapshot each source
    gradient is compared with each query's OWN gradient (fit() compares it with the target
    mini-batch's mean gradient) by the same similarity; the matrix is the mean over the
    snapshots. So a row is not fit()'s values for that query alone (the training differs), and the
    mean over the queries is fit()'s value only for similarity="dot" with one target batch per
    epoch; for a cosine a mean of cosines is no cosine of the mean. One process, no checkpoint_dir.

    result.stderr is each value's standard error over all snapshots of all restarts (NaN with
    fewer than two); result.counts the number of snapshots averaged. Any N_source, N_target >= 1
    works (with BatchNorm, a one-sample target mini-batch is refused before training).

    Never silently wrong: a non-finite target loss stops the run with a ValueError naming the
    restart, epoch and step and suggesting a lower lr; a non-finite similarity names the snapshot
    and the source row.

    Reproducibility: the same seed, settings, data, device type, torch build and number of
    threads (result.info["torch_threads"]) give bit-identical values. Another thread count
    changes the rounding of some CPU reductions (BatchNorm's batch statistics, norm affine
    gradients): within ~3e-7 for the models measured, except BatchNorm after a layer with a
    bias trained by Adam, up to ~1% -- that bias's exact gradient is 0 (BatchNorm removes the
    mean), its float gradient is rounding noise, Adam turns it into lr-sized steps that train-mode
    BatchNorm cancels but the eval-mode scoring does not. Use bias=False before BatchNorm.
    """

    name = "dvgs"
    requires_labels = False      # autoencoders: y = x when both label sets are None
    attribute_accumulates = True

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
    def _attribute(self, x_source, y_source, x_query, y_query, sink: ScoreSink, run: Run, query_batch_size: int):
        """Per-query DVGS (see the class docstring): trained on the queries; at each snapshot the
        similarity of every source gradient with every query's own gradient; the mean over snapshots."""
        timings = {"setup": 0.0, "train": 0.0, "score": 0.0, "checkpoint": 0.0}
        ctx = one_process(self.distributed, run.device)
        try:
            try:
                spec = prepare(self, x_source, y_source, x_query, y_query, ctx, run, None)
            except ValueError as exc:
                raise query_error(exc) from None
            fo = factors_fn(spec.scorer)
            done = []

            def blocks():
                for a, b, x, y in spec.source.iter_chunks(0, spec.n_source, self.source_batch_size):
                    x = x.to(device=spec.device, dtype=spec.dtype)
                    yield a, b, x, (x if not spec.source_labels else cast_labels(y, spec.dtype).to(spec.device))

            def snapshot(k: int) -> None:
                queries = query_factors(fo, spec.xt, spec.yt if spec.yt is not None else spec.xt, query_batch_size,
                                        self.similarity != "dot")
                score_pass(fo, blocks(), queries, sink, similarity=self.similarity, eps=EPS)
                done.append(k)

            est = train_and_score(self, spec, timings, run.budget, snapshot_hook=snapshot)
        finally:
            ctx.close()
        if est.status == "stopped":
            raise ValueError(f"max_time: the budget ran out after {len(done)} snapshots; attribute() returns no "
                             f"partial matrix (raise max_time)")
        sink.scale(1.0 / max(1, len(done)))
        return {"snapshots": len(done), "similarity": self.similarity, "timings": timings,
                **({"note": "checkpoint_dir is not used by attribute()"} if self.checkpoint_dir else {}),
                **spec.scorer.describe()}

    def _fit(self, x_source, y_source, x_target, y_target, base_run: Run) -> Estimate:
        """Prepare (prepare.py), then train on the target set scoring the source set (loop.py),
        holding the checkpoint folder's lock (dvgs_fast.runstate) throughout."""
        t_start = time.perf_counter()
        timings = {"setup": 0.0, "train": 0.0, "score": 0.0, "checkpoint": 0.0}
        ctx = context_for(self.distributed, base_run.device)
        lock = None
        try:
            files = None
            if self.checkpoint_dir is not None:
                files = CheckpointFiles(self.checkpoint_dir, ctx.rank if ctx.enabled else None)
                lock = DirLock(files).acquire()
                files.remove_temporaries()
            spec = prepare(self, x_source, y_source, x_target, y_target, ctx, base_run, files)
            timings["setup"] = time.perf_counter() - t_start
            est = train_and_score(self, spec, timings, base_run.budget)
        except Exception as exc:
            # Launched without torchrun, nothing else stops the other ranks: they learn of this
            # failure at their next sync point (every collective is preceded by one).
            if ctx.enabled and not isinstance(exc, PeerFailed):
                ctx.check_peers(exc)          # re-raises exc
            raise
        finally:
            if lock is not None:
                lock.release()
            ctx.close()                       # only if fit() initialised the process group
        est.info.update({"n_source": spec.n_source, "n_target": spec.n_target, **spec.scorer.describe()})
        est.timings = timings
        return est
