"""solver="datainf": DataInf (Kwon, Wu, Wu, Zou 2024, "DataInf: Efficiently Estimating Data
Influence in LoRA-tuned LLMs and Diffusion Models"; pyDVL's InverseHarmonicMeanInfluence).

Per layer l (a module's weight and bias together; the remaining explicit parameters of one
module together), the empirical-Fisher inverse (1/n Σ_i g_il g_ilᵀ + λ_l I)⁻¹ is replaced by the
average of the rank-one inverses (Sherman-Morrison), so for a query gradient g_q

    V_l = (1/λ_l) (g_ql − (1/n) Σ_i c_iq g_il),    c_iq = ⟨g_il, g_ql⟩ / (λ_l + ‖g_il‖²),

with g_i the training losses' own gradients (true labels, as in the paper). The dots ⟨g_il, g_ql⟩
and norms ‖g_il‖² are the engine's (ghost dots; no per-sample gradient formed for Linear/conv
layers), and Σ_i c_iq g_il is assembled in layer-matrix form from the recorded a, δ
(Σ_i c_iq Σ_t δ_it a_itᵀ: one GEMM), so nothing per sample is kept but the norms.

When the scored source is the Hessian's data and it is small beside the layers' width, attribute()
scores through per-layer Gram matrices instead (datainf_gram.py: the same scores, fewer
multiply-adds).

Damping "auto": λ_l = 0.1 × (1/(n·d_l)) Σ_i ‖g_il‖², the paper's rule (d_l: the layer's parameter
count). Fitting = one pass for the norms (saved, n × layers numbers); every query block then
passes over the Hessian's data once more, on the fitting pass's recordings while they fit in
the problem's KEEP_BYTES (problem.py), recording them again otherwise.
"""
from __future__ import annotations

import torch

from dvgs_fast import grads
from dvgs_fast.grads import DenseGrads, SampleFactors
from dvgs_fast.methods.influence.datainf_gram import cheaper, gram_scores
from dvgs_fast.methods.influence.problem import Problem, Saver, Stopped, recorded
from dvgs_fast.methods.influence.solver import Solver, fixed_damping

DATAINF_AUTO_DAMPING = 0.1
_BLOCK = 1 << 23                     # elements of the largest temporary (queries × rows × d_out)
_MIN_SAMPLES = 64                    # samples per block of formed gradients (the weighted sum's GEMM depth)


def _layers(f: SampleFactors, owner) -> list[tuple[str, SampleFactors, list[str]]]:
    """(layer name, its factors alone, its parameter names) for every layer of `f`; explicit
    parameters are grouped by the module owning them."""
    out = [(r.name, SampleFactors(f.n, rows=[r], dtype=f.dtype), [n for n in (r.weight, r.bias) if n])
           for r in f.rows]
    out += [(t.name, SampleFactors(f.n, tokens=[t], dtype=f.dtype), [t.weight]) for t in f.tokens]
    if f.dense is not None:
        cols = dict(zip(f.dense.names, f.dense.g.split(f.dense.sizes, 1)))
        groups: dict[str, list[str]] = {}
        for nm in f.dense.names:
            groups.setdefault(owner(nm), []).append(nm)
        for mod, names in groups.items():
            g = torch.cat([cols[n] for n in names], 1)
            out.append((mod, SampleFactors(f.n, dense=DenseGrads(names, [cols[n].shape[1] for n in names], g),
                                           dtype=f.dtype), names))
    return out


def _owner(name: str) -> str:
    """The module a (not tied) parameter belongs to: its path without the local name."""
    return name.rsplit(".", 1)[0] if "." in name else ""


