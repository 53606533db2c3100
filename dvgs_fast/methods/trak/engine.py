"""What TRAK and LoGra share: members -> stores of projected gradients -> one kernel per member
-> scores by products over the stores.

For members m = 1..M with training features Φ_m [N, k] (a store each), query features φ_m(q):

    score(q, i) = c · (1/M) Σ_m φ_m(q) (Φ_mᵀΦ_m + λ_m I)⁻¹ φ_m(z_i)ᵀ · w_i

TRAK: c = 1, w_i = Q̄_i (the out-to-loss weight averaged over the members); LoGra: c = N (its
Hessian is the projected Fisher ΦᵀΦ/N + λI), w_i = 1. λ_m comes from kernel.relative_lambda
(training features only). The query side is preconditioned once, ψ_m = φ_m K_m, and the
members' columns are scored side by side: [ψ_1 … ψ_M] [Φ_1 … Φ_M]ᵀ, blockwise (gradstore).

Under torchrun (fit / featurize): each rank writes its row range of every store, ΦᵀΦ and the
values are summed / gathered over ranks; ``store_dir`` must be a folder every rank sees (without
one, rank 0's temporary folder is used: one machine only).
"""
from __future__ import annotations

import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from dvgs_fast import gradstore
from dvgs_fast.distributed import context_for
from dvgs_fast.methods import _grad_training as T
from dvgs_fast.methods.base import Estimate
from dvgs_fast.methods.trak import members as M
from dvgs_fast.methods.trak.features import MemberFeatures, data_digest
from dvgs_fast.methods.trak.kernel import Kernel, relative_lambda


@contextmanager
def _store_root(cfg, ctx):
    """store_dir, or a temporary folder removed afterwards (rank 0's, shared with the others)."""
    if cfg.store_dir is not None:
        Path(cfg.store_dir).mkdir(parents=True, exist_ok=True)
        yield Path(cfg.store_dir)
        return
    path = tempfile.mkdtemp(prefix=f"dvgs_{cfg.name}_") if ctx.is_main else None
    path = Path(ctx.broadcast_object(path))
    try:
        yield path
    finally:
        ctx.barrier()
        if ctx.is_main:
            shutil.rmtree(path, ignore_errors=True)


