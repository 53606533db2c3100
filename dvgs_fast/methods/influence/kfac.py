"""solver="kfac" and solver="ekfac": a Kronecker-factored Gauss-Newton per layer (Martens & Grosse
2015; EK-FAC: George et al. 2018; for influence: Grosse et al. 2023, Kronfluence), built from the
engine's recordings (dvgs_fast.grads.curvature: the factors' conventions and the Fisher choice).

Per covered layer (Linear, ungrouped Conv1d/Conv2d, Embedding), with A = Q_A diag(e_A) Q_Aᵀ and
S = Q_S diag(e_S) Q_Sᵀ, a query's weight gradient G (bias as the last column, Kronfluence's
layout) is preconditioned in the Kronecker eigenbasis:

    V = Q_S [(Q_Sᵀ G Q_A) / (Λ + λ)] Q_Aᵀ,   Λ = e_S e_Aᵀ (K-FAC) or EK-FAC's corrected eigenvalues.

Damping "auto": λ = 0.1 × mean(Λ) per layer -- Kronfluence's heuristic (damping_factor=None),
so the two agree by default. The preconditioned gradient stays in layer-matrix form, Q × d_out ×
d_in per layer (3.3 GB for 1,000 queries of one 4096 × 4096 layer in float64: query_batch_size
bounds it). Other selected parameters (norm affines, other layers, tied weights) have no
Kronecker factors: they are left out of the scores, as Kronfluence leaves unsupported modules
out, and named in info["left_out"].

Fitting passes over the Hessian's data once (covariances), eigendecomposes, and for EK-FAC
passes again (corrected eigenvalues: on the first pass's recordings while they fit in the
problem's KEEP_BYTES, which saves a forward, a backward and a conv's unfold per block). The
empirical Fisher's recordings are the source's loss gradients: kept for scoring as well when the
source is scored in the Hessian's blocks (Problem.scored_in_blocks). The state after every block
can be saved, so a killed run resumes at its block; torchrun ranks take their own blocks and
all-reduce the sums.
"""
from __future__ import annotations

import torch

from dvgs_fast import grads
from dvgs_fast.methods.base import derive_seed
from dvgs_fast.methods.influence.problem import Problem, Saver, Stopped, recorded
from dvgs_fast.methods.influence.solver import Solver, fixed_damping

KFAC_AUTO_DAMPING = 0.1              # λ = this × mean eigenvalue of the layer (Kronfluence's heuristic)
_STREAM = 2929                       # salt of the sampled-Fisher draws (seeded per global block)


