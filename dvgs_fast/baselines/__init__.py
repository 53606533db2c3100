"""Reference data-valuation baselines, pure PyTorch: DVRL, Data Shapley (TMC / G-Shapley),
leave-one-out and random values. All share the interface

    Method(model_or_factory, ..., device=None, seed=None, progress=True)
        .fit(x_source, y_source, x_target, y_target) -> dvgs_fast.ValuationResult
"""
from __future__ import annotations

_LAZY = {
    "DVRL": ("dvgs_fast.baselines.dvrl", "DVRL"),
    "DataShapley": ("dvgs_fast.baselines.shapley", "DataShapley"),
    "LeaveOneOut": ("dvgs_fast.baselines.loo", "LeaveOneOut"),
    "RandomValuation": ("dvgs_fast.baselines.random_values", "RandomValuation"),
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        mod, attr = _LAZY[name]
        value = getattr(importlib.import_module(mod), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dvgs_fast.baselines' has no attribute {name!r}")
