"""The semivalue family on one sampler/utility loop (`core.py`): Data Shapley (its TMC and
G-Shapley front end is `dvgs_fast.methods.shapley.DataShapley`), Beta Shapley, Data Banzhaf by
maximum sample reuse, asymmetric Data Shapley, exact values of small games, composable stopping
rules, and the variance of values under resampling of the data (``result.ci``).

    from dvgs_fast.methods.semivalues import BetaShapley, DataBanzhaf, StderrBelow, MaxUpdates
    res = BetaShapley(alpha=16, beta=1, stop=StderrBelow(0.002) | MaxUpdates(500)).fit(xs, ys, xt, yt)
"""
from dvgs_fast.methods.semivalues.core import Semivalue
from dvgs_fast.methods.semivalues.exact import ExactSemivalue
from dvgs_fast.methods.semivalues.methods import AsymmetricShapley, BetaShapley, DataBanzhaf
from dvgs_fast.methods.semivalues.stopping import (HistoryDeviation, MaxTime, MaxUpdates, RankStable,
                                                   StderrBelow, StoppingRule)
from dvgs_fast.methods.semivalues.weights import BanzhafWeight, BetaWeight, SemivalueWeight, ShapleyWeight

__all__ = ["Semivalue", "BetaShapley", "DataBanzhaf", "AsymmetricShapley", "ExactSemivalue",
           "StoppingRule", "MaxUpdates", "MaxTime", "StderrBelow", "RankStable", "HistoryDeviation",
           "SemivalueWeight", "ShapleyWeight", "BetaWeight", "BanzhafWeight"]
