"""Data value embedding (Wang et al. 2024): trajectory-specific leave-one-out from one training run.
method.py holds the class, trajectory.py the recorded training, embedding.py the backward recursion."""
from dvgs_fast.methods.dvemb.method import DataValueEmbedding

__all__ = ["DataValueEmbedding"]
