"""The original's ``similarities`` module (``dvgs/similarities.py``) under the same names, for
scripts that ``import similarities``: ``from dvgs_fast.compat import similarities``.

Each factory returns a callable ``sim(G [n, P], g [n, P]) -> [n]`` (target gradient first, as the
original calls it) that the compat DVGS recognises and runs on the fast path. Passing the
original module's own callables works too (they are recognised by name and checked numerically).
"""
from __future__ import annotations

import torch


def _tag(fn, kind):
    fn._dvgs_kind = kind
    return fn


def cosine_similarity():
    """Cosine similarity (torch.nn.CosineSimilarity(dim=1), as the original)."""
    return torch.nn.CosineSimilarity(dim=1)


def dot_product():
    """<G, g_i>."""
    return _tag(lambda A, B: (A * B).sum(1), "dot")


def scalar_projection():
    """Scalar projection of the source gradient onto the target gradient: <G, g_i> / |G|."""
    return _tag(lambda B, A: (A * B).sum(1) / torch.linalg.vector_norm(B, dim=1), "projection")


def C_dist(L=2, unit_norm=False):  # noqa: N802 - the original's name
    """Negative L-norm distance -|G - g_i|_L. With unit_norm both vectors are divided by their own
    norm first (the original divides the second by the first's norm, which looks unintended; such
    a similarity runs on the slow per-sample-gradient path either way)."""
    if unit_norm:
        def f(x, y):
            return -torch.linalg.vector_norm(x / torch.linalg.vector_norm(x, ord=L, dim=1, keepdim=True)
                                             - y / torch.linalg.vector_norm(y, ord=L, dim=1, keepdim=True), ord=L, dim=1)
        return f
    f = lambda x, y: -torch.linalg.vector_norm(x - y, ord=L, dim=1)  # noqa: E731
    return _tag(f, "distance") if L == 2 else f


__all__ = ["cosine_similarity", "dot_product", "scalar_projection", "C_dist"]
