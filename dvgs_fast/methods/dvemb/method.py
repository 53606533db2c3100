"""DataValueEmbedding: trajectory-specific leave-one-out from one training run (Wang et al. 2024).

    dve = DataValueEmbedding(model, epochs=20, lr=0.05, optimizer="sgd", proj_dim=1024, seed=0)
    att = dve.attribute(x_train, y_train, x_query, y_query)   # [n_query, n_train]
    res = dve.fit(x_train, y_train, x_target, y_target)       # values: the mean over the target

The model is trained on the source set once (trajectory.py records each step's projected
per-sample gradients), the embeddings are accumulated backwards over the recorded steps
(embedding.py), and a query's score against training sample i is ⟨∇ℓ(q; θ_T), E_i⟩ in the
projected space: the first-order effect on q's loss of removing i from that very run, with its
data order. The same scores come without forming E by running the recursion from the queries'
side (query_recursion.py), cheaper when there are fewer queries than projected dimensions;
``recursion`` picks. A second fit()/attribute() on the same source, settings and seed reuses the
recorded run and E once formed (kept on the instance; with ``store_dir`` also on disk,
fingerprinted, so another process reuses them).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from dvgs_fast import _io
from dvgs_fast import _validation as V
from dvgs_fast import grads, runstate
from dvgs_fast._utils import own_rng
from dvgs_fast.attribution import AttributionMixin, ScoreSink, query_error
from dvgs_fast.gradstore import DTYPES, GradientStore, StoreWriter, create_store
from dvgs_fast.gradstore.store import read_meta, write_meta
from dvgs_fast.methods import _grad_training as T
from dvgs_fast.methods.base import Estimate, Run, Valuation
from dvgs_fast.methods.dvemb.embedding import embed
from dvgs_fast.methods.dvemb.query_recursion import query_scores
from dvgs_fast.methods.dvemb.trajectory import StepSides, StepsInMemory, record_training

EMBEDDING = "embedding.npy"
TRAJECTORY = "trajectory"
# info["recorded_as"] of a run whose steps are kept as their Kronecker sides (StepSides reads them).
_SIDES = "kronecker sides"
# A run without store_dir keeps its recorded steps in memory up to this many bytes.
_IN_MEMORY = 256 << 20
# Scores [N, q] + propagated queries [k, q] (float64) per pass of the query route over the steps.
_QUERY_BYTES = 256 << 20


def _layer_spec(p) -> dict:
    """A planned layer as plan_layers() takes it back (the projection is then the same map)."""
    return {"name": p.name, "kind": p.kind, "d_out": p.d_out, "d_in": p.d_in, "weight": p.weight, "bias": p.bias,
            "params": tuple(p.params), "sizes": tuple(p.sizes)}


def _atomic_save(path: Path, arr: np.ndarray) -> None:
    import io
    from dvgs_fast._io import atomic_write_bytes
    buf = io.BytesIO()
    np.save(buf, arr)
    atomic_write_bytes(path, buf.getvalue())


class DataValueEmbedding(AttributionMixin, Valuation):
    """Data value embedding (see the module docstring).

    model            nn.Module (deep-copied; its weights are the start) or a zero-argument factory
                     (called under torch.manual_seed(seed), as a counterfactual TrainingRecipe does).
    loss             "cross_entropy", "mse", or a callable (output, target) -> per-sample losses [N].
    epochs, batch_size, lr, optimizer ("sgd" exact; "adam"/"adamw": their preconditioned step,
                     an approximation, see trajectory.py), weight_decay    the training.
    proj_dim         dimension k of the projected gradients (split over the layers); memory:
                     k² (the recursion) + N·k (the embeddings) floats, and epochs·N·k on disk.
    layer_dims  {layer name: k or (k_out, k_in)} for layers that set their own (the rest share proj_dim).
    projection, proj_seed, projection_structure   the projection (grads.Projector), recorded in the result.
                     "khatri_rao" (default): k·(d_out + d_in) multiply-adds per sample and layer at every
                     training step, but the input side of the layer reading the model's input is
                     projected once per sample, not per step (trajectory.InputSides) -- on a 2048-wide
                     first layer at k = 1024 training + recording 2.2-2.6x plain training over 4 epochs
                     (3.8-4.6x projecting it every step; bench/results/dvemb.md); "kronecker" (LoGra's
                     P_out ⊗ P_in): k_out·d_out + k_in·d_in, 1.0-1.4x there at batch 512, 1.3-1.4x at
                     128, and the steps kept as their two sides (far less memory). Kronecker is as
                     accurate at a large k (digits MLP, k = 1024: Spearman with the trajectory LOO
                     0.511 vs 0.505, bench/results/projection_split.md) but less at a small one (k = 64 on a single
                     Linear layer: LDS 0.762 vs 0.833 on Adult, 0.605 vs 0.621 on digits, same file),
                     so it is the choice for wide layers, not the default.
    store_dir        None: the recorded steps in memory when they fit 256 MB, else in a temporary
                     folder; kept while the instance holds them for a later call (dropped by close()
                     or with the instance);
                     a folder: the recorded steps and the embeddings are kept there, fingerprinted,
                     and reused by a later run with the same data and settings.
    recursion        "auto" (default): whichever of the two below costs fewer multiply-adds for the
                     call's number of queries; "embedding": form E [N, k] (2·R·k² for R recorded
                     rows), kept and reused, then score any query by a dot product; "query": the
                     same scores without E, by propagating the queries backwards (query_recursion.py:
                     2·R·k·Q, a pass over the recorded steps per call; fit() has Q = 1).
                     Once E exists (this instance or store_dir), every call scores with it.
    store_dtype      "float32" (default), "float16" (half the disk) or "float64" for the recorded steps
                     (float64 also runs the recursion in float64; otherwise it runs in float32).
    grad_params      None (every trainable parameter) or names / module-name prefixes.
    """

    name = "dvemb"
    requires_labels = False

    def __init__(self, model: nn.Module | Callable[[], nn.Module], loss: str | Callable = "cross_entropy",
                 epochs: int = 20, batch_size: int = 64, lr: float = 0.01, optimizer: str = "sgd",
                 weight_decay: float = 0.0, proj_dim: int = 1024, layer_dims: dict | None = None,
                 projection: str = "gaussian", proj_seed: int = 0, projection_structure: str = "khatri_rao",
                 store_dir: str | None = None, store_dtype: str = "float32", recursion: str = "auto",
                 grad_params: Any = None, device: Any = None, seed: int | None = None, max_time: float | None = None,
                 progress: bool = True, num_threads: int | None = None):
        self.optimizer, self.backend, self.grad_params = T.check_common(loss, optimizer, "fast", grad_params, model)
        self.model, self.loss = model, loss
        self.epochs = V.check_positive_int(epochs, "epochs")
        self.batch_size = V.check_positive_int(batch_size, "batch_size")
        self.lr = V.check_positive_float(lr, "lr")
        self.weight_decay = V.check_positive_float(weight_decay, "weight_decay", allow_zero=True)
        self.proj_dim = V.check_positive_int(proj_dim, "proj_dim")
        if layer_dims is not None and not isinstance(layer_dims, dict):
            raise ValueError(f"layer_dims: expected None or {{layer name: k or (k_out, k_in)}}, got "
                             f"{type(layer_dims).__name__}")
        self.layer_dims = None if layer_dims is None else dict(layer_dims)
        self.projection = V.check_choice(projection, "projection", grads.PROJECTION_KINDS)
        self.proj_seed = V.check_positive_int(proj_seed, "proj_seed", allow_zero=True)
        self.projection_structure = V.check_choice(projection_structure, "projection_structure", grads.PROJECTION_STRUCTURES)
        self.store_dir = None if store_dir is None else Path(store_dir)
        self.store_dtype = V.check_choice(store_dtype, "store_dtype", ("float32", "float16", "float64"))
        self.recursion = V.check_choice(recursion, "recursion", ("auto", "embedding", "query"))
        super().__init__(device=device, seed=seed, max_time=max_time, progress=progress, num_threads=num_threads)
        self._cache: _Recorded | None = None      # the last recorded run, reused by a call with the same key

    # ------------------------------------------------------------------------------------------
    def _projector(self) -> grads.Projector:
        return grads.Projector(self.proj_dim, layer_dims=self.layer_dims, kind=self.projection,
                               seed=self.proj_seed, structure=self.projection_structure)

    def _key(self, prep: T.Prepared, seed: int) -> dict:
        h = runstate.new_hash()
        for t in (prep.xs, prep.ys):
            runstate.update_with_tensor(h, t)
        # neither where the steps are kept nor how the recursion runs changes the result
        settings = {k: v for k, v in self.settings().items() if k not in ("store_dir", "recursion")}
        return runstate.fingerprint({"method": self.name, **settings}, seed, 1, prep.model, self.loss, h.digest())

    def _recorded(self, prep: T.Prepared, run: Run) -> _Recorded:
        """The recorded run for this source and these settings: trained now, or the instance's own
        (memory) or store_dir's (another process's) when the fingerprint matches. Leaves prep.model at θ_T."""
        key = self._key(prep, run.seed)
        if self._cache is not None and self._cache.key == key:
            prep.model.load_state_dict(self._cache.state)
            self._cache.info["reused"] = "memory"
            return self._cache
        if self._cache is not None:
            self._cache.close()
            self._cache = None
        if self.store_dir is None:
            tmp = tempfile.TemporaryDirectory(prefix="dvgs_fast_dvemb.")
            try:
                rec = self._train(prep, run, Path(tmp.name), key)
            except BaseException:
                tmp.cleanup()
                raise
            rec.tmp = tmp
        else:
            files = runstate.CheckpointFiles(self.store_dir, method="DVEmb")
            with runstate.DirLock(files):
                state = runstate.read_state(files)
                if state is not None:
                    runstate.compare(state["fingerprint"], key, files)
                    prep.model.load_state_dict(state["model"])
                    projector = self._projector().plan_layers(state["projector_layers"])
                    # The layers re-planned must give the projection the steps were recorded with
                    # (a state of an earlier version names only its layers: its store says which).
                    saved = state.get("projector") or read_meta(self.store_dir / TRAJECTORY)["fingerprint"].get("projector")
                    if projector.fingerprint() != saved:
                        raise files.error("holds steps recorded with another projection (an earlier version's split "
                                          "of k over a layer's sides): remove it or use another folder")
                    rec = _Recorded(key, self.store_dir, projector, {"n": prep.xs.shape[0], **state["info"], "reused": "store_dir"},
                                    {k: v.clone() for k, v in prep.model.state_dict().items()})
                    if state.get("embedding", True):      # states written before the query route always had E
                        rec.E = np.load(self.store_dir / EMBEDDING, mmap_mode="r")
                else:
                    rec = self._train(prep, run, self.store_dir, key)
                    runstate.write_state(files.state, self._state(rec))
        self._cache = rec
        return rec

    def _state(self, rec: _Recorded) -> dict:
        return {"format": runstate.FORMAT, "fingerprint": rec.key, "model": rec.state, "embedding": rec.E is not None,
                "projector_layers": [_layer_spec(p) for p in rec.projector.layers],
                "projector": rec.projector.fingerprint(), "info": rec.info}

    def _train(self, prep: T.Prepared, run: Run, folder: Path, key: dict) -> _Recorded:
        n = prep.xs.shape[0]
        sgd = self.optimizer == "sgd"
        projector = self._projector()
        # plan the projection from one recording of the first rows: the layers are known before training
        scorer = grads.FastScorer(prep.model, prep.names, prep.sample_loss, "dot", owner="DataValueEmbedding")
        with own_rng(run.device):
            sides = projector.projects_sides(scorer.record(prep.xs[:2], prep.ys[:2]).factors())
        k = projector.dim
        w = projector.side_dim if sides else k                          # a step's row: its sides, or formed
        rows, width = self.epochs * n, (w if sgd else 2 * w)
        aux = {"index": "float64", "step": "float64"}
        in_memory = self.store_dir is None and rows * width * np.dtype(DTYPES[self.store_dtype]).itemsize <= _IN_MEMORY
        traj_dir = folder / TRAJECTORY
        if in_memory:
            writer = steps = StepsInMemory(rows, width, self.store_dtype, aux)
        else:
            _io.refuse_link(traj_dir)
            if traj_dir.exists():        # no state for it: a run killed in its training, which starts over
                shutil.rmtree(traj_dir)
            create_store(traj_dir, rows, width, dtype=self.store_dtype, aux=aux,
                         fingerprint={"run": key, "projector": projector.fingerprint()})
            writer = StoreWriter(traj_dir, 0, rows, checkpoint_every=3600.0).open()
        bar = run.progress(self.epochs, "DVEmb training", unit="epoch")
        t0 = time.perf_counter()
        try:
            traj = record_training(self, prep, run, projector, writer, bar, sides=sides)
        finally:
            bar.close()
            if not in_memory:
                writer.close(commit=True)
        if not in_memory:
            meta = read_meta(traj_dir)
            meta["complete"] = True
            write_meta(traj_dir, meta)
            steps = GradientStore.open(traj_dir)
        info = {"n": n, "steps": traj.steps, "proj_dim": k, "projector": projector.describe(),
                "train_cpu_s": traj.train_cpu_s, "record_cpu_s": traj.record_cpu_s, "input_sides": traj.input_sides,
                "recorded_bytes": int(steps.nbytes), "recorded_in": "memory" if in_memory else "disk",
                "recorded_as": _SIDES if sides else "projected gradients",
                "train_wall_s": time.perf_counter() - t0}
        rec = _Recorded(key, folder, projector, info, {k: v.clone() for k, v in prep.model.state_dict().items()})
        rec.steps = steps if in_memory else None
        return rec

    def _embedding(self, rec: _Recorded, run: Run):
        """E [N, k] of the recorded run (formed once, then kept with it; in store_dir under its lock)."""
        if rec.E is not None:
            return rec.E
        if self.store_dir is None:
            rec.E = self._embed(rec, run, rec.folder / EMBEDDING)
            return rec.E
        files = runstate.CheckpointFiles(self.store_dir, method="DVEmb")
        with runstate.DirLock(files):
            state = runstate.read_state(files)
            if state is not None and state.get("embedding", True) and state["fingerprint"] == rec.key:
                rec.E = np.load(self.store_dir / EMBEDDING, mmap_mode="r")      # another process formed it
            else:
                rec.E = self._embed(rec, run, self.store_dir / EMBEDDING)
                runstate.write_state(files.state, self._state(rec))
        return rec.E

    def _embed(self, rec: _Recorded, run: Run, path: Path):
        store = rec.store()
        bar = run.progress(rec.info["steps"], "DVEmb embedding", unit="step")
        c1 = time.process_time()
        partial = path.with_name(path.stem + ".partial.npy")       # never a half-written E under the final name
        _io.refuse_link(path)
        _io.refuse_link(partial)
        try:
            E = embed(store, rec.n, rec.k, sgd=self.optimizer == "sgd", step_lr=_step_lr(store, self.lr),
                      progress=bar, out_path=partial, exact=self.store_dtype == "float64",
                      stop=self._stop(run, "the embedding recursion"))
        except ValueError as exc:
            raise self._diverged(exc) from None
        finally:
            bar.close()
        rec.info["embed_cpu_s"] = time.process_time() - c1
        rec.info["embedding_bytes"] = int(E.shape[0] * E.shape[1] * E.dtype.itemsize)
        if isinstance(E, np.memmap):
            E.flush()
            del E
            os.replace(partial, path)
        elif self.store_dir is None:
            return E                                             # small and the run's own: kept in memory
        else:
            _atomic_save(path, E.astype(np.float32))
        return np.load(path, mmap_mode="r")

    def _stop(self, run: Run, what: str):
        """stop(step) for a recursion: a max_time error once the budget is spent (a partial
        recursion is no result; the recorded steps stay with the instance or in store_dir, so the
        next call starts at the recursion, not the training)."""
        def stop(step: int) -> None:
            if run.budget.time_up():
                raise ValueError(f"max_time: the budget ran out during {what} (at recorded step {step}); it needs "
                                 f"every step (raise max_time; the recorded training is kept for the next call)")
        return stop

    def _diverged(self, exc: ValueError) -> ValueError:
        if self.optimizer == "sgd" or not str(exc).startswith("lr:"):
            return exc
        # Adam's per-coordinate step does not shrink with the gradient, so the propagated
        # change (u gᵀ per sample) can exceed the step's own size and the recursion grows.
        return ValueError(f"{exc}; with optimizer={self.optimizer!r} the embedding propagates the preconditioned "
                          f"steps (an approximation) and these can grow without bound: use optimizer='sgd' "
                          f"(exact) or a lower lr")

    def _route(self, rec: _Recorded, n_queries: int) -> str:
        """"embedding" (score with E) or "query" (query_recursion: the same scores without E)."""
        if rec.E is not None or self.recursion == "embedding":
            return "embedding"
        if self.recursion == "query":
            return "query"
        # multiply-adds: E costs 2·R·k² to form, then N·k·Q to score; the query route 2·R·k·Q
        R, n, k = rec.rows, rec.n, rec.k
        return "query" if 2 * R * n_queries < 2 * R * k + n * n_queries else "embedding"

    def _scores(self, rec: _Recorded, Q: torch.Tensor, run: Run, emit) -> None:
        """emit(q0, q1, s0, s1, [q1-q0, s1-s0] float64 scores) for the query vectors Q [q, k], by E or
        by the query route (blocks of queries, one pass over the recorded steps each)."""
        rec.info["recursion"] = route = self._route(rec, Q.shape[0])
        c0 = time.process_time()
        if route == "embedding":
            E = self._embedding(rec, run)
            n = E.shape[0]
            step = max(1, (32 << 20) // max(1, E.shape[1] * 8))
            for s0 in range(0, n, step):
                Eb = torch.from_numpy(np.asarray(E[s0:s0 + step], dtype=np.float64))
                emit(0, Q.shape[0], s0, s0 + Eb.shape[0], Q @ Eb.t())
        else:
            store = rec.store()
            step_lr = _step_lr(store, self.lr)
            block = max(1, _QUERY_BYTES // (8 * rec.n + 8 * rec.k))
            bar = run.progress(rec.info["steps"] * -(-Q.shape[0] // block), "DVEmb query recursion", unit="step")
            try:
                for q0 in range(0, Q.shape[0], block):
                    q = Q[q0:q0 + block]
                    S = query_scores(store, rec.n, q.t().contiguous(), sgd=self.optimizer == "sgd",
                                     step_lr=step_lr, progress=bar, exact=self.store_dtype == "float64",
                                     stop=self._stop(run, "the query recursion"))
                    emit(q0, q0 + q.shape[0], 0, rec.n, torch.from_numpy(np.ascontiguousarray(S.T)))
            except ValueError as exc:
                raise self._diverged(exc) from None
            finally:
                bar.close()
        rec.info["scores_cpu_s"] = time.process_time() - c0

    # ------------------------------------------------------------------------------------------
    def _query_vectors(self, prep: T.Prepared, projector, xq, yq, batch: int, run: Run) -> torch.Tensor:
        """[q, k]: the queries' projected loss gradients at θ_T (eval mode)."""
        model = prep.model
        model.eval()
        scorer = grads.FastScorer(model, prep.names, prep.sample_loss, "dot", owner="DataValueEmbedding")
        out = []
        with grads.FrozenStatistics(model), own_rng(run.device):
            for a in range(0, xq.shape[0], batch):
                out.append(projector.project(scorer.record(xq[a:a + batch], yq[a:a + batch]).factors()))
        return torch.cat(out).to(torch.float64)

    def _fit(self, x_source, y_source, x_target, y_target, run: Run) -> Estimate:
        prep = T.prepare(self, x_source, y_source, x_target, y_target, run.device, run.seed)
        rec = self._recorded(prep, run)
        q = self._query_vectors(prep, rec.projector, prep.xt, prep.yt, 1024, run).mean(0, keepdim=True)
        values = np.empty(rec.n)

        def emit(q0, q1, s0, s1, block):
            values[s0:s1] = block[0].numpy()
        self._scores(rec, q, run, emit)
        info = dict(rec.info)
        return Estimate(values=values, info=info, timings={k: v for k, v in info.items() if k.endswith("_s")})

    def _attribute(self, x_source, y_source, x_query, y_query, sink: ScoreSink, run: Run, query_batch_size: int):
        try:
            prep = T.prepare(self, x_source, y_source, x_query, y_query, run.device, run.seed)
        except ValueError as exc:
            raise query_error(exc) from None
        rec = self._recorded(prep, run)
        Q = self._query_vectors(prep, rec.projector, prep.xt, prep.yt, query_batch_size, run)
        self._scores(rec, Q, run, sink.add)
        return dict(rec.info)

    def close(self) -> None:
        """Delete the temporary folder of the recorded steps kept for a later call (store_dir None);
        also done when the instance is garbage-collected."""
        if self._cache is not None:
            self._cache.close()
            self._cache = None


