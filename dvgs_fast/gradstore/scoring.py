"""Blockwise products over gradient stores, never holding a store or a score matrix whole.

* ``gram(store)``: ΦᵀΦ [k, k] (float64 sums of per-block products);
* ``matmul_rows(stores, V)``: Φ V [N, r] for a few columns V (e.g. a mean query direction);
* ``score_into(sink, queries, stores)``: every [query block, source block] of Q Φᵀ into a
  ScoreSink (dvgs_fast.attribution: top-k per query, a memory-mapped matrix, callbacks).

Several stores of the same rows act as one whose columns are theirs side by side (an
ensemble: Σ_m Q_m Φ_mᵀ = [Q_1 … Q_M] [Φ_1 … Φ_M]ᵀ in one product per block). Products are
float32 for float16/float32 stores, float64 when a store or the queries are float64.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch

from dvgs_fast.gradstore.store import GradientStore

# Default bytes of one [query rows, source rows] score block and of one source block.
SCORE_BLOCK_BYTES = 256 << 20
SOURCE_BLOCK_BYTES = 64 << 20


def _stores(stores) -> list[GradientStore]:
    stores = [stores] if isinstance(stores, GradientStore) else list(stores)
    if not stores:
        raise ValueError("stores: none given")
    n = stores[0].n
    for s in stores[1:]:
        if s.n != n:
            raise ValueError(f"stores: {s.directory} has {s.n} rows, {stores[0].directory} has {n}")
    return stores


def _compute_dtype(stores: list[GradientStore], other: torch.dtype | None = None) -> torch.dtype:
    if other == torch.float64 or any(s.dtype == np.float64 for s in stores):
        return torch.float64
    return torch.float32


def source_blocks(stores: Sequence[GradientStore], start: int = 0, stop: int | None = None,
                  rows: int | None = None, dtype: torch.dtype = torch.float32):
    """(a, b, [b - a, Σ dims]) blocks of several stores' rows side by side."""
    stores = _stores(stores)
    stop = stores[0].n if stop is None else stop
    width = sum(s.dim for s in stores)
    rows = rows or max(1, SOURCE_BLOCK_BYTES // (width * torch.tensor([], dtype=dtype).element_size()))
    its = [s.blocks(start, stop, rows, dtype) for s in stores]
    for parts in zip(*its):
        a, b = parts[0][0], parts[0][1]
        yield a, b, (parts[0][2] if len(parts) == 1 else torch.cat([p[2] for p in parts], 1))


def gram(store: GradientStore, *, start: int = 0, stop: int | None = None, rows: int | None = None,
         progress=None, device=None) -> torch.Tensor:
    """[k, k] float64 (on the CPU): Σ_i φ_i φ_iᵀ over the store's rows [start, stop); the
    products on `device` (e.g. a GPU) when given."""
    dt = _compute_dtype([store])
    out = torch.zeros(store.dim, store.dim, dtype=torch.float64, device=device)
    for a, b, blk in source_blocks([store], start, stop, rows=rows, dtype=dt):
        blk = blk.to(device) if device is not None else blk
        out += (blk.t() @ blk).to(torch.float64)
        if progress is not None:
            progress.update(b - a)
    return out.cpu()


def matmul_rows(stores, V: torch.Tensor, *, start: int = 0, stop: int | None = None,
                rows: int | None = None, device=None) -> torch.Tensor:
    """[stop - start, r] float64 (CPU): rows [start, stop) of [Φ_1 … Φ_M] times V [Σ dims, r]."""
    stores = _stores(stores)
    width = sum(s.dim for s in stores)
    if V.dim() != 2 or V.shape[0] != width:
        raise ValueError(f"V: expected [{width}, r], got {tuple(V.shape)}")
    dt = _compute_dtype(stores, V.dtype)
    Vc = V.to(dtype=dt, device=device)
    stop = stores[0].n if stop is None else stop
    out = torch.empty(stop - start, V.shape[1], dtype=torch.float64)
    for a, b, blk in source_blocks(stores, start, stop, rows, dt):
        blk = blk.to(device) if device is not None else blk
        out[a - start:b - start] = (blk @ Vc).to(torch.float64).cpu()
    return out


def score_into(sink, queries: torch.Tensor | GradientStore | Sequence[GradientStore], stores, *,
               source_scale: np.ndarray | torch.Tensor | None = None, weight: float = 1.0,
               score_block_bytes: int = SCORE_BLOCK_BYTES, source_rows: int | None = None,
               query_rows: int | None = None, progress=None, stop: Callable[[], bool] | None = None,
               device=None) -> bool:
    """Scores[j, i] = weight · ⟨q_j, φ_i⟩ · source_scale[i] for every query j and store row i,
    into `sink` block by block (``sink.add(q0, q1, s0, s1, block)``).

    queries       [n_query, Σ dims] tensor, or store(s) of query vectors (read a block at a time)
    stores        the source vectors: one store or several side by side (same rows)
    source_scale  [N] per-source multiplier (TRAK's out-to-loss weights), or None
    query_rows, source_rows   block sizes (default: a score block of ~score_block_bytes)
    stop          checked after every block; True returns False (the scores are incomplete)
    device        where the products run (e.g. a GPU: blocks are moved there); default the CPU
    Returns True when every block was scored."""
    stores = _stores(stores)
    width = sum(s.dim for s in stores)
    q_stores = None
    if isinstance(queries, torch.Tensor):
        if queries.dim() != 2 or queries.shape[1] != width:
            raise ValueError(f"queries: expected [n_query, {width}], got {tuple(queries.shape)}")
        n_query, q_dtype = queries.shape[0], queries.dtype
    else:
        q_stores = _stores(queries)
        if sum(s.dim for s in q_stores) != width:
            raise ValueError(f"queries: {sum(s.dim for s in q_stores)} columns, the stores have {width}")
        n_query, q_dtype = q_stores[0].n, _compute_dtype(q_stores)
    dt = _compute_dtype(stores, q_dtype)
    n = stores[0].n
    item = torch.tensor([], dtype=dt).element_size()
    if source_rows is None:
        source_rows = max(1, min(n, SOURCE_BLOCK_BYTES // (width * item)))
    if query_rows is None:
        query_rows = max(1, min(n_query, score_block_bytes // (source_rows * item)))
    scale = None if source_scale is None else torch.as_tensor(np.asarray(source_scale), dtype=dt).reshape(-1).to(device)
    if scale is not None and scale.shape[0] != n:
        raise ValueError(f"source_scale: {scale.shape[0]} values for {n} source rows")
    q_iter = ((q0, min(q0 + query_rows, n_query), queries[q0:q0 + query_rows].to(dt))
              for q0 in range(0, n_query, query_rows)) if q_stores is None else \
        source_blocks(q_stores, rows=query_rows, dtype=dt)
    for q0, q1, qb in q_iter:
        qb = qb.to(device) if device is not None else qb
        if weight != 1.0:
            qb = qb * weight
        for s0, s1, sb in source_blocks(stores, rows=source_rows, dtype=dt):
            sb = sb.to(device) if device is not None else sb
            block = qb @ sb.t()
            if scale is not None:
                block.mul_(scale[s0:s1])
            sink.add(q0, q1, s0, s1, block)
            if progress is not None:
                progress.update((q1 - q0) * (s1 - s0))
            if stop is not None and stop():
                return False
    return True


def passes(n_query: int, n: int, width: int, score_block_bytes: int = SCORE_BLOCK_BYTES, itemsize: int = 4) -> int:
    """How many passes over the source stores score_into makes (one per block of queries)."""
    source_rows = max(1, min(n, SOURCE_BLOCK_BYTES // (width * itemsize)))
    query_rows = max(1, min(n_query, score_block_bytes // (source_rows * itemsize)))
    return math.ceil(n_query / query_rows)


__all__ = ["gram", "matmul_rows", "passes", "score_into", "source_blocks"]
