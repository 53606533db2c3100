"""Training on the source set while recording, per step, what the data value embedding needs:
each batch sample's projected gradient, from the training step's own forward and backward.

The training is plain mini-batch training with the conventions of a counterfactual ground truth
(dvgs_fast/evaluate/counterfactual/recipe.py), so that its trajectory-specific leave-one-out can be
computed for the very same run: the initial weights are the factory's under ``torch.manual_seed(seed)``
(or a copy of the module passed), and each epoch's order is ``torch.randperm(n, generator=g)`` with
``g = torch.Generator().manual_seed(seed)``. One step: one forward of the batch (the routed layers'
calls recorded), one ``autograd.grad`` of the mean loss to the parameters and to the layers'
outputs (which gives every sample's δ / B), the optimizer's gradients set from it, then the step.

Recorded per step, into a gradient store (dvgs_fast.gradstore; rows in step order, columns
``index`` and ``step``, exact integers in the store's float64 columns):

* g_i: sample i's loss gradient at θ_t, projected (grads.Projector: Kronecker / Khatri-Rao on the
  engine's factors for Linear / conv / Embedding layers, dense JL for the rest), [B, k];
* u_i: its share of the step, projected: SGD: (lr / B) g_i; Adam / AdamW: (P_t ⊙ g_i) / B with P_t
  the update map of In-Run Data Shapley (lr / (sqrt(v̂_t) + eps)). P_t is elementwise, which no
  factored projection can carry; for a weight matrix it is replaced by its rank-one
  approximation P ≈ r cᵀ / mean(P) (r, c its row and column means), so that P ⊙ (δ aᵀ) =
  (r ⊙ δ)(c ⊙ a)ᵀ / mean(P) stays factored -- an approximation, on top of Adam's momentum being
  credited at the step the gradient was computed (as In-Run Data Shapley does). Biases and
  explicitly formed gradients take P exactly.
The store holds [g | u] side by side (2k columns; SGD stores g alone, u being a multiple) -- or,
when every layer is a Kronecker-projected Linear layer, each of them as its sides [P_out δ | P_in ã]
per layer (StepSides forms the rows when they are read): k_out + k_in numbers instead of k_out·k_in
(82 instead of 1,014 floats a sample on a 2048-100-100-10 MLP), so a step writes and faults in far
less memory, which there was most of what recording cost beyond the projection's own products.
The layer that reads the model's input as it is (an MLP's first) has an input side P_in ã that
depends on the sample alone: it is projected once per source sample, not at every step (InputSides).
A run without store_dir whose steps fit in memory keeps them there (StepsInMemory: the same rows,
checks and reading interface, without files, checksums and fsync, which only serve a store that
outlives the process).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from dvgs_fast import grads
from dvgs_fast.gradstore import DTYPES, checked_rows
from dvgs_fast._utils import make_optimizer, own_rng
from dvgs_fast.methods import _grad_training as T


@dataclass
class Trajectory:
    steps: int
    rows: int
    train_cpu_s: float
    record_cpu_s: float
    input_sides: str | None = None        # the layer whose input side was kept per sample (InputSides)


class StepsInMemory:
    """The recorded steps in memory: StoreWriter's write() and GradientStore's n / dim / nbytes /
    read() / aux() over arrays."""

    def __init__(self, n: int, dim: int, dtype: str, aux: dict[str, str]):
        self.n, self.dim = n, dim
        self.dtype = np.dtype(DTYPES[dtype])
        self._rows = np.empty((n, dim), dtype=self.dtype)
        self._aux = {name: np.empty(n, dtype=DTYPES[dt]) for name, dt in aux.items()}

    @property
    def nbytes(self) -> int:
        return self._rows.nbytes

    def rows_out(self, a: int, b: int, dtype: torch.dtype) -> torch.Tensor | None:
        """Rows [a, b) as a writable tensor sharing this memory (None unless held in `dtype`): a
        step projected into it is then committed by write(a, b, that tensor, aux), checked, no copy."""
        t = torch.from_numpy(self._rows[a:b])
        return t if t.dtype == dtype else None

    def write(self, a: int, b: int, vectors, aux: dict) -> None:
        rows = checked_rows(vectors, a, b, self.dim, self.dtype)
        if rows.ctypes.data != self._rows[a:b].ctypes.data:               # not already in place (rows_out)
            self._rows[a:b] = rows
        for name, col in aux.items():
            self._aux[name][a:b] = col

    def read(self, a: int, b: int) -> np.ndarray:
        return self._rows[a:b]

    def aux(self, name: str) -> np.ndarray:
        return self._aux[name]


class StepSides:
    """Recorded steps kept as the Kronecker sides of their projected gradients (grads.Projector.
    project_sides: per layer k_out + k_in numbers instead of k_out·k_in -- 1,014 -> 82 floats a
    sample on a 2048-100-100-10 MLP at k = 1,024), read back as rows of projected gradients [g] or
    [g | u]: the reading interface of GradientStore (n, dim, nbytes, read, aux) over them. The
    outer products a training step would write are formed when the recursion reads its block."""

    def __init__(self, store, projector: grads.Projector):
        self.store, self.projector = store, projector
        self.halves = store.dim // projector.side_dim
        self.n, self.dim = store.n, projector.dim * self.halves

    @property
    def nbytes(self) -> int:
        return self.store.nbytes

    def aux(self, name: str) -> np.ndarray:
        return self.store.aux(name)

    def read(self, a: int, b: int) -> np.ndarray:
        raw = torch.from_numpy(np.asarray(self.store.read(a, b)))
        raw = raw.to(torch.float64 if raw.dtype == torch.float64 else torch.float32)
        w, k = self.projector.side_dim, self.projector.dim
        out = torch.empty(raw.shape[0], self.dim, dtype=raw.dtype)
        for h in range(self.halves):
            self.projector.expand_sides(raw[:, h * w:(h + 1) * w], out=out[:, h * k:(h + 1) * k])
        return out.numpy()


def _rank_one(P: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(r, c) with P ≈ r cᵀ for a positive [d_out, d_in] matrix (row means times column means over
    the mean)."""
    r, c = P.mean(1), P.mean(0)
    return r / P.mean().clamp_min(torch.finfo(P.dtype).tiny), c


