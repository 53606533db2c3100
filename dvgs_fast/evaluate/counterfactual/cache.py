"""A ground truth on disk: one folder per fingerprint, its retrains saved block by block.

``cache_dir/<kind>-<key>/`` where ``key`` is a digest of the fingerprint (the settings, the
model's structure and initial weights, the data's bytes), so a different setting lands in
another folder and two runs are never mixed. Inside:

* ``manifest.json``: the fingerprint in full, written when the folder is made and compared on
  every later use (a folder whose manifest differs from its name is refused);
* ``<kind>_block<b>_checkpoint.pt``: the query outputs of block b's retrains, each written
  atomically with a checksum (``write_state``), so a run killed at any moment leaves whole
  blocks only and a rerun computes just the missing ones;
* ``<kind>_warm<s>_checkpoint.pt``: the full-data model of seed s that warm-started retrains
  continue from;
* ``<kind>.lock`` (``.rank<r>`` under torchrun): held while a process computes into the folder.

The checkpoint machinery (fingerprint, atomic checksummed state files, the folder lock) is
``dvgs_fast.runstate``'s, shared with DVGS and TracIn; this module is the only place here that
imports it.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dvgs_fast._io import atomic_write_text
from dvgs_fast import runstate as ckpt


class CacheError(ValueError):
    """The cache folder cannot be used by this run (one line: the folder, what, the way out)."""


def make_fingerprint(kind: str, settings: dict[str, Any], model: nn.Module, loss: str,
                     data_digest: str) -> dict[str, Any]:
    """What determines the ground truth, in parts (a mismatch can say what changed)."""
    fp = ckpt.fingerprint(settings, seed=0, world_size=1, model=model, loss=loss,
                          data_identity=data_digest.encode())
    fp["kind"] = kind
    return json.loads(json.dumps(fp, sort_keys=True, default=str))     # as the manifest stores it


def fingerprint_key(fp: dict[str, Any]) -> str:
    return hashlib.blake2b(json.dumps(fp, sort_keys=True).encode(), digest_size=8).hexdigest()


class GroundTruthCache:
    """The folder of one fingerprint; ``with cache:`` holds its lock."""

    def __init__(self, root: str | Path, kind: str, fingerprint: dict[str, Any], *, rank: int = 0,
                 world_size: int = 1):
        self.kind, self.fingerprint = kind, fingerprint
        self.key = fingerprint_key(fingerprint)
        self.dir = Path(root) / f"{kind}-{self.key}"
        self._files = ckpt.CheckpointFiles(self.dir, rank=None if world_size == 1 else rank, method=kind)
        self._lock = ckpt.DirLock(self._files)

    # ------------------------------------------------------------------ folder
    def __enter__(self) -> "GroundTruthCache":
        try:
            self._lock.acquire()
        except ValueError as exc:              # the lock's own message, in this API's words
            raise CacheError(str(exc).replace("checkpoint_dir", "cache_dir")) from None
        try:
            self._check_manifest()
        except BaseException:
            self._lock.release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._lock.release()

    def _error(self, what: str) -> CacheError:
        return CacheError(f"cache_dir: {self.dir}: {what}")

    def _check_manifest(self) -> None:
        path = self.dir / "manifest.json"
        if path.exists():
            try:
                saved = json.loads(path.read_text())["fingerprint"]
            except (OSError, ValueError, KeyError) as exc:
                raise self._error(f"manifest.json is unreadable ({type(exc).__name__}); delete the folder to "
                                  f"start over") from None
            if saved != self.fingerprint:
                parts = sorted(k for k in set(saved) | set(self.fingerprint) if saved.get(k) != self.fingerprint.get(k))
                raise self._error(f"holds another ground truth (its {', '.join(parts)} differ); delete the folder "
                                  f"or pass another cache_dir")
            return
        atomic_write_text(path, json.dumps({"kind": self.kind, "key": self.key, "fingerprint": self.fingerprint,
                                            "created": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=1, sort_keys=True))

    # ------------------------------------------------------------------ blocks
    def _state_files(self, name: str) -> Any:
        return ckpt.CheckpointFiles(self.dir, method=f"{self.kind}_{name}")

    def _read(self, name: str) -> dict | None:
        files = self._state_files(name)
        try:
            state = ckpt.read_state(files)
        except ValueError as exc:              # unreadable, truncated, checksum mismatch
            raise CacheError(str(exc).replace("checkpoint_dir", "cache_dir")) from None
        if state is not None and (state.get("key") != self.key or state.get("name") != name):
            raise self._error(f"{files.state.name} belongs to another ground truth; delete the folder to start over")
        return state

    def _write(self, name: str, payload: dict) -> None:
        ckpt.write_state(self._state_files(name).state,
                         {"format": ckpt.FORMAT, "key": self.key, "name": name, **payload})

    def load_block(self, b: int, shape: tuple[int, int]) -> np.ndarray | None:
        """Block b's outputs [K, Q], or None when not computed yet."""
        state = self._read(f"block{b:05d}")
        if state is None:
            return None
        out = state["outputs"]
        if tuple(out.shape) != tuple(shape):
            raise self._error(f"block {b} holds outputs of shape {tuple(out.shape)}, expected {tuple(shape)}; "
                              f"delete the folder to start over")
        return out.numpy()

    def save_block(self, b: int, outputs: np.ndarray) -> None:
        self._write(f"block{b:05d}", {"outputs": torch.from_numpy(np.ascontiguousarray(outputs, dtype=np.float64))})

    def load_warm(self, seed: int) -> dict[str, torch.Tensor] | None:
        state = self._read(f"warm{seed}")
        return None if state is None else dict(state["params"])

    def save_warm(self, seed: int, params: dict[str, torch.Tensor]) -> None:
        self._write(f"warm{seed}", {"params": {k: v.detach().to("cpu") for k, v in params.items()}})
