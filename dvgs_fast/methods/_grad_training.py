"""What the training-based gradient methods (In-Run Data Shapley, TracIn) share: input checks,
per-sample losses, the selected parameters, the optimizer's update map, and the result sums.

Both train the model on the SOURCE set (unlike DVGS, which trains on the target) and credit
each source sample with inner products ⟨∇ℓ(z_i; θ), v⟩ against a target-derived vector v, which
the DVGS scorers (fast: ghost statistics; reference: torch.func per-sample gradients) give.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from dvgs_fast import _validation as V
from dvgs_fast._utils import as_model_input, build_model, embedding_hint, model_input_dtype, seed_everything
from dvgs_fast.grads import cast_labels, make_sample_loss
from dvgs_fast.result import stats_from_sums

OPTIMIZERS = ("sgd", "adam", "adamw")
BACKENDS = ("fast", "reference")


def check_common(loss: Any, optimizer: Any, backend: Any, grad_params: Any, model: Any):
    """Constructor checks shared by both methods; returns (optimizer, backend, grad_params)."""
    if not isinstance(model, nn.Module) and not callable(model):
        raise ValueError(f"model: expected an nn.Module or a zero-argument callable returning one, "
                         f"got {type(model).__name__}")
    if not callable(loss):
        V.check_choice(loss, "loss", V.LOSSES)
    optimizer = V.check_choice(optimizer.lower() if isinstance(optimizer, str) else optimizer, "optimizer",
                               OPTIMIZERS)
    backend = V.check_choice(backend, "backend", BACKENDS)
    if grad_params is not None:
        if isinstance(grad_params, str):
            grad_params = [grad_params]
        grad_params = list(grad_params)
        if not grad_params or not all(isinstance(g, str) for g in grad_params):
            raise ValueError(f"grad_params: expected None or a non-empty list of parameter names, got {grad_params!r}")
    return optimizer, backend, grad_params


@dataclass
class Prepared:
    model: nn.Module
    names: list[str]
    xs: torch.Tensor | None           # in-memory source rows (None: a chunked source, see `source`)
    ys: torch.Tensor | None           # their targets (the rows themselves for autoencoders)
    xt: torch.Tensor
    yt: torch.Tensor
    sample_loss: Callable
    dtype: torch.dtype
    shuffle: torch.Generator          # seeded from the run's seed (the global RNG is seeded too)
    source: Any = None                # dvgs sources.Source over the same rows (in memory or streamed)
    source_labels: bool = True        # False: autoencoder, a row's target is the row
    x_dtype: torch.dtype = torch.float32   # the inputs' dtype: `dtype`, or int64 token ids of an Embedding

    def target_loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The target loss of some target rows: their mean per-sample loss."""
        return self.sample_loss(out, y).mean()


