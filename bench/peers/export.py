"""Write what bench/peers/dattri_attribution.py reads (run from our environment).

    from bench.peers.export import export_task, export_lds_ground_truth
    files = export_task("runs/peers/digits_lr", x_source, y_source, x_query, y_query, [model_at_epoch_k, ...])
    export_lds_ground_truth("runs/peers/digits_lr/lds_gt.npz", gt)

``export_task`` writes data.npz, model.json (the layout) and ck<k>.pt (one state_dict per
checkpoint, in training order) and returns the paths as the runner's arguments.
``export_lds_ground_truth`` writes an LDS ground truth in dattri's format: ``actual`` [M, n_query]
(the seed-averaged outputs) and ``indices`` [M, subset size] (the rows of each subset), so that the
runner's ``--lds-gt`` can score every method with dattri's own ``dattri.metric.lds`` too.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

_ACTIVATIONS = {nn.ReLU: "relu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.GELU: "gelu", nn.Mish: "mish"}


def model_spec(model: nn.Module) -> dict:
    """The layout of an nn.Linear, or an nn.Sequential of Linear layers and plain activations."""
    layers = [model] if isinstance(model, nn.Linear) else list(model) if isinstance(model, nn.Sequential) else None
    if layers is None:
        raise ValueError(f"model: only nn.Linear or nn.Sequential can be exported, got {type(model).__name__}")
    spec = []
    for layer in layers:
        if isinstance(layer, nn.Linear):
            spec.append(["linear", layer.in_features, layer.out_features])
        elif type(layer) in _ACTIVATIONS:
            spec.append([_ACTIVATIONS[type(layer)]])
        else:
            raise ValueError(f"model: layer {type(layer).__name__} has no counterpart in the runner")
    return {"layers": spec}


def export_task(out_dir, x_source, y_source, x_query, y_query, checkpoints: list[nn.Module]) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    arr = {k: np.asarray(v.detach().cpu() if hasattr(v, "detach") else v) for k, v in
           {"x_source": x_source, "y_source": y_source, "x_query": x_query, "y_query": y_query}.items()}
    np.savez(out / "data.npz", x_source=arr["x_source"].astype(np.float32), y_source=arr["y_source"].astype(np.int64),
             x_query=arr["x_query"].astype(np.float32), y_query=arr["y_query"].astype(np.int64))
    (out / "model.json").write_text(json.dumps(model_spec(checkpoints[0])))
    paths = []
    for k, m in enumerate(checkpoints):
        p = out / f"ck{k}.pt"
        torch.save({n: t.detach().to("cpu", torch.float32) for n, t in m.state_dict().items()}, p)
        paths.append(str(p))
    return {"data": str(out / "data.npz"), "model": str(out / "model.json"), "checkpoints": paths}


def export_lds_ground_truth(path, gt) -> None:
    """An LDSGroundTruth in dattri's (target values, indices) form."""
    gt.check_complete("gt")
    indices = np.stack([np.flatnonzero(m) for m in gt.masks])
    np.savez(path, actual=gt.actual, indices=indices)
