"""Projected per-sample gradients of one member: its training store (written block by block,
resumable, sharded under torchrun) and its queries' features (in memory).

Per member j the projection is ``grads.Projector(proj_dim, layer_dims=, kind=, seed=s_j)`` with
s_j derived from the run's seed and j (TRAK draws a new projection per model), planned on the
member's first two source rows. The vector of a sample is P ∇_θ out(z; θ_j), ``out`` the
method's output function (TRAK: the margin; LoGra: the loss), taken from the engine's factored
gradients (no per-sample gradient is formed for Linear / conv / Embedding layers). TRAK also
stores each training row's out-to-loss weight Q as the store's ``q`` column.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from dvgs_fast import grads, runstate
from dvgs_fast.gradstore import GradientStore, write_store
from dvgs_fast.methods.base import derive_seed
from dvgs_fast.methods.trak.outputs import out_to_loss
from dvgs_fast.sources import source_identity


class MemberFeatures:
    """One member's scorer and projector: what turns rows into projected gradients."""

    def __init__(self, cfg, prep, member, j: int, seed: int, output: Callable, with_q: bool):
        self.cfg, self.prep, self.member, self.j = cfg, prep, member, j
        self.output, self.with_q = output, with_q
        self.model = member.model
        self.scorer = grads.FastScorer(self.model, prep.names, output, "dot", owner=type(cfg).__name__)
        self.projector = grads.Projector(cfg.proj_dim, layer_dims=cfg.layer_dims, kind=cfg.projection,
                                         structure=cfg.projection_structure, seed=derive_seed(seed, 13, j))
        self.device, self.dtype = prep.xt.device, prep.dtype
        _, _, x0, y0 = prep.source.probe(min(2, len(prep.source)))
        with grads.FrozenStatistics(self.model):
            self.projector.plan(self.scorer.record(*self._cast(x0, y0)).factors())

    def _cast(self, x, y):
        x = x.to(device=self.device, dtype=self.dtype)
        y = x if not self.prep.source_labels or y is None else grads.cast_labels(y, self.dtype).to(self.device)
        return x, y

    def vectors(self, x, y, cast: bool = True):
        """[b, dim] projected gradients of rows (x, y) (and {"q": [b]} for TRAK)."""
        if cast:
            x, y = self._cast(x, y)
        with grads.FrozenStatistics(self.model):
            z = self.projector.project(self.scorer.record(x, y).factors())
            if not self.with_q:
                return z
            with torch.no_grad():
                q = out_to_loss(self.model(x), y)
        return z, {"q": q}

    def fingerprint(self, data_digest: str) -> dict:
        return {"method": self.cfg.name, "output": runstate.callable_identity(self.output),
                "model structure": runstate.model_structure(self.model),
                "weights": runstate.model_weights(self.model), "parameters": list(self.prep.names),
                "projector": self.projector.fingerprint(), "data": data_digest,
                "block_rows": self.cfg.source_batch_size}

    def write(self, directory: Path, data_digest: str, ctx, stop) -> tuple[GradientStore | None, dict]:
        res = write_store(directory, self.prep.source, lambda x, y: self.vectors(x, y), dim=self.projector.dim,
                          dtype=self.cfg.store_dtype, fingerprint=self.fingerprint(data_digest),
                          aux={"q": "float32"} if self.with_q else None,
                          info={"member": self.member.label, "projector": self.projector.describe()},
                          block_rows=self.cfg.source_batch_size, ctx=ctx, stop=stop,
                          progress=self.cfg.progress, desc=f"{type(self.cfg).__name__} features {self.j}")
        return res.store, {"rows_written": res.rows_written, "cpu_s": res.timings["cpu"], "wall_s": res.timings["wall"]}

    def queries(self, xq: torch.Tensor, yq: torch.Tensor, batch: int) -> torch.Tensor:
        """[n_query, dim] the queries' projected gradients (no Q: TRAK weights the training side)."""
        out = []
        for a in range(0, xq.shape[0], batch):
            z = self.vectors(xq[a:a + batch], yq[a:a + batch], cast=False)
            out.append(z[0] if isinstance(z, tuple) else z)
        return torch.cat(out)


def data_digest(prep) -> str:
    h = runstate.new_hash()
    h.update(source_identity(prep.source))
    return h.hexdigest()


__all__ = ["MemberFeatures", "data_digest"]