@dataclass
class _Recorded:
    """One recorded training run: its folder (TRAJECTORY, EMBEDDING once formed), the projection,
    θ_T, and what was measured. ``tmp`` owns the folder when it is a temporary one."""
    key: dict
    folder: Path
    projector: grads.Projector
    info: dict
    state: dict
    E: Any = None
    tmp: Any = None
    steps: StepsInMemory | None = None

    def store(self) -> GradientStore | StepsInMemory | StepSides:
        """The recorded steps, read as rows of projected gradients ([g] or [g | u])."""
        raw = self.steps if self.steps is not None else GradientStore.open(self.folder / TRAJECTORY)
        # runs recorded before sides existed have no "recorded_as": their rows are formed
        return StepSides(raw, self.projector) if self.info.get("recorded_as") == _SIDES else raw

    @property
    def k(self) -> int:
        return self.projector.dim

    @property
    def rows(self) -> int:
        return self.store().n

    @property
    def n(self) -> int:
        return self.info["n"]

    def close(self) -> None:
        self.E = self.steps = None
        if self.tmp is not None:
            self.tmp.cleanup()
            self.tmp = None


def _step_lr(store: GradientStore, lr: float) -> np.ndarray:
    """lr / B of every recorded step (SGD's u = lr/B · g; B from the step column)."""
    return lr / np.bincount(store.aux("step").astype(np.int64)).astype(np.float64)


def _matvec(E, q: np.ndarray) -> np.ndarray:
    out = np.empty(E.shape[0])
    step = max(1, (32 << 20) // max(1, E.shape[1] * 8))
    for a in range(0, E.shape[0], step):
        out[a:a + step] = np.asarray(E[a:a + step], dtype=np.float64) @ q
    return out


__all__ = ["DataValueEmbedding"]
