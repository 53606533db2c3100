"""In-Run Data Shapley (Wang, Mittal, Song, Jia 2024, "Data Shapley in One Training Run").

The model is trained on the source set as usual (shuffled mini-batches, SGD or Adam, starting
from the weights passed). Every step t is a small cooperative game: the batch B_t's samples are
the players and the utility is the decrease of the target loss L_T that the step causes. With a
Taylor expansion of L_T around θ_t the step's Shapley values have a closed form, and a sample's
value is the sum of its Shapley values over the steps it took part in.

With the mean batch loss, this step's batch moves θ by Δθ = -P ∇L_B = -(1/B) Σ_j P g_j,
g_j = ∇ℓ(z_j; θ_t) and P the optimizer's update map (sgd: the learning rate η; Adam: see below).
Sample i's share of the step is then

    order=1:  φ_i = (1/B) ⟨g_i, P G⟩                            G = ∇L_T(θ_t)
    order=2:  φ_i = (1/B) ⟨g_i, P (G - ½ H u)⟩                  H = ∇²L_T(θ_t), u = P ∇L_B

The first-order term is the paper's η⟨∇ℓ(z_i), ∇L_T⟩ (η/B per sample for a mean loss); the
second adds the paper's interaction term -½ (P g_i)ᵀ H Σ_j (P g_j)/B, i.e. sample i's Shapley share
of the quadratic (pairwise) part of the batch's effect: each pair (i, j) splits g_iᵀ H g_j evenly.
It is not formed pair by pair: Σ_j H P g_j = B · H u is ONE Hessian-vector product of the target
loss per step, so both orders cost one ghost dot product per sample against one vector
v = P(G - ½ H u) (or P G). Under Adam P = η / (sqrt(v̂_t) + ε) elementwise: the sample is
credited with its preconditioned update direction, scaled by the denominator Adam uses at this
step (v̂_t includes this step's gradient). Adam's momentum spreads a gradient over this and later
steps with weights (1-β1)β1^k summing to one; the whole of it is credited once, at the step the
gradient was computed (exact on the first step, an approximation afterwards, as in the paper's
treatment of adaptive optimizers). Weight decay is credited to no sample.

The per-sample ⟨g_i, v⟩ come from the training step itself (backend="fast"): one forward of the
batch records each layer's input and output gradient, one backward gives both the parameter
gradients for the optimizer and the layers' δ, and the ghost routes of the DVGS fast scorer turn
them into ⟨g_i, v⟩ without per-sample gradients. The target gradient G is one forward/backward of
the target set (or a random target mini-batch of ``target_batch_size``) per step, in eval mode
(no dropout: G is the gradient of the target loss the model is evaluated on). backend="reference"
forms every g_i explicitly with torch.func (slow; the correctness baseline).

Pairwise ghost dot-product (SGD, order 1; the paper's own trick). With P = η a scalar, v = η G and
G = Σ_r δ'_r a'_rᵀ per Linear layer (r over the target rows; δ' the gradient of the mean target
loss at the layer's output), so sample i's dot is Σ_t Σ_r (a_it · a'_r)(δ_it · δ'_r) (+ the bias
term, from the same products) and G is never formed: the target backward is taken w.r.t. the
layers' OUTPUTS (no weight-gradient GEMMs; a first layer on the data needs no backward at all),
and the dots cost B·L·T·L'·(d_in + d_out) per layer instead of (T·L' + B·L)·d_in·d_out. Each
Linear / ungrouped Conv1d/Conv2d layer (conv: unfolded patches, L = output positions) takes the
cheaper of the two by that count at every step (``dot_route="auto"``; "pairwise"/"materialised"
force one); Embedding, norm layers and left-over parameters keep the materialised route. With
Adam P is elementwise (⟨g_i, P G⟩ does not factor) and at order 2 v contains H u, so both keep
the materialised route. result.info["dot_routes"] says which route each layer took.

Fused target pass (SGD, order 1, auto/pairwise routes). When the model is an nn.Sequential of
plain Linear layers and parameter-free modules that act row by row and alike in train and eval
mode (elementwise activations, Flatten, LayerNorm without parameters, Dropout with p = 0: no
dropout, no BatchNorm, no custom forward), the target rows ride along in the training step: ONE
forward over [x_B; x_T] records each Linear's input and output, ONE autograd.grad of L_B + L_T
w.r.t. the outputs gives every layer's δ (rows do not interact, so the batch rows' δ are those of
L_B and the target rows' those of L_T; no weight-gradient GEMM, no backward into the first
layer's input), and the optimizer's gradients are formed from the batch rows as autograd would:
W.grad = δ_Bᵀ a_B, b.grad = Σ δ_B. Batch and target rows are gathered into reused buffers (the
whole target set is copied in once). Other models (and Adam, order 2, dot_route="materialised")
keep the separate eval-mode target pass; result.info["target_pass"] says which ("fused" /
"separate", with info["target_pass_reason"]).

Cost (bench/bench_ghost_methods.py --inrun-only, CPU, 1 thread, CPU time vs plain training on
the same batches, interleaved; bench/RESULTS.md). SGD order 1 on the exp3 head (2048-100-100-10)
with a target mini-batch of B/16: 1.21x at B=128 (the separate pass: 1.58x) and 1.17x at B=512
(separate: 1.33x), within the paper's "negligible overhead" of <= 1.3x (also against plain
training that reuses a batch buffer: 1.25x / 1.28x). What remains is mostly arithmetic in the
2048-wide first layer: the target rows' forward (T·2048·100 multiply-adds) and the pairwise
products a_B·a_Tᵀ (B·T·2048), against the step's 2·B·2048·100: T/(2B) + T/200 of a step. So a target batch of
B/4 costs 1.31x at B=128 and 1.53x at B=512 (T=128: the materialised dot is cheaper there, and it
is a GEMM of the layer's size), and the whole target set per step costs what its rows cost (4.4x
with 4x the batch's rows, 2.05x with 1x). Models outside the fused class keep the separate pass:
the small CNN (GroupNorm; its convolutions keep the materialised dot: one extra convolution of
the batch) ~1.7-1.8x, the text model (Embedding/LayerNorm routes without a pairwise form) ~3x;
Adam and order 2 (materialised routes, separate pass) 1.6-2.8x.

The training itself is exactly plain training: the target pass draws no random numbers, the
per-sample gradients are read off the same forward (dropout masks included), and the target
mini-batches come from their own generator. So the values belong to the model you would get (on
the fused pass to rounding: δ_Bᵀ a_B is autograd's weight gradient, summed in its own order).

BatchNorm layers are refused: in training mode their batch statistics couple the samples of a
step, so a sample's own gradient is not defined (use GroupNorm/LayerNorm, or DVGS/TracIn).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from dvgs_fast import _validation as V
from dvgs_fast._utils import ROWWISE_ACTIVATIONS, make_optimizer
from dvgs_fast.methods import _grad_training as T
from dvgs_fast.methods.base import Estimate, Run, Valuation
from dvgs_fast import grads
from dvgs_fast.attribution import AttributionMixin, ScoreSink, query_error
from dvgs_fast.attribution.gradient_pairs import factors_fn
from dvgs_fast.grads import FastScorer, ForwardRecorder, check_vmappable, per_sample_grads
from dvgs_fast.grads import pairwise as GP

DOT_ROUTES = ("auto", "pairwise", "materialised")


@dataclass(eq=False)
class _PairLayer:
    """A layer that may take the pairwise dot: module, "linear"/"conv", its selected weight and
    bias names, its name in the model and its weight's (d_in, d_out) as a matrix."""
    module: nn.Module
    kind: str
    w: str
    b: str | None
    layer: str
    d_in: int
    d_out: int


