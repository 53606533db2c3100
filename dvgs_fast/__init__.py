"""dvgs_fast: fast, trustworthy data valuation (DVGS, LossVal, DVRL, Data Shapley, LOO)."""
from __future__ import annotations

from ._extension import build_info  # loads dvgs_fast._C and registers torch.ops.dvgs_fast.*
from . import ops  # noqa: F401  (fake kernels and autograd registrations)
from .result import ValuationResult

__version__ = "0.1.0"

# Methods are imported lazily (dvgs_fast.methods keeps the one list) so that `import dvgs_fast`
# stays quick and a method's optional dependencies are only needed when that method is used.
from .methods import __all__ as _METHODS  # noqa: E402  (the package itself imports no method)

__all__ = ["build_info", "ops", "ValuationResult", *_METHODS]


def __getattr__(name: str):
    if name in _METHODS:
        from . import methods
        value = getattr(methods, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dvgs_fast' has no attribute {name!r}")
