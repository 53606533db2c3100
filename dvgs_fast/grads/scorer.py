"""Fast DVGS scorer: exact per-sample gradient statistics by the cheapest route per layer.

The similarity of g_i with the target G only needs dot_i = <g_i, G> and sq_i = |g_i|^2, and both
are sums over parameter groups. So each layer contributes its own (dot, sq) and the per-sample
gradient vector is never assembled:

* nn.Linear: `ops.linear_ghost_stats` from the layer's input a_i and output gradient d_i
  (the weight gradient d_i a_i^T is never formed);
* Conv1d/Conv2d, Embedding, LayerNorm/RMSNorm/GroupNorm/InstanceNorm and eval-mode BatchNorm
  affines: the ghost routes of ghost_layers.py (unfolded convolution in linear_ghost_stats'
  sequence form, gathered embedding rows, per-channel reductions of δ·x̂ and δ);
* any other leaf module owning selected parameters: that module's own per-sample gradients via
  torch.func (vmap over samples of the vjp of the module alone, with the recorded output
  gradient as cotangent), reduced by `ops.per_sample_grad_stats` ("per_layer_func");
* everything else (parameters on non-leaf modules, parameters shared between modules, recurrent
  layers, modules whose call could not be recorded): the reference route (vmap(grad) of the
  whole model) for those parameters only.

`describe()` (stored in result.info) names the route of every layer; when some layer takes one
of the two slower torch.func routes, a `SlowRouteWarning` names them once per scorer.

Inputs and output gradients of all routed layers come from ONE batched forward and ONE
backward of sum_i loss_i: with samples independent, d(sum_j loss_j)/d out_i is sample i's own δ.

Assumptions (shared with every ghost/per-layer per-sample-gradient method): dim 0 of every
routed layer's input/output is the sample dimension, and samples do not interact in the forward
(BatchNorm is put in eval mode while scoring for that reason, see method.py). With dropout, the
batched forward draws an independent mask per sample; the reference route for left-over
parameters runs its own forward and so draws its own masks.
"""
from __future__ import annotations

import warnings
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import vjp, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from dvgs_fast import ops
from dvgs_fast._utils import functional_call
from dvgs_fast.grads.ghost_layers import MATERIALISE, describe_conv, ghost_dot, ghost_kind, ghost_module_stats
from dvgs_fast.grads.losses import SampleLoss
from dvgs_fast.grads.record import ForwardRecorder, fresh_output_modules
from dvgs_fast.grads.reference import per_sample_grads


class SlowRouteWarning(UserWarning):
    """Some layers have no ghost route: their per-sample gradients are formed by torch.func."""


def _is_plain_linear(m: nn.Module) -> bool:
    # Subclasses that change forward (LoRA, quantised, ...) are not y = x W^T + b any more.
    return isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward


@dataclass(frozen=True)
class LayerRoute:
    """How one layer's selected parameters are scored.

    module: the layer; name: its path in the model ("" for the model itself); route: "linear"
    (Linear ghost), a ghost_layers kind ("conv1d", "conv2d", "embedding", "norm"),
    "per_layer_func" (that layer's own per-sample gradients, torch.func) or "reference" (whole-model
    per-sample gradients); weight / bias: the full parameter names the route scores (None: not
    selected); params: every selected parameter of the layer; reason: why this route."""

    module: nn.Module
    name: str
    route: str
    weight: str | None
    bias: str | None
    params: tuple[str, ...]
    reason: str


