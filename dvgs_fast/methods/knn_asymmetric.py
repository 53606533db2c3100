"""Asymmetric Data Shapley of a K-nearest-neighbour classifier in closed form.

Asymmetric Shapley (Zheng et al. 2024; `semivalues.methods.AsymmetricShapley`): groups of the
source points come in a fixed order, and a point's value is its Shapley value in the game of its
own group G with every point of the earlier groups (the base P) always present. For the KNN
utility of Jia et al. (2019), U(S) = (1/K) sum over the min(K, |S|) nearest points of S of
m = 1[label matches], write U as a sum of per-point indicator games,

    U(P + S) = (1/K) sum_x m_x * 1[x in P + S and fewer than K points of P + S are nearer than x],

and take each one's Shapley value for a point v of G by counting, over a random order of G,
how many of the nearer points of G precede v (uniform on 0..a for a set of a points). With the
points of P + G sorted by distance to the target point (ties by index), b_x the number of points
of G nearer than x and r_x the number of base points nearer than x:

    phi_v = (1/K) [ m_v * min(l_v, max(0, K - r_v)) / l_v  -  sum over x farther than v of t_x ]

    l_v = b_v + 1;   t_x = m_x / b_x                        x in P, r_x < K <= r_x + b_x
                     t_x = m_x (K - r_x) / (b_x (b_x + 1))  x in G, r_x < K <= r_x + b_x
                     t_x = 0                                 otherwise.

The first term is v's own indicator (v is among the K nearest when fewer than K - r_v of the
nearer group points precede it); t_x is the chance that v pushes x out of the K nearest. With
no base (the first group) this is Jia et al.'s recursion. (Our derivation, checked against
enumeration of every subset in the tests; the authors' code computes the same values with
O(n^2 K) nested sums per target point, this is O(N) per group and target point after one sort.)
The values are averaged over the target points, like `KNNShapley`.
"""
from __future__ import annotations

import torch

from dvgs_fast.methods.knn_shapley import pairwise_distances


def knn_asymmetric_block(X: torch.Tensor, Y: torch.Tensor, xt: torch.Tensor, yt: torch.Tensor, k: int,
                         group_rank: torch.Tensor, n_groups: int, metric: str) -> torch.Tensor:
    """Asymmetric KNN-Shapley values [b, N] (float64, source order) for b target points.

    group_rank[i] = the position of point i's group in the order (0 = earliest).
    `metric` 'cosine' expects unit-normalised rows (euclidean on them)."""
    d = pairwise_distances(xt, X, "manhattan" if metric == "manhattan" else "euclidean")
    order = torch.sort(d, dim=1, stable=True).indices                     # nearest first, ties by index
    del d
    m = (Y[order] == yt.unsqueeze(1)).to(torch.float64)                  # [b, N] along the sorted order
    g_sorted = group_rank[order]                                           # [b, N]
    out = torch.zeros_like(m)
    for g in range(n_groups):
        in_g = (g_sorted == g).to(torch.float64)
        in_p = (g_sorted < g).to(torch.float64)
        b_x = torch.cumsum(in_g, 1) - in_g                                 # group points nearer than x
        r_x = torch.cumsum(in_p, 1) - in_p                                 # base points nearer than x
        reach = (r_x < k) & (r_x + b_x >= k) & (b_x >= 1)
        bb = b_x.clamp(min=1)
        t = torch.where(reach & (in_p > 0), m / bb, torch.zeros_like(m))
        t = t + torch.where(reach & (in_g > 0), m * (k - r_x) / (bb * (bb + 1)), torch.zeros_like(m))
        after = torch.flip(torch.cumsum(torch.flip(t, (1,)), 1), (1,)) - t  # sum over x farther than v
        l_v = b_x + 1
        own = m * torch.clamp(torch.clamp(k - r_x, min=0), max=l_v) / l_v
        val = (own - after) / k
        out = out + torch.where(in_g > 0, val, torch.zeros_like(val))
    return torch.zeros_like(out).scatter_(1, order, out)
