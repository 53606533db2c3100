"""KNN-Shapley: exact Data Shapley values of a K-nearest-neighbour classifier (Jia et al. 2019).

"Efficient task-specific data valuation for nearest neighbor algorithms" (VLDB 2019), Theorem 1.
For one target point (x, y) let alpha_1, ..., alpha_N be the source points sorted by distance to x
(nearest first) and m_i = 1[y_{alpha_i} == y]. The utility of a subset S is the KNN likelihood of
the right label, U(S) = (1/K) * sum over the min(K, |S|) nearest points of S of their m. Its exact
Shapley values follow from one backward recursion:

    s_{alpha_N} = m_N * min(K, N) / (K * N)
    s_{alpha_i} = s_{alpha_{i+1}} + (m_i - m_{i+1}) * min(K, i) / (K * i)        i = N-1, ..., 1

The paper states the first line as m_N / N, which is the same for N >= K; for N < K (every subset
has fewer than K points, so U is additive and each point's value is m / K) only min(K, N) / (K N)
is the Shapley value. Values are averaged over the target points (the utility of the whole target
set is the mean of the per-point utilities, and Shapley values are linear in the utility).

Implementation: target points are processed in blocks on the inputs' device; a block computes its
[b, N] distances, sorts each row once (``stable=True``: equal distances keep source-index order,
so ties are broken by index and are reproducible), evaluates the recursion as a reverse cumulative
sum in float64 and scatters the values back to source order. The block size bounds memory
(about 48 bytes x block x N). Euclidean distances are computed pairwise (no ``|a|^2 + |b|^2 -
2ab`` matrix product) so that identical points get bit-identical distances and ties are real ties.

result.stderr is the standard error of the values over the target points; result.counts the number
of target points averaged (all samples alike; fewer when ``max_time`` stopped the run).

With ``groups`` the values are asymmetric Data Shapley values (Zheng et al. 2024: the groups
come in order, each point valued within its group with the earlier groups present), in closed
form (`knn_asymmetric.py`).
"""
from __future__ import annotations

import time
import warnings
from typing import Any

import numpy as np
import torch

from dvgs_fast import _validation as V
from dvgs_fast.methods.base import Estimate, Run, Valuation
from dvgs_fast.result import stats_from_sums

METRICS = ("euclidean", "cosine", "manhattan")
# Elements of one [block, N] slab; ~6 slabs of 8 bytes live at once -> ~100 MB per block.
_BLOCK_ELEMENTS = 1 << 21


