"""DataInf's scores on the Hessian's own rows through per-layer Gram matrices, without forming
the preconditioned queries.

When the scored source is the Hessian's data (attribute() with hessian_samples=None), DataInf's
score of query q against row s is, per layer l (datainf.py for V_l and c_iq),

    ⟨V_ql, g_sl⟩ = (1/λ_l) (D_l[s, q] − (1/n) Σ_i c_iq K_l[i, s]),   D_l[i, q] = ⟨g_il, g_ql⟩,
                                                                      K_l[i, s] = ⟨g_il, g_sl⟩,

so the three [Q x n] x p products of the formed route (the dots, the weighted sum Σ_i c_iq g_il,
the scoring of V) become the engine's Grams: D and K by ghost products (a Linear layer:
(a_i·a_j)(δ_i·δ_j), n·m·(d_in + d_out) multiply-adds instead of n·m·d_in·d_out) and one [Q x n] x
[n x n] product. Quadratic in n, so taken only where it costs fewer multiply-adds than the formed
route (``cheaper``): wide Linear layers and a few thousand rows (the digits MLP: ~0.5 against
~3.7 G multiply-adds for its 64 x 64 layer), never a large source.
"""
from __future__ import annotations

import torch

from dvgs_fast import grads
from dvgs_fast.grads import SampleFactors
from dvgs_fast.methods.influence.problem import Problem, recorded


def _pair_cost(f: SampleFactors) -> tuple[int, int]:
    """(multiply-adds per pair of samples by the Gram, parameters p) of a one-layer SampleFactors."""
    for r in f.rows:
        if r.weight is None:                                   # a bias alone: Σ_t δ_t, d_out numbers
            return r.d_out, r.d_out
        p = r.d_out * (r.d_in + (r.bias is not None))
        return min(r.rows * r.rows * (r.d_in + r.d_out + 1), p), p
    for t in f.tokens:
        T, dim = t.ids.shape[1], t.d.shape[-1]
        return T * T * dim, int(t.module.weight.numel())
    p = int(f.dense.g.shape[1])
    return p, p


def cheaper(layers_q: list, n: int) -> bool:
    """The Gram route costs fewer multiply-adds than the formed one for these query layers and n rows."""
    q = layers_q[0][1].n if layers_q else 0
    gram = formed = 0
    for _, lf, _ in layers_q:
        w, p = _pair_cost(lf)
        gram += n * q * w + n * n * w // 2 + q * n * n       # D, K (symmetric: half), cᵀK
        formed += 3 * n * q * p
    return gram < formed


def gram_scores(solver, prob: Problem, lq: list, layers, scorer: grads.FastScorer) -> torch.Tensor | None:
    """[Q, n] scores of the queries (their factors split by layer, ``lq``) against the Hessian's n
    rows, or None when the query layers do not match the Hessian's recorded layers. ``layers(f)``
    splits factors alike (datainf._layers); ``scorer`` records the Hessian's rows (kept recordings
    are reused)."""
    names = [name for name, _ in solver.state["layers"]]
    if [name for name, _, _ in lq] != names:
        return None
    blocks = []
    for k, x, y in prob.blocks():
        prob.check_time(lockstep=False)
        a, b = prob.block_rows(k)
        blocks.append((a, b, layers(recorded(scorer, prob, x, y, (a, b)))))
    n, Q = prob.n_hessian, lq[0][1].n
    out = torch.zeros(Q, n, dtype=prob.dtype, device=prob.device)
    for j, (_, fqj, _) in enumerate(lq):
        lam = solver.lams[j]
        c = torch.empty(n, Q, dtype=prob.dtype, device=prob.device)
        for a, b, lf in blocks:
            D = grads.cross_gram(lf[j][1], fqj).to(prob.dtype)                # [n_h, Q]
            out[:, a:b] += D.t() / lam
            c[a:b] = D / (lam + solver.norms[a:b, j].to(prob.device)).unsqueeze(1)
        scale = 1.0 / (prob.n_hessian * lam)
        for i, (a, b, lf) in enumerate(blocks):
            for a2, b2, lf2 in blocks[i:]:                                    # K is symmetric: each pair once
                prob.check_time(lockstep=False)
                K = grads.cross_gram(lf[j][1], lf2[j][1]).to(prob.dtype)     # [rows a:b, rows a2:b2]
                out[:, a2:b2].addmm_(c[a:b].t(), K, alpha=-scale)
                if a2 != a:
                    out[:, a:b].addmm_(c[a2:b2].t(), K.t(), alpha=-scale)
    return out


__all__ = ["cheaper", "gram_scores"]
