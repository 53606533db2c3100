"""Map what an original-DVGS script passes (similarity callables, loss criteria, optimizer classes,
the model's reset) onto what the engine knows, or say why it cannot be mapped.

Everything is identified by type/name *and checked numerically* on a small probe before it is
trusted, so a look-alike (a function called ``dot_product`` that computes something else, a
lambda that weights classes) is never silently replaced by something different:

* similarity: ``nn.CosineSimilarity(dim=1)``, ``F.cosine_similarity``, the original's
  ``similarities.dot_product()``, ``scalar_projection()``, ``C_dist(L=2)``, our strings, and any
  callable that computes one of those on random probes -> "cosine" | "dot" | "projection" |
  "distance". The original calls ``similarity(G expanded to [n, P], per-sample grads [n, P])``
  (target first); the probe calls it the same way.
* losses: the engine takes one per-sample criterion ``l_i`` and trains on ``mean_i l_i`` (or,
  for cross-entropy with ``class_weight``, on the weighted mean). The original applies
  ``source_crit`` to each sample alone (a batch of one, under vmap) and trains on
  ``target_crit(batch)``. So the pair maps exactly when, on a probe batch,
  ``target_crit(out, y) == mean_i source_crit(out_i, y_i)``, or ``== sum_i w_{y_i} l_i / sum_i
  w_{y_i}`` with per-sample cross-entropy ``l_i`` (class weights, read off the criterion by
  probing it on pairs of samples). Otherwise the compat layer runs its own loop (see _loop.py).
"""
from __future__ import annotations

import copy
import inspect
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

KINDS = ("cosine", "dot", "projection", "distance")
_ALIASES = {
    "cosine": "cosine", "cosine_similarity": "cosine", "cos": "cosine",
    "dot": "dot", "dot_product": "dot",
    "projection": "projection", "scalar_projection": "projection",
    "distance": "distance", "c_dist": "distance", "negative_distance": "distance",
}
_EPS = 1e-8


