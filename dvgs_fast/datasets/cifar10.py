"""CIFAR-10 from the standard python pickle batches, and the 20 sample PNGs of the shared data.

``cifar-10-batches-py/`` holds ``data_batch_1..5`` (10,000 images each), ``test_batch`` and
``batches.meta``; each batch is a pickle of a dict with ``b"data"`` (uint8 [10000, 3072], the
1024 red, then green, then blue values of a 32x32 image, row-major) and ``b"labels"``. Each file is
md5-checked against the values published with the archive before it is unpickled, which also
guards against unpickling an arbitrary file.
"""
from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import numpy as np

from ._paths import cache_dir, search_roots
from .base import Dataset
from .download import extract_tar, fetch, verify_file

BATCH_DIR = "cifar-10-batches-py"
ARCHIVE = "cifar-10-python.tar.gz"
ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
# md5 of each member of the official archive.
BATCH_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
    "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
}
TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_BATCHES = ["test_batch"]
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
SAMPLES_DIR = "cifar10_foolbox_samples"
_SAMPLE_RE = re.compile(r"cifar10_(\d+)_(\d)\.png$")


def _find_batch_dir(root, download: bool) -> Path:
    for r in search_roots(root):
        for cand in (r / BATCH_DIR, r):
            if (cand / "test_batch").is_file() and (cand / "data_batch_1").is_file():
                return cand
    # The archive itself placed by hand (the offline route the download error suggests):
    # verify and extract it into the cache rather than insisting on a manual extraction.
    for r in search_roots(root):
        if (r / ARCHIVE).is_file():
            verify_file(r / ARCHIVE, md5=ARCHIVE_MD5)
            extract_tar(r / ARCHIVE, cache_dir(create=True))
            return cache_dir() / BATCH_DIR
    if download:
        archive = fetch(ARCHIVE, progress=True)
        extract_tar(archive, cache_dir())
        return cache_dir() / BATCH_DIR
    looked = ", ".join(str(r) for r in search_roots(root))
    raise FileNotFoundError(
        f"cifar10: folder {BATCH_DIR}/ (data_batch_1..5, test_batch) not found in any of: {looked}. "
        f"Place {ARCHIVE} (md5 {ARCHIVE_MD5}, from https://www.cs.toronto.edu/~kriz/) or its "
        f"extracted {BATCH_DIR}/ folder in one of them, or pass download=True")


def read_batch(path: str | os.PathLike, *, md5: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One pickle batch -> (uint8 images [n, 3, 32, 32], int64 labels [n]).

    ``md5``: checked before unpickling (pass None only for files you created yourself).
    """
    if md5 is not None:
        verify_file(path, md5=md5)
    with open(path, "rb") as fh:
        try:
            d = pickle.load(fh, encoding="bytes")
        except Exception as exc:  # noqa: BLE001 - any unpickling failure means "not a batch"
            raise ValueError(f"{path}: not a CIFAR-10 pickle batch ({exc})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: not a CIFAR-10 pickle batch (got {type(d).__name__})")
    data = d.get(b"data", d.get("data"))
    labels = d.get(b"labels", d.get("labels"))
    if data is None or labels is None:
        raise ValueError(f"{path}: CIFAR-10 batch without 'data'/'labels' entries")
    data = np.asarray(data, dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: data has shape {data.shape}, expected [n, 3072]")
    return data.reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int64)


def load_cifar10(root: str | os.PathLike | None = None, *, split: str = "all", download: bool = False,
                 verify: bool = True, flatten: bool = False, as_uint8: bool = False) -> Dataset:
    """Load CIFAR-10: 60,000 images (50,000 train first, ``meta["n_train"]``), 10 classes.

    X is float32 [n, 3, 32, 32] in [0, 1] (NCHW, ready for torch), or [n, 3072] with
    ``flatten=True``, or the raw uint8 values with ``as_uint8=True``.
    root      folder holding ``cifar-10-batches-py/`` (or that folder itself)
    split     "all", "train" or "test"; only the needed batches are read
    download  fetch and extract the official archive into the cache (md5-checked)
    verify    md5-check every batch file before reading it
    """
    if split not in ("all", "train", "test"):
        raise ValueError(f"split: unknown value {split!r}; choose 'all', 'train' or 'test'")
    folder = _find_batch_dir(root, download)
    names = {"all": TRAIN_BATCHES + TEST_BATCHES, "train": TRAIN_BATCHES, "test": TEST_BATCHES}[split]
    xs, ys = [], []
    for name in names:
        x, y = read_batch(folder / name, md5=BATCH_MD5[name] if verify else None)
        xs.append(x)
        ys.append(y)
    X = np.concatenate(xs)
    if not as_uint8:
        X = X.astype(np.float32) / np.float32(255.0)
    if flatten:
        X = X.reshape(X.shape[0], -1)
    n_train = sum(len(y) for y, n in zip(ys, names) if n in TRAIN_BATCHES)
    meta = {"class_names": list(CLASSES), "folder": str(folder), "layout": "NCHW"}
    if split == "all":
        meta["n_train"] = n_train
        meta["n_test"] = X.shape[0] - n_train
    return Dataset(X=X, y=np.concatenate(ys), feature_names=None, n_classes=10,
                   name="cifar10" if split == "all" else f"cifar10-{split}", meta=meta)


def load_cifar10_samples(root: str | os.PathLike | None = None, *, flatten: bool = False) -> Dataset:
    """The CIFAR-10 test images shipped as PNGs ``cifar10_<index>_<label>.png`` (20 in shared data).

    X float32 [n, 3, 32, 32] in [0, 1], y from the file names, ``meta["indices"]`` the images'
    indices in the CIFAR-10 test set. ``root`` may be the data folder or the PNG folder itself.
    """
    import matplotlib.image as mpimg  # PNG decoding via matplotlib's pillow backend

    folder = None
    for r in search_roots(root):
        for cand in (r / SAMPLES_DIR, r):
            if cand.is_dir() and any(_SAMPLE_RE.search(p.name) for p in cand.iterdir()):
                folder = cand
                break
        if folder is not None:
            break
    if folder is None:
        looked = ", ".join(str(r) for r in search_roots(root))
        raise FileNotFoundError(f"cifar10 samples: no {SAMPLES_DIR}/cifar10_<index>_<label>.png "
                                f"files in any of: {looked}")
    entries = sorted((int(m.group(1)), int(m.group(2)), p) for p in folder.iterdir()
                     if (m := _SAMPLE_RE.search(p.name)))
    images = []
    for idx, _, p in entries:
        img = np.asarray(mpimg.imread(p))
        if img.dtype == np.uint8:
            img = img.astype(np.float32) / 255.0
        if img.ndim != 3 or img.shape[:2] != (32, 32) or img.shape[2] < 3:
            raise ValueError(f"{p}: expected a 32x32 RGB image, got shape {img.shape}")
        images.append(np.transpose(img[:, :, :3], (2, 0, 1)))  # HWC -> CHW, alpha dropped
    X = np.stack(images).astype(np.float32)
    if flatten:
        X = X.reshape(X.shape[0], -1)
    return Dataset(X=X, y=np.array([e[1] for e in entries], dtype=np.int64), feature_names=None,
                   n_classes=10, name="cifar10-samples",
                   meta={"indices": np.array([e[0] for e in entries]), "class_names": list(CLASSES),
                         "folder": str(folder), "layout": "NCHW", "per_row": ["indices"]})


__all__ = ["load_cifar10", "load_cifar10_samples", "read_batch", "CLASSES", "BATCH_MD5",
           "ARCHIVE_MD5"]
