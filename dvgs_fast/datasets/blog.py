"""UCI BlogFeedback: predict whether a blog post gets any comment in the next 24 hours.

The archive holds ``blogData_train.csv`` (52,397 rows) and 60 daily test files
``blogData_test-YYYY.MM.DD.HH_MM.csv`` (7,624 rows together); every file has 281 unnamed numeric
columns, the last being the number of comments in the next 24 h. The 280 others are the features;
the label is ``comments > 0`` (as in DVRL). The archive is read in place with :mod:`zipfile`; an
extracted folder works too.
"""
from __future__ import annotations

import io
import os
import re
import zipfile
from pathlib import Path

import numpy as np

from ._paths import search_roots
from .base import Dataset, scale_features, select_split
from .download import fetch_all, locate

N_COLUMNS = 281
TRAIN_NAME = "blogData_train.csv"
_TEST_RE = re.compile(r"blogData_test-[0-9._]+\.csv$")


def _parse_csv(data: bytes, label: str) -> np.ndarray:
    if not data.strip():
        return np.empty((0, N_COLUMNS))
    arr = np.loadtxt(io.BytesIO(data), delimiter=",", dtype=np.float64, ndmin=2)
    if arr.shape[1] != N_COLUMNS:
        raise ValueError(f"{label}: expected {N_COLUMNS} columns, got {arr.shape[1]}")
    return arr


def _read_zip(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise ValueError(f"{path}: not a readable zip archive ({exc})") from None
    with zf:
        names = zf.namelist()
        # Members may sit in a sub-folder depending on who zipped them; match on the base name.
        train = [n for n in names if n.rsplit("/", 1)[-1] == TRAIN_NAME]
        tests = sorted((n for n in names if _TEST_RE.search(n.rsplit("/", 1)[-1])),
                       key=lambda n: n.rsplit("/", 1)[-1])
        if not train or not tests:
            raise ValueError(f"{path}: expected {TRAIN_NAME} and blogData_test-*.csv members")
        tr = _parse_csv(zf.read(train[0]), f"{path}!{train[0]}")
        te = np.concatenate([_parse_csv(zf.read(n), f"{path}!{n}") for n in tests])
    return tr, te, [n.rsplit("/", 1)[-1] for n in tests]


def _read_folder(folder: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    tests = sorted(p for p in folder.iterdir() if _TEST_RE.search(p.name))
    if not tests:
        raise ValueError(f"{folder}: no blogData_test-*.csv files beside {TRAIN_NAME}")
    tr = _parse_csv((folder / TRAIN_NAME).read_bytes(), str(folder / TRAIN_NAME))
    te = np.concatenate([_parse_csv(p.read_bytes(), str(p)) for p in tests])
    return tr, te, [p.name for p in tests]


def _find_blog(root, download: bool) -> Path:
    """The zip, or a folder holding the extracted CSVs (zip preferred, it is what UCI ships)."""
    for r in search_roots(root):
        if (r / "BlogFeedback.zip").is_file():
            return r / "BlogFeedback.zip"
        for sub in (r, r / "BlogFeedback"):
            if (sub / TRAIN_NAME).is_file():
                return sub
    if download:
        return fetch_all(["BlogFeedback.zip"])[0]
    return locate(["BlogFeedback.zip"], root, download=False, dataset="blog")[0]  # raises


def load_blog(root: str | os.PathLike | None = None, *, split: str = "all", download: bool = False,
              scale: str | None = "minmax") -> Dataset:
    """Load BlogFeedback: 60,021 rows x 280 features (train rows first, ``meta["n_train"]`` = 52,397).

    root      folder holding ``BlogFeedback.zip`` (or the extracted CSVs, directly or in a
              ``BlogFeedback/`` sub-folder)
    split     "all", "train" or "test" (test = the 60 daily files in date order)
    download  fetch the zip into the cache (checksum-verified) when not found
    scale     "minmax" (default, as DVRL), "standard" or None; fitted on train+test features
    """
    src = _find_blog(root, download)
    tr, te, test_files = _read_zip(src) if src.is_file() else _read_folder(src)
    raw = np.concatenate([tr, te])
    comments = raw[:, -1]
    X, stats = scale_features(raw[:, :-1], scale)
    y = (comments > 0).astype(np.int64)
    ds = Dataset(X=X, y=y, feature_names=[f"f{i}" for i in range(N_COLUMNS - 1)], n_classes=2,
                 name="blog", meta={"n_train": int(tr.shape[0]), "n_test": int(te.shape[0]),
                                    "source": str(src), "test_files": test_files, "scaling": stats,
                                    "comments_24h": comments.astype(np.float32),
                                    "per_row": ["comments_24h"],
                                    "label": "comments in next 24h > 0"})
    return select_split(ds, split)
