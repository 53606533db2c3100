"""The contract every influence solver follows, and what they share.

A solver turns query gradients into preconditioned ones, V_q ≈ (H + λI)⁻¹ g_q, per parameter
({name: [Q, *shape]}); the engine then scores V against every training sample. Its expensive,
query-independent part (a Hessian, Kronecker factors, eigenpairs, per-sample norms) is built by
``fit`` and kept in ``state`` -- saved in ``factors_dir`` and reused by later calls; ``fit``
resumes from a partial state (a run killed mid-way) and checkpoints through the Saver.
"""
from __future__ import annotations

import warnings
from typing import Any

from dvgs_fast.methods.influence.problem import Problem, Saver


class CurvatureWarning(UserWarning):
    """The damped curvature is not positive definite, or an iterative solve did not converge."""


class Solver:
    name = ""
    #: rows of the Hessian's data per fit step are visited in order (a resumable position)
    state: dict

    def __init__(self, cfg: Any):
        self.cfg = cfg                    # the InfluenceFunction (its settings)
        self.state = {}
        self.details: dict[str, Any] = {}

    def scored_names(self, prob: Problem) -> list[str]:
        """The parameters the scores cover (all selected ones, unless the solver leaves some out)."""
        return list(prob.names)

    def fit(self, prob: Problem, saved: dict | None, saver: Saver) -> None:
        """Build the query-independent curvature into self.state (resume from `saved`)."""
        self.state = dict(saved or {})

    def precondition(self, prob: Problem, G: dict) -> dict:
        raise NotImplementedError

    def hessian_row_scores(self, prob: Problem, fq) -> "torch.Tensor | None":
        """[Q, n_hessian] scores of the queries (their factors, grads.SampleFactors) against the
        Hessian's own rows when the solver has a cheaper route than preconditioning and scoring
        (the caller asks only when the scored source is the Hessian's data); None: no such route."""
        return None

    def info(self) -> dict:
        return dict(self.details)

    def warn(self, msg: str) -> None:
        """Warn once per message (every query block would repeat it) and keep it in info["warnings"]."""
        seen = self.details.setdefault("warnings", [])
        if msg not in seen:
            seen.append(msg)
            warnings.warn(f"InfluenceFunction ({self.name}): {msg}", CurvatureWarning, stacklevel=4)


def fixed_damping(cfg: Any) -> float | None:
    """The damping the user set (a number), or None for the solver's default rule ("auto")."""
    return None if cfg.damping == "auto" else float(cfg.damping)


__all__ = ["CurvatureWarning", "Solver", "fixed_damping"]