def preconditioned(f: grads.SampleFactors, P: dict[str, torch.Tensor]) -> grads.SampleFactors:
    """The factors of P ⊙ g_i (see the module docstring: rank-one P for factored weights). A
    layer's bias joins its weight's rank-one approximation as the input's appended 1, made an
    explicit column of the factors (the projection reads the columns as "inputs, then the bias")."""
    rows = []
    for x in f.rows:
        if x.weight is None:                                           # bias only: P_b exactly
            rows.append(grads.RowFactors(x.name, x.module, x.a, x.d * P[x.bias].reshape(1, -1).to(x.d.dtype), x.rows,
                                         None, x.bias))
            continue
        w = P[x.weight].reshape(x.d.shape[1], -1)
        if x.bias is not None:                                         # [P_w | P_b]: the bias is the input's 1
            w = torch.cat([w, P[x.bias].reshape(-1, 1)], 1)
        r, c = _rank_one(w)
        a = x.a * c[:x.a.shape[1]].to(x.a.dtype)
        if x.bias is not None:                                         # the 1 column made explicit, scaled
            a = torch.cat([a, c[-1].to(a.dtype).expand(a.shape[0], 1)], 1)
        rows.append(grads.RowFactors(x.name, x.module, a, x.d * r.to(x.d.dtype), x.rows, x.weight, None))
    toks = []
    for x in f.tokens:
        w = P[x.weight]                                            # [vocab, dim]
        r, c = _rank_one(w)
        toks.append(grads.TokenFactors(x.name, x.module, x.ids, x.d * c.to(x.d.dtype) * r[x.ids].unsqueeze(-1),
                                       x.weight))
    dense = None
    if f.dense is not None:
        scale = torch.cat([P[nm].reshape(-1) for nm in f.dense.names]).to(f.dense.g.dtype)
        dense = grads.DenseGrads(f.dense.names, f.dense.sizes, f.dense.g * scale)
    return grads.SampleFactors(f.n, rows, toks, dense, f.dtype)


# The recurring input sides (InputSides) are kept for every source sample up to this many bytes.
_INPUT_SIDES_BYTES = 256 << 20


class InputSides:
    """The projected input side P_in ã of the Linear layer that reads the model's input as it is
    (an MLP's first layer, after a Flatten or nothing). It depends on the sample alone, not on the
    weights, so it is computed once per source sample (grads.Projector.input_sides) instead of at
    every step of every epoch: on the 2048-wide MLP of bench/bench_dvemb_overhead.py it was half
    of a recording step's projection with Kronecker (k_in = 31 of 2,049 inputs) and nearly all of
    it with Khatri-Rao (k = 971). A step's layer input is its samples' rows of the source exactly
    when it is a view of the step's batch (xs[idx], a fresh copy) in the batch's layout and the
    forward did not change the batch in place (its version counter): then the kept rows are the
    same numbers (up to the GEMM's summation order) and the step projects the layer's output side only.
    Kept while [N, k_in] fits _INPUT_SIDES_BYTES; otherwise every step projects it, as before."""

    def __init__(self, projector: grads.Projector, xs: torch.Tensor):
        self.projector, self.xs = projector, xs
        self.name: str | None = None
        self.rows: torch.Tensor | None = None
        self._out: torch.Tensor | None = None
        self.tried = False

    def given(self, f: grads.SampleFactors, xb: torch.Tensor, version: int, idx: torch.Tensor) -> dict:
        """{layer: its input sides for this step's samples} (empty when no layer reads the batch as
        it is); `version`: the batch's version counter before the forward."""
        if xb._version != version or not xb.is_contiguous():
            return {}
        for x in f.rows:
            a = x.a
            if not (x.rows == 1 and a.dim() == 2 and a.dtype == xb.dtype and a.data_ptr() == xb.data_ptr()
                    and a.numel() == xb.numel() and a.shape[0] == xb.shape[0] and a.is_contiguous()):
                continue
            if not self.tried:
                self.tried = True
                self._compute(x.name, f.dtype)
            if x.name == self.name:        # into one buffer reused by every step: no fresh pages per step
                if self._out is None or self._out.shape[0] < idx.shape[0]:
                    self._out = torch.empty(idx.shape[0], self.rows.shape[1], dtype=self.rows.dtype,
                                            device=self.rows.device)
                return {x.name: torch.index_select(self.rows, 0, idx, out=self._out[:idx.shape[0]])}
        return {}

    def _compute(self, name: str, dtype: torch.dtype) -> None:
        plan = self.projector.projected_input(name)
        if plan is None:
            return
        n, k_in = self.xs.shape[0], plan.k_in
        if n * k_in * torch.tensor([], dtype=dtype).element_size() > _INPUT_SIDES_BYTES:
            return
        flat = self.xs.reshape(n, -1)
        rows = torch.empty(n, k_in, dtype=dtype, device=self.xs.device)
        for a in range(0, n, 4096):
            rows[a:a + 4096] = self.projector.input_sides(name, flat[a:a + 4096], dtype)
        self.name, self.rows = name, rows