def _weighted_sum(f: SampleFactors, c: torch.Tensor, shapes: dict) -> dict[str, torch.Tensor]:
    """{name: [Q, *shape]} = Σ_i c[i, q] g_i for one layer's factors (c: [n, Q])."""
    q = c.shape[1]
    out = {}
    for r in f.rows:
        n = c.shape[0]
        ct = c.t().to(r.d3().dtype)                                        # [Q, n]
        if r.weight is not None and (r.rows > 1 or r.d_out * r.d_in * _MIN_SAMPLES <= _BLOCK):
            # several rows per sample (conv positions): Q·n·L·d_out·d_in by rows, but only
            # n·(L + Q)·d_out·d_in with the per-sample gradients formed (digits CNN: 70 -> ~3 CPU s).
            # One row: the same multiply-adds either way, but this is one GEMM over blocks of
            # samples instead of a [Q, n, d_out] product per query block (digits MLP 64-64-10, 300
            # queries, 1,000 rows: 0.13 -> ~0.03 CPU s); a layer too wide for blocks of
            # _MIN_SAMPLES samples keeps the per-query GEMMs, whose inner dimension is n.
            w = torch.zeros(q, r.d_out * r.d_in, dtype=ct.dtype, device=ct.device)
            for s0, g in r.weight_grad_blocks(_BLOCK):
                w += ct[:, s0:s0 + g.shape[0]] @ g.reshape(g.shape[0], -1).to(ct.dtype)
            out[r.weight] = w.reshape(q, *shapes[r.weight])
        elif r.weight is not None:
            a, d = r.a, r.d
            w = torch.empty(q, r.d_out, r.d_in, dtype=d.dtype, device=d.device)
            step = max(1, _BLOCK // max(1, d.numel()))
            for s0 in range(0, q, step):                                   # Σ_i c δ aᵀ, a block of queries
                dq = ct[s0:s0 + step].unsqueeze(2) * d.unsqueeze(0)          # [q', n, d_out]
                w[s0:s0 + step] = dq.transpose(1, 2) @ a
            out[r.weight] = w.reshape(q, *shapes[r.weight])
        if r.bias is not None:
            out[r.bias] = (ct @ r.bias_grads()).reshape(q, *shapes[r.bias])
    for t in f.tokens:
        n, T = t.ids.shape
        vocab, dim = shapes[t.weight]
        w = torch.zeros(q, vocab, dim, dtype=t.d.dtype, device=t.d.device)
        ct = c.to(t.d.dtype).repeat_interleave(T, 0)                        # [n·T, Q]
        d = t.d.reshape(n * T, dim)
        w.index_add_(1, t.ids.reshape(-1), ct.t().unsqueeze(2) * d.unsqueeze(0))
        out[t.weight] = w
    if f.dense is not None:
        s = c.t().to(f.dense.g.dtype) @ f.dense.g
        for nm, blk in zip(f.dense.names, s.split(f.dense.sizes, 1)):
            out[nm] = blk.reshape(q, *shapes[nm])
    return out


class DataInf(Solver):
    name = "datainf"

    def _scorer(self, prob: Problem) -> grads.FastScorer:
        return grads.FastScorer(prob.model, prob.names, prob.sample_loss, "dot", owner="InfluenceFunction")

    def fit(self, prob: Problem, saved: dict | None, saver: Saver) -> None:
        st = dict(saved or {"block": 0, "norms": [], "layers": None})
        scorer = self._scorer(prob)
        owner = _owner
        bar = prob.progress(prob.n_blocks(), "influence (datainf): gradient norms", unit="block",
                            initial=int(st["block"]))
        try:
            for k, x, y in prob.blocks(int(st["block"])):
                try:
                    prob.check_time(lockstep=False)
                except Stopped:
                    saver(lambda: st, force=True)
                    raise
                f = recorded(scorer, prob, x, y, prob.block_rows(k))     # kept: each query block passes again
                layers = _layers(f, owner)
                st["layers"] = [(name, names) for name, _, names in layers]
                st["norms"].append(torch.stack([grads.sqnorms(lf) for _, lf, _ in layers], 1).to(prob.dtype).cpu())
                st["block"] = k + 1
                bar.update(1)
                saver(lambda: st)
        finally:
            bar.close()
        self.state = st
        norms = torch.cat(st["norms"]) if st["norms"] else torch.zeros(0, 0, dtype=prob.dtype)
        sums = prob.all_reduce(norms.sum(0)) if norms.numel() else None
        self.norms = norms
        self.owner = owner
        fixed = fixed_damping(self.cfg)
        if fixed is not None:
            self.lams = [fixed] * len(st["layers"] or [])
        else:
            size = {n: int(torch.Size(s).numel()) for n, s in prob.shapes.items()}
            self.lams = [DATAINF_AUTO_DAMPING * float(sums[j]) / (prob.n_hessian * sum(size[n] for n in names))
                         for j, (_, names) in enumerate(st["layers"])]
        self.details["damping"] = {name: lam for (name, _), lam in zip(st["layers"], self.lams)}

    def precondition(self, prob: Problem, G: dict) -> dict:
        scorer = self._scorer(prob)
        q = next(iter(G.values())).shape[0]
        acc = {n: torch.zeros(q, *prob.shapes[n], dtype=prob.dtype, device=prob.device) for n in prob.names}
        row = 0
        for k, x, y in prob.blocks():
            prob.check_time(lockstep=False)
            f = recorded(scorer, prob, x, y, prob.block_rows(k))
            nb = self.norms[row:row + f.n].to(prob.device)
            row += f.n
            for j, (_, lf, names) in enumerate(_layers(f, self.owner)):
                dots = grads.batch_dots(lf, {n: G[n] for n in names}).to(prob.dtype)       # [n, Q]
                c = dots / (self.lams[j] + nb[:, j]).unsqueeze(1)
                for n, s in _weighted_sum(lf, c, prob.shapes).items():
                    acc[n] += s.to(prob.dtype)
        out = {}
        by_name = {n: j for j, (_, names) in enumerate(self.state["layers"]) for n in names}
        for n in prob.names:
            summed = prob.all_reduce(acc[n])
            if n not in by_name:                 # its layer never reached the loss: zero gradients
                out[n] = torch.zeros_like(summed)
                continue
            out[n] = (G[n].to(prob.dtype) - summed / prob.n_hessian) / self.lams[by_name[n]]
        return out

    def hessian_row_scores(self, prob: Problem, fq: SampleFactors) -> torch.Tensor | None:
        """The scores on the Hessian's own rows by per-layer Grams (datainf_gram.py) when that
        costs fewer multiply-adds than preconditioning and scoring."""
        lq = _layers(fq, self.owner)
        if not cheaper(lq, prob.n_hessian):
            return None
        S = gram_scores(self, prob, lq, lambda f: _layers(f, self.owner), self._scorer(prob))
        if S is not None:
            self.details["scoring"] = "gram (datainf_gram.py)"
        return S


__all__ = ["DATAINF_AUTO_DAMPING", "DataInf"]
