"""scikit-learn's bundled real datasets: the embedded defaults that need no download.

Both are small real measurements shipped inside scikit-learn (no network): ``digits`` (1,797 8x8
handwritten digit images, 64 features, 10 classes) and ``breast_cancer`` (569 tumours, 30
features, 2 classes: 1 = benign as in scikit-learn). There is no official train/test split
(``meta["n_train"]`` is absent), so :func:`make_split` draws all parts from the whole set.

Scaling (documented choice): ``scale="minmax"`` (default) maps every feature to [0, 1]; for digits
this is close to dividing by 16 (pixel counts 0..16). ``scale="standard"`` standardises to mean 0
/ std 1; ``scale=None`` keeps the raw values. Statistics are computed on the whole set and kept in
``meta["scaling"]``.
"""
from __future__ import annotations

import numpy as np

from .base import Dataset, scale_features


def _wrap(bunch, name: str, scale) -> Dataset:
    X, stats = scale_features(bunch.data, scale)
    raw_names = getattr(bunch, "feature_names", None)  # a numpy array for breast_cancer
    names = [str(n) for n in raw_names] if raw_names is not None else [f"f{i}" for i in range(X.shape[1])]
    y = np.asarray(bunch.target, dtype=np.int64)
    return Dataset(X=X, y=y, feature_names=names, n_classes=int(y.max()) + 1, name=name,
                   meta={"scaling": stats, "class_names": [str(c) for c in bunch.target_names],
                         "source": "scikit-learn bundled data"})


def load_digits(*, scale: str | None = "minmax") -> Dataset:
    """scikit-learn's digits: 1,797 x 64 features in [0, 1] (default), 10 classes."""
    from sklearn.datasets import load_digits as _load
    return _wrap(_load(), "digits", scale)


def load_breast_cancer(*, scale: str | None = "minmax") -> Dataset:
    """scikit-learn's breast cancer (Wisconsin diagnostic): 569 x 30 features in [0, 1], 2 classes."""
    from sklearn.datasets import load_breast_cancer as _load
    return _wrap(_load(), "breast_cancer", scale)
