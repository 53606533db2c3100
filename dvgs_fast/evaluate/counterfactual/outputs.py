"""The per-query output a ground truth records (and an attribution predicts).

* ``"margin"`` (classification default): the log-odds of the true class,
  ``z_y - logsumexp_{j != y} z_j`` = log(p_y / (1 - p_y)). This is the output TRAK attributes and
  the "log-odds ratio" target dattri's TRAK examples use (``logp - log(1 - exp(logp))``); with two
  classes it is ``z_y - z_other``. (Some papers write the margin with ``max_{j != y} z_j``
  instead of the log-sum-exp; the two agree when one wrong class dominates.)
* ``"neg_loss"`` (regression default; allowed for classification): minus the query's loss
  (cross-entropy, or the squared error averaged over the outputs, as ``nn.MSELoss``). dattri's
  benchmarks record the loss and flip its sign for LDS; here it is flipped at the source.

Both are "higher = the query is served better", so an attribution score that is positive when a
training row helps a query correlates positively with the ground truth.
"""
from __future__ import annotations

import torch

OUTPUTS = ("margin", "neg_loss")


def default_output(classification: bool) -> str:
    return "margin" if classification else "neg_loss"


def query_outputs(logits: torch.Tensor, y: torch.Tensor, output: str, classification: bool) -> torch.Tensor:
    """logits [..., Q, o] and the queries' labels / targets -> outputs [..., Q] (float64)."""
    z = logits.to(torch.float64)
    if classification:
        yy = y.expand(z.shape[:-1]).unsqueeze(-1)
        zy = z.gather(-1, yy).squeeze(-1)
        if output == "margin":
            others = z.scatter(-1, yy, float("-inf"))
            return zy - torch.logsumexp(others, -1)
        return zy - torch.logsumexp(z, -1)                      # -cross-entropy
    t = y.to(torch.float64)
    if t.dim() == 1:                                            # [Q] targets, one output
        return -(z[..., 0] - t) ** 2
    return -((z - t) ** 2).mean(-1)                             # [Q, k]: nn.MSELoss's mean over k
