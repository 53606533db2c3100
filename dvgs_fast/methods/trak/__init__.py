"""Projected-gradient attribution at scale: TRAK (trak.py) and LoGra influence (logra.py).

Both store a random low-dimensional projection of every training sample's gradient once
(gradstore; the projection grads.Projector, Kronecker-structured on the engine's factors) and
score any number of queries by blockwise matrix products. method.py holds their shared
settings, engine.py the shared run (members -> stores -> kernels -> scores), members.py the
models (trained ensemble or checkpoints), features.py the per-member projection, kernel.py
the regularised kernel and its rule, outputs.py TRAK's margin and out-to-loss weight.
"""
from dvgs_fast.methods.trak.logra import LoGraInfluence
from dvgs_fast.methods.trak.trak import TRAK

__all__ = ["LoGraInfluence", "TRAK"]
