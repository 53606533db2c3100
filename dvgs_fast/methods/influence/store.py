"""factors_dir: the expensive parts of an influence computation kept on disk, reused by later
``fit()`` / ``attribute()`` calls and resumed after a kill (dvgs_fast.runstate: folder lock,
checksummed atomic state files, fingerprints).

Two files per folder (``.rank<r>`` before the suffix under torchrun):

* ``influence_<solver>_checkpoint.pt``: the solver's state -- partial sums and the position in
  the Hessian's data while fitting, then the finished curvature (Hessian, Kronecker factors and
  eigenbases, eigenpairs, norms) -- with the fingerprint of what determines it: the trained
  model (structure and weights), the loss, the Hessian's data, and the settings that enter the
  curvature (solver, Fisher, layers, precision, weight decay, rank, ...). Damping is applied at
  solve time, so one saved curvature serves every damping.
* ``influence_model_checkpoint.pt`` (when the method trains the model): the trained weights,
  fingerprinted by the initial model, the training settings, the seed and the source data, so a
  later call scores the same model without training again.

A fingerprint that differs is refused naming what differs (one ValueError naming factors_dir).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from dvgs_fast import runstate


def _renamed(exc: runstate.CheckpointError) -> ValueError:
    return ValueError(str(exc).replace("checkpoint_dir", "factors_dir").replace("checkpoint of another run",
                                                                                "state of another computation"))


def data_digest(*tensors: torch.Tensor) -> bytes:
    h = runstate.new_hash()
    for t in tensors:
        runstate.update_with_tensor(h, t)
    return h.digest()


def fingerprint(settings: dict[str, Any], model: nn.Module, loss: Any, data: bytes, weights: str) -> dict:
    """The parts a mismatch can name: settings, model structure, `weights` (trained or initial), loss, data."""
    h = runstate.new_hash()
    h.update(data)
    return {"settings": settings, "model structure": runstate.model_structure(model),
            weights: runstate.model_weights(model), "loss": runstate.callable_identity(loss),
            "data": h.hexdigest()}


class FactorStore:
    """One folder, locked for the life of a call (see the module doc)."""

    def __init__(self, directory: str | Path, solver: str, rank: int | None):
        self.files = runstate.CheckpointFiles(Path(directory), rank, method=f"influence_{solver}")
        self.model_files = runstate.CheckpointFiles(Path(directory), rank, method="influence_model")
        self._lock: runstate.DirLock | None = None

    def __enter__(self) -> "FactorStore":
        try:
            self._lock = runstate.DirLock(self.files).acquire()
        except runstate.CheckpointError as exc:
            raise _renamed(exc) from None
        self.files.remove_temporaries()
        return self

    def __exit__(self, *exc) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _read(self, files, fp: dict) -> dict | None:
        try:
            st = runstate.read_state(files)
            if st is not None:
                runstate.compare(st["fingerprint"], fp, files)
        except runstate.CheckpointError as exc:
            raise _renamed(exc) from None
        return st

    def saved_seed(self) -> int | None:
        """The seed of the state in the folder (a call with seed=None continues with it)."""
        for files in (self.files, self.model_files):
            try:
                st = runstate.read_state(files)
            except runstate.CheckpointError as exc:
                raise _renamed(exc) from None
            if st is not None and st.get("seed") is not None:
                return int(st["seed"])
        return None

    def load_curvature(self, fp: dict) -> dict | None:
        st = self._read(self.files, fp)
        return None if st is None else st["curvature"]

    def save_curvature(self, fp: dict, curvature: dict, seed: int) -> None:
        runstate.write_state(self.files.state, {"format": runstate.FORMAT, "fingerprint": fp, "seed": seed,
                                                "curvature": curvature})

    def load_model(self, fp: dict) -> dict | None:
        st = self._read(self.model_files, fp)
        return None if st is None else st["model"]

    def save_model(self, fp: dict, state_dict: dict, seed: int) -> None:
        runstate.write_state(self.model_files.state, {"format": runstate.FORMAT, "fingerprint": fp, "seed": seed,
                                                      "model": state_dict})


__all__ = ["FactorStore", "data_digest", "fingerprint"]