class Session:
    """One call's members, stores and kernels."""

    def __init__(self, cfg, prep, run, ctx, root: Path):
        self.cfg, self.prep, self.run, self.ctx, self.root = cfg, prep, run, ctx, root
        self.timings: dict[str, float] = {}
        self.info: dict = {}

    # ------------------------------------------------------------------------------ stages
    def featurise(self) -> None:
        cfg, prep, run = self.cfg, self.prep, self.run
        t0 = time.perf_counter()
        self.members, how = M.build(cfg, prep, run, self.root if cfg.store_dir is not None else None, self.ctx)
        self.timings["train"] = time.perf_counter() - t0
        t0, c0 = time.perf_counter(), time.process_time()
        digest = data_digest(prep)
        self.feats, self.stores, per = [], [], []
        for j, m in enumerate(self.members):
            mf = MemberFeatures(cfg, prep, m, j, run.seed, cfg.output_function(prep), cfg.weights_q)
            store, t = mf.write(self.root / f"member_{j:02d}", digest, self.ctx, stop=run.budget.time_up)
            if store is None:
                raise M.Stopped(f"max_time while featurising member {j}")
            self.feats.append(mf)
            self.stores.append(store)
            per.append({"member": m.label, "dim": store.dim, **t})
        self.timings["featurise"] = time.perf_counter() - t0
        self.timings["featurise_cpu"] = time.process_time() - c0
        self.info.update(how)
        self.info["members"] = per
        self.info["dim_per_member"] = self.stores[0].dim if self.stores else 0
        self.info["store_dtype"] = cfg.store_dtype
        if cfg.store_dir is not None:
            self.info["stores"] = [str(s.directory) for s in self.stores]

    def kernels(self) -> None:
        t0 = time.perf_counter()
        n = self.stores[0].n
        lo, hi = self.ctx.shard(n) if self.ctx.enabled else (0, n)
        self.kern = []
        for store in self.stores:
            xtx = gradstore.gram(store, start=lo, stop=hi, device=self.prep.xt.device)
            if self.ctx.enabled:
                xtx = torch.from_numpy(self.ctx.all_reduce_sum(xtx.numpy()))
            self.kern.append(Kernel(xtx, relative_lambda(xtx, self.cfg.reg_value)))
        self.info["kernels"] = [k.describe() for k in self.kern]
        self.info[self.cfg.reg_name] = self.cfg.reg_value
        self.timings["kernel"] = time.perf_counter() - t0

    def source_scale(self) -> np.ndarray | None:
        if not self.cfg.weights_q:
            return None
        return np.mean([s.aux("q").astype(np.float64) for s in self.stores], 0)

    def query_vectors(self, xq: torch.Tensor, yq: torch.Tensor, batch: int) -> torch.Tensor:
        """[n_query, Σ dims]: ψ = c/M [φ_1 K_1, …, φ_M K_M] (float64 for float64 stores, else float32)."""
        t0 = time.perf_counter()
        c = (self.stores[0].n if self.cfg.kernel_is_mean else 1.0) / len(self.stores)
        parts = [k.apply(mf.queries(xq, yq, batch)) * c for mf, k in zip(self.feats, self.kern)]
        psi = torch.cat(parts, 1)
        if not bool(torch.isfinite(psi).all()):
            raise ValueError("x_query: a query's projected gradient is not finite (NaN/Inf): check the inputs or "
                             "the model")
        self.timings["queries"] = time.perf_counter() - t0
        keep64 = any(s.dtype == np.float64 for s in self.stores)
        return psi if keep64 else psi.to(torch.float32)


def _probe_target(x_source, y_source):
    """Two source rows in the target's place (featurize() has no queries)."""
    from dvgs_fast.sources import as_source, is_chunked_input
    if is_chunked_input(x_source):
        _, _, x, y = as_source(x_source, y_source).probe(2)
        return x, (y if y is not None else None)
    return x_source[:2], (None if y_source is None else y_source[:2])


def _prepare(cfg, x_source, y_source, x_query, y_query, run, ctx, query_error=None):
    seed = ctx.broadcast_object(run.seed)
    run.seed = seed
    try:
        prep = T.prepare(cfg, x_source, y_source, x_query, y_query, ctx.device_for(run.device), seed, chunked_ok=True)
        _check_classes(cfg, prep)
    except ValueError as exc:
        raise (query_error(exc) if query_error is not None else exc) from None
    return prep


def _check_classes(cfg, prep) -> None:
    """Every in-memory label within the model's classes (T.prepare's probe sees two rows)."""
    if cfg.loss != "cross_entropy":
        return
    with torch.no_grad():
        c = int(prep.model.eval()(prep.xt[:1]).shape[1])
    for name, y in (("y_target", prep.yt), ("y_source", prep.ys)):
        if y is not None and y.numel() and (int(y.min()) < 0 or int(y.max()) >= c):
            raise ValueError(f"{name}: labels must be in [0, {c}) (the model has {c} outputs), found range "
                             f"[{int(y.min())}, {int(y.max())}]")


