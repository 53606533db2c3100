"""Data Shapley: TMC and G-Shapley, sequential reference and batched refits (method.py), the
permutation bookkeeping (tmc.py) and permutations spread over torchrun ranks (sharded.py)."""
from dvgs_fast.methods.shapley.method import DataShapley

__all__ = ["DataShapley"]
