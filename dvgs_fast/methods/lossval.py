"""LossVal (Wibiral et al., 2024): data values learned as per-sample weights inside the loss.

Every source sample n gets a weight w_n (initialised to 1) that is trained jointly with the
model, by the same Adam optimizer. For a mini-batch B of the source set against the whole target
set V the loss is

    L_B = [ sum_{n in B} w_n * l_n ] * S(w_B . x_B, 1 . x_V)^2

with l_n the per-sample loss (cross-entropy on the softmax of the model output, or squared
error) and S the debiased Sinkhorn divergence (p = 2, blur = 0.05, scaling = 0.5, diameter =
1.1 x the largest distance between the batch and the target features) between the batch's
input features weighted by w_B (unnormalised) and the target's with unit weights. The values
are the weights at the end of training: samples whose loss stays high (e.g. flipped labels) are
pushed down.

As in the original code (which uses geomloss): the weights enter the Sinkhorn divergence as
given, without normalisation; a weight that has become <= 0 carries no mass in the transport
problem but still counts in the <a, f> term of the divergence (geomloss's log-weight clamp).
y_target is accepted for symmetry with the other methods and checked, but the loss does not use
it (the target set only enters through its features).

backend="fast" computes S with dvgs_fast.ops.sinkhorn (online log-sum-exp, no batch x target
matrix); backend="reference" with the dense pure-PyTorch log-domain implementation.
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from dvgs_fast import _validation as V
from dvgs_fast._utils import build_model, seed_everything
from dvgs_fast.methods.base import Estimate, Run, Valuation
from dvgs_fast.ops.sinkhorn import sinkhorn, sinkhorn_reference

BACKENDS = ("fast", "reference")
_LOG_EPS = 1e-8  # the original's cross-entropy: -log(softmax + 1e-8)


def per_sample_loss(out: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    """LossVal's per-sample losses [B]: -log(softmax(out)[y] + 1e-8), or the summed squared error."""
    if loss == "cross_entropy":
        prob = torch.softmax(out, dim=1)
        return -torch.log(prob.gather(1, y.view(-1, 1)).squeeze(1) + _LOG_EPS)
    return (out - y.reshape(out.shape)).square().reshape(out.shape[0], -1).sum(1)


def batch_ot(x_batch: torch.Tensor, x_target: torch.Tensor, w: torch.Tensor, *, blur: float = 0.05,
             scaling: float = 0.5, diameter_factor: float = 1.1, backend: str = "fast",
             check_inputs: bool = True) -> torch.Tensor:
    """Sinkhorn divergence between (w, x_batch) and (1, x_target), as LossVal's original computes it.

    Differentiable with respect to w. Nonpositive weights carry no transport mass but keep their
    <w, f> term (see the module docstring)."""
    with torch.no_grad():
        diameter = diameter_factor * float(torch.cdist(x_batch, x_target).max())
    b = torch.ones(x_target.shape[0], dtype=x_target.dtype, device=x_target.device)
    kw = dict(blur=blur, p=2, scaling=scaling, diameter=diameter if diameter > 0 else None, debias=True)
    w_pos = w.clamp_min(0)
    if backend == "reference" or not bool((w_pos > 0).any()):
        # The dense reference treats w <= 0 exactly like geomloss does (log-weight clamp);
        # the fast op refuses a measure without mass, so an all-nonpositive batch comes here too.
        return sinkhorn_reference(x_batch, x_target, w, b, **kw).cost
    if check_inputs:
        res = sinkhorn(x_batch, x_target, w_pos, b, **kw)
        cost, f = res.cost, res.f
    else:  # fit() validated the data once; skip the per-batch NaN scans of the wrapper
        cost, f = torch.ops.dvgs_fast.sinkhorn(x_batch, x_target, w_pos, b, blur, 2, scaling, kw["diameter"],
                                               True, None, None)[:2]
    # cost = <w+, f> + <b, g>; geomloss's <w, f> adds <w - w+, f> (gradient f on those weights).
    return cost + ((w - w_pos) * f).sum()


def lossval_batch_loss(out: torch.Tensor, y: torch.Tensor, x_batch: torch.Tensor, x_target: torch.Tensor,
                       w: torch.Tensor, loss: str = "cross_entropy", backend: str = "fast", **ot_kwargs) -> torch.Tensor:
    """The LossVal objective of one mini-batch: (w . l) * S(w . x_B, 1 . x_V)^2."""
    weighted = (w * per_sample_loss(out, y, loss)).sum()
    return weighted * batch_ot(x_batch, x_target, w, backend=backend, **ot_kwargs) ** 2