def fit(cfg, x_source, y_source, x_target, y_target, run) -> Estimate:
    """Values: each source row's mean score over the target rows (= Q̄_i φ_i · mean_j ψ_j)."""
    ctx = context_for(cfg.distributed, run.device)
    try:
        prep = _prepare(cfg, x_source, y_source, x_target, y_target, run, ctx)
        n = len(prep.source)
        with _store_root(cfg, ctx) as root:
            s = Session(cfg, prep, run, ctx, root)
            try:
                s.featurise()
            except M.Stopped as stop:
                return Estimate(values=np.zeros(n), counts=np.zeros(n, dtype=np.int64), status="stopped",
                                stop_reason="max_time", progress=str(stop), timings=s.timings, info=s.info)
            s.kernels()
            psi = s.query_vectors(prep.xt, prep.yt, cfg.source_batch_size)
            t0 = time.perf_counter()
            lo, hi = ctx.shard(n) if ctx.enabled else (0, n)
            v = gradstore.matmul_rows(s.stores, psi.to(torch.float64).mean(0, keepdim=True).t(), start=lo,
                                      stop=hi, device=prep.xt.device)[:, 0].numpy()
            scale = s.source_scale()
            if scale is not None:
                v = v * scale[lo:hi]
            values = ctx.gather_shards(v, n) if ctx.enabled else v
            s.timings["score"] = time.perf_counter() - t0
            info = dict(s.info)
            if ctx.enabled:
                info.update({"world_size": ctx.world_size, "rank": ctx.rank, "shard": [lo, hi]})
            return Estimate(values=np.asarray(values, dtype=np.float64), info=info, timings=s.timings)
    finally:
        ctx.close()


def attribute(cfg, x_source, y_source, x_query, y_query, sink, run, query_batch_size: int, query_error) -> dict:
    """The [n_query, n_source] scores into `sink`, blockwise over the stores."""
    ctx = context_for(cfg.distributed, run.device)
    try:
        if ctx.enabled:
            raise ValueError(f"distributed: attribute() runs in one process; featurise under torchrun with "
                             f"{type(cfg).__name__}(..., store_dir=DIR).featurize(x_source, y_source), then call "
                             f"attribute() in one process with the same settings (it reuses the stores)")
        prep = _prepare(cfg, x_source, y_source, x_query, y_query, run, ctx, query_error)
        with _store_root(cfg, ctx) as root:
            s = Session(cfg, prep, run, ctx, root)
            try:
                s.featurise()
            except M.Stopped as stop:
                again = ", or call again: store_dir keeps the work done" if cfg.store_dir else ""
                raise ValueError(f"max_time: the budget ran out ({stop}); attribute() returns no partial matrix "
                                 f"(raise max_time{again})") from None
            s.kernels()
            psi = s.query_vectors(prep.xt, prep.yt, query_batch_size)
            t0 = time.perf_counter()
            bar = run.progress(psi.shape[0] * s.stores[0].n, f"{type(cfg).__name__} scores", unit="score")
            try:
                done = gradstore.score_into(sink, psi, s.stores, source_scale=s.source_scale(), progress=bar,
                                            stop=run.budget.time_up, device=prep.xt.device)
            finally:
                bar.close()
            if not done:
                raise ValueError("max_time: the budget ran out while scoring; attribute() returns no partial matrix "
                                 "(raise max_time)")
            s.timings["score"] = time.perf_counter() - t0
            return {**s.info, "timings": s.timings}
    finally:
        ctx.close()


def featurize(cfg, x_source, y_source, run) -> dict:
    """Members and their stores in store_dir (sharded under torchrun); returns their description."""
    if cfg.store_dir is None:
        raise ValueError("store_dir: featurize() writes the stores there for later calls; pass store_dir=DIR")
    ctx = context_for(cfg.distributed, run.device)
    try:
        xt, yt = _probe_target(x_source, y_source)
        prep = _prepare(cfg, x_source, y_source, xt, yt, run, ctx)
        with _store_root(cfg, ctx) as root:
            s = Session(cfg, prep, run, ctx, root)
            try:
                s.featurise()
            except M.Stopped as stop:
                return {"status": "stopped", "stopped_by": "max_time", "progress": str(stop), **s.info,
                        "timings": s.timings}
            return {"status": "completed", "seed": run.seed, **s.info, "timings": s.timings}
    finally:
        ctx.close()


__all__ = ["Session", "attribute", "featurize", "fit"]
