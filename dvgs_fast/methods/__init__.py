"""Every valuation method, one module or package each, all subclasses of `Valuation`:

    Method(model_or_factory, ..., device=None, seed=None, max_time=None, progress=True)
        .fit(x_source, y_source, x_target, y_target) -> dvgs_fast.ValuationResult

Imported lazily so that `import dvgs_fast` stays quick.
"""
from __future__ import annotations

_LAZY = {
    "Valuation": ("dvgs_fast.methods.base", "Valuation"),
    "DVGS": ("dvgs_fast.methods.dvgs", "DVGS"),
    "LossVal": ("dvgs_fast.methods.lossval", "LossVal"),
    "DVRL": ("dvgs_fast.methods.dvrl", "DVRL"),
    "DataShapley": ("dvgs_fast.methods.shapley", "DataShapley"),
    "LeaveOneOut": ("dvgs_fast.methods.loo", "LeaveOneOut"),
    "RandomValuation": ("dvgs_fast.methods.random", "RandomValuation"),
    "KNNShapley": ("dvgs_fast.methods.knn_shapley", "KNNShapley"),
    "InRunShapley": ("dvgs_fast.methods.in_run_shapley", "InRunShapley"),
    "TracIn": ("dvgs_fast.methods.tracin", "TracIn"),
    "TracInCheckpoints": ("dvgs_fast.methods.tracin_checkpoints", "TracInCheckpoints"),
    "DataOOB": ("dvgs_fast.methods.data_oob", "DataOOB"),
    "Semivalue": ("dvgs_fast.methods.semivalues", "Semivalue"),
    "BetaShapley": ("dvgs_fast.methods.semivalues", "BetaShapley"),
    "DataBanzhaf": ("dvgs_fast.methods.semivalues", "DataBanzhaf"),
    "AsymmetricShapley": ("dvgs_fast.methods.semivalues", "AsymmetricShapley"),
    "ExactSemivalue": ("dvgs_fast.methods.semivalues", "ExactSemivalue"),
    "LAVA": ("dvgs_fast.methods.lava", "LAVA"),
    "GradientSimilarity": ("dvgs_fast.methods.grad_similarity", "GradientSimilarity"),
    "DataValueEmbedding": ("dvgs_fast.methods.dvemb", "DataValueEmbedding"),
    "GradDot": ("dvgs_fast.methods.grad_similarity", "GradDot"),
    "GradCos": ("dvgs_fast.methods.grad_similarity", "GradCos"),
    "TRAK": ("dvgs_fast.methods.trak", "TRAK"),
    "LoGraInfluence": ("dvgs_fast.methods.trak", "LoGraInfluence"),
    "InfluenceFunction": ("dvgs_fast.methods.influence", "InfluenceFunction"),
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        mod, attr = _LAZY[name]
        value = getattr(importlib.import_module(mod), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dvgs_fast.methods' has no attribute {name!r}")
