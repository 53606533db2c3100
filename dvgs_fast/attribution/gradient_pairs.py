"""One pass of gradient-pair scores at a fixed model: every (query, source) pair's
⟨g_source, g_query⟩ (or a similarity made of it and the norms), from the engine's factored per-sample gradients
(``grads.cross_gram``: Linear / conv layers by their inputs and output gradients, never the
d_out x d_in products), blockwise into a ScoreSink.

TracIn calls it once per checkpoint (weighted by the learning rate, accumulated), DVGS once per
snapshot (its similarity, averaged), grad-dot and grad-cos once at the trained model. The query side's factors are recorded once per pass, in
blocks of ``query_batch_size``; the source is streamed in its own blocks. The model must be in
the mode the caller wants scored (eval: no dropout) and is not changed.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch

from dvgs_fast import _validation as V
from dvgs_fast import grads
from dvgs_fast.attribution.sink import ScoreSink

SIMILARITIES = ("dot", "cosine")          # what grad-dot / grad-cos offer; pair_similarity has DVGS's four


def pair_similarity(gram: torch.Tensor, q_sq: torch.Tensor, s_sq: torch.Tensor | None, kind: str,
                    eps: float = 1e-8) -> torch.Tensor:
    """[q, s] similarities of each source gradient g_i with each query gradient h_j from their
    dots and squared norms, with ops.similarity's definitions (the query in the target's place):
    cosine dot/(max(|g|,eps)·max(|h|,eps)), dot, projection dot/max(|h|,eps), distance -|g - h|."""
    if kind == "dot":
        return gram
    qn = q_sq.clamp_min(0).sqrt().clamp_min(eps).unsqueeze(1)
    if kind == "projection":
        return gram / qn
    if kind == "cosine":
        return gram / (qn * s_sq.clamp_min(0).sqrt().clamp_min(eps).unsqueeze(0))
    if kind == "distance":
        return -(s_sq.unsqueeze(0) - 2 * gram + q_sq.unsqueeze(1)).clamp_min(0).sqrt()
    raise ValueError(f"similarity: unknown value {kind!r}")


FactorsOf = Callable[[torch.Tensor, torch.Tensor], grads.SampleFactors]


def factors_fn(scorer) -> FactorsOf:
    """(x, y) -> SampleFactors: the engine's factored route for a FastScorer, explicit per-sample
    gradients (torch.func) for a ReferenceScorer."""
    if isinstance(scorer, grads.FastScorer):
        return lambda x, y: scorer.record(x, y).factors()
    return lambda x, y: grads.dense_factors(scorer.model, scorer.names, x, y, scorer.sample_loss)


def query_factors(factors_of: FactorsOf, xq: torch.Tensor, yq: torch.Tensor, batch: int, norms: bool):
    """[(q0, q1, factors, sqnorms or None)] for the queries in blocks of `batch` rows."""
    out = []
    for q0 in range(0, xq.shape[0], batch):
        q1 = min(q0 + batch, xq.shape[0])
        f = factors_of(xq[q0:q1], yq[q0:q1])
        out.append((q0, q1, f, grads.sqnorms(f) if norms else None))
    return out


def score_pass(factors_of: FactorsOf, source_blocks: Iterable, queries, sink: ScoreSink, *,
               weight: float = 1.0, similarity: str = "dot", eps: float = 1e-8, on_block=None) -> torch.Tensor | None:
    """Score every source block against every query block into `sink`.

    source_blocks: (s0, s1, x, y) in row order; queries: query_factors(...). Returns the per-source
    sum over the queries of the scores added (float64, [n_source] of the rows seen), the
    aggregate a method's fit() values are made of. on_block(s0, s1, factors): optional hook."""
    norms = similarity != "dot"
    total = []
    for s0, s1, x, y in source_blocks:
        f = factors_of(x, y)
        if on_block is not None:
            on_block(s0, s1, f)
        s_sq = grads.sqnorms(f) if norms else None
        col = torch.zeros(s1 - s0, dtype=torch.float64)
        for q0, q1, qf, q_sq in queries:
            block = pair_similarity(grads.cross_gram(qf, f), q_sq, s_sq, similarity, eps)     # [q, s]
            if weight != 1.0:
                block = block * weight
            if not V.all_finite(block):
                bad = (~torch.isfinite(block)).any(0).nonzero().reshape(-1)
                raise ValueError(f"x_source: the gradient of source row {s0 + int(bad[0])} (or of a query) is not "
                                 f"finite: rescale the inputs, or the model diverged")
            sink.add(q0, q1, s0, s1, block)
            col += block.detach().to(torch.float64).sum(0).cpu()
        total.append(col)
    return torch.cat(total) if total else None


__all__ = ["SIMILARITIES", "factors_fn", "pair_similarity", "query_factors", "score_pass"]