# ============================================================================== similarity
def _reference_similarity(kind: str, G: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The four similarities from their definitions; G [n, P] (target rows), g [n, P]."""
    G64, g64 = G.double(), g.double()
    dot = (G64 * g64).sum(1)
    if kind == "cosine":
        return dot / (G64.norm(dim=1) * g64.norm(dim=1)).clamp_min(_EPS)
    if kind == "dot":
        return dot
    if kind == "projection":
        return dot / G64.norm(dim=1).clamp_min(_EPS)
    return -(G64 - g64).norm(dim=1)


def _named_kind(sim: Any) -> str | None:
    """The kind a similarity claims to be by its type or the original's factory name."""
    kind = getattr(sim, "_dvgs_kind", None)
    if kind in KINDS:
        return kind
    if isinstance(sim, nn.CosineSimilarity):
        return "cosine" if sim.dim in (1, -1) else None
    if sim is F.cosine_similarity:
        return "cosine"
    qual = getattr(sim, "__qualname__", "") or ""
    owner = qual.split(".<locals>")[0] if ".<locals>" in qual else ""
    if owner == "dot_product":
        return "dot"
    if owner == "scalar_projection":
        return "projection"
    if owner == "C_dist":
        # C_dist(L, unit_norm): only L=2 without unit_norm is the engine's -|g - G|.
        try:
            nl = inspect.getclosurevars(sim).nonlocals
        except (TypeError, ValueError):
            return None
        if nl.get("L", 2) == 2 and not nl.get("unit_norm", False):
            return "distance"
    return None


def _probe_matches(sim: Callable, kind: str) -> bool:
    """Does sim(G, g) equal the engine's `kind` on random probes (rtol 1e-4: the original's
    C_dist adds PairwiseDistance's eps=1e-6 to the difference, a ~1e-6 relative offset)?"""
    gen = torch.Generator().manual_seed(20240517)
    for n, p in ((5, 7), (3, 33)):
        G = torch.randn(1, p, generator=gen).expand(n, p)
        g = torch.randn(n, p, generator=gen) * torch.rand(n, 1, generator=gen).add(0.2)
        try:
            with torch.no_grad():
                out = sim(G, g)
        except Exception:  # noqa: BLE001 - a callable that cannot take the probe is not this kind
            return False
        if not isinstance(out, torch.Tensor) or out.numel() != n:
            return False
        want = _reference_similarity(kind, G, g)
        if not torch.allclose(out.detach().double().reshape(-1), want, rtol=1e-4, atol=1e-6):
            return False
    return True


def resolve_similarity(similarity: Any) -> str | None:
    """"cosine" | "dot" | "projection" | "distance" for a similarity the engine computes from
    per-layer statistics, None for any other callable (it then runs on per-sample gradients).
    Raises ValueError for an unknown string or a non-callable."""
    if isinstance(similarity, str):
        key = similarity.strip().lower().replace("-", "_").replace(" ", "_")
        if key not in _ALIASES:
            raise ValueError(f"similarity: unknown name {similarity!r}; choose one of "
                             f"{', '.join(repr(k) for k in KINDS)} (or pass a callable)")
        return _ALIASES[key]
    if not callable(similarity):
        raise ValueError(f"similarity: expected a callable sim(G [n, P], g [n, P]) -> [n] or one of "
                         f"{', '.join(repr(k) for k in KINDS)}, got {type(similarity).__name__}")
    named = _named_kind(similarity)
    candidates = [named] if named else list(KINDS)
    for kind in candidates:
        if _probe_matches(similarity, kind):
            return kind
    return None


# ============================================================================== losses
def _is_ce(crit: Any) -> bool:
    if crit is F.cross_entropy:
        return True
    return (isinstance(crit, nn.CrossEntropyLoss) and crit.reduction == "mean"
            and crit.ignore_index == -100 and float(crit.label_smoothing) == 0.0)


def _is_mse(crit: Any) -> bool:
    return crit is F.mse_loss or (isinstance(crit, nn.MSELoss) and crit.reduction == "mean")


def adapt_labels(crit: Callable, y: torch.Tensor | None) -> Callable:
    """A cross-entropy criterion given as a module/function with the original's [N, 1] labels:
    the original's scripts squeeze them inside a lambda; a bare nn.CrossEntropyLoss would reject
    [N, 1] targets, so it gets the squeezed long labels (the module itself is still what runs)."""
    if y is not None and y.dim() == 2 and y.shape[1] == 1 and (_is_ce(crit) or isinstance(crit, nn.CrossEntropyLoss)):
        def crit_n1(out, t, _crit=crit):
            return _crit(out, t.reshape(-1).long())
        crit_n1.__wrapped__ = crit
        return crit_n1
    return crit


def per_sample(crit: Callable) -> Callable:
    """(out [N, ...], y [N, ...]) -> [N]: crit applied to each sample alone, as a batch of one
    (the original's vmap(grad(crit(model(x_i[None]), y_i[None])))). vmap when the criterion
    allows it, else a Python loop (same numbers, slower)."""
    def one(o, t):
        return crit(o.unsqueeze(0), t.unsqueeze(0)).reshape(())

    vm = torch.vmap(one)

    def f(out, y):
        if getattr(f, "loop", False):
            return torch.stack([crit(out[i:i + 1], y[i:i + 1]).reshape(()) for i in range(out.shape[0])])
        return vm(out, y)
    f.loop = False
    f.crit = crit
    return f


def _probe_rows(y: torch.Tensor | None, n: int, classes: torch.Tensor | None, gen: torch.Generator,
                size: int = 48) -> torch.Tensor:
    """Row indices for probing: one row of every class present (so every class weight is seen),
    then random rows."""
    k = min(n, size)
    rows = torch.randperm(n, generator=gen)[:k]
    if classes is not None:
        first = torch.stack([torch.nonzero(y == c)[0, 0] for c in classes])
        rows = torch.cat([first, rows[~torch.isin(rows, first)]])[:max(k, len(first))]
    return rows


class LossPlan:
    """How the criteria run. engine: True -> engine DVGS with `loss` (a string or a per-sample
    callable) and `class_weight`; False -> the compat loop, `reason` says why. `sample_loss` is
    the per-sample source loss either way (labels as the engine / loop receives them)."""

    def __init__(self, engine: bool, loss: Any, class_weight: Any, labels_1d: bool, sample_loss: Callable,
                 target_loss: Callable, reason: str = ""):
        self.engine, self.loss, self.class_weight = engine, loss, class_weight
        self.labels_1d, self.sample_loss, self.target_loss, self.reason = labels_1d, sample_loss, target_loss, reason

    def describe(self) -> str:
        if not self.engine:
            return f"compat loop ({self.reason})"
        name = self.loss if isinstance(self.loss, str) else "per-sample source_crit"
        return f"{name}{', class weights ' + str([round(float(w), 4) for w in self.class_weight]) if self.class_weight is not None else ''}"


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.detach().double().reshape(-1), b.detach().double().reshape(-1)
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=2e-5, atol=1e-6))


