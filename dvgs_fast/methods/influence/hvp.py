"""Hessian-vector products of the training objective for the exact solvers (direct, CG, LiSSA,
Arnoldi): v ↦ (H + weight_decay·I) v with H the Hessian of the mean loss over the Hessian's data
at the trained parameters (the true Hessian, not a Gauss-Newton approximation).

Two routes, named in info["hessian_vector_route"]. A Sequential model of Linear layers, elementwise
activations, Flatten, Conv1d / Conv2d, max / average pools and eval-mode BatchNorm takes the
R-operator written out (hvp_sequential.py, hvp_conv.py): on the digits MLP 64-64-10 (1 thread,
float32) 300 products on a 100-row LiSSA batch cost ~37 ms instead of ~98 ms by double backward,
and the direct solver's 4,810 columns 9.4 CPU s instead of 13-17 s; on the digits CNN (conv
1->8->16, max-pools, 1,000 rows) a product ~0.13 s instead of ~0.42 s. Any other model takes
double backward: per block of rows one forward and one backward that keeps its
graph (create_graph; the graph itself kept across full passes while it fits in the problem's
KEEP_BYTES), then vmapped backward passes of ⟨∇L_block, v⟩ (is_grads_batched) reusing it, a chunk
of vectors at a time -- 16 on 1,000-row blocks, up to 128 on small ones (its temporaries grow
with chunk × rows). Measured on this project's 2-core CPU, 300 vectors, 1 thread: on 1,000
digits rows, float32, a loop of single products took 0.16 CPU s (logistic regression) and 0.39 s
(MLP 64-64-10), chunks of 16 0.074 s and 0.385 s, chunks of 300 0.11 s and 1.17 s; on a 64-row
LiSSA mini-batch (float64 MLP) the loop took 0.32 s, chunks of 128 0.09 s. Forward-over-reverse
(vmap of jvp(grad)) was no faster, and torch.func.hessian for the whole matrix took 2.5x the
loop's time per column. Under torchrun every rank takes its own rows and the products are
all-reduced.
"""
from __future__ import annotations

import numpy as np
import torch

from dvgs_fast.methods.influence.hvp_sequential import SequentialHVP
from dvgs_fast.methods.influence.problem import Problem


# Vectors per vmapped backward pass: _BATCHED_ELEMENTS // rows, clamped to [_MIN_BATCHED, _MAX_BATCHED].
_BATCHED_ELEMENTS = 16384
_MAX_BATCHED = 128
_MIN_BATCHED = 16