def _probe(model: nn.Module, x: torch.Tensor, y: torch.Tensor, sample_loss, loss: Any, set_name: str) -> torch.Tensor:
    """One eval-mode forward on (at most) two rows: output/label mismatches fail now, not mid-run."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as exc:
        raise ValueError(f"x_{set_name}: the model cannot run on samples of shape {tuple(x.shape[1:])} "
                         f"({type(exc).__name__}: {exc}){embedding_hint(model, x)}") from exc
    finally:
        model.train(was)
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"model: must return a tensor, returned {type(out).__name__}")
    if loss == "cross_entropy":
        if out.dim() < 2:
            raise ValueError(f"model: cross_entropy needs outputs [N, n_classes], got shape {tuple(out.shape)}")
        k = int(out.shape[1])
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= k:
            raise ValueError(f"y_{set_name}: labels must be in [0, {k}) (the model has {k} outputs), "
                             f"found range [{lo}, {hi}]")
    try:
        with torch.no_grad():
            per = sample_loss(out, y)
    except Exception as exc:
        raise ValueError(f"y_{set_name}: the loss cannot compare the model output {tuple(out.shape)} with targets "
                         f"{tuple(y.shape)} ({type(exc).__name__}: {exc})") from exc
    if not isinstance(per, torch.Tensor) or tuple(per.shape) != (out.shape[0],):
        raise ValueError(f"loss: must return one loss per sample (shape [N]), got "
                         f"{tuple(per.shape) if isinstance(per, torch.Tensor) else type(per).__name__}")
    return out


def prepare(method, x_source, y_source, x_target, y_target, device: torch.device, seed: int,
            chunked_ok: bool = False) -> Prepared:
    """Validate the four inputs, seed, build the model (a factory's initialisation is seeded),
    check its output against the labels of both sets (before any training).

    chunked_ok: x_source may be a chunked source (a GctxReader, torch Dataset or iterator
    factory, see dvgs_fast/sources.py); then only `source` is set (xs, ys None)."""
    from dvgs_fast.sources import TensorSource, as_source, is_chunked_input

    chunked = is_chunked_input(x_source)
    if chunked and not chunked_ok:
        raise ValueError(f"x_source: {type(method).__name__} needs the source in memory (an array or tensor), "
                         f"got {type(x_source).__name__}")
    xs = None if chunked else V.as_float_tensor(x_source, "x_source", keep_integers=True)   # token ids stay integer
    source = as_source(x_source, y_source) if chunked else None
    xt = V.as_float_tensor(x_target, "x_target", keep_integers=True)
    V.check_same_features(source if chunked else xs, xt, "x_source", "x_target")
    yt = V.labels_for_loss(y_target, xt, "y_target", method.loss)
    if chunked:
        source_labels = yt is not None and source.has_labels
        if yt is not None and not source_labels:
            raise ValueError("y_source: is None but y_target is given; a chunked source yields (x, y) chunks, "
                             "or pass y_source as an array")
        ys = None
    else:
        ys = V.labels_for_loss(y_source, xs, "y_source", method.loss)
        source_labels = ys is not None
        if (ys is None) != (yt is None):
            raise ValueError(f"{'y_target' if yt is None else 'y_source'}: is None but "
                             f"{'y_source' if yt is None else 'y_target'} is given; pass both or neither")
    if not source_labels and method.loss == "cross_entropy":
        raise ValueError("y_source: labels are required for loss='cross_entropy'")
    shuffle = seed_everything(seed)
    model = build_model(method.model, "model")
    names = V.resolve_grad_params(model, method.grad_params)
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    model.to(device)
    x_dtype = model_input_dtype(model, xt[:2].to(device), dtype)     # int64 for an Embedding's token ids
    xt = as_model_input(xt.to(device), x_dtype)
    yt = xt if yt is None else cast_labels(yt, dtype).to(device)     # autoencoder: the target is the input
    sample_loss = make_sample_loss(method.loss)
    if not chunked:
        xs = as_model_input(xs.to(device), x_dtype)
        ys = xs if ys is None else cast_labels(ys, dtype).to(device)
        source = TensorSource(xs, ys if source_labels else None)
        x_probe, y_probe = xs[:2], ys[:2]
    else:
        _, _, x_probe, y_probe = source.probe(2)
        x_probe = as_model_input(x_probe.to(device), x_dtype)
        y_probe = x_probe if not source_labels else cast_labels(y_probe, dtype).to(device)
    _probe(model, xt[:2], yt[:2], sample_loss, method.loss, "target")
    _probe(model, x_probe, y_probe, sample_loss, method.loss, "source")
    return Prepared(model, names, xs, ys, xt, yt, sample_loss, dtype, shuffle, source, source_labels, x_dtype)


def train_plain(prep: Prepared, run, *, optimizer: str, lr: float, weight_decay: float, epochs: int,
                batch_size: int, owner: str) -> None:
    """Plain mini-batch training of prep.model on the in-memory source set (shuffled by
    prep.shuffle; TracIn's loop without its checkpoints): what grad-dot / grad-cos and influence
    functions score afterwards. A non-finite loss is a ValueError naming lr."""
    from dvgs_fast._utils import make_optimizer
    model, n = prep.model, prep.xs.shape[0]
    opt = make_optimizer(optimizer, [p for p in model.parameters() if p.requires_grad], lr, weight_decay)
    model.train()
    bar = run.progress(epochs, f"{owner} training", unit="epoch")
    try:
        for epoch in range(epochs):
            for step, idx in enumerate(torch.randperm(n, generator=prep.shuffle).to(prep.xs.device)
                                       .split(batch_size)):
                opt.zero_grad(set_to_none=True)
                loss = prep.sample_loss(model(prep.xs[idx]), prep.ys[idx]).mean()
                loss.backward()
                opt.step()
                if not math.isfinite(float(loss.detach())):
                    raise ValueError(f"lr: training diverged: the source loss is {float(loss.detach())} at "
                                     f"epoch {epoch}, step {step}; lower lr (now {lr:g})")
            bar.update(1)
    finally:
        bar.close()


def batchnorm_layers(model: nn.Module) -> list[str]:
    return [f"{n} ({type(m).__name__})" for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def update_map(opt: torch.optim.Optimizer, kind: str, params: dict[str, nn.Parameter], names: list[str],
               lr: float) -> dict[str, torch.Tensor | float]:
    """P: how this step's mean-batch gradient is credited with moving each selected parameter,
    Δθ = -P ⊙ ∇L_B, from the optimizer's state before step().

    sgd:        P = lr (exact: that is the update).
    adam/adamw: P = lr / (sqrt(v_t / (1 - β2^t)) + eps), the preconditioned update direction: the
                gradient scaled by the same denominator torch.optim.Adam divides by at this step
                (v_t includes this step's gradient). Adam spreads a gradient over this and later
                steps through the momentum, with weights (1-β1)β1^k that sum to one; it is
                credited here once, whole, at the step it was computed (with this step's
                preconditioner and target gradient). On the first step this is exactly Adam's update.
                Weight decay is credited to no sample.
    Must be called after the gradients are in p.grad and before opt.step()."""
    if kind == "sgd":
        return {n: lr for n in names}
    group = opt.param_groups[0]
    _, b2 = group["betas"]
    eps, wd = group["eps"], group["weight_decay"]
    out = {}
    for n in names:
        p = params[n]
        st = opt.state.get(p, {})
        t = int(st["step"]) + 1 if "step" in st else 1
        g = p.grad.detach() if p.grad is not None else torch.zeros_like(p)
        if kind == "adam" and wd != 0:
            g = g + wd * p.detach()                    # Adam's L2 term enters the moments
        v_prev = st.get("exp_avg_sq")
        v = (1 - b2) * g * g if v_prev is None else b2 * v_prev + (1 - b2) * g * g
        out[n] = lr / ((v / (1 - b2 ** t)).sqrt() + eps)
    return out


def finish_sums(s1: np.ndarray, s2: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(values, stderr) for values that are SUMS of per-step contributions.

    stderr = counts * (standard error of the mean contribution) = sqrt(counts * var), the spread
    of a sum of `counts` contributions drawn like the observed ones; NaN with fewer than two."""
    _, se = stats_from_sums(s1, s2, counts)
    return s1.copy(), se * counts