def plan_losses(target_crit: Callable, source_crit: Callable, out_shape: tuple[int, ...], dtype: torch.dtype,
                device: torch.device, y_target: torch.Tensor | None, autoencoder: bool) -> LossPlan:
    """Decide how target_crit/source_crit run (see the module docstring). y_target: the target
    labels as the user gave them (None for an autoencoder: y = x). out_shape: the model's output
    shape for one sample. Raises ValueError naming the criterion that fails on the probe."""
    gen = torch.Generator().manual_seed(7331)
    feat = tuple(out_shape)
    y_all = y_target
    classes = None
    y_int = None
    if y_all is not None and not y_all.is_floating_point() and y_all.dtype != torch.bool \
            and y_all.numel() == y_all.shape[0] and len(feat) == 1:
        y_int = y_all.reshape(-1).long()
        if int(y_int.min()) >= 0 and int(y_int.max()) < feat[0]:
            classes = torch.unique(y_int)
        else:
            y_int = None
    n = y_all.shape[0] if y_all is not None else 48
    rows = _probe_rows(y_int, n, classes, gen)
    b = len(rows)
    out = (torch.randn((b, *feat), generator=gen) * 2.0).to(dtype=dtype, device=device)
    if autoencoder:
        y = (torch.randn((b, *feat), generator=gen)).to(dtype=dtype, device=device)
    else:
        y = y_all[rows].to(device)

    tcrit = adapt_labels(target_crit, y_all)
    scrit = adapt_labels(source_crit, y_all)
    try:
        t = tcrit(out, y)
        if not isinstance(t, torch.Tensor) or t.numel() != 1:
            raise ValueError(f"returned {tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}, "
                             f"not a scalar")
    except Exception as exc:
        raise ValueError(f"target_crit: fails on model outputs of shape {(b, *feat)} with targets "
                         f"{tuple(y.shape)}: {type(exc).__name__}: {exc}") from exc
    ps = per_sample(scrit)
    try:
        s = ps(out, y)
    except Exception:  # noqa: BLE001 - vmap cannot run every criterion: fall back to a loop
        ps.loop = True
        try:
            s = ps(out, y)
        except Exception as exc:
            raise ValueError(f"source_crit: fails on one sample (a batch of one, as the original calls it): "
                             f"{type(exc).__name__}: {exc}") from exc
    if s.shape != (b,):
        raise ValueError(f"source_crit: must return a scalar loss for one sample, got {tuple(s.shape)} per sample")

    # Name the per-sample loss by what it computes (so the engine's own fused losses run).
    loss_name = None
    if y_int is not None and _close(s, F.cross_entropy(out, y.reshape(-1).long(), reduction="none")):
        loss_name = "cross_entropy"
    elif y.shape == out.shape and y.is_floating_point() and _close(
            s, (out - y).square().reshape(b, -1).mean(1)):
        loss_name = "mse"

    # 1) the target loss is the mean of the per-sample losses
    if _close(t, s.mean()):
        if loss_name is not None:
            return LossPlan(True, loss_name, None, loss_name == "cross_entropy", ps, tcrit)
        return LossPlan(True, ps, None, False, ps, tcrit)
    # 2) cross-entropy with class weights on the target, plain per-sample cross-entropy on the source
    if loss_name == "cross_entropy" and classes is not None:
        w = _infer_class_weights(tcrit, y_all, classes, feat[0], dtype, device)
        if w is not None:
            yi = y.reshape(-1).long()
            wy = w.to(out.device, torch.float64)[yi]
            if float(wy.sum()) > 0 and _close(t, (wy * s.double()).sum() / wy.sum()):
                return LossPlan(True, "cross_entropy", w, True, ps, tcrit)
    return LossPlan(False, None, None, False, ps, tcrit,
                    reason="target_crit is not the (class-weighted) mean of source_crit per sample")