def record_training(method, prep: T.Prepared, run, projector: grads.Projector, writer, progress,
                    sides: bool = False) -> Trajectory:
    """Train prep.model on the source (module docstring) and write every step's rows to `writer`
    (a gradstore StoreWriter or StepsInMemory over epochs · N rows): the projected gradients, or
    with `sides` their Kronecker sides (StepSides reads them back as projected gradients)."""
    model, names, xs, ys = prep.model, prep.names, prep.xs, prep.ys
    n, bs = xs.shape[0], method.batch_size
    params = dict(model.named_parameters())
    tparams = [p for p in params.values() if p.requires_grad]
    opt = make_optimizer(method.optimizer, tparams, method.lr, method.weight_decay)
    scorer = grads.FastScorer(model, names, prep.sample_loss, "dot", owner="DataValueEmbedding")
    gen = prep.shuffle
    sgd = method.optimizer == "sgd"
    pos, step = 0, 0
    t_train = t_record = 0.0
    dev = xs.device
    project = projector.project_sides if sides else projector.project
    # SGD's rows are g alone: projected straight into the steps in memory (StepsInMemory.rows_out)
    # when they are held there in the factors' dtype -- no [B, k] copy per step
    rows_out = getattr(writer, "rows_out", None) if sgd and dev.type == "cpu" else None
    inputs = InputSides(projector, xs)
    model.train()                                                      # nothing in the loop leaves it
    for epoch in range(method.epochs):
        for idx in torch.randperm(n, generator=gen).to(dev).split(bs):
            c0 = time.process_time()
            b = idx.shape[0]
            xb, yb = xs[idx], ys[idx]
            version = xb._version
            loss, rec, out_grads = T.recorded_step(scorer, prep.sample_loss, model, xb, yb, tparams)
            lv = float(loss)
            if not math.isfinite(lv):
                raise ValueError(f"lr: training diverged: the source loss is {lv} at epoch {epoch}, step {step}; "
                                 f"lower lr (now {method.lr:g})")
            c1 = time.process_time()
            # ---- the step's per-sample gradients, projected. The recorded δ are the mean loss's
            # (g_i / B): scaled by B here, on [B, d_out] per layer, not on the projected [B, k].
            with own_rng(dev):
                deltas = [None if d is None else d * b for d in out_grads]
                f = grads.Recording(scorer, xb, yb, rec, deltas, [], 1.0).factors()
                g = project(f, out=None if rows_out is None else rows_out(pos, pos + b, f.dtype),   # g_i
                            in_sides=inputs.given(f, xb, version, idx))
                if sgd:
                    rows = g
                else:
                    P = {nm: v / b for nm, v in T.update_map(opt, method.optimizer, params, names, method.lr).items()}
                    u = project(preconditioned(f, P))                  # (P ⊙ g_i) / B
                    rows = torch.cat([g, u], 1)
            writer.write(pos, pos + b, rows.detach().to(torch.float64 if rows.dtype == torch.float64 else torch.float32),
                         {"index": idx.cpu().numpy().astype(np.float64), "step": np.full(b, step, dtype=np.float64)})
            del rec, out_grads, deltas, f
            c2 = time.process_time()
            opt.step()
            t_train += (c1 - c0) + (time.process_time() - c2)
            t_record += c2 - c1
            pos += b
            step += 1
            if run.budget.exhausted():
                raise ValueError(f"max_time: the budget ran out during the training (epoch {epoch}, step {step}); "
                                 f"the embedding needs the whole run (raise max_time)")
        progress.update(1)
    return Trajectory(step, pos, t_train, t_record, inputs.name)


__all__ = ["InputSides", "StepSides", "StepsInMemory", "Trajectory", "preconditioned", "record_training"]
