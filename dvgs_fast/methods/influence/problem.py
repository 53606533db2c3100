"""What every influence solver works on: the trained model, the parameters scored, the
Hessian's data, the run's budget and progress, the process group, and the conversions between
gradient dicts {name: [Q, *shape]} and flat [Q, p] vectors.

Also the two ends every solver shares: the query gradients (explicit, [Q, *shape] per
parameter, from the engine's factored form) and the scoring of a preconditioned query gradient
V against every source sample (``grads.batch_dots`` on the engine's factors of each source
block: ghost dots for Linear / conv / Embedding, per-sample gradients only where no route exists).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn

from dvgs_fast import grads


# Memory for recordings kept between passes over the Hessian's data (Problem.keep).
KEEP_BYTES = 512 << 20


class Stopped(Exception):
    """The time budget ran out inside a solver (the caller saves what is done and stops)."""


@dataclass
class Problem:
    """The fixed inputs of one influence computation (see the module doc).

    xh, yh: the Hessian's data (all of it; ``shard()`` gives this rank's rows); block: rows per
    forward/backward of the Hessian's data; dtype: the precision of the curvature and the solves
    (the model's forward/backward keeps the model's dtype); weight_decay: the training objective's
    L2 coefficient, added to the Hessian as weight_decay·I; scored_in_blocks: the source is the
    Hessian's data, scored in the same blocks (so scoring can take recordings a fit pass kept)."""

    model: nn.Module
    names: list[str]
    sample_loss: Callable
    loss: Any
    xh: torch.Tensor
    yh: torch.Tensor
    block: int
    dtype: torch.dtype
    weight_decay: float
    ctx: Any                                   # dvgs_fast.distributed.DistContext
    run: Any                                   # methods.base.Run (budget, progress)
    gen: torch.Generator                       # the solver's own random stream (sampled Fisher, LiSSA, Arnoldi)
    scored_in_blocks: bool = False
    shapes: dict[str, torch.Size] = field(init=False)
    sizes: list[int] = field(init=False)
    notes: list[str] = field(default_factory=list)
    _kept: dict = field(default_factory=dict, repr=False)      # see keep()
    _kept_bytes: int = 0

    def __post_init__(self):
        params = dict(self.model.named_parameters())
        self.shapes = {n: params[n].shape for n in self.names}
        self.sizes = [params[n].numel() for n in self.names]

    @property
    def p(self) -> int:
        return sum(self.sizes)

    @property
    def n_hessian(self) -> int:
        return int(self.xh.shape[0])

    @property
    def device(self) -> torch.device:
        return self.xh.device

    def params(self) -> list[nn.Parameter]:
        named = dict(self.model.named_parameters())
        return [named[n] for n in self.names]

    # ------------------------------------------------------------------ flat <-> dict
    def flat(self, G: dict[str, torch.Tensor]) -> torch.Tensor:
        """[Q, p] in ``names`` order (a missing name is zero), in the solver's dtype."""
        q = next(iter(G.values())).shape[0]
        return torch.cat([G[n].reshape(q, -1).to(self.dtype) if n in G else
                          torch.zeros(q, s, dtype=self.dtype, device=self.device)
                          for n, s in zip(self.names, self.sizes)], 1)

    def unflat(self, X: torch.Tensor) -> dict[str, torch.Tensor]:
        q = X.shape[0]
        return {n: t.reshape(q, *self.shapes[n]) for n, t in zip(self.names, X.split(self.sizes, 1))}

    # ------------------------------------------------------------------ the Hessian's data
    def shard(self) -> tuple[int, int]:
        """This rank's rows of the Hessian's data: whole blocks, contiguous."""
        n_blocks = -(-self.n_hessian // self.block)
        b0, b1 = self.ctx.shard(n_blocks)
        return min(b0 * self.block, self.n_hessian), min(b1 * self.block, self.n_hessian)

    def block_rows(self, k: int) -> tuple[int, int]:
        """Rows [a, b) of the Hessian's data that this rank's block k holds."""
        lo, hi = self.shard()
        a = lo + k * self.block
        return a, min(a + self.block, hi)

    def blocks(self, start: int = 0) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """(block index, x, y) over this rank's rows, from block `start` (a resume)."""
        lo, hi = self.shard()
        for k, a in enumerate(range(lo, hi, self.block)):
            if k >= start:
                b = min(a + self.block, hi)
                yield k, self.xh[a:b], self.yh[a:b]

    def n_blocks(self) -> int:
        lo, hi = self.shard()
        return -(-(hi - lo) // self.block)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (float64 on the wire), back in t's dtype and device."""
        if not self.ctx.enabled:
            return t
        out = self.ctx.all_reduce_sum(t.detach().cpu().double().numpy())
        return torch.as_tensor(out).to(dtype=t.dtype, device=t.device)

    # ------------------------------------------------------------------ recordings kept between passes
    def keep(self, key, value, nbytes: int) -> None:
        """Keep what a pass over a block of the Hessian's data computed for a later pass over the
        same rows, while all kept fit in KEEP_BYTES: recorded factors (K-FAC's second pass,
        DataInf's per-query-block passes, scoring), the R-operator's preparations and the double
        backward's gradient graphs (every product of Arnoldi, CG, direct). Each is most of such a
        pass's time; one budget for all, dropped when the call ends (forget)."""
        if key not in self._kept and self._kept_bytes + nbytes <= KEEP_BYTES:
            self._kept[key] = value
            self._kept_bytes += nbytes

    def kept(self, key):
        return self._kept.get(key)

    def forget(self) -> None:
        """Drop every kept recording (their passes are done)."""
        self._kept.clear()
        self._kept_bytes = 0

    # ------------------------------------------------------------------ budget
    def check_time(self, lockstep: bool = True) -> None:
        """Raise Stopped when max_time is spent. Under torchrun every rank must decide alike, on
        rank 0's clock, which takes a collective: only at steps all ranks take together
        (lockstep: an HVP iteration, a Hessian column); a rank's own blocks are not checked."""
        if self.run.budget.max_time is None:
            return
        if self.ctx.enabled:
            if not lockstep:
                return
            up = self.ctx.broadcast_object(self.run.budget.time_up())
        else:
            up = self.run.budget.time_up()
        if up:
            raise Stopped()

    def progress(self, total: int | None, desc: str, unit: str = "it", initial: int = 0):
        if not self.ctx.is_main:                   # one bar per run, not one per rank
            from tqdm.auto import tqdm
            return tqdm(total=total, disable=True)
        return self.run.progress(total, desc, unit=unit, initial=initial)


class Saver:
    """Calls ``save(state)`` at most every ``every`` seconds (and always when forced): factor
    fitting checkpoints often enough to lose little to a kill, rarely enough to cost little."""

    def __init__(self, save: Callable[[dict], None] | None, every: float):
        self.save, self.every, self.last = save, every, time.perf_counter()

    def __call__(self, state_fn: Callable[[], dict], force: bool = False) -> None:
        if self.save is None:
            return
        now = time.perf_counter()
        if force or now - self.last >= self.every:
            self.save(state_fn())
            self.last = time.perf_counter()


# ---------------------------------------------------------------------- queries and scoring
def query_gradients(scorer: grads.FastScorer, prob: Problem, xq: torch.Tensor, yq: torch.Tensor,
                    f: grads.SampleFactors | None = None) -> dict:
    """{name: [Q, *shape]}: each query's own loss gradient, from the engine's factored form
    (formed explicitly: the solvers precondition them); f: the queries' factors when recorded already."""
    if f is None:
        f = scorer.record(xq, yq).factors()
    shapes = {n: prob.shapes[n] for n in scorer.names}
    return {n: g.detach() for n, g in grads.materialise(f, shapes).items()}


def recorded(scorer: grads.FastScorer, prob: Problem, x: torch.Tensor, y: torch.Tensor,
             rows: tuple[int, int] | None, keep: bool = True) -> grads.SampleFactors:
    """The scorer's factors of rows [a, b) of the Hessian's data (x, y = those rows): the ones an
    earlier pass kept for the same rows and parameters (the loss gradient at the true labels: a
    fit pass of DataInf or of the empirical-Fisher K-FAC, which scoring then reuses when the
    source is the Hessian's data, in the same blocks), else recorded now and, with keep, kept
    while they fit in KEEP_BYTES. rows None: recorded, not kept."""
    key = None if rows is None else ("loss gradients", tuple(scorer.names), rows)
    f = prob.kept(key) if key is not None else None
    if f is None:
        f = scorer.record(x, y).factors()
        if key is not None and keep:
            prob.keep(key, f, f.nbytes())
    return f


def mean_gradient(prob: Problem, names: list[str], x: torch.Tensor, y: torch.Tensor, batch: int) -> dict:
    """{name: [1, *shape]}: ∇ of the mean loss over (x, y), accumulated over blocks of `batch`."""
    named = dict(prob.model.named_parameters())
    ps = [named[n] for n in names]
    total = [torch.zeros_like(p) for p in ps]
    m = x.shape[0]
    for a in range(0, m, batch):
        loss = prob.sample_loss(prob.model(x[a:a + batch]), y[a:a + batch]).sum() / m
        gs = torch.autograd.grad(loss, ps, allow_unused=True)
        total = [t if g is None else t + g for t, g in zip(total, gs)]
    return {n: t.detach().unsqueeze(0) for n, t in zip(names, total)}


def _check_finite(block: torch.Tensor, s0: int) -> None:
    if not bool(torch.isfinite(block).all()):
        bad = int((~torch.isfinite(block)).any(0).nonzero()[0])
        raise ValueError(f"x_source: the influence score of source row {s0 + bad} is not finite: the "
                         f"damped Hessian is (nearly) singular or the model diverged; raise damping")


def emit_scores(S: torch.Tensor, q0: int, q1: int, batch: int,
                on_block: Callable[[int, int, int, int, torch.Tensor], None]) -> None:
    """A solver's own [q, n] scores of queries q0:q1 against the source (Solver.hessian_row_scores),
    passed on as score_rows does: blocks of ``batch`` source rows, each checked finite."""
    for s0 in range(0, S.shape[1], batch):
        block = S[:, s0:s0 + batch]
        _check_finite(block, s0)
        on_block(q0, q1, s0, s0 + block.shape[1], block)


def score_rows(scorer: grads.FastScorer, Vs: list[tuple[int, int, dict]], xs: torch.Tensor, ys: torch.Tensor,
               lo: int, hi: int, batch: int, prob: Problem,
               on_block: Callable[[int, int, int, int, torch.Tensor], None]):
    """Score source rows [lo, hi) against every preconditioned query block (q0, q1, V): one
    recording per source block (``batch`` rows), ``batch_dots`` against each V, and
    ``on_block(q0, q1, s0, s1, scores [q, s])``. Checks the budget between source blocks."""
    bar = prob.progress(hi - lo, "influence scoring", unit="row")
    try:
        for s0 in range(lo, hi, batch):
            prob.check_time(lockstep=False)
            s1 = min(s0 + batch, hi)
            f = recorded(scorer, prob, xs[s0:s1], ys[s0:s1], (s0, s1) if prob.scored_in_blocks else None, keep=False)
            for q0, q1, V in Vs:
                block = grads.batch_dots(f, V).t()
                _check_finite(block, s0)
                on_block(q0, q1, s0, s1, block)
            bar.update(s1 - s0)
    finally:
        bar.close()


__all__ = ["KEEP_BYTES", "Problem", "Saver", "Stopped", "emit_scores", "mean_gradient", "query_gradients",
           "recorded", "score_rows"]
