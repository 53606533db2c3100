"""A case where the answer is known: the influence of an L2-regularised linear model.

For a logistic (softmax) or linear regression trained to its optimum theta of

    L(theta) = mean_i loss_i(theta) + weight_decay / 2 * ||theta||^2      (bias regularised too,
                                                                           as torch.optim does)

leaving row i out moves the optimum, to first order, by
``H^-1 (grad loss_i + weight_decay * theta) / (n - 1)`` (H: the Hessian of L; the second term comes
from the mean's renormalisation and is the same for every i). The influence of row i on query q's
output f_q is therefore

    score[q, i] = -grad f_q^T H^-1 grad loss_i / (n - 1)   ~  f_q(all rows) - f_q(without row i)

(the term common to every i is left out: it shifts all of a query's scores alike, so no
correlation over i sees it). Computed in float64 in closed form (softmax Hessian
``(diag p - p p^T) (x) x x^T``), it is what a leave-one-out ground truth of a converged L2 model
must agree with -- the sanity row of the attribution table, and a test of the ground truth.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from dvgs_fast import _validation as V

from .outputs import OUTPUTS, default_output


def exact_linear_influence(weight: Any, bias: Any, x_source: Any, y_source: Any, x_query: Any, y_query: Any, *,
                           weight_decay: float, loss: str = "cross_entropy", output: str | None = None) -> np.ndarray:
    """Leave-one-out influence [n_query, n_source] of a linear model ``x @ weight.T + bias`` at its
    optimum (module docstring). ``weight`` [o, d], ``bias`` [o] or None; ``loss`` "cross_entropy"
    or "mse" (one output); ``output`` "margin" / "neg_loss" as the ground truth records it."""
    V.check_choice(loss, "loss", V.LOSSES)
    lam = V.check_positive_float(weight_decay, "weight_decay")
    out = default_output(loss == "cross_entropy") if output is None else V.check_choice(output, "output", OUTPUTS)
    W = V.as_float_tensor(weight, "weight").to(torch.float64)
    if W.dim() != 2:
        raise ValueError(f"weight: expected [n_outputs, n_features], got shape {tuple(W.shape)}")
    o, d = W.shape
    b = None if bias is None else V.as_float_tensor(bias, "bias").to(torch.float64).reshape(-1)
    if b is not None and b.shape[0] != o:
        raise ValueError(f"bias: expected {o} entries (one per output), got {b.shape[0]}")
    X = V.as_float_tensor(x_source, "x_source").to(torch.float64)
    Xq = V.as_float_tensor(x_query, "x_query").to(torch.float64)
    for name, x in (("x_source", X), ("x_query", Xq)):
        if x.dim() != 2 or x.shape[1] != d:
            raise ValueError(f"{name}: expected [n, {d}] (the weight's features), got {tuple(x.shape)}")
    Y = V.as_labels(y_source, "y_source", loss=loss, n_classes=o if loss == "cross_entropy" else None)
    Yq = V.as_labels(y_query, "y_query", loss=loss, n_classes=o if loss == "cross_entropy" else None)
    V.check_same_length(X, Y, "x_source", "y_source")
    V.check_same_length(Xq, Yq, "x_query", "y_query")
    n = X.shape[0]
    if n < 2:
        raise ValueError(f"x_source: needs at least 2 rows, got {n}")
    if loss == "mse" and o != 1:
        raise ValueError(f"weight: 'mse' supports one output, got {o}")
    if out == "margin" and loss != "cross_entropy":
        raise ValueError("output: 'margin' needs loss='cross_entropy'")

    def aug(x):                                          # rows with a 1 for the bias
        return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1) if b is not None else x

    Xa, Xqa = aug(X), aug(Xq)
    theta = W if b is None else torch.cat([W, b[:, None]], 1)           # [o, d'], row-major vector
    P = theta.numel()
    if loss == "cross_entropy":
        p = torch.softmax(Xa @ theta.T, 1)                                 # [n, o]
        A = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]            # [n, o, o]
        H = torch.einsum("ncC,nj,nJ->cjCJ", A, Xa, Xa).reshape(P, P) / n
        G = ((p - torch.nn.functional.one_hot(Y, o).to(p.dtype))[:, :, None] * Xa[:, None, :]).reshape(n, P)
        zq = Xqa @ theta.T
        yq = torch.nn.functional.one_hot(Yq, o).to(zq.dtype)
        if out == "margin":                          # d/dz (z_y - logsumexp_{j != y} z_j) = e_y - softmax_others
            others = torch.softmax(zq.masked_fill(yq.bool(), float("-inf")), 1)
            dz = yq - others
        else:                                        # d/dz (-cross-entropy) = e_y - p
            dz = yq - torch.softmax(zq, 1)
        F = (dz[:, :, None] * Xqa[:, None, :]).reshape(Xq.shape[0], P)
    else:
        r = (Xa @ theta.T)[:, 0] - Y.to(torch.float64).reshape(-1)
        H = 2.0 * Xa.T @ Xa / n
        G = 2.0 * r[:, None] * Xa
        rq = (Xqa @ theta.T)[:, 0] - Yq.to(torch.float64).reshape(-1)
        F = -2.0 * rq[:, None] * Xqa                   # d/dtheta of -(x theta - y)^2
    H = H + lam * torch.eye(P, dtype=torch.float64)
    Hinv_G = torch.linalg.solve(H, G.T)                                    # [P, n]
    return (-(F @ Hinv_G) / (n - 1)).numpy()
