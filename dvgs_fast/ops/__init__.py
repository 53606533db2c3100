"""Thin Python wrappers around torch.ops.dvgs_fast.*, with fake kernels and autograd."""
from .grad_stats import per_sample_cosine, per_sample_grad_stats
from .linear_ghost import linear_ghost_stats
from .similarity import SIMILARITIES, similarity
from .sinkhorn import sinkhorn, SinkhornResult