class HessianOperator:
    """(H + weight_decay·I) applied to rows of a [k, p] matrix (flat vectors, ``prob.names`` order)."""

    def __init__(self, prob: Problem):
        self.prob = prob
        self.products = 0                                # Hessian-vector products taken (per rank)
        self.batched = True                              # False once vmap refused the model
        # Sequential models: the R-operator written out (hvp_sequential.py); None: autograd
        self.sequential = SequentialHVP.of(prob.model, prob.names)
        self.details: dict = {}                          # how an explicit Hessian was built (direct.py)

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """[k, p] -> [k, p]: the full Hessian's data (this rank's rows, all-reduced)."""
        prob = self.prob
        out = torch.zeros_like(V)
        for b, x, y in prob.blocks():
            out += self._block(x, y, V, 1.0 / prob.n_hessian, key=b)
        out = prob.all_reduce(out)
        return out + prob.weight_decay * V if prob.weight_decay else out

    def matmat_rows(self, x: torch.Tensor, y: torch.Tensor, V: torch.Tensor, n: int) -> torch.Tensor:
        """The mean over n rows of which (x, y) are this rank's share (a LiSSA mini-batch)."""
        out = self._block(x, y, V, 1.0 / n) if x.shape[0] else torch.zeros_like(V)
        out = self.prob.all_reduce(out)
        return out + self.prob.weight_decay * V if self.prob.weight_decay else out

    @property
    def route(self) -> str:
        return "R-operator (Sequential)" if self.sequential is not None else "double backward"

    def _block(self, x: torch.Tensor, y: torch.Tensor, V: torch.Tensor, scale: float,
               key: int | None = None) -> torch.Tensor:
        """(scale · Σ_rows H_row) applied to V's rows; key: the block's index in a full pass (its
        R-operator preparation or gradient graph is then kept for the next pass: Problem.keep)."""
        if self.sequential is not None:
            out = self._block_sequential(x, y, V, scale, key)
            if out is not None:
                return out
            self.sequential = None                           # input a Linear cannot take as rows
        return self._block_autograd(x, y, V, scale, key)

    def _block_sequential(self, x, y, V: torch.Tensor, scale: float, key: int | None) -> torch.Tensor | None:
        prob = self.prob
        st = self._preparation(x, y, scale, key)
        if st is None:
            return None
        mdt = prob.params()[0].dtype
        out = torch.empty(V.shape, dtype=mdt, device=V.device)
        # unflat's [K, *shape] column slices of a Linear's weight / bias are views: written in place
        self.sequential.apply(st, prob.unflat(V.to(mdt)), out=prob.unflat(out))
        self.products += V.shape[0]
        return out.to(V.dtype)

    def _preparation(self, x, y, scale: float, key: int | None) -> dict | None:
        """The R-operator's preparation of a block of rows (SequentialHVP.prepare); kept
        (Problem.keep) when `key` names a block of a full pass. None: the model cannot take them."""
        kept = ("R-operator preparation", key, scale)
        st = self.prob.kept(kept) if key is not None else None
        if st is None:
            st = self.sequential.prepare(x, y, self.prob.sample_loss, scale)
            if st is not None and key is not None:
                self.prob.keep(kept, st, self.sequential.nbytes(st))
        return st

    def _gradient_graph(self, x, y, scale: float, key: int | None) -> tuple:
        """(∇ of scale·Σ_rows loss with its graph, the indices of the parameters whose gradient
        depends on θ). The graph (forward and first backward: about half of each product's time
        on the digits CNN) is kept (Problem.keep, counting its saved tensors) when `key` names a
        block of a full pass, which Arnoldi, CG and the direct solver's columns take again and again."""
        kept = ("gradient graph", key, scale)
        got = self.prob.kept(kept) if key is not None else None
        if got is not None:
            return got
        params = self.prob.params()
        saved: dict[int, int] = {}

        def pack(t):                                     # bytes the graph keeps, by storage
            st = t.untyped_storage()
            saved[st.data_ptr()] = st.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = self.prob.sample_loss(self.prob.model(x), y).sum() * scale
            g = torch.autograd.grad(loss, params, create_graph=True)
        live = [i for i, t in enumerate(g) if t.requires_grad]   # a gradient constant in θ has zero curvature
        if key is not None:
            self.prob.keep(kept, (g, live), sum(saved.values()))
        return g, live

    def _block_autograd(self, x: torch.Tensor, y: torch.Tensor, V: torch.Tensor, scale: float,
                        key: int | None = None) -> torch.Tensor:
        prob = self.prob
        params = prob.params()
        mdt = params[0].dtype
        g, live = self._gradient_graph(x, y, scale, key)
        out = torch.zeros_like(V)
        if not live:
            return out
        offsets = np.cumsum([0] + prob.sizes)
        shapes = [prob.shapes[prob.names[i]] for i in live]
        rows = max(1, int(x.shape[0]))
        chunk = max(_MIN_BATCHED, min(_MAX_BATCHED, _BATCHED_ELEMENTS // rows))
        j = 0
        while j < V.shape[0]:
            if self.batched and V.shape[0] - j > 1:               # one vmapped backward per chunk of vectors
                k = min(chunk, V.shape[0] - j)
                parts = [V[j:j + k, offsets[i]:offsets[i + 1]].reshape(k, *s).to(mdt) for i, s in zip(live, shapes)]
                try:
                    h = torch.autograd.grad([g[i] for i in live], params, grad_outputs=parts, retain_graph=True,
                                            allow_unused=True, is_grads_batched=True)
                except RuntimeError:                             # a layer vmap cannot batch: one by one
                    self.batched = False
                    continue
                out[j:j + k] = torch.cat([torch.zeros(k, s, dtype=V.dtype, device=V.device) if t is None else
                                          t.reshape(k, -1).to(V.dtype) for t, s in zip(h, prob.sizes)], 1)
                j += k
                continue
            parts = [V[j, offsets[i]:offsets[i + 1]].reshape(s).to(mdt) for i, s in zip(live, shapes)]
            h = torch.autograd.grad([g[i] for i in live], params, grad_outputs=parts, retain_graph=True,
                                    allow_unused=True)
            out[j] = torch.cat([torch.zeros(s, dtype=V.dtype, device=V.device) if t is None else
                                t.reshape(-1).to(V.dtype) for t, s in zip(h, prob.sizes)])
            j += 1
        self.products += V.shape[0]
        return out

    # ------------------------------------------------------------------ one layer's block at once
    def kron_plan(self) -> tuple[int, torch.Tensor] | None:
        """(layer, flat indices of its block in ``prob.names`` order) when the R-operator route
        can build the largest scored Linear layer's diagonal block of H directly; else None (also
        when the model turns out not to take the Hessian's rows: one row is tried, alike on
        every rank)."""
        seq, prob = self.sequential, self.prob
        layer = seq.largest_layer() if seq is not None else None
        if layer is None:
            return None
        if seq.prepare(prob.xh[:1], prob.yh[:1], prob.sample_loss, 1.0) is None:
            self.sequential = None                           # a Linear sees more than 2-D input
            return None
        m = seq.layers[layer]
        wn, bn = seq.names[id(m)]
        offsets = dict(zip(prob.names, np.cumsum([0] + prob.sizes)[:-1].tolist()))
        o, d = m.out_features, m.in_features
        idx = offsets[wn] + torch.arange(o * d).view(o, d)
        if bn is not None:
            idx = torch.cat([idx, (offsets[bn] + torch.arange(o)).view(o, 1)], 1)
        return layer, idx.reshape(-1)

    def kron_block(self, plan: tuple[int, torch.Tensor]) -> torch.Tensor:
        """kron_plan()'s layer block of H + weight_decay·I (the solver's dtype, CPU), rows and
        columns in the order of its indices; this rank's rows (maybe none) all-reduced."""
        prob, seq = self.prob, self.sequential
        layer, size = plan[0], int(plan[1].numel())
        total = torch.zeros(size, size, dtype=prob.dtype, device=prob.device)
        for b, x, y in prob.blocks():
            total += seq.kron_block(self._preparation(x, y, 1.0 / prob.n_hessian, b), layer).to(prob.dtype)
        total = prob.all_reduce(total)
        if prob.weight_decay:
            total.diagonal().add_(prob.weight_decay)
        return total.cpu()

    # ------------------------------------------------------------------ spectra (scipy ARPACK)
    def linear_operator(self, on_product=None):
        """scipy LinearOperator of H + weight_decay·I (float64 numpy); on_product() after each product."""
        from scipy.sparse.linalg import LinearOperator
        p, dt = self.prob.p, self.prob.dtype

        def mv(v):
            t = torch.as_tensor(np.asarray(v, dtype=np.float64).reshape(1, -1), dtype=dt, device=self.prob.device)
            self.prob.check_time()
            out = self.matmat(t)[0].double().cpu().numpy()
            if on_product is not None:
                on_product()
            return out

        return LinearOperator((p, p), matvec=mv, dtype=np.float64)

    def v0(self) -> np.ndarray:
        """ARPACK's starting vector from the solver's seeded stream (the same on every rank)."""
        return torch.randn(self.prob.p, generator=self.prob.gen, dtype=torch.float64).numpy()

    def top_eigenvalue(self, tol: float = 1e-2) -> float:
        """λ_max of H + weight_decay·I by Lanczos (ARPACK), to ~1% (it only sets damping and scale)."""
        from scipy.sparse.linalg import eigsh
        if self.prob.p == 1:
            return float(self.matmat(torch.ones(1, 1, dtype=self.prob.dtype, device=self.prob.device))[0, 0])
        ev = eigsh(self.linear_operator(), k=1, which="LA", tol=tol, v0=self.v0(), return_eigenvectors=False)
        return float(ev[0])


def dense_top_eigenvalue(H: torch.Tensor) -> float:
    """λ_max of an explicit symmetric matrix, to ~0.1% (it sets damping)."""
    return _dense_extreme(H, largest=True)


def dense_bottom_eigenvalue(H: torch.Tensor) -> float:
    """λ_min of an explicit symmetric matrix, to ~0.1% (it only words a warning)."""
    return _dense_extreme(H, largest=False)


def _dense_extreme(H: torch.Tensor, largest: bool) -> float:
    """eigvalsh when tiny; else Lanczos (ARPACK) on the matrix: LOBPCG took 174 CPU s for λ_min of
    an 11k x 11k Hessian (500 iterations of Python-level block updates), ARPACK a few matrix-vector
    products' worth. ARPACK's own tolerance is relative to the eigenvalue: 1e-3."""
    if H.shape[0] <= 256:
        ev = torch.linalg.eigvalsh(H)
        return float(ev[-1] if largest else ev[0])
    from scipy.sparse.linalg import ArpackNoConvergence, eigsh
    A = H.detach().double().cpu().numpy()
    v0 = np.random.default_rng(0).standard_normal(A.shape[0])
    try:
        ev = eigsh(A, k=1, which="LA" if largest else "SA", tol=1e-3, v0=v0, maxiter=5000,
                   return_eigenvectors=False)
    except ArpackNoConvergence as exc:                   # what it has so far: enough for a warning
        ev = exc.eigenvalues
        if len(ev) == 0:
            raise
    return float(ev[0])


__all__ = ["HessianOperator", "dense_bottom_eigenvalue", "dense_top_eigenvalue"]
