"""The ``attribute()`` contract shared by every method that attributes a query's loss to training
samples (TracIn, grad-dot / grad-cos, In-Run Data Shapley, DVGS, influence functions, ...).

    res = method.attribute(x_source, y_source, x_query, y_query, top_k=10)
    res.scores          # [n_query, n_source]; > 0: training on source i lowers query j's loss
    res.top_indices     # [n_query, 10]: each query's most helpful training samples

``fit()`` stays the aggregate over a target set; ``attribute()`` is the pairwise matrix, computed
blockwise (``query_batch_size`` queries x the method's source blocks at a time) into a
``ScoreSink``: kept in memory, written to ``out=PATH.npy`` (memory-mapped, renamed into place when
complete), or not kept at all (``keep=False``) with ``top_k`` and/or ``callback(q0, q1, s0, s1,
block)`` receiving each finished block. A method implements ``_attribute(x_source, y_source,
x_query, y_query, sink, run) -> info`` and sets ``attribute_accumulates`` when its scores are sums
over passes (checkpoints, steps, snapshots).
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable

import numpy as np

from dvgs_fast import _validation as V
from dvgs_fast.attribution.result import AttributionResult
from dvgs_fast.attribution.sink import ScoreSink


class AttributionMixin:
    """Adds ``attribute()`` to a ``Valuation`` subclass that implements ``_attribute``."""

    #: True when the scores are sums over passes: the sink adds blocks into its stored matrix and
    #: runs top-k and callbacks once the sums are complete.
    attribute_accumulates: bool = False

    def attribute(self, x_source: Any, y_source: Any = None, x_query: Any = None, y_query: Any = None, *,
                  out: str | os.PathLike | None = None, keep: bool | None = None, top_k: int | None = None,
                  callback: Callable[[int, int, int, int, np.ndarray], None] | None = None,
                  query_batch_size: int = 1024, dtype: str = "float32") -> AttributionResult:
        """[n_query, n_source] scores: how much each training sample lowers each query's loss.

        out: a .npy path to write the scores to (memory-mapped; for matrices larger than memory).
        keep: False to keep no matrix (then top_k and/or callback receive the scores).
        top_k: also return each query's k highest and k lowest scoring training samples.
        callback(q0, q1, s0, s1, block): called with every finished block of scores.
        query_batch_size: queries whose per-sample gradients are held at once.
        dtype: "float32" (default) or "float64" for the stored scores."""
        if x_query is None:
            raise ValueError("x_query: is required (the queries whose losses are attributed to the training samples)")
        if getattr(self, "requires_labels", True) and (y_source is None or y_query is None):
            raise ValueError(f"{'y_source' if y_source is None else 'y_query'}: {type(self).__name__} needs labels")
        if top_k is not None:
            top_k = V.check_positive_int(top_k, "top_k")
        query_batch_size = V.check_positive_int(query_batch_size, "query_batch_size")
        dt = {"float32": np.float32, "float64": np.float64}.get(str(dtype))
        if dt is None:
            raise ValueError(f"dtype: expected 'float32' or 'float64', got {dtype!r}")
        if callback is not None and not callable(callback):
            raise ValueError(f"callback: expected a callable (q0, q1, s0, s1, block), got {type(callback).__name__}")
        n_source, n_query = _length(x_source, "x_source"), _length(x_query, "x_query")
        t0 = time.perf_counter()
        run = self._new_run(x_source, y_source, x_query, y_query)
        sink = ScoreSink(n_query, n_source, out=out, keep=keep, top_k=top_k, callback=callback,
                         accumulate=self.attribute_accumulates, dtype=dt)
        try:
            import torch
            with torch.enable_grad():
                info = self._attribute(x_source, y_source, x_query, y_query, sink, run, query_batch_size) or {}
        except BaseException:
            sink.abandon()
            raise
        timings = {"total": time.perf_counter() - t0}
        info = {"seed": run.seed, "device": str(run.device), **info}
        return sink.finish(self.name, params=self.settings(), info=info, timings=timings)

    def _attribute(self, x_source, y_source, x_query, y_query, sink: ScoreSink, run, query_batch_size: int):
        raise NotImplementedError(f"{type(self).__name__} has no attribute()")


def _length(x: Any, name: str) -> int:
    from dvgs_fast.sources import as_source, is_chunked_input
    try:
        # a streamed source (an iterator factory) is counted by a pass over it
        n = len(as_source(x)) if is_chunked_input(x) and not hasattr(x, "__len__") else len(x)
    except TypeError:
        raise ValueError(f"{name}: expected an array or tensor with one row per sample, got "
                         f"{type(x).__name__}") from None
    if n == 0:
        raise ValueError(f"{name}: is empty")
    return int(n)


def one_process(distributed, device):
    """The distributed context of an attribute() call: it runs in one process (the score matrix is
    not sharded across ranks), so a torchrun launch is refused up front."""
    from dvgs_fast.distributed import context_for
    ctx = context_for(distributed, device)
    if ctx.enabled:
        ctx.close()
        raise ValueError("distributed: attribute() runs in one process (the score matrix is not sharded across "
                         "ranks); call it without torchrun or with distributed=False")
    return ctx


def query_error(exc: ValueError) -> ValueError:
    """A method's input check speaks of the target set; in attribute() that set is the queries."""
    msg = str(exc).replace("x_target", "x_query").replace("y_target", "y_query")
    return ValueError(msg)


__all__ = ["AttributionMixin", "one_process", "query_error"]