class KNNShapley(Valuation):
    """Exact KNN-Shapley values (classification), averaged over the target points.

    Parameters
    ----------
    k : number of neighbours of the KNN classifier (k > N runs but warns: every point is then a
        neighbour and the value of a point is just 1[label matches] / k).
    metric : 'euclidean' (default), 'cosine' (1 - cosine similarity) or 'manhattan'.
    block_size : target points per block (None: as many as fit in ~2M distance entries).
    dtype : 'float64' (default) or 'float32' for the distances (the recursion is always float64).
        float32 is faster on GPUs; near-equal distances may then order differently. Features whose
        magnitude would over- or underflow float32 distances (above 2^50 or all below 2^-50) are
        measured in float64 instead (``info["distances_dtype"]``).
    max_time : wall-clock budget; a run stopped by it averages the target points done so far.
    groups, order : asymmetric Data Shapley: the [N] group label of every source sample and the
        labels earliest first (default: sorted); see `knn_asymmetric.py`. None: Data Shapley.
    seed : unused by the algorithm (it is deterministic); recorded like every method's.
    """

    def __init__(self, k: int = 10, *, metric: str = "euclidean", block_size: int | None = None,
                 dtype: str = "float64", groups: Any = None, order: Any = None, device: Any = None,
                 seed: int | None = None, max_time: float | None = None, progress: bool = True, num_threads: int | None = None):
        from dvgs_fast.methods.semivalues.methods import check_groups
        self.groups = self.order = None
        self._members = None
        if groups is not None:
            self.groups, self.order, self._members = check_groups(groups, order)
        elif order is not None:
            raise ValueError("order: given without groups")
        self.k = V.check_positive_int(k, "k")
        self.metric = V.check_choice(metric, "metric", METRICS)
        self.block_size = V.check_optional_positive_int(block_size, "block_size")
        self.dtype = V.check_dtype(dtype)
        super().__init__(device=device, seed=seed, max_time=max_time, progress=progress,
                         num_threads=num_threads)

    def _thread_work(self, x_source, y_source, x_target) -> int | None:
        """A block's distances: [block, N] pairs of d features."""
        if not (hasattr(x_source, "shape") and hasattr(x_target, "shape")):
            return None
        n, t, d = int(x_source.shape[0]), int(x_target.shape[0]), int(np.prod(x_source.shape[1:]))
        return (self.block_size or max(1, min(t, _BLOCK_ELEMENTS // max(n, 1)))) * n * d

    @property
    def name(self) -> str:
        return "knn_shapley" if self.groups is None else "asymmetric_knn_shapley"

    def _fit(self, x_source, y_source, x_target, y_target, run: Run) -> Estimate:
        t0 = time.perf_counter()
        data = V.prepare_inputs(x_source, y_source, x_target, y_target, loss="cross_entropy", n_classes=None,
                                device=run.device, dtype=self.dtype, flatten=True)
        X, Y, Xt, Yt = data.x_source, data.y_source, data.x_target, data.y_target
        N, T = data.n_source, int(Xt.shape[0])
        if self.k > N:
            warnings.warn(f"k: {self.k} neighbours but only {N} source samples: every sample is a neighbour of "
                          f"every target point, so each value is just 1[label matches] / k and the distances play "
                          f"no part; choose k < {N}", UserWarning, stacklevel=3)
        rank = None
        if self.groups is not None:
            if len(self.groups) != N:
                raise ValueError(f"groups: has {len(self.groups)} labels for {N} source samples")
            rank = torch.zeros(N, dtype=torch.long)
            for r, members in enumerate(self._members):
                rank[torch.as_tensor(members, dtype=torch.long)] = r
            rank = rank.to(X.device)
            from dvgs_fast.methods.knn_asymmetric import knn_asymmetric_block   # it imports this module
        promoted = X.dtype == torch.float32 and float32_distances_unsafe(X, Xt)
        if promoted:        # the float32 values are exact in float64; their distances then are too
            X, Xt = X.double(), Xt.double()
        if self.metric == "cosine":   # cosine distance is monotone in the distance of unit vectors
            X = torch.nn.functional.normalize(X, dim=1)
            Xt = torch.nn.functional.normalize(Xt, dim=1)
        block = self.block_size or max(1, min(T, _BLOCK_ELEMENTS // max(N, 1)))
        i = torch.arange(1, N + 1, dtype=torch.float64, device=X.device)
        coef = torch.clamp(i, max=self.k) / (self.k * i)          # min(K, i) / (K i), i = 1..N
        s1 = torch.zeros(N, dtype=torch.float64, device=X.device)
        s2 = torch.zeros(N, dtype=torch.float64, device=X.device)
        t_setup = time.perf_counter() - t0
        done, stopped = 0, None
        bar = run.progress(T, "KNN-Shapley", unit="target")
        try:
            with torch.no_grad():
                while done < T:
                    stopped = run.budget.exhausted(done)
                    if stopped:
                        break
                    b = min(block, T - done)
                    if rank is None:
                        vals = knn_shapley_block(X, Y, Xt[done:done + b], Yt[done:done + b], coef, self.metric)
                    else:
                        vals = knn_asymmetric_block(X, Y, Xt[done:done + b], Yt[done:done + b], self.k, rank,
                                                    len(self._members), self.metric)
                    s1 += vals.sum(0)
                    s2 += (vals * vals).sum(0)
                    done += b
                    bar.update(b)
        finally:
            bar.close()
        counts = np.full(N, done, dtype=np.int64)
        values, stderr = stats_from_sums(s1.cpu().numpy(), s2.cpu().numpy(), counts)
        return Estimate(values=values, stderr=stderr, counts=counts,
                        status="stopped" if stopped else "completed", stop_reason=stopped,
                        progress=f"{done} of {T} target points",
                        info={"k": self.k, "metric": self.metric, "n_target": T, "targets_done": done,
                              "block_size": block, "distances_dtype": str(X.dtype).replace("torch.", ""),
                              **({} if rank is None else {"n_groups": len(self._members)})},
                        timings={"setup": t_setup, "valuation": time.perf_counter() - t0 - t_setup})


# Beyond these magnitudes float32 squared differences (and norms) overflow or underflow: every
# distance becomes inf or 0, all neighbours tie, and the values silently change (issue 33: up to
# 0.06 at |x| ~ 1e19). 2^50 leaves room for 2^26 features below float32's 2^128.
_F32_SAFE_MAX, _F32_SAFE_MIN = 2.0 ** 50, 2.0 ** -50


def float32_distances_unsafe(*xs: torch.Tensor) -> bool:
    """Whether float32 distances between these rows would over- or underflow (the largest
    magnitude is above 2^50, or every value is below 2^-50 without being all zero)."""
    top = max(max(-float(lo), float(hi)) for lo, hi in (torch.aminmax(x) for x in xs if x.numel()))
    return top > _F32_SAFE_MAX or 0.0 < top < _F32_SAFE_MIN


def pairwise_distances(a: torch.Tensor, b: torch.Tensor, metric: str) -> torch.Tensor:
    """[n_a, n_b] distances, each pair computed on its own (identical rows tie exactly)."""
    if metric == "manhattan":
        return torch.cdist(a, b, p=1.0)
    return torch.cdist(a, b, p=2.0, compute_mode="donot_use_mm_for_euclid_dist")


def knn_shapley_block(X: torch.Tensor, Y: torch.Tensor, xt: torch.Tensor, yt: torch.Tensor,
                      coef: torch.Tensor, metric: str) -> torch.Tensor:
    """KNN-Shapley values [b, N] (float64, source order) of the N source points for b target points.

    coef[i-1] = min(K, i) / (K i). `metric` 'cosine' expects unit-normalised rows (euclidean on them)."""
    d = pairwise_distances(xt, X, "manhattan" if metric == "manhattan" else "euclidean")
    order = torch.sort(d, dim=1, stable=True).indices                      # nearest first, ties by index
    del d
    m = (Y[order] == yt.unsqueeze(1)).to(torch.float64)                   # m_i along the sorted order
    step = m.clone()
    step[:, :-1] -= m[:, 1:]                                              # m_i - m_{i+1}; m_N at i = N
    step *= coef
    s = torch.flip(torch.cumsum(torch.flip(step, (1,)), 1), (1,))         # s_i = sum_{j >= i} step_j
    return torch.zeros_like(s).scatter_(1, order, s)
