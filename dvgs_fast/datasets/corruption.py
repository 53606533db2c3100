"""Controlled corruptions with ground truth: label flips and per-sample feature noise.

Both are pure functions of their inputs and a seed (a private ``numpy.random.Generator``; the
global numpy state is neither used nor changed), so an experiment is reproducible from its seed.
"""
from __future__ import annotations

import math

import numpy as np


def _rng(seed) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    return np.random.default_rng(seed)


def flip_labels(y, rate: float, seed=0, n_classes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Flip a fraction of the labels, each to a uniformly chosen *different* class.

    The first ``floor(n * rate)`` indices of a random permutation are flipped: exactly that many
    labels change. A flipped label ``c`` becomes ``(c + k) % n_classes`` with ``k`` uniform in
    ``1..n_classes-1``, i.e. uniform over the other classes.

    Returns ``(y_noisy int64 copy, is_corrupted bool array)``; ``y`` is not modified.
    """
    y = np.asarray(y)
    if y.ndim != 1 or y.shape[0] == 0:
        raise ValueError(f"y: expected a non-empty 1-D label array, got shape {y.shape}")
    if y.dtype.kind == "f":
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise ValueError("y: class labels must be integers")
    elif y.dtype.kind not in "iub":
        raise ValueError(f"y: class labels must be integers, got dtype {y.dtype}")
    y = y.astype(np.int64)
    try:
        rate = float(rate)
    except (TypeError, ValueError):
        raise ValueError(f"rate: expected a number in [0, 1], got {rate!r}") from None
    if not (0.0 <= rate <= 1.0):
        raise ValueError(f"rate: must be in [0, 1], got {rate}")
    if n_classes is None:
        n_classes = int(y.max()) + 1
    if isinstance(n_classes, bool) or int(n_classes) != n_classes or n_classes < 2:
        raise ValueError(f"n_classes: need at least 2 classes to flip labels, got {n_classes}")
    n_classes = int(n_classes)
    if y.min() < 0 or y.max() >= n_classes:
        raise ValueError(f"y: labels must be in [0, {n_classes}), found range [{y.min()}, {y.max()}]")
    rng = _rng(seed)
    n = y.shape[0]
    # floor with a tiny tolerance: 0.1 * 1000 is 100.00000000000001 in floating point.
    n_flip = min(n, int(math.floor(n * rate + 1e-9)))
    idx = rng.permutation(n)[:n_flip]
    y_noisy = y.copy()
    y_noisy[idx] = (y[idx] + rng.integers(1, n_classes, size=n_flip)) % n_classes
    is_corrupted = np.zeros(n, dtype=bool)
    is_corrupted[idx] = True
    return y_noisy, is_corrupted


def add_feature_noise(X, max_sigma: float, seed=0) -> tuple[np.ndarray, np.ndarray]:
    """Add Gaussian noise of a per-sample strength: ``x_i + sigma_i * N(0, I)``, ``sigma_i ~ U(0, max_sigma)``.

    Works for any sample shape (tabular rows or images); floating inputs keep their dtype, others
    become float32. Returns ``(X_noisy, sigma float64 [n])``; ``sigma`` is the ground truth noise
    level (larger = more corrupted), e.g. for :func:`dvgs_fast.evaluate.noise_spearman`.
    """
    X = np.asarray(X)
    if X.ndim < 1 or X.shape[0] == 0:
        raise ValueError(f"X: expected a non-empty array of samples, got shape {X.shape}")
    if X.dtype.kind not in "fiub":
        raise ValueError(f"X: expected numeric values, got dtype {X.dtype}")
    dtype = X.dtype if X.dtype.kind == "f" else np.float32
    try:
        max_sigma = float(max_sigma)
    except (TypeError, ValueError):
        raise ValueError(f"max_sigma: expected a number >= 0, got {max_sigma!r}") from None
    if not np.isfinite(max_sigma) or max_sigma < 0:
        raise ValueError(f"max_sigma: must be finite and >= 0, got {max_sigma}")
    rng = _rng(seed)
    n = X.shape[0]
    sigma = rng.uniform(0.0, max_sigma, size=n)
    noise = rng.standard_normal(X.shape)
    scale = sigma.reshape((n,) + (1,) * (X.ndim - 1))
    X_noisy = (X.astype(np.float64) + scale * noise).astype(dtype)
    return X_noisy, sigma
