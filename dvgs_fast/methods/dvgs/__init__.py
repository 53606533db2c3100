"""DVGS: data valuation by gradient similarity (Evans et al.), with a fast exact scorer."""
from dvgs_fast.methods.dvgs.method import DVGS

__all__ = ["DVGS"]
