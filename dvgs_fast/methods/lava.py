"""LAVA (Just et al., ICLR 2023): data values from the optimal-transport distance between the
source (training) set and the clean target (validation) set, without training a model.

The distance is the entropic OT between the two labelled sets with the label-aware cost of
Alvarez-Melis & Fusi's OTDD,

    C((x, y), (x', y')) = lam_x |x - x'|^2 / 2 + lam_y W(y, y') / 2,

W(c, k) = the entropic OT cost (|.|^2 / 2 ground cost, blur sqrt(label_entreg), not debiased)
between the source points of class c and the target points of class k. A point's value is minus
the *calibrated gradient* of the distance with respect to its probability mass,

    f_i - sum_{j != i} f_j / (N - 1)   (f: the source-side dual potential),

i.e. how much moving mass onto point i, taken equally from all others, increases the distance
to the clean set: points that look unlike the clean data of their label (mislabelled, noisy)
raise it and get low values.

Implementation: our own log-domain Sinkhorn kernel (`dvgs_fast.ops.sinkhorn`, O(N + M) memory:
no N x M matrix) returns the dual potentials directly. Its ground cost is |a - b|^2 / 2, so the
label term is folded into the points: with the C1 x C2 matrix lam_y W factored (SVD) as
-2 P Q^T and one padding coordinate per side,

    a_i = [sqrt(lam_x) x_i, P_{y_i}, s_{y_i}, 0],  b_j = [sqrt(lam_x) x'_j, Q_{y'_j}, 0, t_{y'_j}],
    |a_i - b_j|^2 = lam_x |x_i - x'_j|^2 + lam_y W(y_i, y'_j) + kappa,

s and t chosen so that every |P_c|^2 + s_c^2 and |Q_k|^2 + t_k^2 is the same: the cost is then
the label-aware cost plus a constant kappa / 2. A constant in the cost shifts every potential
by the same amount through every Sinkhorn iteration (also the epsilon-scaling ones), and the
calibrated gradient subtracts it out exactly: the values are those of the label-aware cost.
Everything is O((N + M)(d + C)) memory; the C1 x C2 label distances are small OT problems on
the class subsets.

Compared with OpenDataVal's ``LavaEvaluator`` (1.3, otdd code on geomloss's tensorized
backend, N x M memory): the same definition and defaults (lam_x = lam_y = 1, blur =
sqrt(0.1) outside and inside, epsilon-scaling 0.5, no debiasing), including its starting scale
of the epsilon schedule (``diameter=None``: the diagonal of the bounding box of the features
with the class index appended as one more coordinate, target classes numbered after the source
ones). It also computes the within-set label distances, which the non-debiased problem never
uses; we do not.
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable

import numpy as np
import torch

from dvgs_fast import _validation as V
from dvgs_fast.methods.base import Estimate, Run, Valuation
from dvgs_fast.ops.sinkhorn import sinkhorn


class LAVA(Valuation):
    """LAVA data values (see the module doc).

    Parameters
    ----------
    embedding : None, or a callable / nn.Module mapping a batch of inputs to feature vectors
        (e.g. a pretrained network's penultimate layer); applied in batches of `batch_size`
        under no_grad. None: the flattened inputs are the features.
    lam_x, lam_y : weights of the feature and label terms of the cost.
    entreg : entropic regularisation of the outer problem (blur = entreg ** 0.5).
    label_entreg : entropic regularisation of the class-to-class problems.
    scaling : ratio of successive blurs of the epsilon-scaling schedule.
    diameter : starting scale of the outer schedule (None: OpenDataVal's, see the module doc).
    dtype : 'float32' (default) or 'float64'.
    max_time : budget (seconds): checked between the class-to-class problems and before the
        outer one; a stopped run values nothing (counts 0).
    seed : unused (the method is deterministic); recorded like every method's.
    result.stderr is NaN (nothing is averaged); info holds the OT distance and the iterations.
    """

    name = "lava"

    def __init__(self, embedding: Callable | None = None, *, lam_x: float = 1.0, lam_y: float = 1.0,
                 entreg: float = 0.1, label_entreg: float = 0.1, scaling: float = 0.5,
                 diameter: float | None = None, batch_size: int = 1024, dtype: str = "float32",
                 device: Any = None, seed: int | None = None, max_time: float | None = None, progress: bool = True,
                 num_threads: int | None = None):
        if embedding is not None and not callable(embedding):
            raise ValueError(f"embedding: expected None or a callable (an nn.Module), got {type(embedding).__name__}")
        self.embedding = embedding
        self.lam_x = V.check_positive_float(lam_x, "lam_x", allow_zero=True)
        self.lam_y = V.check_positive_float(lam_y, "lam_y", allow_zero=True)
        if self.lam_x == 0 and self.lam_y == 0:
            raise ValueError("lam_x: lam_x and lam_y are both 0: the cost would be 0")
        self.entreg = V.check_positive_float(entreg, "entreg")
        self.label_entreg = V.check_positive_float(label_entreg, "label_entreg")
        self.scaling = V.check_positive_float(scaling, "scaling")
        if not self.scaling < 1:
            raise ValueError(f"scaling: expected a number in (0, 1), got {scaling!r}")
        self.diameter = V.check_optional_positive_float(diameter, "diameter")
        self.batch_size = V.check_positive_int(batch_size, "batch_size")
        self.dtype = V.check_dtype(dtype)
        super().__init__(device=device, seed=seed, max_time=max_time, progress=progress, num_threads=num_threads)

    def _fit(self, x_source, y_source, x_target, y_target, run: Run) -> Estimate:
        t0 = time.perf_counter()
        data = V.prepare_inputs(x_source, y_source, x_target, y_target, loss="cross_entropy", n_classes=None,
                                device=run.device, dtype=self.dtype, flatten=self.embedding is None)
        X, Y, Xt, Yt = data.x_source, data.y_source, data.x_target, data.y_target
        N = data.n_source
        if N < 2:
            raise ValueError(f"x_source: LAVA's calibrated gradient needs at least 2 source samples, got {N}")
        with torch.no_grad():
            if self.embedding is not None:
                X, Xt = self._embed(X), self._embed(Xt)
            src_cls, tgt_cls = torch.unique(Y), torch.unique(Yt)
            t_setup = time.perf_counter() - t0
            W, stopped = self._label_distances(X, Y, Xt, Yt, src_cls, tgt_cls, run)
            info: dict[str, Any] = {"n_source": N, "n_target": int(Xt.shape[0]), "features": int(X.shape[1]),
                                    "source_classes": src_cls.tolist(), "target_classes": tgt_cls.tolist(),
                                    "label_distances": W.tolist()}
            t_labels = time.perf_counter() - t0 - t_setup
            if stopped or run.budget.time_up():
                return Estimate(values=np.zeros(N), counts=np.zeros(N, dtype=np.int64), status="stopped",
                                stop_reason="max_time", progress="label distances", info=info,
                                timings={"setup": t_setup, "label_distances": t_labels})
            diameter = self.diameter if self.diameter is not None else _odv_diameter(X, Y, Xt, Yt, src_cls, tgt_cls)
            a, b = _augment(X, Y, Xt, Yt, src_cls, tgt_cls, W, self.lam_x, self.lam_y)
            res = sinkhorn(a, b, blur=math.sqrt(self.entreg), p=2, scaling=self.scaling, diameter=diameter,
                           debias=False)
            f = res.f.to(torch.float64)
        values = -calibrated_gradient(f).cpu().numpy()
        if not np.isfinite(values).all():
            raise FloatingPointError("LAVA: the Sinkhorn potentials are not finite (the features' scale may "
                                     "overflow the exponentials; standardise them or use dtype='float64')")
        info.update({"ot_distance": float(res.cost), "sinkhorn_iterations": res.n_iter, "diameter": diameter})
        return Estimate(values=values, info=info,
                        timings={"setup": t_setup, "label_distances": t_labels,
                                 "valuation": time.perf_counter() - t0 - t_setup})

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        parts = []
        for s in range(0, x.shape[0], self.batch_size):
            out = self.embedding(x[s:s + self.batch_size])
            if not isinstance(out, torch.Tensor) or out.shape[0] != min(self.batch_size, x.shape[0] - s):
                raise ValueError(f"embedding: must return one row per input, got "
                                 f"{type(out).__name__ if not isinstance(out, torch.Tensor) else tuple(out.shape)}")
            parts.append(out.reshape(out.shape[0], -1).to(self.dtype))
        z = torch.cat(parts)
        if not bool(torch.isfinite(z).all()):
            raise ValueError("embedding: returned NaN/Inf features")
        return z

    def _label_distances(self, X, Y, Xt, Yt, src_cls, tgt_cls, run: Run) -> tuple[torch.Tensor, bool]:
        """W[c, k]: entropic OT cost between source class c and target class k (C1 x C2)."""
        W = torch.zeros(len(src_cls), len(tgt_cls), dtype=torch.float64)
        blur = math.sqrt(self.label_entreg)
        bar = run.progress(W.numel(), "LAVA label distances", unit="pair")
        try:
            for i, c in enumerate(src_cls):
                xc = X[Y == c]
                for j, k in enumerate(tgt_cls):
                    if run.budget.time_up():
                        return W, True
                    W[i, j] = float(sinkhorn(xc, Xt[Yt == k], blur=blur, p=2, scaling=self.scaling,
                                             debias=False).cost)
                    bar.update(1)
        finally:
            bar.close()
        return W, False


def calibrated_gradient(f: torch.Tensor) -> torch.Tensor:
    """f_i - sum_{j != i} f_j / (N - 1): the gradient of the OT distance with respect to the mass
    of point i when the mass comes equally from every other point (LAVA, Just et al. eq. 3)."""
    n = f.shape[0]
    return f - (f.sum() - f) / (n - 1)


def _augment(X, Y, Xt, Yt, src_cls, tgt_cls, W, lam_x: float, lam_y: float):
    """The points of the two sets with the label cost folded in (see the module doc)."""
    A = (lam_y * W).numpy()                                  # [C1, C2]
    U, S, Vt = np.linalg.svd(A, full_matrices=False)
    root = np.sqrt(S / 2.0)
    P = U * root                                              # -2 P Q^T = A
    Q = -(Vt.T * root)
    pn, qn = (P * P).sum(1), (Q * Q).sum(1)
    s = np.sqrt(np.maximum(pn.max() - pn, 0.0))              # equal norms: the cost gets a constant
    t = np.sqrt(np.maximum(qn.max() - qn, 0.0))
    u = np.concatenate([P, s[:, None], np.zeros((len(P), 1))], 1)
    v = np.concatenate([Q, np.zeros((len(Q), 1)), t[:, None]], 1)
    dt, dev = X.dtype, X.device
    u, v = torch.as_tensor(u, dtype=dt, device=dev), torch.as_tensor(v, dtype=dt, device=dev)
    ys = torch.searchsorted(src_cls, Y)
    yt = torch.searchsorted(tgt_cls, Yt)
    sx = math.sqrt(lam_x)
    return torch.cat([sx * X, u[ys]], 1).contiguous(), torch.cat([sx * Xt, v[yt]], 1).contiguous()


def _odv_diameter(X, Y, Xt, Yt, src_cls, tgt_cls) -> float:
    """OpenDataVal's starting scale: geomloss's bounding-box diameter of [features, class index],
    the target classes numbered after the source ones (its otdd port reindexes them so)."""
    n_cls = int(max(int(src_cls.max()), int(tgt_cls.max())) + 1)
    za = torch.cat([X.to(torch.float64), Y.to(torch.float64).unsqueeze(1)], 1)
    zb = torch.cat([Xt.to(torch.float64), (Yt + n_cls).to(torch.float64).unsqueeze(1)], 1)
    lo = torch.minimum(za.amin(0), zb.amin(0))
    hi = torch.maximum(za.amax(0), zb.amax(0))
    return float((hi - lo).norm())