@dataclass(eq=False)
class _StepContext:
    """What every step uses (built once per fit)."""
    model: nn.Module
    scorer: FastScorer | None
    names: list[str]
    params: dict[str, nn.Parameter]
    tparams: list[nn.Parameter]
    opt: torch.optim.Optimizer
    sample_loss: Callable
    batch_loss: Callable
    last_loss: Any = None
    unsplit: set = field(default_factory=set)


# ROWWISE_ACTIVATIONS (exact types here: a subclass may override forward) and the modules below
# compute every row from that row alone. With these around plain Linear layers
# in an nn.Sequential, one forward over [batch rows; target rows] in train mode gives both sides
# exactly what the separate passes give (the target's in eval mode).
_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


@dataclass(eq=False)
class _FusedLinear:
    """One Linear of the fused pass: its parameters, whether each is credited, and its name."""
    module: nn.Module
    weight: nn.Parameter
    bias: nn.Parameter | None
    credit_w: bool
    credit_b: bool
    layer: str
    d_in: int
    d_out: int


@dataclass(eq=False)
class _FusedShape:
    """Per (batch rows, target rows): the concatenated input/label buffers, each Linear's dot
    route (True: pairwise) and the loss weights (1/B on the batch rows, 1/T on the target's)."""
    x: torch.Tensor
    y: torch.Tensor
    weights: torch.Tensor
    pairwise: list[bool]
    one: torch.Tensor                      # a 0-dim 1: addmm's broadcast input for the bias's +1
    steps: int = 0


@dataclass(eq=False)
class _FusedPlan:
    ops: list[tuple[nn.Module, _FusedLinear | None, bool]]     # (module, its Linear entry, in-place)
    linears: list[_FusedLinear]
    shapes: dict = field(default_factory=dict)
    active: bool = True
    reason: str = ""


def fused_plan(model: nn.Module, names: list[str]) -> tuple["_FusedPlan | None", str]:
    """(plan, "") when the target rows can ride along in the training forward exactly: an
    nn.Sequential (nested ones allowed) of plain Linear layers and row-wise, mode-independent,
    parameter-free modules, every parameter trainable and owned by one Linear used once, no
    hooks. Otherwise (None, why): the separate eval-mode target pass is kept."""
    from torch.nn.modules import module as _mod
    if type(model) is not nn.Sequential:
        return None, f"the model is a {type(model).__name__}, not an nn.Sequential (its forward is not known)"
    if any(getattr(_mod, h, None) for h in ("_global_forward_hooks", "_global_forward_pre_hooks",
                                           "_global_backward_hooks", "_global_backward_pre_hooks")):
        return None, "global module hooks are registered"
    mod_name = {id(m): nm for nm, m in model.named_modules()}
    leaves: list[nn.Module] = []

    def flatten(seq):
        for m in seq:
            if type(m) is nn.Sequential:
                flatten(m)
            else:
                leaves.append(m)

    flatten(model)
    selected = set(names)
    pname = {id(p): nm for nm, p in model.named_parameters(remove_duplicate=False)}
    ops, linears, seen_mod, seen_par = [], [], set(), set()
    for m in list(model.modules()):
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or getattr(m, "_backward_pre_hooks", None):
            return None, f"module {mod_name[id(m)] or '<model>'} has hooks"
    for m in leaves:
        nm = mod_name[id(m)]
        if id(m) in seen_mod:
            return None, f"module {nm} is used twice (shared weights)"
        seen_mod.add(id(m))
        if type(m) is nn.Linear:
            ps = [m.weight] + ([m.bias] if m.bias is not None else [])
            if any(not p.requires_grad for p in ps):
                return None, f"{nm} has a frozen parameter"
            if any(id(p) in seen_par for p in ps):
                return None, f"{nm} shares a parameter with another layer"
            seen_par.update(id(p) for p in ps)
            e = _FusedLinear(m, m.weight, m.bias, pname[id(m.weight)] in selected,
                             m.bias is not None and pname[id(m.bias)] in selected, nm, m.in_features, m.out_features)
            linears.append(e)
            ops.append((m, e, False))
            continue
        if list(m.parameters(recurse=False)) or list(m.buffers(recurse=False)):
            return None, f"{nm} ({type(m).__name__}) has parameters or buffers and is not an nn.Linear"
        if type(m) in _DROPOUTS:
            if m.p > 0:
                return None, f"{nm} ({type(m).__name__}, p={m.p}) differs between train and eval mode"
        elif type(m) is nn.Flatten:
            if m.start_dim < 1:
                return None, f"{nm} (Flatten) flattens the sample dimension"
        elif type(m) in (nn.LayerNorm, getattr(nn, "RMSNorm", nn.LayerNorm)):
            pass                                   # parameter-free here (no buffers, checked above)
        elif type(m) not in ROWWISE_ACTIVATIONS:
            return None, (f"{nm} ({type(m).__name__}) is not known to act row by row and alike in train "
                          f"and eval mode")
        ops.append((m, None, bool(getattr(m, "inplace", False))))
    if not linears:
        return None, "no nn.Linear layer"
    if len(seen_par) != len({id(p) for p in model.parameters()}):
        return None, "some parameters belong to no Linear layer"
    return _FusedPlan(ops, linears), ""


