"""Datasets for data valuation experiments: real-data loaders, splits and controlled corruptions.

Every loader returns a :class:`Dataset` (``X`` float32, ``y`` int64, ``feature_names``,
``n_classes``, ``name``, ``meta``). Files are read in place from the folder given as ``root``, else
``$DVGS_FAST_DATA``, else ``<checkout>/../shared/data``, else the download cache
(``$DVGS_FAST_CACHE`` or ``~/.cache/dvgs_fast``); ``download=True`` fetches public files there with
checksum verification.

Loaders: :func:`load_adult`, :func:`load_blog`, :func:`load_cifar10`, :func:`load_cifar10_samples`,
:func:`load_lincs` (GCTX; :class:`GctxReader` streams, :class:`GctxWriter` / :func:`write_gctx`
write), :func:`load_digits`, :func:`load_breast_cancer` (bundled with scikit-learn, no download).
Experiment helpers: :func:`make_split`, :func:`flip_labels`, :func:`add_feature_noise`.
"""
from __future__ import annotations

from ._paths import cache_dir, default_data_root
from .adult import load_adult
from .base import Dataset
from .blog import load_blog
from .cifar10 import load_cifar10, load_cifar10_samples
from .corruption import add_feature_noise, flip_labels
from .download import ChecksumError, DownloadError, fetch, verify_file
from .lincs import GctxReader, GctxWriter, load_lincs, write_gctx
from .sklearn_sets import load_breast_cancer, load_digits
from .split import Split, make_split

# Name -> loader, for command-line tools (``load_dataset("adult", root=...)``).
LOADERS = {
    "adult": load_adult,
    "blog": load_blog,
    "cifar10": load_cifar10,
    "cifar10_samples": load_cifar10_samples,
    "digits": load_digits,
    "breast_cancer": load_breast_cancer,
}


def load_dataset(name: str, **kwargs) -> Dataset:
    """Load a dataset by name (see ``LOADERS``; LINCS needs a path: use :func:`load_lincs`)."""
    key = name.lower().replace("-", "_")
    if key not in LOADERS:
        raise ValueError(f"name: unknown dataset {name!r}; choose one of {', '.join(LOADERS)}")
    return LOADERS[key](**kwargs)


__all__ = ["Dataset", "Split", "load_adult", "load_blog", "load_cifar10", "load_cifar10_samples",
           "load_lincs", "GctxReader", "GctxWriter", "write_gctx", "load_digits",
           "load_breast_cancer", "make_split", "flip_labels", "add_feature_noise", "load_dataset",
           "LOADERS", "DownloadError", "ChecksumError", "fetch", "verify_file", "cache_dir",
           "default_data_root"]
