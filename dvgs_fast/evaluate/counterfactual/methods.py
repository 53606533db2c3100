"""Judge attribution methods against a counterfactual ground truth: each method's ``attribute()``
on the same source and queries, scored by LDS and leave-one-out correlation, with its cost.

    gt = lds_ground_truth(recipe, xs, ys, xq, yq)
    report = evaluate_attribution({"tracin": TracIn(...), "grad_dot": GradDot(model)}, xs, ys, xq, yq, lds_gt=gt)
    report["tracin"].lds.mean, report["tracin"].cpu_s

What ``dvgs-fast compare --metric lds,loo`` runs for every method that has ``attribute()``.
A method without it, or one that fails, gets a row saying so (the others are still scored).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Mapping

from .results import LDSGroundTruth, LOOGroundTruth
from .scoring import Correlation, LOOCorrelation, lds, loo_correlation


@dataclass
class AttributionQuality:
    """One method's attribution scored against the ground truth(s) given.

    lds / loo      Correlation (mean, stderr over queries, per query) / LOOCorrelation, or None
                   when that ground truth was not given or the method has no attribute()
    wall_s, cpu_s  the attribute() call alone (the method's own training included)
    error          why there is no score (no attribute(), or the exception's one line)"""

    method: str
    lds: Correlation | None = None
    loo: LOOCorrelation | None = None
    wall_s: float = float("nan")
    cpu_s: float = float("nan")
    error: str | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def as_metrics(self) -> dict[str, float]:
        """Flat numbers for a report: lds, lds_stderr, loo_spearman, loo_spearman_stderr, loo_pearson."""
        out: dict[str, float] = {}
        if self.lds is not None:
            out.update(lds=float(self.lds.mean), lds_stderr=float(self.lds.stderr))
        if self.loo is not None:
            out.update(loo_spearman=float(self.loo.spearman.mean),
                       loo_spearman_stderr=float(self.loo.spearman.stderr),
                       loo_pearson=float(self.loo.pearson.mean))
        return out


def evaluate_attribution(methods: Mapping[str, Any], x_source, y_source, x_query, y_query, *,
                         lds_gt: LDSGroundTruth | None = None, loo_gt: LOOGroundTruth | None = None,
                         raise_errors: bool = False, **attribute_kwargs) -> dict[str, AttributionQuality]:
    """{name: AttributionQuality} for every method: ``method.attribute(x_source, y_source, x_query,
    y_query, **attribute_kwargs)`` scored by ``lds`` against ``lds_gt`` and ``loo_correlation``
    against ``loo_gt`` (either may be None). raise_errors=False records a failing method's error
    and goes on with the others."""
    if lds_gt is None and loo_gt is None:
        raise ValueError("lds_gt: give lds_gt and/or loo_gt (lds_ground_truth / loo_ground_truth)")
    for gt in (lds_gt, loo_gt):
        if gt is not None and gt.n_query != len(x_query):
            raise ValueError(f"x_query: {len(x_query)} queries, but the ground truth has {gt.n_query}; use the "
                             f"queries it was made for")
    out: dict[str, AttributionQuality] = {}
    for name, method in methods.items():
        q = AttributionQuality(name)
        if not callable(getattr(method, "attribute", None)):
            q.error = f"{type(method).__name__} has no attribute() (no pairwise scores)"
            out[name] = q
            continue
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            res = method.attribute(x_source, y_source, x_query, y_query, **attribute_kwargs)
            q.wall_s, q.cpu_s = time.perf_counter() - t0, time.process_time() - c0
            if lds_gt is not None:
                q.lds = lds(res, lds_gt)
            if loo_gt is not None:
                q.loo = loo_correlation(res, loo_gt)
            q.info = dict(getattr(res, "info", {}) or {})
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # noqa: BLE001 - one failing method must not lose the others
            if raise_errors:
                raise
            q.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        out[name] = q
    return out


__all__ = ["AttributionQuality", "evaluate_attribution"]