class InRunShapley(AttributionMixin, Valuation):
    """In-Run Data Shapley: each sample's Shapley share of every training step's target-loss decrease.

    >>> res = InRunShapley(model, epochs=20, lr=0.05).fit(x_source, y_source, x_target, y_target)
    >>> res.values            # [N_source]; > 0: the sample's steps lowered the target loss

    model              nn.Module (deep-copied; its weights are the start) or a zero-argument factory.
    loss               "cross_entropy", "mse", or a callable (output, target) -> per-sample losses [N].
                       With "mse"/callable the labels may be None (autoencoder: the target is the input).
    epochs, batch_size the training on the source set (shuffled each epoch; the last batch may be smaller).
    lr, optimizer      "sgd" (plain, no momentum: the exact case), "adam" or "adamw" (the
                       preconditioned update direction is credited, see the module docstring);
                       weight_decay. The defaults (Adam, lr 1e-3, 50 epochs) are chosen so that the
                       model actually fits: on an under-trained model the target gradient mostly
                       moves the class prior, every sample of one label gets a common offset, and
                       flipped labels can rank as valuable (UCI Adult, 20% flipped, seeds 0-4:
                       SGD lr 0.01 x 10 epochs gave detection AUROC 0.45 +- 0.32 with 4 of 5 seeds
                       inverted; Adam lr 1e-3 x 50 epochs 0.755 +- 0.096, all seeds 0.70-0.83).
    order              1 (first-order term) or 2 (adds the second-order interaction term; one
                       Hessian-vector product of the target loss per step).
    target_batch_size  None: the target gradient over the whole target set at every step; an int:
                       over a fresh random target mini-batch of that size per step (cheaper,
                       unbiased, noisier).
    grad_params        None (all trainable parameters) or names / module-name prefixes: only these
                       parameters' moves are credited (training still updates every parameter).
    backend            "fast" (ghost statistics from the training step) or "reference".
    dot_route          "auto" (SGD order 1: each Linear/conv layer takes the pairwise ghost
                       dot-product when it needs fewer multiply-adds, see the module docstring),
                       "pairwise" (SGD, order 1, fast backend only) or "materialised" (form the
                       target gradient G and dot each sample against it).
    max_time           wall-clock budget (s), checked after every step: a stopped run returns the
                       sums so far, status "stopped".

    result.values: sum over steps; result.counts: steps the sample took part in; result.stderr:
    sqrt(counts · var) of its per-step contributions (NaN below two steps). result.info holds
    the target loss before and after training (the values' sum approximates their difference),
    which route each layer took ("dot_routes") and whether the target rows rode along in the
    training forward ("target_pass": "fused") or had their own pass ("separate").

    attribute(x_source, y_source, x_query, y_query): the first-order term per query, the
    [n_query, n_source] matrix Σ_t [i ∈ B_t] (1/B)⟨g_i(θ_t), P_t g_q(θ_t)⟩ over the same training run
    (P_t: lr for SGD, Adam's preconditioned direction), from the engine's factored per-sample
    gradients. Row j equals fit()'s values with x_target = query j alone (and target_batch_size
    None); order 2's interaction term needs a Hessian-vector product per query and is not
    defined there (order=2 is refused).
    """

    name = "inrun_shapley"
    requires_labels = False
    attribute_accumulates = True
    # False: never take the fused target pass (tests and bench/bench_ghost_methods.py compare it
    # with the separate one; not a user setting, the two give the same values)
    _allow_fused = True

    def __init__(self, model: nn.Module | Callable[[], nn.Module], loss: str | Callable = "cross_entropy",
                 epochs: int = 50, batch_size: int = 64, lr: float = 1e-3, optimizer: str = "adam",
                 weight_decay: float = 0.0, order: int = 1, target_batch_size: int | None = None,
                 grad_params: Any = None, backend: str = "fast", dot_route: str = "auto", device: Any = None,
                 seed: int | None = None, max_time: float | None = None, progress: bool = True):
        self.optimizer, self.backend, self.grad_params = T.check_common(loss, optimizer, backend, grad_params, model)
        self.model, self.loss = model, loss
        self.epochs = V.check_positive_int(epochs, "epochs")
        self.batch_size = V.check_positive_int(batch_size, "batch_size")
        self.lr = V.check_positive_float(lr, "lr")
        self.weight_decay = V.check_positive_float(weight_decay, "weight_decay", allow_zero=True)
        if isinstance(order, bool) or order not in (1, 2):
            raise ValueError(f"order: expected 1 or 2, got {order!r}")
        self.order = int(order)
        self.target_batch_size = V.check_optional_positive_int(target_batch_size, "target_batch_size")
        self.dot_route = V.check_choice(dot_route, "dot_route", DOT_ROUTES)
        if self.dot_route == "pairwise" and (self.optimizer != "sgd" or self.order != 1 or self.backend != "fast"):
            raise ValueError(f"dot_route: 'pairwise' needs optimizer='sgd', order=1 and backend='fast' (got "
                             f"{self.optimizer!r}, order {self.order}, {self.backend!r}): only there is the "
                             f"target vector lr*G a sum of per-row outer products")
        super().__init__(device=device, seed=seed, max_time=max_time, progress=progress)

    # ------------------------------------------------------------------------------------------
    def _fit(self, x_source, y_source, x_target, y_target, run: Run) -> Estimate:
        t_start = time.perf_counter()
        prep = T.prepare(self, x_source, y_source, x_target, y_target, run.device, run.seed)
        if self.backend == "reference":
            check_vmappable(prep.model)           # before any training step
        bn = T.batchnorm_layers(prep.model)
        if bn:
            raise ValueError(f"model: {', '.join(bn)}: in training, batch statistics couple the samples of a "
                             f"step, so a sample's own gradient (and its In-Run Shapley value) is not defined; "
                             f"use GroupNorm/LayerNorm, or DVGS/TracIn (which score with running statistics)")
        model, names, xs, xt, yt = prep.model, prep.names, prep.xs, prep.xt, prep.yt
        n, m = xs.shape[0], xt.shape[0]
        dev = run.device
        shuffle = prep.shuffle
        target_gen = run.generator(0x54475442)          # target mini-batches: their own stream
        params = dict(model.named_parameters())
        trainable = [(nm, p) for nm, p in params.items() if p.requires_grad]
        opt = make_optimizer(self.optimizer, [p for _, p in trainable], self.lr, self.weight_decay)
        scorer = (FastScorer(model, names, prep.sample_loss, "dot", owner="InRunShapley")
                  if self.backend == "fast" else None)
        # Layers that may take the pairwise dot (SGD, order 1 only: P = lr is a scalar there).
        pair = self._pairwise_layers(scorer) if self._pairwise_possible() else []
        route_steps = {e.layer: {"pairwise": 0, "materialised": 0} for e in pair}
        chosen_for: dict[tuple[int, int], list] = {}
        # SGD order 1 on a Linear network whose train and eval forward agree: the target rows ride
        # along in the training forward (one forward, one backward to the layers' outputs).
        fused, fused_why = (fused_plan(model, names) if self._pairwise_possible() and self._allow_fused
                            else (None, "disabled (_allow_fused = False)" if self._pairwise_possible() else
                                  "only SGD, order 1, fast backend, dot_route auto/pairwise"))
        pass_steps = {"fused": 0, "separate": 0}
        ctx = _StepContext(model, scorer, names, params, [p for _, p in trainable], opt, prep.sample_loss,
                           lambda out, y: prep.sample_loss(out, y).mean())

        # Per-sample sums on the device, float64 (one index_add per step, no host sync).
        s1 = torch.zeros(n, dtype=torch.float64, device=dev)
        s2 = torch.zeros(n, dtype=torch.float64, device=dev)
        counts = torch.zeros(n, dtype=torch.int64, device=dev)
        timings = {"setup": time.perf_counter() - t_start, "target": 0.0, "train": 0.0, "values": 0.0}
        loss_start = self._target_loss(model, prep, xt, yt)
        steps, stopped = 0, None
        steps_per_epoch = -(-n // self.batch_size)
        bar = run.progress(self.epochs, "InRunShapley", unit="epoch")
        try:
            for epoch in range(self.epochs):
                perm = torch.randperm(n, generator=shuffle).to(dev)
                rows_done = 0
                for idx in perm.split(self.batch_size):
                    t0 = time.perf_counter()
                    tidx = (None if self.target_batch_size is None or self.target_batch_size >= m else
                            torch.randperm(m, generator=target_gen)[: self.target_batch_size].to(dev))
                    contrib = None
                    if fused is not None and fused.active:
                        contrib = self._fused_step(ctx, fused, prep, idx, tidx, timings)
                        if contrib is None:             # this model's calls do not fit: separate from now on
                            fused_why = fused.reason
                    if contrib is not None:
                        pass_steps["fused"] += 1
                    else:
                        pass_steps["separate"] += 1
                        contrib = self._separate_step(ctx, prep, pair, chosen_for, route_steps, idx, tidx, timings, t0)
                    c = contrib.detach().to(torch.float64)
                    s1.index_add_(0, idx, c)
                    s2.index_add_(0, idx, c * c)
                    steps += 1
                    rows_done += idx.shape[0]
                    # A diverged training must not return NaN values silently. On CPU the loss is
                    # read every step (a scalar read); on a GPU the sums are checked at epoch ends.
                    if dev.type == "cpu" and not math.isfinite(float(ctx.last_loss)):
                        self._diverged(epoch, steps - 1, float(ctx.last_loss))
                    stopped = run.budget.exhausted()
                    if stopped:
                        break
                # counts: every epoch shows each sample once, so they are added per epoch (or for
                # the part of it done), not per step
                if rows_done == n:
                    counts += 1
                else:
                    counts.index_add_(0, perm[:rows_done], torch.ones_like(perm[:rows_done]))
                if dev.type != "cpu" and not bool(torch.isfinite(s1).all()):
                    self._diverged(epoch, steps - 1, float("nan"))
                bar.update(1)
                if stopped:
                    break
        finally:
            bar.close()
        return self._finish(ctx, prep, scorer, fused, fused_why, pass_steps, route_steps, s1, s2, counts, steps,
                            steps_per_epoch, stopped, loss_start, timings)

    def _separate_step(self, ctx: "_StepContext", prep, pair, chosen_for, route_steps, idx, tidx, timings, t0):
        """A step with the target side as its own eval-mode pass; returns φ [B]."""
        xs, ys, xt, yt = prep.xs, prep.ys, prep.xt, prep.yt
        # ---- the target side at θ_t (eval mode: no dropout, no randomness drawn)
        xtb, ytb = (xt, yt) if tidx is None else (xt[tidx], yt[tidx])
        # The cost rule depends on the shapes only: decided on the first step with
        # these (batch, target) sizes, later steps record just the chosen layers.
        key = (idx.shape[0], xtb.shape[0])
        cand = chosen_for.get(key, pair)
        for e in pair:
            if e not in cand:
                route_steps[e.layer]["materialised"] += 1
        if cand:
            G, tgt_rows = self._target_pairwise(ctx, prep, cand, xtb, ytb, idx.shape[0], route_steps)
            chosen_for[key] = list(tgt_rows)
        else:
            G, tgt_rows = self._target_grad(ctx, prep, xtb, ytb), {}
        timings["target"] += time.perf_counter() - t0
        # ---- the training step, recording what the per-sample statistics need
        return self._step(ctx, G, tgt_rows, xs[idx], ys[idx], timings)

    def _finish(self, ctx, prep, scorer, fused, fused_why, pass_steps, route_steps, s1, s2, counts, steps,
                steps_per_epoch, stopped, loss_start, timings) -> Estimate:
        model, xt, yt = ctx.model, prep.xt, prep.yt
        n, m = s1.shape[0], xt.shape[0]
        if fused is not None:                       # the fused steps' routes, per batch shape
            for st in fused.shapes.values():
                for e, pw in zip(fused.linears, st.pairwise):
                    if e.layer in route_steps:
                        route_steps[e.layer]["pairwise" if pw else "materialised"] += st.steps
        loss_end = self._target_loss(model, prep, xt, yt)
        counts = counts.cpu().numpy()
        values, stderr = T.finish_sums(s1.cpu().numpy(), s2.cpu().numpy(), counts)
        info = {"n_source": n, "n_target": m, "steps": steps, "steps_planned": self.epochs * steps_per_epoch,
                "epochs_done": steps // steps_per_epoch, "target_loss_start": loss_start,
                "target_loss_end": loss_end, "order": self.order,
                "target_pass": ("fused" if pass_steps["separate"] == 0 else "separate" if pass_steps["fused"] == 0
                                else f"fused ({pass_steps['fused']} steps), separate ({pass_steps['separate']} steps)")}
        if pass_steps["separate"]:
            info["target_pass_reason"] = fused_why
        if scorer is not None:
            info.update(scorer.describe())
            info["dot_routes"] = self._dot_routes(scorer, route_steps)
            for layer, how in info["dot_routes"].items():
                if layer in info["routes"] and info["routes"][layer] != "reference":
                    info["routes"][layer] += f", dot: {how}"
        else:
            info["backend"] = "reference"
        return Estimate(values=values, stderr=stderr, counts=counts, status="stopped" if stopped else "completed",
                        stop_reason=stopped, info=info, timings=timings,
                        progress=f"{steps} of {self.epochs * steps_per_epoch} steps")

    # ---------------------------------------------------------------------------- attribute
    def _attribute(self, x_source, y_source, x_query, y_query, sink: ScoreSink, run: Run, query_batch_size: int):
        if self.order != 1:
            raise ValueError("order: attribute() gives In-Run Data Shapley's first-order term per query; order 2's "
                             "interaction term would need a Hessian-vector product per query (use order=1)")
        try:
            prep = T.prepare(self, x_source, y_source, x_query, y_query, run.device, run.seed)
        except ValueError as exc:
            raise query_error(exc) from None
        if self.backend == "reference":
            check_vmappable(prep.model)
        bn = T.batchnorm_layers(prep.model)
        if bn:
            raise ValueError(f"model: {', '.join(bn)}: in training, batch statistics couple the samples of a "
                             f"step, so a sample's own gradient is not defined; use GroupNorm/LayerNorm")
        model, names, xs, ys, xq, yq = prep.model, prep.names, prep.xs, prep.ys, prep.xt, prep.yt
        n, dev = xs.shape[0], run.device
        params = dict(model.named_parameters())
        shapes = {nm: params[nm].shape for nm in names}
        tparams = [p for p in params.values() if p.requires_grad]
        opt = make_optimizer(self.optimizer, tparams, self.lr, self.weight_decay)
        scorer = FastScorer(model, names, prep.sample_loss, "dot", owner="InRunShapley")
        ref = None if self.backend == "fast" else grads.ReferenceScorer(model, names, prep.sample_loss, "dot")
        fork = (lambda: torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []))
        steps, t0 = 0, time.perf_counter()
        bar = run.progress(self.epochs, "InRunShapley attribute", unit="epoch")
        try:
            for epoch in range(self.epochs):
                for idx in torch.randperm(n, generator=prep.shuffle).to(dev).split(self.batch_size):
                    b = idx.shape[0]
                    # ---- the queries at θ_t (eval mode, as fit()'s target side)
                    model.eval()
                    with fork():
                        qfs = [(q0, min(q0 + query_batch_size, xq.shape[0]),
                                factors_fn(ref or scorer)(xq[q0:q0 + query_batch_size], yq[q0:q0 + query_batch_size]))
                               for q0 in range(0, xq.shape[0], query_batch_size)]
                    model.train()
                    # ---- the training step, as fit()'s: one forward, one backward of the mean loss
                    xb, yb = xs[idx], ys[idx]
                    with scorer.recorder() as rec:
                        out = model(xb)
                    loss = prep.sample_loss(out, yb).mean()
                    outs = scorer.grad_outputs(rec)
                    g_all = torch.autograd.grad(loss, tparams + outs, allow_unused=True)
                    for p, g in zip(tparams, g_all[:len(tparams)]):
                        p.grad = None if g is None else g.detach()
                    if not math.isfinite(float(loss.detach())):
                        self._diverged(epoch, steps, float(loss.detach()))
                    if ref is None:
                        bf = grads.Recording(scorer, xb, yb, rec, g_all[len(tparams):], [], 1.0 / b).factors()
                    else:
                        with fork():
                            bf = grads.dense_factors(model, names, xb, yb, prep.sample_loss)
                        bf.dense.g.div_(b)
                    del rec, out, outs
                    # ---- each query's credit to each batch sample: (1/B)⟨g_i, P g_q⟩
                    P = None if self.optimizer == "sgd" else T.update_map(opt, self.optimizer, params, names, self.lr)
                    for q0, q1, qf in qfs:
                        if P is None:
                            block = grads.cross_gram(qf, bf) * self.lr
                        else:
                            vq = grads.materialise(qf, shapes)
                            block = grads.batch_dots(bf, {nm: vq[nm] * P[nm] for nm in names}).t()
                        if not bool(torch.isfinite(block).all()):
                            self._diverged(epoch, steps, float("nan"))
                        sink.add_columns(q0, q1, idx, block)
                    opt.step()
                    steps += 1
                    if run.budget.exhausted():
                        raise ValueError(f"max_time: the budget ran out at epoch {epoch}, step {steps}; attribute() "
                                         f"returns no partial matrix (raise max_time)")
                bar.update(1)
        finally:
            bar.close()
        return {"steps": steps, "order": 1, "optimizer": self.optimizer,
                "timings": {"attribute": time.perf_counter() - t0}, **scorer.describe()}

    # ---------------------------------------------------------------------------- dot routes
    def _pairwise_possible(self) -> bool:
        return (self.backend == "fast" and self.optimizer == "sgd" and self.order == 1
                and self.dot_route != "materialised")

    @staticmethod
    def _pairwise_layers(scorer: FastScorer) -> list["_PairLayer"]:
        """Routed Linear / ungrouped conv layers whose weight is credited: pairwise candidates."""
        out = []
        for r in scorer.layer_routes():
            if r.route in ("per_layer_func", "reference"):
                continue
            pk = GP.pairwise_kind(r.module, r.route)
            if pk is not None and r.weight is not None:
                out.append(_PairLayer(r.module, pk, r.weight, r.bias, r.name, *GP.layer_width(r.module, pk)))
        return out

    def _dot_routes(self, scorer: FastScorer, route_steps: dict) -> dict[str, str]:
        """How each routed layer's per-sample dot was formed (result.info["dot_routes"])."""
        if not self._pairwise_possible():
            why = ("materialised (forced: dot_route='materialised')" if self.dot_route == "materialised" else
                   f"materialised ({'order 2: v = P(G - H u / 2) is no sum of target outer products' if self.order == 2 else f'{self.optimizer}: the update map P is elementwise, so <g_i, P G> does not factor into pairwise products'})")
            return {r.name: why for r in scorer.layer_routes() if r.route != "reference"}
        out = {}
        for layer, c in route_steps.items():
            if c["materialised"] == 0:
                out[layer] = "pairwise"
            elif c["pairwise"] == 0:
                out[layer] = "materialised"
            else:
                out[layer] = f"pairwise ({c['pairwise']} steps), materialised ({c['materialised']} steps)"
        pairable = {e for e in route_steps}
        for r in scorer.layer_routes():
            if r.route != "reference" and r.name not in pairable:
                out[r.name] = "materialised (no pairwise route for this layer)"
        return out

    # ---------------------------------------------------------------------------- target side
    def _target_grad(self, ctx: "_StepContext", prep, xtb, ytb) -> dict[str, torch.Tensor]:
        """The target gradient G of every selected parameter (eval mode; kept differentiable for order 2)."""
        model = ctx.model
        model.eval()
        lt = prep.target_loss(model(xtb), ytb)
        sel = [ctx.params[nm] for nm in ctx.names]
        G = torch.autograd.grad(lt, sel, create_graph=self.order == 2, allow_unused=True)
        model.train()
        return {nm: torch.zeros_like(p) if g is None else g for nm, g, p in zip(ctx.names, G, sel)}

    def _target_pairwise(self, ctx: "_StepContext", prep, pair, xtb, ytb, b: int, route_steps):
        """(G of the parameters that keep the materialised route, {module: target rows} of the
        pairwise layers). The backward is taken w.r.t. the pairwise layers' OUTPUTS (their δ')
        and the remaining parameters only: no weight-gradient GEMM for the pairwise layers."""
        model = ctx.model
        t = xtb.shape[0]
        model.eval()
        rec = ForwardRecorder([e.module for e in pair])
        with rec:
            out = model(xtb)
        lt = prep.target_loss(out, ytb)
        chosen = []
        for e in pair:
            calls = rec.calls[e.module]
            rows = [GP.call_rows(e.module, e.kind, c, t) for c in calls]
            ok = bool(calls) and e.module not in rec.unsupported and None not in rows
            # The batch's rows per sample are taken to be the target's (same model, same kind of input).
            if ok and (self.dot_route == "pairwise"
                       or GP.pairwise_cheaper(b, sum(rows), t, sum(rows), e.d_in, e.d_out)):
                chosen.append(e)
                route_steps[e.layer]["pairwise"] += 1
            else:
                route_steps[e.layer]["materialised"] += 1
        done = {nm for e in chosen for nm in (e.w, e.b) if nm}
        rest = [nm for nm in ctx.names if nm not in done]
        outs = [c.output for e in chosen for c in rec.calls[e.module]]
        grads = torch.autograd.grad(lt, outs + [ctx.params[nm] for nm in rest], allow_unused=True)
        model.train()
        it = iter(grads[:len(outs)])
        tgt_rows = {}
        for e in chosen:
            calls = rec.calls[e.module]
            tgt_rows[e] = GP.rows_of(e.module, e.kind, calls, [next(it) for _ in calls], t)
        G = {nm: torch.zeros_like(ctx.params[nm]) if g is None else g for nm, g in zip(rest, grads[len(outs):])}
        return G, tgt_rows

    # ---------------------------------------------------------------------------- fused pass
    def _fused_shape(self, plan: _FusedPlan, prep, b: int, t: int, full_target: bool) -> _FusedShape | None:
        """Buffers and routes for a new (batch, target) size; the whole target set is copied in once."""
        xs, ys, xt, yt = prep.xs, prep.ys, prep.xt, prep.yt
        x = torch.empty((b + t, *xs.shape[1:]), dtype=xs.dtype, device=xs.device)
        y = x if ys is xs else torch.empty((b + t, *ys.shape[1:]), dtype=ys.dtype, device=ys.device)
        if full_target:
            x[b:] = xt
            if y is not x:
                y[b:] = yt
        w = torch.cat([torch.full((b,), 1.0 / b, dtype=prep.dtype, device=xs.device),     # the model's dtype:
                       torch.full((t,), 1.0 / t, dtype=prep.dtype, device=xs.device)])    # xs may hold token ids
        pw = [e.credit_w and (self.dot_route == "pairwise" or GP.pairwise_cheaper(b, 1, t, 1, e.d_in, e.d_out))
              for e in plan.linears]
        return _FusedShape(x, y, w, pw, torch.ones((), dtype=prep.dtype, device=xs.device))

    def _fused_step(self, ctx: "_StepContext", plan: _FusedPlan, prep, idx, tidx, timings) -> torch.Tensor | None:
        """One training step with the target rows in the same forward; returns φ [B], or None (and
        plan.active = False, nothing changed) when a layer's input is not [rows, features].

        One forward over [x_B; x_T] (train mode = eval mode here), recording each Linear's input a
        and output; one autograd.grad of L_B + L_T w.r.t. the outputs only, which gives every
        layer's δ (rows do not interact: the batch rows' δ are those of L_B, the target rows' those
        of L_T) and computes no weight gradient. The optimizer's gradients are then what autograd
        computes for L_B: W.grad = δ_Bᵀ a_B, b.grad = Σ δ_B, and the dots come from the same rows."""
        t0 = time.perf_counter()
        b = idx.shape[0]
        t = prep.xt.shape[0] if tidx is None else tidx.shape[0]
        key = (b, t)
        st = plan.shapes.get(key)
        new = st is None
        if new:
            st = self._fused_shape(plan, prep, b, t, tidx is None)
        x, y = st.x, st.y
        torch.index_select(prep.xs, 0, idx, out=x[:b])
        if y is not x:
            torch.index_select(prep.ys, 0, idx, out=y[:b])
        if tidx is not None:
            torch.index_select(prep.xt, 0, tidx, out=x[b:])
            if y is not x:
                torch.index_select(prep.yt, 0, tidx, out=y[b:])
        h, ins, outs = x, [], []
        for mod, lin, inplace in plan.ops:
            if lin is not None:
                ins.append(h)
                h = F.linear(h, lin.weight, lin.bias)
                outs.append(h)
            else:
                # an in-place op must not overwrite a recorded output (its δ is wanted, not the op's)
                h = mod(h.clone() if inplace and outs and h is outs[-1] else h)
        per = ctx.sample_loss(h, y)
        if new:
            n = b + t
            bad = next(((e, a) for e, a in zip(plan.linears, ins) if a.dim() != 2 or a.shape[0] != n), None)
            if bad is not None or tuple(per.shape) != (n,):
                plan.active = False
                plan.reason = (f"layer {bad[0].layer} gets inputs of shape {tuple(bad[1].shape)}, not [rows, features]"
                               if bad is not None else "the loss does not return one value per row")
                return None
            plan.shapes[key] = st
        st.steps += 1
        grads = torch.autograd.grad(torch.dot(per, st.weights), outs)
        ctx.last_loss = per.detach()[:b].mean()
        for e, a, d in zip(plan.linears, ins, grads):
            a_b, d_b = a[:b].detach(), d[:b]
            if e.weight.grad is None or e.weight.grad.shape != e.weight.shape:
                e.weight.grad = torch.mm(d_b.t(), a_b)
            else:
                torch.mm(d_b.t(), a_b, out=e.weight.grad)
            if e.bias is not None:
                if e.bias.grad is None:
                    e.bias.grad = d_b.sum(0)
                else:
                    torch.sum(d_b, 0, out=e.bias.grad)
        t1 = time.perf_counter()
        timings["train"] += t1 - t0
        # ---- (1/B)⟨g_i, G⟩ per layer: pairwise Σ_r ((a_i·a'_r) + 1)(δ_i·δ'_r) summed over the layers
        # as one [B, T] matrix, or through G = δ'ᵀa' where that is cheaper (wide target, narrow layer)
        mat = vec = None
        for e, pw, a, d in zip(plan.linears, st.pairwise, ins, grads):
            if not (e.credit_w or e.credit_b):
                continue
            a_b, a_t, d_b, d_t = a[:b].detach(), a[b:].detach(), d[:b], d[b:]
            if pw:
                aa = torch.addmm(st.one, a_b, a_t.t()) if e.credit_b else torch.mm(a_b, a_t.t())
                dd = torch.mm(d_b, d_t.t())
                mat = aa.mul_(dd) if mat is None else mat.addcmul_(aa, dd)
                continue
            if e.credit_w:
                gw = torch.mm(d_t.t(), a_t)
                z = torch.addmm(d_t.sum(0), a_b, gw.t()) if e.credit_b else torch.mm(a_b, gw.t())
                r = z.mul_(d_b).sum(1)
            else:
                r = torch.mv(d_b, d_t.sum(0))
            vec = r if vec is None else vec.add_(r)
        dot = mat.sum(1) if mat is not None else None
        dot = vec if dot is None else dot if vec is None else dot.add_(vec)
        ctx.opt.step()
        timings["values"] += time.perf_counter() - t1
        return dot.mul_(self.lr)

    # ------------------------------------------------------------------------------------------
    def _diverged(self, epoch: int, step: int, value: float):
        raise V.diverged("InRunShapley", "the source loss (or a value)", value, f"epoch {epoch}, step {step}",
                         lr=self.lr, before_training=step == 0)

    @staticmethod
    def _target_loss(model: nn.Module, prep, xt, yt) -> float:
        was = model.training
        model.eval()
        with torch.no_grad():
            v = float(prep.target_loss(model(xt), yt))
        model.train(was)
        return v

    def _step(self, ctx: "_StepContext", G, tgt_rows, xb, yb, timings) -> torch.Tensor:
        """One optimizer step on (xb, yb); returns each sample's contribution φ_i [B]."""
        t0 = time.perf_counter()
        model, scorer, tparams = ctx.model, ctx.scorer, ctx.tparams
        b = xb.shape[0]
        if scorer is not None:
            with scorer.recorder() as rec:
                out = model(xb)
            loss = ctx.batch_loss(out, yb)
            outs = scorer.grad_outputs(rec)
            grads = torch.autograd.grad(loss, tparams + outs, allow_unused=True)
            deltas = grads[len(tparams):]            # δ of the MEAN loss: each row is g_i / B
        else:
            loss = ctx.batch_loss(model(xb), yb)
            grads = torch.autograd.grad(loss, tparams, allow_unused=True)
        ctx.last_loss = loss.detach()
        for p, g in zip(tparams, grads[:len(tparams)]):
            p.grad = None if g is None else g.detach()
        t1 = time.perf_counter()
        timings["train"] += t1 - t0

        # ---- v, the vector each sample's gradient is dotted with. SGD: P = lr, a scalar that
        # multiplies the dots at the end (no update map, no scaled copy of G).
        names, params = ctx.names, ctx.params
        if self.optimizer == "sgd":
            P, scale = None, self.lr
        else:
            P, scale = T.update_map(ctx.opt, self.optimizer, params, names, self.lr), 1.0
        if self.order == 2:
            gsel = [G[nm] for nm in names]
            grad_of = [params[nm].grad if params[nm].grad is not None else torch.zeros_like(params[nm])
                       for nm in names]
            u = [g * self.lr if P is None else P[nm] * g for nm, g in zip(names, grad_of)]
            hu = torch.autograd.grad(gsel, [params[nm] for nm in names], grad_outputs=u, allow_unused=True)
            v = {nm: g.detach() - 0.5 * (torch.zeros_like(g) if h is None else h.detach())
                 for nm, g, h in zip(names, gsel, hu)}
        else:
            v = {nm: g.detach() for nm, g in G.items()}
        if P is not None:
            v = {nm: P[nm] * g for nm, g in v.items()}

        if scorer is not None:
            dot = self._pairwise_dots(ctx, rec, deltas, tgt_rows, v, b) if tgt_rows else None
            skip = {e.module for e in tgt_rows if e not in ctx.unsplit} if tgt_rows else ()
            rest, _, leftover = scorer.stats_from_record(rec, deltas, b, v, xb.dtype, xb.device, need_sq=False,
                                                         skip=skip)
            dot = rest if dot is None else dot.to(rest.dtype) + rest
            del rec, deltas, outs, out
            if leftover:                             # parameters without a per-layer route
                with torch.random.fork_rng(devices=[xb.device] if xb.device.type == "cuda" else []):
                    g = per_sample_grads(model, leftover, xb, yb, ctx.sample_loss)
                dot = dot + sum((g[nm].reshape(b, -1) * v[nm].reshape(1, -1)).sum(1) for nm in leftover) / b
        else:
            # Reference: explicit per-sample gradients (own random stream, so training is unchanged).
            with torch.random.fork_rng(devices=[xb.device] if xb.device.type == "cuda" else []):
                g = per_sample_grads(model, names, xb, yb, ctx.sample_loss)
            flat = torch.cat([g[nm].reshape(b, -1) for nm in names], 1)
            dot = flat @ torch.cat([v[nm].reshape(-1) for nm in names]) / b
        ctx.opt.step()
        timings["values"] += time.perf_counter() - t1
        return dot * scale if scale != 1.0 else dot

    @staticmethod
    def _pairwise_dots(ctx: "_StepContext", rec, deltas, tgt_rows, v, b: int) -> torch.Tensor | None:
        """Σ over the pairwise layers of (1/B)⟨g_i, G⟩ from the batch's and the target's rows. A layer
        whose batch call cannot be split by sample gets its G materialised from the target rows
        (into v) and is left to stats_from_record, which sends it to the whole-model route."""
        ctx.unsplit = set()
        delta_of = ctx.scorer.deltas_by_module(rec, deltas)
        dot = None
        for e, trow in tgt_rows.items():
            src = GP.rows_of(e.module, e.kind, rec.calls[e.module], delta_of[e.module], b) \
                if e.module in delta_of else None
            if src is None:                         # cannot split the batch's call by sample
                ctx.unsplit.add(e)
                if trow is False:
                    gw, gb = torch.zeros_like(ctx.params[e.w]), (torch.zeros_like(ctx.params[e.b]) if e.b else None)
                else:
                    gw, gb = GP.materialise(e.module, e.kind, trow[0], trow[1], True, e.b is not None)
                v[e.w] = gw
                if e.b:
                    v[e.b] = gb
                continue
            if src is False or trow is False:       # no gradient reached this layer on one side
                continue
            d = GP.pairwise_dot(src[0], src[1], src[2], trow[0], trow[1], e.b is not None)
            dot = d if dot is None else dot + d
        return dot
