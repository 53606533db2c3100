"""The files one run keeps in its ``checkpoint_dir``, and the one error type for a folder that
cannot be used.

A ``checkpoint_dir`` holds, per process (``.rank<r>`` before the suffix in a distributed run):

* ``<method>_checkpoint.pt``: the state after the last completed unit of work (model, optimizer,
  RNG states, counters), written atomically with a checksummed header (state_file.py);
* ``<method>_sums.npy`` (and ``<method>_snapshots.npy``): memory-mapped per-sample sums written
  in place (values_store.py), verified against checksums recorded in the state on resume;
* ``<method>.lock``: held by the process using the folder (lock.py).

Each method names its own files (``dvgs_checkpoint.pt``, ``tracin_checkpoint.pt``, ...), so two
methods sharing a folder neither block nor misread each other.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class CheckpointError(ValueError):
    """The checkpoint folder cannot be used by this run (one line: the folder, what, the way out)."""


def checkpoint_error(directory: Path, what: str) -> CheckpointError:
    return CheckpointError(f"checkpoint_dir: {directory}: {what}; delete that folder (or pass another "
                           f"checkpoint_dir) to start over")


@dataclass(frozen=True)
class CheckpointFiles:
    """The paths one process uses in ``directory`` (``rank`` None: a single-process run).

    ``method`` names the files (``dvgs_checkpoint.pt``, ``tracin_checkpoint.pt``, ...) and the
    errors: each method that checkpoints through this module has its own files and lock, so a
    DVGS and a TracIn run sharing a folder neither block nor misread each other."""

    directory: Path
    rank: int | None = None
    method: str = "DVGS"

    def _name(self, stem: str, suffix: str) -> Path:
        return self.directory / (f"{self.method.lower()}{stem}{'' if self.rank is None else f'.rank{self.rank}'}"
                                 f"{suffix}")

    @property
    def state(self) -> Path:
        return self._name("_checkpoint", ".pt")

    @property
    def sums(self) -> Path:
        return self._name("_sums", ".npy")

    @property
    def snapshots(self) -> Path:
        return self._name("_snapshots", ".npy")

    @property
    def lock_path(self) -> Path:
        return self._name("", ".lock")

    def error(self, what: str) -> CheckpointError:
        return checkpoint_error(self.directory, what)

    def remove_temporaries(self) -> None:
        """Temporary state files of a process killed mid-write (atomic_write_bytes names them
        `.<name>.<random>.tmp`); only call while holding the lock, when nobody else writes."""
        for tmp in self.directory.glob(f".{self.state.name}.*.tmp"):
            try:
                tmp.unlink()
            except OSError:
                pass
