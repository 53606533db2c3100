"""Fast DVGS scorer: exact per-sample gradient statistics by the cheapest route per layer.

The similarity of g_i with the target G only needs dot_i = <g_i, G> and sq_i = |g_i|^2, and both
are sums over parameter groups. So each layer contributes its own (dot, sq) and the per-sample
gradient vector is never assembled:

* nn.Linear: `ops.linear_ghost_stats` from the layer's input a_i and output gradient d_i
  (the weight gradient d_i a_i^T is never formed);
* any other leaf module owning selected parameters (norm affine, conv, embedding, ...): that
  module's own per-sample gradients via torch.func (vmap over samples of the vjp of the module
  alone, with the recorded output gradient as cotangent), reduced by `ops.per_sample_grad_stats`;
* everything else (parameters on non-leaf modules, parameters shared between modules, modules
  whose call could not be recorded): the reference route (vmap(grad) of the whole model) for
  those parameters only.

Inputs and output gradients of all routed layers come from ONE batched forward and ONE
backward of sum_i loss_i: with samples independent, d(sum_j loss_j)/d out_i is sample i's own δ.

Assumptions (shared with every ghost/per-layer per-sample-gradient method): dim 0 of every
routed layer's input/output is the sample dimension, and samples do not interact in the forward
(BatchNorm is put in eval mode while scoring for that reason, see method.py). With dropout, the
batched forward draws an independent mask per sample; the reference route for left-over
parameters runs its own forward and so draws its own masks.
"""
from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn
from torch.func import functional_call, vjp, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from dvgs_fast import ops
from dvgs_fast.methods.dvgs._hooks import ForwardRecorder
from dvgs_fast.methods.dvgs.reference import SampleLoss, per_sample_grads


def _is_plain_linear(m: nn.Module) -> bool:
    # Subclasses that change forward (LoRA, quantised, ...) are not y = x W^T + b any more.
    return isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward


class FastScorer:
    """score(x, y, target) -> similarity [N]; same contract as ReferenceScorer."""

    name = "fast"

    def __init__(self, model: nn.Module, names: list[str], sample_loss: SampleLoss, similarity: str,
                 eps: float = 1e-8):
        self.model, self.names, self.sample_loss = model, list(names), sample_loss
        self.similarity, self.eps = similarity, eps

        params = dict(model.named_parameters())
        name_of = {id(p): n for n, p in params.items()}
        wanted = {id(params[n]) for n in self.names}
        n_owners: dict[int, int] = defaultdict(int)
        for m in model.modules():
            for p in m.parameters(recurse=False):
                n_owners[id(p)] += 1

        self.linear: list[tuple[nn.Module, str | None, str | None]] = []
        self.generic: list[tuple[nn.Module, list[tuple[str, str]]]] = []
        self.fallback: list[str] = []
        for m in model.modules():
            own = [(local, p) for local, p in m.named_parameters(recurse=False) if id(p) in wanted]
            if not own:
                continue
            full = [(local, name_of[id(p)]) for local, p in own]
            if any(n_owners[id(p)] > 1 for _, p in own):
                self.fallback += [n for _, n in full]      # tied weights: contributions add up
            elif _is_plain_linear(m):
                d = dict(full)
                self.linear.append((m, d.get("weight"), d.get("bias")))
            elif next(m.children(), None) is None:
                self.generic.append((m, full))
            else:
                self.fallback += [n for _, n in full]      # its forward runs children: not per-layer
        self.fallback = list(dict.fromkeys(self.fallback))   # a tied weight is listed once
        self._routed = [m for m, _, _ in self.linear] + [m for m, _ in self.generic]

    # ------------------------------------------------------------------------------------------
    def target(self, G: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        tsq = sum(G[n].double().square().sum() for n in self.names)
        return G, tsq

    def score(self, x: torch.Tensor, y: torch.Tensor, target) -> torch.Tensor:
        dot, sq = self.stats(x, y, target[0])
        return ops.similarity(dot, sq, target[1], self.similarity, self.eps)

    def stats(self, x: torch.Tensor, y: torch.Tensor, G: dict[str, torch.Tensor]):
        n = x.shape[0]
        with ForwardRecorder(self._routed) as rec:
            out = self.model(x)
        loss = self.sample_loss(out, y).sum()

        usable = [m for m in self._routed if m not in rec.unsupported and rec.calls[m]]
        outputs = [c.output for m in usable for c in rec.calls[m]]
        deltas = torch.autograd.grad(loss, outputs, allow_unused=True) if outputs else ()
        it = iter(deltas)
        delta_of = {m: [next(it) for _ in rec.calls[m]] for m in usable}

        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        dot = torch.zeros(n, dtype=acc, device=x.device)
        sq = torch.zeros(n, dtype=acc, device=x.device)
        leftover = list(self.fallback)      # + routed modules whose calls could not be used

        for m, w_name, b_name in self.linear:
            res = self._linear_stats(m, rec.calls[m] if m in delta_of else None, delta_of.get(m), n,
                                     G.get(w_name) if w_name else None, G.get(b_name) if b_name else None)
            if res is None:
                leftover += [nm for nm in (w_name, b_name) if nm]
            elif res is not False:
                dot += res[0]
                sq += res[1]
        for m, full in self.generic:
            res = self._module_stats(m, full, rec.calls[m] if m in delta_of else None, delta_of.get(m), n, G)
            if res is None:
                leftover += [nm for _, nm in full]
            elif res is not False:
                dot += res[0]
                sq += res[1]
        del rec, outputs, deltas, delta_of, out, loss
        leftover = list(dict.fromkeys(leftover))
        if leftover:
            g = per_sample_grads(self.model, leftover, x, y, self.sample_loss)
            d_, s_ = ops.per_sample_grad_stats([g[nm] for nm in leftover], [G[nm] for nm in leftover])
            dot += d_
            sq += s_
        return dot, sq

    # ------------------------------------------------------------------------------------------
    @staticmethod
    def _linear_stats(m, calls, deltas, n, G_w, G_b):
        """(dot, sq) of one Linear; False if it contributes nothing; None -> use the fallback."""
        if not calls:
            return None                                   # not called (weight used some other way?)
        ins, ds = [], []
        for c, d in zip(calls, deltas):
            a = c.args[0] if c.args else c.kwargs.get("input")
            if not isinstance(a, torch.Tensor) or a.dim() < 2 or a.shape[0] != n or c.output.shape[0] != n:
                return None                               # no leading sample dim: can't split by sample
            if d is None:
                continue                                  # output did not reach the loss
            ins.append(a.detach())
            ds.append(d)
        if not ins:
            return False
        if len(ins) == 1 and ins[0].dim() == 2:
            a, d = ins[0], ds[0]
        else:
            # Several calls (shared layer) or token dims: sample i's gradient sums over all rows,
            # which is exactly the sequence form [N, T, d] with the calls concatenated along T.
            a = torch.cat([t.reshape(n, -1, t.shape[-1]) for t in ins], dim=1)
            d = torch.cat([t.reshape(n, -1, t.shape[-1]) for t in ds], dim=1)
        if G_w is not None:
            return ops.linear_ghost_stats(a, d, G_w, G_b)
        s = d if d.dim() == 2 else d.sum(1)             # bias only: its gradient is sum_t d_t
        return ops.per_sample_grad_stats([s], [G_b])

    @staticmethod
    def _module_stats(m, full, calls, deltas, n, G):
        """(dot, sq) of a leaf module's own selected parameters from its per-sample gradients."""
        if not calls:
            return None
        own = dict(m.named_parameters(recurse=False))
        p = {local: own[local].detach() for local, _ in full}
        total = None
        for c, d in zip(calls, deltas):
            if c.output.shape[0] != n:
                return None
            if d is None:
                continue
            flat, spec = tree_flatten((c.args, c.kwargs))
            batched = [i for i, v in enumerate(flat)
                       if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n]
            if not batched:
                return None
            consts = [v.detach() if isinstance(v, torch.Tensor) else v for v in flat]

            def one(p_, xs, d_i, consts=consts, spec=spec, batched=batched):
                vals = list(consts)
                for i, v in zip(batched, xs):
                    vals[i] = v.unsqueeze(0)
                args, kwargs = tree_unflatten(vals, spec)
                _, pull = vjp(lambda q: functional_call(m, q, args, kwargs), p_)
                return pull(d_i.unsqueeze(0))[0]

            g = vmap(one, in_dims=(None, 0, 0))(p, [consts[i] for i in batched], d)
            total = g if total is None else {k: total[k] + g[k] for k in g}
        if total is None:
            return False
        return ops.per_sample_grad_stats([total[local] for local, _ in full], [G[nm] for _, nm in full])

    def describe(self) -> dict:
        name_of = {id(m): n for n, m in self.model.named_modules()}
        return {"backend": "fast",
                "linear_ghost": [name_of[id(m)] for m, _, _ in self.linear],
                "per_layer_func": [name_of[id(m)] for m, _ in self.generic],
                "reference_route_params": list(self.fallback)}