def _infer_class_weights(tcrit, y_all, classes, n_classes, dtype, device) -> torch.Tensor | None:
    """Class weights w such that tcrit is sum w_y l / sum w_y, read off tcrit on two-sample
    batches (one sample of class c with a small loss, one of a reference class r with a large
    loss: t = (w_c s_c + w_r s_r) / (w_c + w_r) gives w_c / w_r); None if that fails."""
    shape = y_all.shape[1:]
    r = int(classes[0])
    w = torch.ones(n_classes, dtype=torch.float64)
    for c in classes[1:].tolist():
        logits = torch.zeros(2, n_classes, dtype=dtype, device=device)
        logits[0, c] = 3.0                                  # class c, confident and right: small loss
        logits[1, (r + 1) % n_classes] = 3.0                # class r, confident and wrong: large loss
        lab = torch.tensor([c, r], device=device).reshape(2, *shape).to(y_all.dtype)
        try:
            with torch.no_grad():
                t = float(tcrit(logits, lab))
        except Exception:  # noqa: BLE001
            return None
        s = F.cross_entropy(logits.double(), torch.tensor([c, r], device=device), reduction="none")
        sc, sr = float(s[0]), float(s[1])
        den = t - sc
        if abs(den) < 1e-12:
            return None                                     # w_r == 0: cannot anchor on r
        w[c] = (sr - t) / den
    if not bool(torch.isfinite(w).all()) or bool((w < -1e-6).any()):
        return None
    return w.clamp_min(0.0)


# ============================================================================== optimizer, reset
_OPTIMIZERS = {torch.optim.Adam: "adam", torch.optim.AdamW: "adamw", torch.optim.SGD: "sgd"}


def optimizer_name(optim: Any) -> str | None:
    """'adam' | 'adamw' | 'sgd' for the torch classes the engine builds with the same defaults."""
    return _OPTIMIZERS.get(optim)


def reset_model(model: nn.Module) -> None:
    """The original's restart: ``model.reset_parameters()``; a model without one (a plain
    nn.Sequential, which the original would reject) resets every submodule that can."""
    if callable(getattr(model, "reset_parameters", None)):
        model.reset_parameters()
        return
    for m in model.modules():
        if m is not model and callable(getattr(m, "reset_parameters", None)):
            m.reset_parameters()


def _changed_by(model: nn.Module, reset: Callable[[nn.Module], None]) -> set[str]:
    m = copy.deepcopy(model)
    with torch.no_grad():
        for t in list(m.parameters()) + list(m.buffers()):
            t.fill_(1234 if not t.is_floating_point() else 1234.5)
        reset(m)
    named = dict(m.named_parameters())
    named.update(dict(m.named_buffers()))
    return {k for k, t in named.items()
            if t.numel() and not bool((t == (1234 if not t.is_floating_point() else 1234.5)).all())}


def engine_reset_matches(model: nn.Module) -> bool:
    """Does the engine's restart (reset_parameters on every submodule that has it) re-initialise
    exactly the tensors the model's own reset_parameters() does? (Both draw fresh random
    weights; they must touch the same tensors for the restarts to mean the same thing.)"""
    from dvgs_fast._utils import reset_parameters as engine_reset
    return _changed_by(model, reset_model) == _changed_by(model, engine_reset)


__all__ = ["KINDS", "resolve_similarity", "plan_losses", "per_sample", "adapt_labels", "LossPlan",
           "optimizer_name", "reset_model", "engine_reset_matches"]
