"""DataValueEmbedding: trajectory-specific leave-one-out from one training run (Wang et al. 2024).

    dve = DataValueEmbedding(model, epochs=20, lr=0.05, optimizer="sgd", proj_dim=1024, seed=0)
    att = dve.attribute(x_train, y_train, x_query, y_query)   # [n_query, n_train]
    res = dve.fit(x_train, y_train, x_target, y_target)       # values: the mean over the target

The model is trained on the source set once (trajectory.py records each step's projected
per-sample gradients), the embeddings are accumulated backwards over the recorded steps
(embedding.py), and a query's score against training sample i is ⟨∇ℓ(q; θ_T), E_i⟩ in the
projected space: the first-order effect on q's loss of removing i from that very run, with its
data order. A second fit()/attribute() on the same source, settings and seed reuses the
embeddings (kept on the instance; with ``store_dir`` also on disk, fingerprinted, so another
process reuses them).
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from dvgs_fast import _validation as V
from dvgs_fast import grads, runstate
from dvgs_fast._utils import own_rng
from dvgs_fast.attribution import AttributionMixin, ScoreSink, query_error
from dvgs_fast.gradstore import GradientStore, StoreWriter, create_store
from dvgs_fast.gradstore.store import read_meta, write_meta
from dvgs_fast.methods import _grad_training as T
from dvgs_fast.methods.base import Estimate, Run, Valuation
from dvgs_fast.methods.dvemb.embedding import embed
from dvgs_fast.methods.dvemb.trajectory import record_training

EMBEDDING = "embedding.npy"


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
    store_dir        None: a temporary folder for the recorded steps (deleted after the run);
                     a folder: the recorded steps and the embeddings are kept there, fingerprinted,
                     and reused by a later run with the same data and settings.
    store_dtype      "float32" (default), "float16" (half the disk) or "float64" for the recorded steps.
    grad_params      None (every trainable parameter) or names / module-name prefixes.
    """

    name = "dvemb"
    requires_labels = False

    def __init__(self, model: nn.Module | Callable[[], nn.Module], loss: str | Callable = "cross_entropy",
                 epochs: int = 20, batch_size: int = 64, lr: float = 0.01, optimizer: str = "sgd",
                 weight_decay: float = 0.0, proj_dim: int = 1024, layer_dims: dict | None = None,
                 projection: str = "gaussian", proj_seed: int = 0, projection_structure: str = "khatri_rao",
                 store_dir: str | None = None, store_dtype: str = "float32",
                 grad_params: Any = None, device: Any = None, seed: int | None = None, max_time: float | None = None,
                 progress: bool = True):
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
        super().__init__(device=device, seed=seed, max_time=max_time, progress=progress)
        self._cache: tuple | None = None          # (key, E, final state_dict, projector, info)

    # ------------------------------------------------------------------------------------------
    def _projector(self) -> grads.Projector:
        return grads.Projector(self.proj_dim, layer_dims=self.layer_dims, kind=self.projection,
                               seed=self.proj_seed, structure=self.projection_structure)

    def _key(self, prep: T.Prepared, seed: int) -> dict:
        h = runstate.new_hash()
        for t in (prep.xs, prep.ys):
            runstate.update_with_tensor(h, t)
        settings = {k: v for k, v in self.settings().items() if k not in ("store_dir",)}
        return runstate.fingerprint({"method": self.name, **settings}, seed, 1, prep.model, self.loss, h.digest())

    def _embeddings(self, prep: T.Prepared, run: Run):
        """(E [N, k], projector, info), training and embedding only when no cached result fits.
        Leaves prep.model at θ_T."""
        key = self._key(prep, run.seed)
        if self._cache is not None and self._cache[0] == key:
            _, E, state, projector, info = self._cache
            prep.model.load_state_dict(state)
            return E, projector, {**info, "reused": "memory"}
        if self.store_dir is None:
            with tempfile.TemporaryDirectory(prefix="dvgs_fast_dvemb.") as tmp:
                E, projector, info = self._compute(prep, run, Path(tmp), key, None)
        else:
            files = runstate.CheckpointFiles(self.store_dir, method="DVEmb")
            with runstate.DirLock(files):
                state = runstate.read_state(files)
                if state is not None:
                    runstate.compare(state["fingerprint"], key, files)
                    prep.model.load_state_dict(state["model"])
                    projector = self._projector().plan_layers(state["projector_layers"])
                    E = np.load(self.store_dir / EMBEDDING, mmap_mode="r")
                    info = {**state["info"], "reused": "store_dir"}
                else:
                    E, projector, info = self._compute(prep, run, self.store_dir, key, self.store_dir / EMBEDDING)
                    runstate.write_state(files.state, {
                        "format": runstate.FORMAT, "fingerprint": key, "model": prep.model.state_dict(),
                        "projector_layers": [_layer_spec(p) for p in projector.layers], "info": info})
        self._cache = (key, E, {k: v.clone() for k, v in prep.model.state_dict().items()}, projector, info)
        return E, projector, info

    def _compute(self, prep: T.Prepared, run: Run, folder: Path, key: dict, embedding_path: Path | None):
        n = prep.xs.shape[0]
        sgd = self.optimizer == "sgd"
        projector = self._projector()
        # plan the projection from one recording of the first rows: the layers are known before training
        scorer = grads.FastScorer(prep.model, prep.names, prep.sample_loss, "dot", owner="DataValueEmbedding")
        with own_rng(run.device):
            projector.plan(scorer.record(prep.xs[:2], prep.ys[:2]).factors())
        k = projector.dim
        rows = self.epochs * n
        traj_dir = folder / "trajectory"
        create_store(traj_dir, rows, k if sgd else 2 * k, dtype=self.store_dtype, aux={"index": "float64", "step": "float64"},
                     fingerprint={"run": key, "projector": projector.fingerprint()})
        writer = StoreWriter(traj_dir, 0, rows, checkpoint_every=3600.0).open()
        bar = run.progress(self.epochs, "DVEmb training", unit="epoch")
        t0 = time.perf_counter()
        try:
            traj = record_training(self, prep, run, projector, writer, bar)
        finally:
            bar.close()
            writer.close(commit=True)
        meta = read_meta(traj_dir)
        meta["complete"] = True
        write_meta(traj_dir, meta)
        store = GradientStore.open(traj_dir)
        bar = run.progress(traj.steps, "DVEmb embedding", unit="step")
        c1 = time.process_time()
        try:
            E = embed(store, n, k, sgd=sgd, step_lr=np.asarray(traj.lrs), progress=bar, out_path=embedding_path)
        finally:
            bar.close()
        info = {"steps": traj.steps, "proj_dim": k, "projector": projector.describe(),
                "train_cpu_s": traj.train_cpu_s, "record_cpu_s": traj.record_cpu_s,
                "embed_cpu_s": time.process_time() - c1, "recorded_bytes": int(store.nbytes),
                "embedding_bytes": int(E.shape[0] * E.shape[1] * E.dtype.itemsize), "wall_s": time.perf_counter() - t0}
        if embedding_path is not None and not isinstance(E, np.memmap):
            _atomic_save(embedding_path, E.astype(np.float32))
            E = np.load(embedding_path, mmap_mode="r")
        return E, projector, info

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
        E, projector, info = self._embeddings(prep, run)
        q = self._query_vectors(prep, projector, prep.xt, prep.yt, 1024, run).mean(0)
        values = _matvec(E, q.numpy())
        return Estimate(values=values, info=info, timings={k: v for k, v in info.items() if k.endswith("_s")})

    def _attribute(self, x_source, y_source, x_query, y_query, sink: ScoreSink, run: Run, query_batch_size: int):
        try:
            prep = T.prepare(self, x_source, y_source, x_query, y_query, run.device, run.seed)
        except ValueError as exc:
            raise query_error(exc) from None
        E, projector, info = self._embeddings(prep, run)
        Q = self._query_vectors(prep, projector, prep.xt, prep.yt, query_batch_size, run)
        n = E.shape[0]
        step = max(1, (32 << 20) // max(1, E.shape[1] * 8))
        for s0 in range(0, n, step):
            Eb = torch.from_numpy(np.asarray(E[s0:s0 + step], dtype=np.float64))
            for q0 in range(0, Q.shape[0], query_batch_size):
                sink.add(q0, min(q0 + query_batch_size, Q.shape[0]), s0, s0 + Eb.shape[0],
                         Q[q0:q0 + query_batch_size] @ Eb.t())
        return info


def _matvec(E, q: np.ndarray) -> np.ndarray:
    out = np.empty(E.shape[0])
    step = max(1, (32 << 20) // max(1, E.shape[1] * 8))
    for a in range(0, E.shape[0], step):
        out[a:a + step] = np.asarray(E[a:a + step], dtype=np.float64) @ q
    return out


__all__ = ["DataValueEmbedding"]
