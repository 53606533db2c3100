"""dvgs_fast: fast, trustworthy data valuation (DVGS, LossVal, DVRL, Data Shapley, LOO)."""
from __future__ import annotations

from ._extension import build_info  # loads dvgs_fast._C and registers torch.ops.dvgs_fast.*
from . import ops  # noqa: F401  (fake kernels and autograd registrations)
from .result import ValuationResult

__version__ = "0.1.0"

# Methods are imported lazily so that `import dvgs_fast` stays quick and a method's optional
# dependencies are only needed when that method is used.
_LAZY = {
    "DVGS": ("dvgs_fast.methods.dvgs", "DVGS"),
    "LossVal": ("dvgs_fast.methods.lossval", "LossVal"),
    "DVRL": ("dvgs_fast.methods.dvrl", "DVRL"),
    "DataShapley": ("dvgs_fast.methods.shapley", "DataShapley"),
    "LeaveOneOut": ("dvgs_fast.methods.loo", "LeaveOneOut"),
    "RandomValuation": ("dvgs_fast.methods.random", "RandomValuation"),
    "KNNShapley": ("dvgs_fast.methods.knn_shapley", "KNNShapley"),
    "InRunShapley": ("dvgs_fast.methods.in_run_shapley", "InRunShapley"),
    "TracIn": ("dvgs_fast.methods.tracin", "TracIn"),
    "DataOOB": ("dvgs_fast.methods.data_oob", "DataOOB"),
}

__all__ = ["build_info", "ops", "ValuationResult", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        mod, attr = _LAZY[name]
        value = getattr(importlib.import_module(mod), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dvgs_fast' has no attribute {name!r}")
