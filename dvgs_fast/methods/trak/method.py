"""The base both projected-gradient methods subclass: settings checks and the three entry
points (fit, attribute, featurize) on the shared engine."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from torch import nn

from dvgs_fast import _validation as V
from dvgs_fast.attribution import AttributionMixin, ScoreSink, query_error
from dvgs_fast.gradstore import DTYPES
from dvgs_fast.grads import PROJECTION_KINDS, PROJECTION_STRUCTURES
from dvgs_fast.methods import _grad_training as T
from dvgs_fast.methods.base import Estimate, Run, Valuation
from dvgs_fast.methods.trak import engine


class ProjectedGradientMethod(AttributionMixin, Valuation):
    """Shared settings (see TRAK and LoGraInfluence for what they mean)."""

    #: the constructor's name of the regularisation factor ("regularization" / "damping")
    reg_name: str = ""
    #: whether the training side is weighted by TRAK's out-to-loss Q
    weights_q: bool = False
    #: whether the kernel is the mean over rows, ΦᵀΦ/N (LoGra's Fisher), rather than the sum (TRAK)
    kernel_is_mean: bool = False

    def _common(self, model, loss, epochs, batch_size, lr, optimizer, weight_decay, checkpoints, proj_dim, layer_dims,
                projection, projection_structure, grad_params, store_dir, store_dtype, source_batch_size, distributed):
        self.optimizer, _, self.grad_params = T.check_common(loss, optimizer, "fast", grad_params, model)
        self.model, self.loss = model, loss
        self.epochs = V.check_positive_int(epochs, "epochs", allow_zero=True)
        self.batch_size = V.check_positive_int(batch_size, "batch_size")
        self.lr = V.check_positive_float(lr, "lr")
        self.weight_decay = V.check_positive_float(weight_decay, "weight_decay", allow_zero=True)
        if checkpoints is not None:
            if isinstance(checkpoints, (dict, nn.Module)) or not hasattr(checkpoints, "__len__") or \
                    not len(checkpoints):
                raise ValueError("checkpoints: expected a non-empty list of state dicts (or modules) of the model")
            if epochs:
                raise ValueError("checkpoints: given with epochs > 0; the checkpoints are the models (epochs=0)")
            checkpoints = list(checkpoints)
        if not epochs and checkpoints is None and not isinstance(model, nn.Module):
            raise ValueError("epochs: 0 scores the model as passed, but `model` is a factory (an untrained model); "
                             "pass a trained nn.Module, checkpoints=[...], or epochs > 0")
        # The weights themselves are no setting to print: settings() shows how many there are.
        self.member_weights = checkpoints
        self.checkpoints = None if checkpoints is None else f"{len(checkpoints)} given"
        self.proj_dim = V.check_positive_int(proj_dim, "proj_dim")
        if layer_dims is not None and not isinstance(layer_dims, dict):
            raise ValueError(f"layer_dims: expected None or a dict {{layer name: k or (k_out, k_in)}}, got "
                             f"{type(layer_dims).__name__}")
        self.layer_dims = layer_dims
        self.projection = V.check_choice(projection, "projection", PROJECTION_KINDS)
        self.projection_structure = V.check_choice(projection_structure, "projection_structure",
                                                   PROJECTION_STRUCTURES)
        self.store_dir = None if store_dir is None else Path(store_dir)
        if self.store_dir is not None and self.store_dir.exists() and not self.store_dir.is_dir():
            raise ValueError(f"store_dir: {self.store_dir} exists and is not a folder")
        self.store_dtype = V.check_choice(store_dtype, "store_dtype", tuple(DTYPES))
        self.source_batch_size = V.check_positive_int(source_batch_size, "source_batch_size")
        if distributed is not None and not isinstance(distributed, bool):
            raise ValueError(f"distributed: expected None, True or False, got {distributed!r}")
        self.distributed = distributed

    # ------------------------------------------------------------------------------------------
    @property
    def reg_value(self) -> float:
        return float(getattr(self, self.reg_name))

    def output_function(self, prep) -> Callable:
        """What is differentiated per sample (TRAK: the margin; LoGra: the loss)."""
        return prep.sample_loss

    def _fit(self, x_source, y_source, x_target, y_target, run: Run) -> Estimate:
        return engine.fit(self, x_source, y_source, x_target, y_target, run)

    def _attribute(self, x_source, y_source, x_query, y_query, sink: ScoreSink, run: Run, query_batch_size: int):
        return engine.attribute(self, x_source, y_source, x_query, y_query, sink, run, query_batch_size, query_error)

    def featurize(self, x_source: Any, y_source: Any = None) -> dict:
        """Train (or load) the models and write every member's store of projected training
        gradients into ``store_dir`` -- under torchrun each rank its row range -- so that later
        ``fit`` / ``attribute`` calls with the same settings, data and seed reuse them.
        Returns a description (members, dims, store folders, status, timings)."""
        run = self._new_run(x_source, y_source)
        import torch
        with torch.enable_grad():
            return engine.featurize(self, x_source, y_source, run)


def check_relative(value: Any, name: str) -> float:
    return V.check_positive_float(value, name, allow_zero=True)


__all__ = ["ProjectedGradientMethod", "check_relative"]
