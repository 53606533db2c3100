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

The training itself is exactly plain training: the target pass draws no random numbers, the
per-sample gradients are read off the same forward (dropout masks included), and the target
mini-batches come from their own generator. So the values belong to the model you would get.

BatchNorm layers are refused: in training mode their batch statistics couple the samples of a
step, so a sample's own gradient is not defined (use GroupNorm/LayerNorm, or DVGS/TracIn).
"""
from __future__ import annotations

import time
from typing import Any, Callable

import torch
from torch import nn

from dvgs_fast import _validation as V
from dvgs_fast._utils import make_optimizer
from dvgs_fast.methods import _grad_training as T
from dvgs_fast.methods.base import Estimate, Run, Valuation
from dvgs_fast.methods.dvgs.fast import FastScorer
from dvgs_fast.methods.dvgs.reference import per_sample_grads


class InRunShapley(Valuation):
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
    max_time           wall-clock budget (s), checked after every step: a stopped run returns the
                       sums so far, status "stopped".

    result.values: sum over steps; result.counts: steps the sample took part in; result.stderr:
    sqrt(counts · var) of its per-step contributions (NaN below two steps). result.info holds
    the target loss before and after training (the values' sum approximates their difference)
    and which route each layer took.
    """

    name = "inrun_shapley"
    requires_labels = False

    def __init__(self, model: nn.Module | Callable[[], nn.Module], loss: str | Callable = "cross_entropy",
                 epochs: int = 50, batch_size: int = 64, lr: float = 1e-3, optimizer: str = "adam",
                 weight_decay: float = 0.0, order: int = 1, target_batch_size: int | None = None,
                 grad_params: Any = None, backend: str = "fast", device: Any = None,
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
        super().__init__(device=device, seed=seed, max_time=max_time, progress=progress)

    # ------------------------------------------------------------------------------------------
    def _fit(self, x_source, y_source, x_target, y_target, run: Run) -> Estimate:
        t_start = time.perf_counter()
        prep = T.prepare(self, x_source, y_source, x_target, y_target, run.device, run.seed)
        bn = T.batchnorm_layers(prep.model)
        if bn:
            raise ValueError(f"model: {', '.join(bn)}: in training, batch statistics couple the samples of a "
                             f"step, so a sample's own gradient (and its In-Run Shapley value) is not defined; "
                             f"use GroupNorm/LayerNorm, or DVGS/TracIn (which score with running statistics)")
        model, names, xs, ys, xt, yt = prep.model, prep.names, prep.xs, prep.ys, prep.xt, prep.yt
        n, m = xs.shape[0], xt.shape[0]
        dev = run.device
        shuffle = prep.shuffle
        target_gen = run.generator(0x54475442)          # target mini-batches: their own stream
        params = dict(model.named_parameters())
        trainable = [(nm, p) for nm, p in params.items() if p.requires_grad]
        selected = [params[nm] for nm in names]
        opt = make_optimizer(self.optimizer, [p for _, p in trainable], self.lr, self.weight_decay)
        scorer = (FastScorer(model, names, prep.sample_loss, "dot", owner="InRunShapley")
                  if self.backend == "fast" else None)
        batch_loss = lambda out, y: prep.sample_loss(out, y).mean()     # noqa: E731  (training)

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
                for idx in perm.split(self.batch_size):
                    t0 = time.perf_counter()
                    # ---- target gradient G at θ_t (eval mode: no dropout, no randomness drawn)
                    if self.target_batch_size is None or self.target_batch_size >= m:
                        xtb, ytb = xt, yt
                    else:
                        tidx = torch.randperm(m, generator=target_gen)[: self.target_batch_size].to(dev)
                        xtb, ytb = xt[tidx], yt[tidx]
                    model.eval()
                    lt = prep.target_loss(model(xtb), ytb)
                    G = torch.autograd.grad(lt, selected, create_graph=self.order == 2, allow_unused=True)
                    G = [torch.zeros_like(p) if g is None else g for g, p in zip(G, selected)]
                    model.train()
                    t1 = time.perf_counter()
                    timings["target"] += t1 - t0
                    # ---- the training step, recording what the per-sample statistics need
                    contrib = self._step(model, scorer, names, params, trainable, selected, opt, G,
                                         xs[idx], ys[idx], prep.sample_loss, batch_loss, timings)
                    c = contrib.detach().to(torch.float64)
                    s1.index_add_(0, idx, c)
                    s2.index_add_(0, idx, c * c)
                    counts.index_add_(0, idx, torch.ones_like(idx))
                    steps += 1
                    # A diverged training must not return NaN values silently. On CPU the loss is
                    # read every step (free); on a GPU the sums are checked at epoch ends.
                    if dev.type == "cpu" and not torch.isfinite(self._last_loss):
                        self._diverged(epoch, steps - 1, float(self._last_loss))
                    stopped = run.budget.exhausted()
                    if stopped:
                        break
                if dev.type != "cpu" and not bool(torch.isfinite(s1).all()):
                    self._diverged(epoch, steps - 1, float("nan"))
                bar.update(1)
                if stopped:
                    break
        finally:
            bar.close()
        loss_end = self._target_loss(model, prep, xt, yt)
        counts = counts.cpu().numpy()
        values, stderr = T.finish_sums(s1.cpu().numpy(), s2.cpu().numpy(), counts)
        info = {"n_source": n, "n_target": m, "steps": steps, "steps_planned": self.epochs * steps_per_epoch,
                "epochs_done": steps // steps_per_epoch, "target_loss_start": loss_start,
                "target_loss_end": loss_end, "order": self.order}
        if scorer is not None:
            info.update(scorer.describe())
        else:
            info["backend"] = "reference"
        return Estimate(values=values, stderr=stderr, counts=counts, status="stopped" if stopped else "completed",
                        stop_reason=stopped, info=info, timings=timings,
                        progress=f"{steps} of {self.epochs * steps_per_epoch} steps")

    def _diverged(self, epoch: int, step: int, value: float):
        raise ValueError(f"lr: training diverged: the source loss (or a value) is {value} at epoch {epoch}, "
                         f"step {step}; lower lr (now {self.lr:g}) or check the model and loss for overflow")

    @staticmethod
    def _target_loss(model: nn.Module, prep, xt, yt) -> float:
        was = model.training
        model.eval()
        with torch.no_grad():
            v = float(prep.target_loss(model(xt), yt))
        model.train(was)
        return v

    def _step(self, model, scorer, names, params, trainable, selected, opt, G, xb, yb, sample_loss, batch_loss,
              timings) -> torch.Tensor:
        """One optimizer step on (xb, yb); returns each sample's contribution φ_i [B]."""
        t0 = time.perf_counter()
        b = xb.shape[0]
        tparams = [p for _, p in trainable]
        if scorer is not None:
            with scorer.recorder() as rec:
                out = model(xb)
            loss = batch_loss(out, yb)
            outs = scorer.grad_outputs(rec)
            grads = torch.autograd.grad(loss, tparams + outs, allow_unused=True)
            deltas = grads[len(tparams):]            # δ of the MEAN loss: each row is g_i / B
        else:
            loss = batch_loss(model(xb), yb)
            grads = torch.autograd.grad(loss, tparams, allow_unused=True)
        self._last_loss = loss.detach()
        for p, g in zip(tparams, grads[:len(tparams)]):
            p.grad = None if g is None else g.detach()
        t1 = time.perf_counter()
        timings["train"] += t1 - t0

        # ---- the vector v each sample's gradient is dotted with
        P = T.update_map(opt, self.optimizer, params, names, self.lr)
        Gd = [g.detach() for g in G]
        if self.order == 2:
            u = [P[nm] * (params[nm].grad if params[nm].grad is not None else torch.zeros_like(params[nm]))
                 for nm in names]
            hu = torch.autograd.grad(G, selected, grad_outputs=u, allow_unused=True)
            hu = [torch.zeros_like(p) if h is None else h.detach() for h, p in zip(hu, selected)]
            v = {nm: P[nm] * (g - 0.5 * h) for nm, g, h in zip(names, Gd, hu)}
        else:
            v = {nm: P[nm] * g for nm, g in zip(names, Gd)}

        if scorer is not None:
            dot, _, leftover = scorer.stats_from_record(rec, deltas, b, v, xb.dtype, xb.device, need_sq=False)
            del rec, deltas, outs, out
            if leftover:                             # parameters without a per-layer route
                with torch.random.fork_rng(devices=[xb.device] if xb.device.type == "cuda" else []):
                    g = per_sample_grads(model, leftover, xb, yb, sample_loss)
                dot = dot + sum((g[nm].reshape(b, -1) * v[nm].reshape(1, -1)).sum(1) for nm in leftover) / b
        else:
            # Reference: explicit per-sample gradients (own random stream, so training is unchanged).
            with torch.random.fork_rng(devices=[xb.device] if xb.device.type == "cuda" else []):
                g = per_sample_grads(model, names, xb, yb, sample_loss)
            flat = torch.cat([g[nm].reshape(b, -1) for nm in names], 1)
            dot = flat @ torch.cat([v[nm].reshape(-1) for nm in names]) / b
        opt.step()
        timings["values"] += time.perf_counter() - t1
        return dot
