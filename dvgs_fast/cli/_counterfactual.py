"""``--metric lds,loo``: attribution quality against retraining, beside the detection metrics.

Per seed, the queries are the first ``--n-query`` rows of the test split (the target set when
there is none); the ground truth retrains the command line's model on random half-subsets of the
source (LDS: ``--lds-subsets``, ``--gt-seeds`` retrain seeds averaged) and without single source
rows (LOO: ``--loo-rows`` rows drawn at random), all with one recipe: Adam, ``--lr`` (1e-3),
``--epochs`` (50), batch 64 -- the training of TracIn, In-Run Data Shapley and grad-dot/cos at
their defaults. Each method with ``attribute()`` is then scored (evaluate.evaluate_attribution);
the others show "-". The ground truth is cached in the output folder (``ground_truth/seed<N>``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ._errors import CLIError, one_line

ATTRIBUTION_METRICS = ("lds", "loo")
DEFAULTS = {"n_query": 100, "lds_subsets": 100, "gt_seeds": 2, "loo_rows": 100, "epochs": 50, "lr": 1e-3,
            "batch_size": 64}


def parse_metrics(text: Any) -> list[str]:
    names = [t.strip().lower() for t in str(text).split(",") if t.strip()]
    bad = [t for t in names if t not in ATTRIBUTION_METRICS]
    if not names or bad:
        raise CLIError(f"--metric: expected a comma-separated list of {', '.join(ATTRIBUTION_METRICS)} (the detection "
                       f"metrics are always reported), got {text!r}")
    return list(dict.fromkeys(names))


@dataclass
class GroundTruths:
    lds: Any
    loo: Any
    x_query: np.ndarray
    y_query: np.ndarray
    recipe: str
    cpu_s: float
    wall_s: float
    reliability: dict


def _reliability(gt) -> float | None:
    """Spearman-Brown reliability of the ground truth's seed average (None with one seed)."""
    from ..evaluate import seed_noise
    if gt is None or len(gt.seeds) < 2:
        return None
    return float(seed_noise(gt).reliability)


def ground_truths(plan, data, preset: dict[str, Any], seed: int, cache_root: Path | None) -> GroundTruths:
    """The LDS / LOO ground truth of this seed's split (retrained as the module docstring says)."""
    import time

    import torch

    from ..evaluate import TrainingRecipe, lds_ground_truth, loo_ground_truth
    from . import _models as M
    metrics, settings = plan.attribution_metrics, plan.settings
    if data.task != "classification":
        raise CLIError("--metric lds/loo: needs a classification dataset (the attributed output is the margin)")
    n_query = int(settings.get("n_query", DEFAULTS["n_query"]))
    pool_x, pool_y = (data.x_test, data.y_test) if data.n_test > 0 else (data.x_target, data.y_target)
    if n_query > pool_x.shape[0]:
        raise CLIError(f"--n-query: {n_query} queries asked, the {'test' if data.n_test else 'target'} split has "
                       f"{pool_x.shape[0]} rows")
    xq, yq = pool_x[:n_query], pool_y[:n_query]
    kind = M.resolve_kind(plan.model_choice, data.task, data.sample_shape, "tracin")
    hidden = settings.get("hidden", M.default_hidden(kind))
    dropout = settings.get("dropout", preset["dropout"])
    arch = M.arch_options(settings)
    factory = M.factory(kind, data.sample_shape, data.n_classes, hidden=hidden, dropout=dropout, **arch)
    epochs, lr = int(settings.get("epochs", DEFAULTS["epochs"])), float(settings.get("lr", DEFAULTS["lr"]))
    recipe = TrainingRecipe(factory, loss="cross_entropy", optimizer="adam", lr=lr, epochs=epochs,
                            batch_size=DEFAULTS["batch_size"])
    desc = (f"{M.describe(kind, data.sample_shape, data.n_classes, hidden, dropout, **arch)}, Adam lr {lr:g}, "
            f"{epochs} epochs, batch {DEFAULTS['batch_size']}")
    seeds = int(settings.get("gt_seeds", DEFAULTS["gt_seeds"]))
    xs = torch.as_tensor(np.asarray(data.x_source, dtype=np.float32).reshape(data.n_source, -1))
    xq_t = torch.as_tensor(np.asarray(xq, dtype=np.float32).reshape(n_query, -1))
    ys, yq_t = torch.as_tensor(np.asarray(data.y_source)), torch.as_tensor(np.asarray(yq))
    common = {"seeds": seeds, "n_classes": data.n_classes, "progress": plan.progress, "subset_seed": seed}
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        lds_gt = loo_gt = None
        if "lds" in metrics:
            plan.status(f"seed {seed}: LDS ground truth ({settings.get('lds_subsets', DEFAULTS['lds_subsets'])} "
                        f"half-subsets x {seeds} seeds of {desc})")
            lds_gt = lds_ground_truth(recipe, xs, ys, xq_t, yq_t,
                                      n_subsets=int(settings.get("lds_subsets", DEFAULTS["lds_subsets"])),
                                      cache_dir=None if cache_root is None else cache_root / f"seed{seed}" / "lds",
                                      **common)
        if "loo" in metrics:
            rows = min(int(settings.get("loo_rows", DEFAULTS["loo_rows"])), data.n_source)
            plan.status(f"seed {seed}: leave-one-out ground truth ({rows} rows x {seeds} seeds)")
            loo_gt = loo_ground_truth(recipe, xs, ys, xq_t, yq_t, indices=rows,
                                      cache_dir=None if cache_root is None else cache_root / f"seed{seed}" / "loo",
                                      **common)
    except ValueError as exc:
        raise CLIError(f"--metric: {one_line(exc)}") from None
    rel = {k: _reliability(g) for k, g in (("lds", lds_gt), ("loo", loo_gt)) if g is not None}
    return GroundTruths(lds_gt, loo_gt, xq, yq, desc, time.process_time() - c0, time.perf_counter() - t0, rel)


def attribution_metrics(name: str, method: Any, data, gts: GroundTruths) -> tuple[dict[str, float], str | None]:
    """(metrics, note): LDS / LOO of one method's attribute() on this seed's split."""
    from ..evaluate import evaluate_attribution
    if not callable(getattr(method, "attribute", None)):
        return {}, f"{name}: no attribute() (pairwise scores), so no LDS / LOO"
    q = evaluate_attribution({name: method}, data.x_source, data.y_source, gts.x_query, gts.y_query,
                             lds_gt=gts.lds, loo_gt=gts.loo)[name]
    if q.error is not None:
        return {}, f"{name}: attribute() failed: {q.error}"
    return {**q.as_metrics(), "attribute_cpu_s": q.cpu_s}, None


__all__ = ["ATTRIBUTION_METRICS", "GroundTruths", "attribution_metrics", "ground_truths", "parse_metrics"]
