"""Label-corruption tasks the tests share: a split of a dataset with 20% of the source labels flipped.

One place for "split, then flip" so the detection tests of every method build their task alike
(each keeps its own sizes and seeds, hence its own numbers)."""
from __future__ import annotations

from dvgs_fast.datasets import flip_labels, load_breast_cancer, make_split


def flipped_task(n_source: int, n_target: int, n_test: int = 0, *, split_seed: int, flip_seed: int,
                 ds=None, rate: float = 0.2, **split_kw):
    """(x_source, noisy y_source, x_target, y_target, is_flipped); breast_cancer unless `ds`."""
    ds = load_breast_cancer() if ds is None else ds
    sp = make_split(ds.X, ds.y, n_source, n_target, n_test, seed=split_seed, **split_kw)
    y_noisy, flipped = flip_labels(sp.y_source, rate, seed=flip_seed)
    return sp.x_source, y_noisy, sp.x_target, sp.y_target, flipped
