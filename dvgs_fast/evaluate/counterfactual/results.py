"""What a ground truth holds: the actual output of every query under every retrain."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np


@dataclass
class GroundTruth:
    """Shared by both kinds.

    outputs     [n_seeds, n_retrains, n_query] float64: the recorded output (``output``) of each
                query under each retrain, per seed
    done        [n_seeds, n_retrains] bool: which retrains were computed (all, when completed)
    status      "completed", or "stopped" (``stopped_by`` says what: "max_time"); a stopped
                ground truth is refused by the scoring functions -- rerun with the same
                ``cache_dir`` to finish it
    settings    what was asked (the recipe, seeds, sizes); ``info``: the engine, the cache folder;
    timings     wall and CPU seconds, retrains computed and read from the cache
    """

    outputs: np.ndarray
    done: np.ndarray
    seeds: tuple[int, ...]
    output: str
    status: str = "completed"
    stopped_by: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    kind: ClassVar[str] = ""

    @property
    def complete(self) -> bool:
        return self.status == "completed"

    @property
    def n_query(self) -> int:
        return int(self.outputs.shape[2])

    @property
    def n_source(self) -> int:
        return int(self.settings["n_source"])

    @property
    def progress(self) -> str:
        return f"{int(self.done.sum())} of {self.done.size} retrains"

    def check_complete(self, name: str = "gt") -> None:
        if not self.complete:
            raise ValueError(f"{name}: the {self.kind.upper()} ground truth was stopped by {self.stopped_by} after "
                             f"{self.progress}; rerun it with the same cache_dir to finish it")


@dataclass
class LOOGroundTruth(GroundTruth):
    """Leave-one-out retrains. Retrain 0 of each seed trains on every source row (the reference);
    retrain j >= 1 leaves out source row ``indices[j - 1]``."""

    indices: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    kind: ClassVar[str] = "loo"

    @property
    def full_outputs(self) -> np.ndarray:
        """[n_seeds, n_query]: the outputs of the model trained on every row."""
        return self.outputs[:, 0]

    def effects_per_seed(self) -> np.ndarray:
        """[n_seeds, n_query, n_left_out]: output(all rows) - output(without row i), per seed."""
        return np.transpose(self.outputs[:, :1] - self.outputs[:, 1:], (0, 2, 1))

    @property
    def effects(self) -> np.ndarray:
        """[n_query, n_left_out]: the leave-one-out effect averaged over the seeds; positive when
        row ``indices[j]`` raised the query's output (helped it)."""
        return self.effects_per_seed().mean(0)


@dataclass
class LDSGroundTruth(GroundTruth):
    """Retrains on random subsets: retrain m of each seed trains on the rows where ``masks[m]``."""

    masks: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), bool))
    kind: ClassVar[str] = "lds"

    @property
    def actual(self) -> np.ndarray:
        """[n_subsets, n_query]: the output of each query after training on each subset, averaged
        over the seeds."""
        return self.outputs.mean(0)