class LossVal(Valuation):
    """LossVal data valuation.

    >>> res = LossVal(model, loss="cross_entropy", epochs=30).fit(x_source, y_source, x_target, y_target)
    >>> res.values          # [N_source], the learned sample weights; lower = more harmful

    model        nn.Module returning logits [N, C] (cross_entropy; the softmax is applied here) or
                 predictions (mse). Deep-copied; or a zero-argument factory.
    loss         "cross_entropy" (integer labels) or "mse".
    epochs, lr, batch_size   training of model and weights together with Adam(lr) over shuffled
                 source mini-batches (the last one may be smaller).
    device       None: where tensor inputs live, else CUDA when available, else CPU.
    seed         makes the run reproducible (shuffling, and the model when given as a factory).
    max_time     wall-clock budget in seconds, checked after every mini-batch; a stopped run
                 returns the weights so far with status "stopped" (counts: the epochs in which
                 each weight was updated, 0 = never).
    progress     tqdm bar over epochs.
    backend      "fast" (dvgs_fast.ops.sinkhorn) or "reference" (dense PyTorch Sinkhorn).
    blur, scaling, diameter_factor   the Sinkhorn settings of the original (0.05, 0.5, 1.1).

    result.stderr is NaN (one weight per sample, nothing averaged); result.counts is the number
    of epochs in which the sample's weight was trained.
    """

    name = "lossval"

    def __init__(self, model: nn.Module | Callable[[], nn.Module], loss: str = "cross_entropy", epochs: int = 30,
                 lr: float = 0.01, batch_size: int = 128, device: Any = None, seed: int | None = None,
                 progress: bool = True, backend: str = "fast", blur: float = 0.05, scaling: float = 0.5,
                 diameter_factor: float = 1.1, max_time: float | None = None):
        if not isinstance(model, nn.Module) and not callable(model):
            raise ValueError(f"model: expected an nn.Module or a zero-argument callable returning one, "
                             f"got {type(model).__name__}")
        self.model = model
        self.loss = V.check_choice(loss, "loss", V.LOSSES)
        self.epochs = V.check_positive_int(epochs, "epochs")
        self.lr = V.check_positive_float(lr, "lr")
        self.batch_size = V.check_positive_int(batch_size, "batch_size")
        self.backend = V.check_choice(backend, "backend", BACKENDS)
        self.blur = V.check_positive_float(blur, "blur")
        self.scaling = V.check_positive_float(scaling, "scaling")
        if not self.scaling < 1:
            raise ValueError(f"scaling: must be in (0, 1), got {scaling!r}")
        self.diameter_factor = V.check_positive_float(diameter_factor, "diameter_factor")
        super().__init__(device=device, seed=seed, max_time=max_time, progress=progress)

    def _fit(self, x_source, y_source, x_target, y_target, run: Run) -> Estimate:
        """Train model and weights on the source set; the final weights are the values."""
        t0 = time.perf_counter()
        prep = self._prepare(x_source, y_source, x_target, y_target, run)
        model, xs, ys, xt, dev = prep["model"], prep["xs"], prep["ys"], prep["xt"], run.device
        n = xs.shape[0]
        weights = nn.Parameter(torch.ones(n, dtype=xs.dtype, device=dev))
        opt = torch.optim.Adam([*model.parameters(), weights], lr=self.lr)
        ot_kw = dict(blur=self.blur, scaling=self.scaling, diameter_factor=self.diameter_factor)
        gen = prep["gen"]
        counts = np.zeros(n, dtype=np.int64)
        stopped = None
        t_setup = time.perf_counter() - t0
        epoch_times, losses = [], []
        steps = 0
        model.train()
        bar = run.progress(self.epochs, "LossVal", unit="epoch")
        for epoch in range(self.epochs):
            te = time.perf_counter()
            perm = torch.randperm(n, generator=gen).to(dev)
            total = 0.0
            for bi, start in enumerate(range(0, n, self.batch_size)):
                idx = perm[start:start + self.batch_size]
                xb = xs[idx]
                opt.zero_grad(set_to_none=True)
                out = model(xb)
                loss = lossval_batch_loss(out, ys[idx], xb.reshape(xb.shape[0], -1), xt, weights[idx],
                                          self.loss, self.backend, check_inputs=False, **ot_kw)
                value = float(loss.detach())        # read every step anyway (the epoch's loss)
                if not math.isfinite(value):        # before the step: NaN must not reach the weights
                    where = f"epoch {epoch}, step {bi} (global step {steps})"
                    raise V.diverged("LossVal", "the loss", value, where, lr=self.lr, before_training=steps == 0)
                loss.backward()
                opt.step()
                total += value
                steps += 1
                counts[idx.cpu().numpy()] += 1
                stopped = run.budget.exhausted()
                if stopped:
                    break
            # a finite loss can still take a step to NaN/Inf weights (a huge lr): once per epoch
            V.check_finite(weights, "LossVal", "a sample weight", f"the end of epoch {epoch} (global step {steps})",
                           lr=self.lr)
            V.check_finite(torch.cat([p.detach().reshape(-1) for p in model.parameters()]), "LossVal",
                           "a model parameter", f"the end of epoch {epoch} (global step {steps})", lr=self.lr)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            epoch_times.append(time.perf_counter() - te)
            losses.append(total)
            bar.set_postfix(loss=f"{total:.4g}", refresh=False)
            bar.update(1)
            if stopped:
                break
        bar.close()
        values = weights.detach().cpu().to(torch.float64).numpy()
        info = {"n_source": n, "n_target": int(xt.shape[0]), "steps": steps, "epochs_done": len(losses),
                "epoch_losses": losses, "epoch_times": epoch_times}
        timings = {"setup": t_setup, "train": float(sum(epoch_times)),
                   "per_epoch": float(np.median(epoch_times)) if epoch_times else 0.0}
        return Estimate(values=values, counts=counts, status="stopped" if stopped else "completed",
                        stop_reason=stopped, info=info, timings=timings,
                        progress=f"{len(losses)} of {self.epochs} epochs")

    # ------------------------------------------------------------------------------------------
    def _prepare(self, x_source, y_source, x_target, y_target, run: Run) -> dict:
        xs = V.as_float_tensor(x_source, "x_source")
        xt = V.as_float_tensor(x_target, "x_target")
        V.check_same_features(xs, xt, "x_source", "x_target")
        ys = V.as_labels(y_source, "y_source", loss=self.loss)
        V.check_same_length(xs, ys, "x_source", "y_source")
        yt = None
        if y_target is not None:
            yt = V.as_labels(y_target, "y_target", loss=self.loss)
            V.check_same_length(xt, yt, "x_target", "y_target")
        device = run.device
        gen = seed_everything(run.seed)
        model = build_model(self.model, "model")
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("model: has no trainable parameters")
        dtype = params[0].dtype
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"model: parameters must be float32 or float64 (the Sinkhorn runs in the model's "
                             f"dtype), got {dtype}")
        model.to(device)
        xs, xt = xs.to(device=device, dtype=dtype), xt.to(device=device, dtype=dtype)
        ys = ys.to(device)
        if ys.is_floating_point():
            ys = ys.to(dtype)
        # Check model output against the labels now, not after the first epoch.
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                out = model(xs[:2])
        except Exception as exc:
            raise ValueError(f"x_source: the model cannot run on samples of shape {tuple(xs.shape[1:])} "
                             f"({type(exc).__name__}: {exc})") from exc
        finally:
            model.train(was)
        if self.loss == "cross_entropy":
            if out.dim() != 2:
                raise ValueError(f"model: cross_entropy needs outputs [N, n_classes], got shape {tuple(out.shape)}")
            k = int(out.shape[1])
            for y, name in ((ys, "y_source"), (yt, "y_target")):
                if y is not None and (int(y.min()) < 0 or int(y.max()) >= k):
                    raise ValueError(f"{name}: labels must be in [0, {k}) (the model has {k} outputs), "
                                     f"found range [{int(y.min())}, {int(y.max())}]")
        elif out[0].numel() != ys[0].numel():
            raise ValueError(f"y_source: the model outputs {tuple(out.shape[1:])} per sample but targets have "
                             f"shape {tuple(ys.shape[1:])}")
        return {"model": model, "xs": xs, "ys": ys, "xt": xt.reshape(xt.shape[0], -1), "gen": gen}
