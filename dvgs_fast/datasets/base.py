"""The one return type of every loader, and the feature-scaling helpers they share."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

SCALINGS = ("minmax", "standard", "none")


@dataclass
class Dataset:
    """A loaded dataset.

    X              float32 array, [n_samples, n_features] (images: [n, C, H, W])
    y              int64 class labels [n_samples], or None for unlabelled data (e.g. a GCTX matrix)
    feature_names  list of column names (None for images)
    n_classes      number of classes (0 when ``y`` is None)
    name           short name ("adult", "blog", "cifar10", "lincs", ...)
    meta           everything else. Loaders with an official train/test split put the number of
                   leading training rows in ``meta["n_train"]`` (rows ``[0, n_train)`` are the
                   official training part, the rest the official test part); see
                   :attr:`train_idx`, :attr:`test_idx`, :meth:`train`, :meth:`test`, :meth:`split`.
                   Keys named in ``meta["per_row"]`` hold one value per sample (e.g. sample ids)
                   and are subset along with the rows by :meth:`subset`.
    """

    X: np.ndarray
    y: np.ndarray | None
    feature_names: list[str] | None
    n_classes: int
    name: str
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.X.shape[0])

    @property
    def n_features(self) -> int:
        return int(np.prod(self.X.shape[1:]))

    def __repr__(self) -> str:
        n_train = self.meta.get("n_train")
        extra = f", n_train={n_train}" if n_train is not None else ""
        return (f"Dataset(name={self.name!r}, X={tuple(self.X.shape)}, n_classes={self.n_classes}"
                f"{extra})")

    # ---- official train / test parts -------------------------------------------------------
    @property
    def train_idx(self) -> np.ndarray | None:
        """Row indices of the official training part (None when the source has no such split)."""
        n_train = self.meta.get("n_train")
        return None if n_train is None else np.arange(int(n_train))

    @property
    def test_idx(self) -> np.ndarray | None:
        """Row indices of the official test (held-out) part (None when there is no such split)."""
        n_train = self.meta.get("n_train")
        return None if n_train is None else np.arange(int(n_train), len(self))

    def subset(self, idx: np.ndarray, name: str | None = None) -> "Dataset":
        idx = np.asarray(idx)
        per_row = set(self.meta.get("per_row", ()))
        # Entries listed in meta["per_row"] have one value per sample and follow the rows;
        # the official split sizes no longer apply to a subset.
        meta = {k: (_take_rows(v, idx) if k in per_row else v)
                for k, v in self.meta.items() if k not in ("n_train", "n_test")}
        return replace(self, X=self.X[idx], y=None if self.y is None else self.y[idx],
                       name=name or self.name, meta=meta)

    def train(self) -> "Dataset":
        """The official training part as its own Dataset."""
        if self.train_idx is None:
            raise ValueError(f"dataset {self.name!r} has no official train/test split")
        return self.subset(self.train_idx, f"{self.name}-train")

    def test(self) -> "Dataset":
        """The official test part as its own Dataset."""
        if self.test_idx is None:
            raise ValueError(f"dataset {self.name!r} has no official train/test split")
        return self.subset(self.test_idx, f"{self.name}-test")

    def split(self, n_source: int, n_target: int, n_test: int, seed: int | None = 0):
        """:func:`dvgs_fast.datasets.make_split` with this dataset's official parts."""
        from .split import make_split
        if self.y is None:
            raise ValueError(f"dataset {self.name!r} has no labels to split")
        return make_split(self.X, self.y, n_source, n_target, n_test, seed,
                          train_idx=self.train_idx, heldout_idx=self.test_idx)


def _take_rows(value: Any, idx: np.ndarray) -> Any:
    """Subset a per-row meta entry: an array, or a dict of arrays (e.g. GCTX column metadata)."""
    if isinstance(value, dict):
        return {k: np.asarray(v)[idx] for k, v in value.items()}
    return np.asarray(value)[idx]


def select_split(ds: Dataset, split: str) -> Dataset:
    """Apply a loader's ``split=`` argument ("all", "train" or "test")."""
    if split == "all":
        return ds
    if split == "train":
        return ds.train()
    if split == "test":
        return ds.test()
    raise ValueError(f"split: unknown value {split!r}; choose 'all', 'train' or 'test'")


def scale_features(X: np.ndarray, scale: str | None, name: str = "scale") -> tuple[np.ndarray, dict]:
    """Column-wise scaling in float64, returned as float32 with the statistics used.

    ``minmax`` maps each column to [0, 1]; ``standard`` to mean 0 / std 1. Constant columns
    (range or std 0) become 0 instead of NaN, because a 0/0 would poison every model downstream.
    """
    scale = "none" if scale is None else scale
    if scale not in SCALINGS:
        raise ValueError(f"{name}: unknown value {scale!r}; choose one of {', '.join(map(repr, SCALINGS))}")
    X = np.asarray(X, dtype=np.float64)
    if scale == "none":
        return X.astype(np.float32), {"scale": "none"}
    if scale == "minmax":
        lo = X.min(axis=0)
        rng = X.max(axis=0) - lo
        safe = np.where(rng > 0, rng, 1.0)
        out = np.where(rng > 0, (X - lo) / safe, 0.0)
        return out.astype(np.float32), {"scale": "minmax", "min": lo, "range": rng}
    mu = X.mean(axis=0)
    sd = X.std(axis=0)
    safe = np.where(sd > 0, sd, 1.0)
    out = np.where(sd > 0, (X - mu) / safe, 0.0)
    return out.astype(np.float32), {"scale": "standard", "mean": mu, "std": sd}
