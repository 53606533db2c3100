"""InfluenceFunction: influence functions (Koh & Liang 2017) on the gradient engine.

    score(query j, source i) = ⟨∇ℓ(q_j), (H + λI)⁻¹ ∇ℓ(z_i)⟩

at the trained parameters, H the Hessian of the mean training loss (+ weight_decay·I, the
training's L2) over the Hessian's data (the source set, or ``hessian_samples`` of its rows drawn
at random). Positive: training on z_i lowers q_j's loss -- removing z_i would raise it by about
score/n (the attribute() contract's sign). ``fit()`` values each source sample by its mean score
over the target set: one preconditioned query, the mean target gradient.

Solvers (one module each): "direct" (explicit Hessian, Cholesky), "cg", "lissa" (Hessian-vector
products), "arnoldi" (leading eigenpairs), "kfac", "ekfac" (Kronecker-factored Gauss-Newton per
layer), "datainf" (per-layer rank-one inverse average). Each turns query gradients into
preconditioned ones, per parameter; the engine scores those against every source sample from one
recording per source block (``grads.batch_dots``: ghost dots for Linear / conv / Embedding
layers, so no per-sample gradient of the source is formed for them; the route of every layer is
in ``info["routes"]``; DataInf scores attribute()'s queries against the Hessian's own rows by
per-layer Grams instead where that is cheaper, ``info["scoring"]``). Many queries are preconditioned at once, in blocks of query_batch_size,
and the source is then streamed once for all of them (memory: n_query × p numbers for the
preconditioned gradients).
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from dvgs_fast import _validation as V
from dvgs_fast import grads
from dvgs_fast.attribution import AttributionMixin, ScoreSink, query_error
from dvgs_fast.distributed import context_for
from dvgs_fast.methods import _grad_training as T
from dvgs_fast.methods.base import Estimate, Run, Valuation, derive_seed
from dvgs_fast.methods.influence import problem as P
from dvgs_fast.methods.influence.arnoldi import ARNOLDI_RANK, Arnoldi
from dvgs_fast.methods.influence.datainf import DataInf
from dvgs_fast.methods.influence.direct import MAX_DIRECT_PARAMS, Direct
from dvgs_fast.methods.influence.iterative import CG, LiSSA
from dvgs_fast.methods.influence.kfac import EKFAC, KFAC
from dvgs_fast.methods.influence.store import FactorStore, data_digest, fingerprint

SOLVERS = {"direct": Direct, "cg": CG, "lissa": LiSSA, "arnoldi": Arnoldi, "kfac": KFAC, "ekfac": EKFAC,
           "datainf": DataInf}
DEFAULT_EPOCHS = 50                  # training of a model given as a factory (TracIn's and grad-dot's CLI default)
SAVE_EVERY_S = 30.0                  # factor fitting saves its state at most this often (and at stage ends)
# Settings that enter the curvature's fingerprint (damping does not: it is applied at solve time).
_CURVATURE_SETTINGS = ("solver", "fisher", "hessian_samples", "hessian_batch_size", "dtype", "weight_decay", "rank")
_TRAINING_SETTINGS = ("epochs", "batch_size", "lr", "optimizer", "weight_decay")


class InfluenceFunction(AttributionMixin, Valuation):
    """Influence of each source sample on the target (fit) or on each query (attribute).

    >>> res = InfluenceFunction(model, solver="ekfac").fit(x_source, y_source, x_target, y_target)
    >>> att = InfluenceFunction(trained, solver="cg").attribute(x_source, y_source, x_query, y_query)

    model              a trained nn.Module (scored as passed; deep-copied) or a zero-argument factory
                       (trained first on the source set).
    loss               "cross_entropy", "mse" or a callable (output, target) -> per-sample losses [N].
    solver             "direct" | "cg" | "lissa" | "arnoldi" | "kfac" | "ekfac" | "datainf" (see the modules).
    damping            λ ≥ 0, or "auto": direct/cg/lissa/arnoldi 0.01·λ_max(H) (direct.py says why),
                       kfac/ekfac 0.1·mean eigenvalue per layer (Kronfluence's), datainf 0.1·mean
                       ‖g_l‖²/d_l per layer (the paper's). The value used is in info["damping"]; a damped
                       Hessian that is not positive definite warns (CurvatureWarning).
    epochs             None: 0 for a module (already trained), 50 for a factory; training uses
                       batch_size, lr, optimizer ("adam" | "sgd") and weight_decay (an L2 term, also
                       added to the Hessian).
    grad_params        None (all trainable parameters) or names / module prefixes: the layers used.
    hessian_samples    None (every source row) or the number of source rows, drawn at random, the
                       Hessian (or Fisher) is measured on.
    hessian_batch_size rows per forward/backward of the Hessian's data (LiSSA: its mini-batch).
    fisher             kfac/ekfac: "ggn" (exact Gauss-Newton, one backward per output), "sampled"
                       (labels drawn from the model, Kronfluence's default), "empirical" (true labels).
    rank               arnoldi: eigenpairs kept.
    max_iterations, rtol   cg (defaults p, 1e-6) and lissa (1000, 1e-4).
    lissa_scale        lissa: s (None: 2·(λ_max + λ)).
    dtype              "float64" (default) or "float32": the curvature's and the solves' precision.
    source_batch_size  source rows recorded at once when scoring; target_batch_size: target rows
                       per forward for the mean target gradient.
    factors_dir        folder keeping the curvature (and the trained model) across calls and kills.
    distributed        None: automatic under torchrun (ranks split the Hessian's data and the
                       source rows; sums all-reduced); False: off.
    max_time           seconds: fitting stops (its state saved in factors_dir) or scoring stops
                       (fit returns the rows scored, status "stopped"; attribute raises).
    """

    name = "influence"

    def __init__(self, model: nn.Module | Callable[[], nn.Module], loss: str | Callable = "cross_entropy",
                 solver: str = "ekfac", damping: float | str = "auto", epochs: int | None = None,
                 batch_size: int = 64, lr: float = 1e-3, optimizer: str = "adam", weight_decay: float = 0.0,
                 grad_params: Any = None, hessian_samples: int | None = None, hessian_batch_size: int = 512,
                 fisher: str = "ggn", rank: int = ARNOLDI_RANK, max_iterations: int | None = None,
                 rtol: float | None = None, lissa_scale: float | None = None, dtype: str = "float64",
                 source_batch_size: int = 1024, target_batch_size: int = 1024,
                 factors_dir: str | os.PathLike | None = None, distributed: bool | None = None,
                 device: Any = None, seed: int | None = None, max_time: float | None = None, progress: bool = True, num_threads: int | None = None):
        _, _, self.grad_params = T.check_common(loss, "adam", "fast", grad_params, model)
        self.model, self.loss = model, loss
        self.solver = V.check_choice(solver, "solver", tuple(SOLVERS))
        if damping != "auto":
            damping = V.check_positive_float(damping, "damping", allow_zero=True)
        self.damping = damping
        self.epochs = None if epochs is None else V.check_positive_int(epochs, "epochs", allow_zero=True)
        self.batch_size = V.check_positive_int(batch_size, "batch_size")
        self.lr = V.check_positive_float(lr, "lr")
        self.optimizer = V.check_choice(optimizer.lower() if isinstance(optimizer, str) else optimizer, "optimizer",
                                        ("adam", "sgd"))
        self.weight_decay = V.check_positive_float(weight_decay, "weight_decay", allow_zero=True)
        self.hessian_samples = V.check_optional_positive_int(hessian_samples, "hessian_samples")
        self.hessian_batch_size = V.check_positive_int(hessian_batch_size, "hessian_batch_size")
        self.fisher = V.check_choice(fisher, "fisher", grads.FISHERS)
        if self.fisher == "sampled" and callable(loss) and self.solver in ("kfac", "ekfac"):
            raise ValueError("fisher: 'sampled' draws labels from the model's predictive distribution, which a custom "
                             "loss does not define; use fisher='ggn' or 'empirical'")
        self.rank = V.check_positive_int(rank, "rank")
        self.max_iterations = V.check_optional_positive_int(max_iterations, "max_iterations")
        self.rtol = V.check_optional_positive_float(rtol, "rtol")
        self.lissa_scale = V.check_optional_positive_float(lissa_scale, "lissa_scale")
        self.dtype = V.check_choice(dtype, "dtype", tuple(V.DTYPES))
        self.source_batch_size = V.check_positive_int(source_batch_size, "source_batch_size")
        self.target_batch_size = V.check_positive_int(target_batch_size, "target_batch_size")
        self.factors_dir = None if factors_dir is None else Path(factors_dir)
        if distributed is not None and not isinstance(distributed, bool):
            raise ValueError(f"distributed: expected None, True or False, got {distributed!r}")
        self.distributed = distributed
        super().__init__(device=device, seed=seed, max_time=max_time, progress=progress, num_threads=num_threads)

    # ------------------------------------------------------------------------------------------
    def _fit(self, x_source, y_source, x_target, y_target, run: Run) -> Estimate:
        with _Session(self, run) as s:
            prep = s.prepare(x_source, y_source, x_target, y_target)
            est = s.curvature(prep)
            if est is not None:
                return est
            t0 = time.perf_counter()
            names = s.solver.scored_names(s.prob)
            G = P.mean_gradient(s.prob, names, prep.xt, prep.yt, self.target_batch_size)
            n = prep.xs.shape[0]
            try:
                Vs = [(0, 1, s.solver.precondition(s.prob, G))]
            except P.Stopped:                      # e.g. CG's iterations: nothing scored yet
                s.timings["precondition"] = time.perf_counter() - t0
                return Estimate(values=np.zeros(n), counts=np.zeros(n, dtype=np.int64), status="stopped",
                                stop_reason="max_time", progress="0 source rows (the target gradient was not "
                                "preconditioned)", info=s.info(), timings=s.timings)
            s.timings["precondition"] = time.perf_counter() - t0
            lo, hi = s.source_shard(n)
            local = np.zeros(hi - lo)
            done = [lo]

            def on_block(q0, q1, s0, s1, block):
                local[s0 - lo:s1 - lo] = block[0].double().cpu().numpy()
                done[0] = s1

            stop = s.score(prep, Vs, lo, hi, on_block)
            counts = np.zeros(n, dtype=np.int64)
            counts[lo:done[0]] = 1
            values = np.zeros(n)
            values[lo:hi] = local
            if s.ctx.enabled:                      # every rank filled its own rows (whole source blocks)
                values = s.ctx.all_reduce_sum(values)
                counts = s.ctx.all_reduce_sum(counts.astype(np.float64)).astype(np.int64)
            return Estimate(values=values, counts=counts, status="stopped" if stop else "completed",
                            stop_reason=stop, progress=f"{int(counts.sum())} of {n} source rows",
                            info=s.info(), timings=s.timings)

    def _attribute(self, x_source, y_source, x_query, y_query, sink: ScoreSink, run: Run, query_batch_size: int):
        with _Session(self, run) as s:
            try:
                prep = s.prepare(x_source, y_source, x_query, y_query)
            except ValueError as exc:
                raise query_error(exc) from None
            if s.curvature(prep) is not None:
                raise ValueError("max_time: the budget ran out while fitting the curvature (its state is kept in "
                                 "factors_dir when given); attribute() returns no partial matrix (raise max_time)")
            t0 = time.perf_counter()
            qscorer = s.scorer()
            # the source is the Hessian's data: a solver may score it without preconditioning
            # (DataInf by per-layer Grams); one process only (the Grams pair rows of every rank)
            on_hessian_rows = self.hessian_samples is None and not s.ctx.enabled
            Vs, direct = [], []
            try:
                for q0 in range(0, prep.xt.shape[0], query_batch_size):
                    q1 = min(q0 + query_batch_size, prep.xt.shape[0])
                    fq = qscorer.record(prep.xt[q0:q1], prep.yt[q0:q1]).factors()
                    S = s.solver.hessian_row_scores(s.prob, fq) if on_hessian_rows else None
                    if S is not None:
                        direct.append((q0, q1, S))
                        continue
                    G = P.query_gradients(qscorer, s.prob, prep.xt[q0:q1], prep.yt[q0:q1], f=fq)
                    Vs.append((q0, q1, s.solver.precondition(s.prob, G)))
            except P.Stopped:
                raise ValueError("max_time: the budget ran out while preconditioning the queries; attribute() "
                                 "returns no partial matrix (raise max_time; the curvature is kept in factors_dir "
                                 "when given)") from None
            s.timings["precondition"] = time.perf_counter() - t0
            n, m = prep.xs.shape[0], prep.xt.shape[0]
            for q0, q1, S in direct:
                P.emit_scores(S, q0, q1, self.source_batch_size, sink.add)
            if not Vs:
                return {**s.info(), "timings": s.timings}
            lo, hi = s.source_shard(n)
            if s.ctx.enabled:                      # this rank's columns, summed onto every rank at the end
                local = np.zeros((m, n))

                def on_block(q0, q1, s0, s1, block):
                    local[q0:q1, s0:s1] = block.double().cpu().numpy()
            else:
                def on_block(q0, q1, s0, s1, block):
                    sink.add(q0, q1, s0, s1, block)
            if s.score(prep, Vs, lo, hi, on_block):
                raise ValueError("max_time: the budget ran out while scoring; attribute() returns no partial matrix "
                                 "(raise max_time; the curvature is kept in factors_dir when given)")
            if s.ctx.enabled:
                full = s.ctx.all_reduce_sum(local)
                step = max(1, (1 << 24) // max(1, m))
                for a in range(0, n, step):
                    sink.add(0, m, a, min(a + step, n), torch.from_numpy(np.ascontiguousarray(full[:, a:a + step])))
            return {**s.info(), "timings": s.timings}


class _Session:
    """One fit() / attribute() call: process group, factors_dir lock, the prepared problem,
    the solver's curvature (loaded, fitted, saved), scoring."""

    def __init__(self, cfg: InfluenceFunction, run: Run):
        self.cfg, self.run = cfg, run
        self.timings: dict[str, float] = {"train": 0.0, "curvature": 0.0}
        self.store: FactorStore | None = None

    def __enter__(self) -> "_Session":
        self.ctx = context_for(self.cfg.distributed, self.run.device)
        try:
            if self.cfg.factors_dir is not None:
                self.store = FactorStore(self.cfg.factors_dir, self.cfg.solver,
                                         self.ctx.rank if self.ctx.enabled else None).__enter__()
                if self.cfg.seed is None:
                    saved = self.store.saved_seed()
                    if saved is not None:
                        self.run.seed = saved
            self.run.seed = self.ctx.broadcast_object(self.run.seed)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if getattr(self, "prob", None) is not None:
            self.prob.forget()                     # recordings kept between passes (Problem.keep)
        if self.store is not None:
            self.store.__exit__()
            self.store = None
        self.ctx.close()

    # ------------------------------------------------------------------------------------------
    def prepare(self, xs, ys, xt, yt) -> T.Prepared:
        cfg, run = self.cfg, self.run
        device = self.ctx.device_for(run.device)
        prep = T.prepare(cfg, xs, ys, xt, yt, device, run.seed)
        n = prep.xs.shape[0]
        p = sum(dict(prep.model.named_parameters())[nm].numel() for nm in prep.names)
        if cfg.solver == "direct" and p > MAX_DIRECT_PARAMS:
            raise ValueError(f"solver: 'direct' forms the {p} x {p} Hessian ({p * p * 8 / 2**30:.1f} GiB in float64); "
                             f"above {MAX_DIRECT_PARAMS} parameters use 'cg', 'arnoldi' or 'ekfac' (or grad_params)")
        if cfg.hessian_samples is not None and cfg.hessian_samples > n:
            raise ValueError(f"hessian_samples: {cfg.hessian_samples} is more than the {n} source rows")
        epochs = cfg.epochs if cfg.epochs is not None else (0 if isinstance(cfg.model, nn.Module) else DEFAULT_EPOCHS)
        self.epochs = epochs
        bn = T.batchnorm_layers(prep.model)
        if epochs and bn and (cfg.batch_size == 1 or n % cfg.batch_size == 1):
            raise ValueError(f"batch_size: {cfg.batch_size} leaves a training batch of one sample, which {bn[0]} "
                             f"cannot normalise in train mode; choose another batch_size")
        t0 = time.perf_counter()
        if epochs:
            self._train(prep, xs_digest=data_digest(prep.xs, prep.ys))
        prep.model.eval()
        self.timings["train"] = time.perf_counter() - t0
        if cfg.hessian_samples is not None:
            g = torch.Generator().manual_seed(derive_seed(run.seed, 2901))
            rows = torch.randperm(n, generator=g)[:cfg.hessian_samples].sort().values.to(prep.xs.device)
            xh, yh = prep.xs[rows], prep.ys[rows]
        else:
            xh, yh = prep.xs, prep.ys
        self.prob = P.Problem(prep.model, prep.names, prep.sample_loss, cfg.loss, xh, yh, cfg.hessian_batch_size,
                              V.DTYPES[cfg.dtype], cfg.weight_decay, self.ctx, run,
                              torch.Generator().manual_seed(derive_seed(run.seed, 2902)),
                              scored_in_blocks=cfg.hessian_samples is None and
                              cfg.source_batch_size == cfg.hessian_batch_size)
        self.solver = SOLVERS[cfg.solver](cfg)
        return prep

    def _train(self, prep: T.Prepared, xs_digest: bytes) -> None:
        cfg = self.cfg
        fp = None
        if self.store is not None:
            settings = {k: getattr(cfg, k) for k in _TRAINING_SETTINGS} | {"epochs": self.epochs,
                                                                            "seed": self.run.seed}
            fp = fingerprint(settings, prep.model, cfg.loss, xs_digest, "initial weights")
            saved = self.store.load_model(fp)
            if saved is not None:
                prep.model.load_state_dict(saved)
                return
        T.train_plain(prep, self.run, optimizer=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay,
                      epochs=self.epochs, batch_size=cfg.batch_size, owner="InfluenceFunction")
        if fp is not None:
            self.store.save_model(fp, prep.model.state_dict(), self.run.seed)

    def curvature(self, prep: T.Prepared) -> Estimate | None:
        """Load / fit / save the solver's curvature; an Estimate "stopped" when max_time ran out."""
        cfg, prob = self.cfg, self.prob
        t0 = time.perf_counter()
        fp, saved, save = None, None, None
        if self.store is not None:
            settings = {k: getattr(cfg, k) for k in _CURVATURE_SETTINGS} | {
                "grad_params": list(prob.names), "world_size": self.ctx.world_size}
            if cfg.hessian_samples is not None or (cfg.fisher == "sampled" and cfg.solver in ("kfac", "ekfac")):
                settings["seed"] = self.run.seed             # it draws the rows or the labels
            fp = fingerprint(settings, prob.model, cfg.loss, data_digest(prob.xh, prob.yh), "trained weights")
            saved = self.store.load_curvature(fp)

            def save(state):
                self.store.save_curvature(fp, state, self.run.seed)
        saver = P.Saver(save, SAVE_EVERY_S)
        try:
            self.solver.fit(prob, saved, saver)
        except P.Stopped:                                    # the solver saved its partial state
            self.timings["curvature"] = time.perf_counter() - t0
            n = prep.xs.shape[0]
            return Estimate(values=np.zeros(n), counts=np.zeros(n, dtype=np.int64), status="stopped",
                            stop_reason="max_time", progress="0 source rows (the curvature was not finished)",
                            info=self.info(), timings=self.timings)
        saver(lambda: self.solver.state, force=True)
        self.timings["curvature"] = time.perf_counter() - t0
        return None

    def scorer(self) -> grads.FastScorer:
        if getattr(self, "_scorer", None) is None:
            self._scorer = grads.FastScorer(self.prob.model, self.solver.scored_names(self.prob),
                                            self.prob.sample_loss, "dot", owner="InfluenceFunction")
        return self._scorer

    def source_shard(self, n: int) -> tuple[int, int]:
        sbs = self.cfg.source_batch_size
        b0, b1 = self.ctx.shard(-(-n // sbs))
        return min(b0 * sbs, n), min(b1 * sbs, n)

    def score(self, prep: T.Prepared, Vs, lo: int, hi: int, on_block) -> str | None:
        t0 = time.perf_counter()
        try:
            P.score_rows(self.scorer(), Vs, prep.xs, prep.ys, lo, hi, self.cfg.source_batch_size, self.prob, on_block)
            stop = None
        except P.Stopped:
            stop = "max_time"
        self.timings["score"] = time.perf_counter() - t0
        return stop

    def info(self) -> dict:
        prob = self.prob
        out = {"solver": self.cfg.solver, "epochs": self.epochs, "n_hessian": prob.n_hessian,
               "n_parameters": prob.p, "dtype": self.cfg.dtype, **self.solver.info()}
        out.setdefault("damping", self.cfg.damping)
        if getattr(self, "_scorer", None) is not None:
            out.update(self._scorer.describe())
        if self.ctx.enabled:
            out.update({"world_size": self.ctx.world_size, "rank": self.ctx.rank})
        return out


__all__ = ["InfluenceFunction", "SOLVERS"]