class FastScorer:
    """score(x, y, target) -> similarity [N]; same contract as ReferenceScorer.

    ``stats(x, y, G)`` gives the raw per-sample (dot, sqnorm); ``record(x, y)`` runs the one
    forward/backward and returns a :class:`Recording` to take statistics from (several targets,
    per layer). Methods that run their own forward/backward (In-Run Data Shapley) use
    ``recorder()``, ``grad_outputs(rec)`` and ``stats_from_record(...)`` to get the same
    statistics from their training step; ``layer_routes()`` says which route each layer takes."""

    name = "fast"

    def __init__(self, model: nn.Module, names: list[str], sample_loss: SampleLoss, similarity: str,
                 eps: float = 1e-8, owner: str = "DVGS"):
        self.model, self.names, self.sample_loss = model, list(names), sample_loss
        self.similarity, self.eps, self.owner = similarity, eps, owner

        params = dict(model.named_parameters())
        name_of = {id(p): n for n, p in params.items()}
        wanted = {id(params[n]) for n in self.names}
        n_owners: dict[int, int] = defaultdict(int)
        for m in model.modules():
            for p in m.parameters(recurse=False):
                n_owners[id(p)] += 1

        self.linear: list[tuple[nn.Module, str | None, str | None]] = []
        self.ghost: list[tuple[nn.Module, str, str | None, str | None]] = []
        self.generic: list[tuple[nn.Module, list[tuple[str, str]]]] = []
        self.fallback: list[str] = []
        self._reason: dict[int, str] = {}            # id(module) -> why it takes its route
        for m in model.modules():
            own = [(local, p) for local, p in m.named_parameters(recurse=False) if id(p) in wanted]
            if not own:
                continue
            full = [(local, name_of[id(p)]) for local, p in own]
            d = dict(full)
            kind = ghost_kind(m)
            if any(n_owners[id(p)] > 1 for _, p in own):
                self.fallback += [n for _, n in full]      # tied weights: contributions add up
                self._reason[id(m)] = "a parameter shared with another module (tied weights)"
            elif _is_plain_linear(m):
                self.linear.append((m, d.get("weight"), d.get("bias")))
                self._reason[id(m)] = "nn.Linear: per-sample statistics from its input and output gradient"
            elif kind is not None and set(d) <= {"weight", "bias"}:
                self.ghost.append((m, kind, d.get("weight"), d.get("bias")))
                self._reason[id(m)] = f"{type(m).__name__}: the {kind} ghost route"
            elif isinstance(m, nn.RNNBase):
                # Fused recurrent kernels: the per-layer vjp would need per-leaf batch dims
                # (h_n is [layers, N, H]); the whole-model route handles them (reference.py).
                self.fallback += [n for _, n in full]
                self._reason[id(m)] = "recurrent layer (fused kernel): whole-model per-sample gradients"
            elif next(m.children(), None) is None:
                self.generic.append((m, full))
                self._reason[id(m)] = f"no ghost route for {type(m).__name__}: its own per-sample gradients"
            else:
                self.fallback += [n for _, n in full]      # its forward runs children: not per-layer
                self._reason[id(m)] = "a module with children owns parameters: whole-model per-sample gradients"
        self.fallback = list(dict.fromkeys(self.fallback))   # a tied weight is listed once
        self._routed = ([m for m, _, _ in self.linear] + [m for m, *_ in self.ghost]
                        + [m for m, _ in self.generic])
        self._module_name = {id(m): n for n, m in model.named_modules()}
        self._uncopied = fresh_output_modules(model, self._routed)
        self._param_owner = {name_of[id(p)]: self._module_name[id(m)]
                             for m in model.modules() for p in m.parameters(recurse=False) if id(p) in name_of}
        self._param_name = name_of
        self._params = list(params.values())
        self._routes: list[LayerRoute] | None = None
        self._ghost_form: dict[str, str] = {}
        self._runtime_fallback: list[str] = []       # routed layers whose calls could not be split
        self._warned = False

    # ------------------------------------------------------------------------------------------
    def target(self, G: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        tsq = sum(G[n].double().square().sum() for n in self.names)
        return G, tsq

    def score(self, x: torch.Tensor, y: torch.Tensor, target) -> torch.Tensor:
        dot, sq = self.stats(x, y, target[0], need_sq=self.similarity != "dot")
        return ops.similarity(dot, sq, target[1], self.similarity, self.eps)

    def recorder(self) -> ForwardRecorder:
        """Context manager recording the routed layers' calls during one batched forward."""
        return ForwardRecorder(self._routed, self._uncopied)

    def grad_outputs(self, rec: ForwardRecorder) -> list[torch.Tensor]:
        """The recorded outputs whose gradients (the layers' δ) the routes need, in order."""
        return [c.output for m in self._usable(rec) for c in rec.calls[m]]

    def deltas_by_module(self, rec: ForwardRecorder, deltas) -> dict[nn.Module, list]:
        """{module: [δ of each of its calls]} from the gradients at `grad_outputs(rec)` (in that order)."""
        it = iter(deltas)
        return {m: [next(it) for _ in rec.calls[m]] for m in self._usable(rec)}

    def _usable(self, rec: ForwardRecorder) -> list[nn.Module]:
        return [m for m in self._routed if m not in rec.unsupported and rec.calls[m]]

    def module_name(self, m: nn.Module) -> str:
        """The path of module m in the model ("" for the model itself)."""
        return self._module_name[id(m)]

    def layer_routes(self) -> list[LayerRoute]:
        """Every layer owning selected parameters, with its route and why: Linear layers, then the
        ghost-routed, per-layer and reference ones, each in model order (the order the statistics
        are summed in). A call can still refuse its route at run time: ``describe()`` reports that.
        Fixed at construction, so listed once (a training step asks at every step)."""
        if self._routes is None:
            self._routes = self._list_routes()
        return list(self._routes)

    def has_float64_parameters(self) -> bool:
        """Whether any of the model's parameters is float64 now (the factors then accumulate in
        float64); over the parameters listed at construction, not a walk of the modules."""
        return any(p.dtype == torch.float64 for p in self._params)

    def _list_routes(self) -> list[LayerRoute]:
        out = []
        for m, w, b in self.linear:
            out.append(LayerRoute(m, self.module_name(m), "linear", w, b, tuple(n for n in (w, b) if n),
                                  self._reason[id(m)]))
        for m, kind, w, b in self.ghost:
            out.append(LayerRoute(m, self.module_name(m), kind, w, b, tuple(n for n in (w, b) if n),
                                  self._reason[id(m)]))
        for m, full in self.generic:
            d = dict(full)
            out.append(LayerRoute(m, self.module_name(m), "per_layer_func", d.get("weight"), d.get("bias"),
                                  tuple(n for _, n in full), self._reason[id(m)]))
        fb = set(self.fallback)
        for m in self.model.modules():
            own = tuple(n for n in (self._param_name.get(id(p)) for p in m.parameters(recurse=False)) if n in fb)
            if own:
                out.append(LayerRoute(m, self.module_name(m), "reference", None, None, own, self._reason[id(m)]))
        return out

    def record(self, x: torch.Tensor, y: torch.Tensor) -> "Recording":
        """One batched forward of x and one backward of Σ_i loss_i to the routed layers' outputs."""
        coupled = self.coupling_layers()
        if coupled:
            return Recording(self, x, y, None, (), coupled)
        with self.recorder() as rec:
            out = self.model(x)
        loss = self.sample_loss(out, y).sum()
        outputs = self.grad_outputs(rec)
        deltas = torch.autograd.grad(loss, outputs, allow_unused=True) if outputs else ()
        del out, loss, outputs
        return Recording(self, x, y, rec, deltas, [])

    def coupling_layers(self) -> list[str]:
        """BatchNorm layers that would normalise with batch statistics right now: they couple the
        samples of a batched forward, so no layer's δ or input is per-sample any more."""
        return [f"{n} ({type(m).__name__})" for n, m in self.model.named_modules()
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or m.running_mean is None)]

    def stats(self, x: torch.Tensor, y: torch.Tensor, G: dict[str, torch.Tensor], need_sq: bool = True):
        """Per-sample (dot, sqnorm) against G; need_sq=False skips the norms (sq is then 0)."""
        return self.record(x, y).stats(G, need_sq, release=True)

    def _coupled_stats(self, coupled: list[str], x, y, G):
        # Every parameter takes the reference route (each sample normalised on its own).
        if self._warned is not True:
            self._warned = True
            self._runtime_fallback.extend(self.names)
            warnings.warn(f"{self.owner} fast backend: {', '.join(coupled)} normalise with batch statistics, "
                          f"which couples the samples of a batch; every parameter takes the per-sample "
                          f"torch.func route (slower). Use eval-mode BatchNorm with running statistics, "
                          f"or GroupNorm/LayerNorm.", SlowRouteWarning, stacklevel=5)
        g = per_sample_grads(self.model, self.names, x, y, self.sample_loss)
        return ops.per_sample_grad_stats([g[nm] for nm in self.names], [G[nm] for nm in self.names])

    def stats_from_record(self, rec: ForwardRecorder, deltas, n: int, G: dict[str, torch.Tensor],
                          dtype: torch.dtype, device, need_sq: bool = True, skip=(),
                          per_layer: dict | None = None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """(dot, sq, leftover): the routed layers' statistics from a recorded forward and the
        gradients at `grad_outputs(rec)` (in that order); `leftover` lists the parameters that
        must still take the whole-model reference route. need_sq=False: dots only (sq partial).
        skip: modules the caller accounts for itself (In-Run Shapley's pairwise dots).
        per_layer: if given, filled with {layer name: (dot, sq)} of each layer that contributed."""
        delta_of = self.deltas_by_module(rec, deltas)
        # float64 when the model is (token-id inputs are integers: look at G as well)
        wide = dtype == torch.float64 or any(G[nm].dtype == torch.float64 for nm in self.names if nm in G)
        acc = torch.float64 if wide else torch.float32
        dot = torch.zeros(n, dtype=acc, device=device)
        sq = torch.zeros(n, dtype=acc, device=device)
        leftover = list(self.fallback)      # + routed modules whose calls could not be used

        def add(res, names, m):
            if res is None:
                leftover.extend(nm for nm in names if nm)
                self._runtime_fallback.extend(nm for nm in names if nm)
            elif res is not False:
                dot.add_(res[0])
                sq.add_(res[1])
                if per_layer is not None:
                    per_layer[self._module_name[id(m)]] = res

        for m, w_name, b_name in self.linear:
            if m in skip:
                continue
            calls = rec.calls[m] if m in delta_of else None
            add(self._linear_stats(m, calls, delta_of.get(m), n, G.get(w_name) if w_name else None,
                                   G.get(b_name) if b_name else None, need_sq), (w_name, b_name), m)
        for m, kind, w_name, b_name in self.ghost:
            if m in skip:
                continue
            if m not in delta_of:
                add(None, (w_name, b_name), m)
                continue
            res = ghost_module_stats(kind, m, rec.calls[m], delta_of[m], n,
                                     G.get(w_name) if w_name else None, G.get(b_name) if b_name else None, need_sq)
            if kind.startswith("conv") and w_name:
                self._ghost_form[self._module_name[id(m)]] = describe_conv(m, rec.calls[m])
            if res is MATERIALISE:            # the norm from materialised per-sample gradients
                full = [(local, nm) for local, nm in (("weight", w_name), ("bias", b_name)) if nm]
                res = self._module_stats(m, full, rec.calls[m], delta_of[m], n, G)
            add(res, (w_name, b_name), m)
        for m, full in self.generic:
            add(self._module_stats(m, full, rec.calls[m] if m in delta_of else None, delta_of.get(m), n, G),
                [nm for _, nm in full], m)
        leftover = list(dict.fromkeys(leftover))
        self._warn_slow(leftover)
        return dot, sq, leftover

    def _warn_slow(self, leftover: list[str]) -> None:
        # Once per layer, not once per scorer: a layer that falls back at a later step (e.g. a
        # batch call that stops being splittable) is named when it happens.
        if self._warned is True:          # the whole model already took the reference route, said so
            return
        seen = self._warned or set()
        layers = [ly for ly in self.slow_layers(leftover) if ly not in seen]
        self._warned = seen | set(layers)
        if layers:
            warnings.warn(f"{self.owner} fast backend: no ghost route for {', '.join(layers)}; their per-sample "
                          f"gradients are formed with torch.func (slower; result.info['slow_route_layers'])",
                          SlowRouteWarning, stacklevel=4)

    def slow_layers(self, leftover: list[str] | None = None) -> list[str]:
        """'name (Type)' of every layer whose parameters take a torch.func route."""
        mods = dict(self.model.named_modules())
        names = [self._module_name[id(m)] for m, _ in self.generic]
        names += [self._param_owner.get(p, p) for p in (leftover if leftover is not None else self.fallback)]
        names = list(dict.fromkeys(names))
        return [f"{n or '<model>'} ({type(mods[n]).__name__})" if n in mods else n for n in names]

    # ------------------------------------------------------------------------------------------
    @staticmethod
    def _linear_stats(m, calls, deltas, n, G_w, G_b, need_sq=True):
        """(dot, sq) of one Linear; False if it contributes nothing; None -> use the fallback."""
        if not calls:
            return None                                   # not called (weight used some other way?)
        ins, ds = [], []
        for c, d in zip(calls, deltas):
            a = c.input
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
        if not need_sq:
            dot = ghost_dot(a, d, G_w, G_b)
            return dot, torch.zeros_like(dot)
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
        """Which route each layer took (for result.info)."""
        name_of = self._module_name
        ref = list(dict.fromkeys(self.fallback + self._runtime_fallback))
        routes = {}
        for m, _, _ in self.linear:
            routes[name_of[id(m)]] = "linear_ghost"
        for m, kind, _, _ in self.ghost:
            nm = name_of[id(m)]
            routes[nm] = f"{kind}_ghost" + (f" ({self._ghost_form[nm]})" if nm in self._ghost_form else "")
        for m, _ in self.generic:
            routes[name_of[id(m)]] = "per_layer_func"
        for p in ref:
            routes[self._param_owner.get(p, p)] = "reference"
        reasons = {r.name: r.reason for r in self.layer_routes()}
        for p in self._runtime_fallback:
            reasons[self._param_owner.get(p, p)] = "its calls could not be split by sample at run time"
        return {"backend": "fast",
                "route_reasons": reasons,
                "linear_ghost": [name_of[id(m)] for m, _, _ in self.linear],
                "ghost_layers": [name_of[id(m)] for m, *_ in self.ghost],
                "per_layer_func": [name_of[id(m)] for m, _ in self.generic],
                "reference_route_params": ref,
                "routes": routes,
                "slow_route_layers": self.slow_layers(ref)}


class Recording:
    """One batched forward/backward of a FastScorer over x (n samples): every routed layer's
    calls (inputs) and the gradients δ at their outputs. Statistics against any number of target
    gradients can be taken from it without another forward/backward.

    ``stats(G)``: per-sample (dot, sqnorm) of the selected parameters' gradients with G (a dict
    parameter name -> tensor), every route included; ``per_layer`` collects each layer's own
    contribution. ``calls(m)`` / ``deltas(m)``: what was recorded for routed module m (its
    inputs are ``call.input``). Parameters with no usable recorded call take the whole-model
    reference route (per-sample gradients by torch.func) inside ``stats``. A caller that ran its
    own forward/backward (a training step) builds one with ``Recording(scorer, x, y, rec, deltas,
    [], grad_scale)``."""

    def __init__(self, scorer: FastScorer, x: torch.Tensor, y: torch.Tensor, rec: ForwardRecorder | None,
                 deltas, coupled: list[str], grad_scale: float = 1.0):
        self.scorer, self.x, self.y, self.n = scorer, x, y, int(x.shape[0])
        self.rec, self.coupled = rec, coupled
        self._deltas = deltas
        # The recorded δ are those of grad_scale · Σ_i ℓ_i (a training step's mean loss: 1/B);
        # factors() scales the explicit per-sample gradients it forms alike.
        self.grad_scale = float(grad_scale)

    def calls(self, m: nn.Module) -> list:
        return [] if self.rec is None else list(self.rec.calls[m])

    def deltas(self, m: nn.Module) -> list:
        if self.rec is None:
            return []
        return self.scorer.deltas_by_module(self.rec, self._deltas).get(m, [])

    def factors(self):
        """This batch's per-sample gradients in factored form (factors.SampleFactors), detached:
        the input of gram.cross_gram / sqnorms / batch_dots, projections and curvature factors."""
        from dvgs_fast.grads.factors import factors_of
        return factors_of(self)

    def stats(self, G: dict[str, torch.Tensor], need_sq: bool = True, release: bool = False,
              per_layer: dict | None = None):
        """(dot, sq) per sample against G. release=True frees the recording before the reference
        route runs (the recording cannot be used again): what FastScorer.stats does."""
        sc = self.scorer
        if self.coupled:
            return sc._coupled_stats(self.coupled, self.x, self.y, G)
        dot, sq, leftover = sc.stats_from_record(self.rec, self._deltas, self.n, G, self.x.dtype, self.x.device,
                                                 need_sq, per_layer=per_layer)
        if release:
            self.rec = self._deltas = None
        if leftover:
            g = per_sample_grads(sc.model, leftover, self.x, self.y, sc.sample_loss)
            d_, s_ = ops.per_sample_grad_stats([g[nm] for nm in leftover], [G[nm] for nm in leftover])
            dot += d_
            sq += s_
            if per_layer is not None:
                per_layer["<reference>"] = (d_, s_)
        return dot, sq