class KFAC(Solver):
    name = "kfac"
    corrected = False                # EK-FAC: eigenvalues corrected by a second pass

    def _routes(self, prob: Problem):
        if getattr(self, "_covered", None) is None:
            full = grads.FastScorer(prob.model, prob.names, prob.sample_loss, "dot", owner="InfluenceFunction")
            routes, left = grads.kfac_routes(full)
            if not routes:
                raise ValueError(f"solver: {self.name!r} covers Linear, Conv1d/Conv2d and Embedding layers; the "
                                 f"selected parameters ({', '.join(prob.names[:5])}) have none -- choose another "
                                 f"solver or grad_params")
            self._covered = [n for r in routes for n in (r.weight, r.bias) if n]
            self.details["left_out"] = left
            self.details["layers"] = [r.name for r in routes]
        return self._covered

    def scored_names(self, prob: Problem) -> list[str]:
        return self._routes(prob)

    def fit(self, prob: Problem, saved: dict | None, saver: Saver) -> None:
        names = self._routes(prob)
        scorer = grads.FastScorer(prob.model, names, prob.sample_loss, "dot", owner="InfluenceFunction")
        st = dict(saved or {"stage": "covariances", "block": 0, "factors": None})
        kf = (grads.KroneckerFactors.from_state(st["factors"]) if st.get("factors")
              else grads.KroneckerFactors(prob.dtype))
        fisher = self.cfg.fisher
        first_block = prob.shard()[0] // prob.block

        def state():
            return {**st, "factors": kf.state()}

        def one_pass(desc: str, add) -> None:
            bar = prob.progress(prob.n_blocks(), f"influence ({self.name}): {desc}", unit="block",
                                initial=int(st["block"]))
            try:
                for k, x, y in prob.blocks(int(st["block"])):
                    try:
                        prob.check_time(lockstep=False)
                    except Stopped:
                        saver(state, force=True)
                        raise
                    if fisher == "empirical":                  # the loss gradients: scoring's own
                        cols = [recorded(scorer, prob, x, y, prob.block_rows(k),
                                         keep=self.corrected or prob.scored_in_blocks)]
                    else:                                      # EK-FAC's second pass takes the same columns
                        cols = prob.kept(("fisher columns", k))
                        if cols is None:
                            gen = torch.Generator().manual_seed(derive_seed(prob.run.seed, _STREAM, first_block + k))
                            cols = list(grads.fisher_factors(scorer, x, y, fisher, prob.loss, gen))
                            if self.corrected and st["stage"] == "covariances":
                                prob.keep(("fisher columns", k), cols, sum(c.nbytes() for c in cols))
                    if cols and cols[0].dense is not None:
                        raise ValueError(f"grad_params: {', '.join(cols[0].dense.names)} belong to layers whose "
                                         f"calls cannot be split by sample at run time, which {self.name} cannot "
                                         f"factor; leave them out with grad_params")
                    add(cols)
                    st["block"] = k + 1
                    bar.update(1)
                    saver(state)
            finally:
                bar.close()

        if st["stage"] == "covariances":
            one_pass("covariances", kf.add_covariances)
            kf.reduce(prob.all_reduce, "covariances")
            kf.eigendecompose()
            st.update(stage="lambda" if self.corrected else "done", block=0)
            saver(state, force=True)
        if st["stage"] == "lambda":
            one_pass("corrected eigenvalues", kf.add_lambda)
            kf.reduce(prob.all_reduce, "lambda")
            st.update(stage="done", block=0)
            saver(state, force=True)
        self.kf = kf
        self.state = state()
        self.details["fisher"] = fisher

    def eigenvalues(self, lay) -> torch.Tensor:
        return lay.ekfac_eigenvalues() if self.corrected else lay.kfac_eigenvalues()

    def precondition(self, prob: Problem, G: dict) -> dict:
        fixed = fixed_damping(self.cfg)
        out, used = {}, {}
        for lay in self.kf.layers.values():
            ev = self.eigenvalues(lay).to(prob.device)
            lam = fixed if fixed is not None else KFAC_AUTO_DAMPING * float(ev.mean())
            used[lay.name] = lam
            QS = lay.QS.to(prob.device)
            gw = G[lay.weight].to(prob.dtype)
            q = gw.shape[0]
            if lay.kind == "rows":
                QA = lay.QA.to(prob.device)
                M = gw.reshape(q, QS.shape[0], -1)
                if lay.bias is not None:
                    M = torch.cat([M, G[lay.bias].to(prob.dtype).reshape(q, -1, 1)], 2)
                M = QS @ ((QS.t() @ M @ QA) / (ev + lam)) @ QA.t()
                if lay.bias is not None:
                    out[lay.bias] = M[:, :, -1].reshape(G[lay.bias].shape)
                    M = M[:, :, :-1]
                out[lay.weight] = M.reshape(gw.shape)
            else:                                           # Embedding: A's eigenbasis is the identity
                out[lay.weight] = ((gw @ QS) / (ev + lam)) @ QS.t()
        self.details["damping"] = used
        return out


class EKFAC(KFAC):
    name = "ekfac"
    corrected = True


__all__ = ["EKFAC", "KFAC", "KFAC_AUTO_DAMPING"]
