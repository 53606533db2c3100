"""UCI Adult (Census Income) with the DVRL feature encoding.

The two original files are read as published: ``adult.data`` (32,561 rows) and ``adult.test``
(16,281 rows; its first line is ``|1x3 Cross validator`` and its labels end with ``.``). Fields
are stripped of the space that follows each comma.

Features, as in DVRL's preprocessing: the 6 numeric columns, then a one-hot block for each of the
8 categorical columns, where a missing value ``?`` is kept as a category of its own (it is
informative: e.g. missing occupation mostly means not working). Category lists are taken from
both files together so train and test share one column layout: 6 + 102 = 108 features. All
columns are then min-max scaled to [0, 1] with statistics of the combined data (as DVRL does; the
scaling only uses feature values, never labels). Label: ``>50K`` -> 1, ``<=50K`` -> 0.
"""
from __future__ import annotations

import os

import numpy as np

from .base import Dataset, scale_features, select_split
from .download import locate

COLUMNS = ["age", "workclass", "fnlwgt", "education", "education-num", "marital-status",
           "occupation", "relationship", "race", "sex", "capital-gain", "capital-loss",
           "hours-per-week", "native-country", "income"]
NUMERIC = ["age", "fnlwgt", "education-num", "capital-gain", "capital-loss", "hours-per-week"]
CATEGORICAL = ["workclass", "education", "marital-status", "occupation", "relationship", "race",
               "sex", "native-country"]
MISSING = "?"


def _read_adult_file(path: os.PathLike) -> list[list[str]]:
    rows: list[list[str]] = []
    with open(path, "r", encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            # Blank lines (the files end with one) and the test file's "|1x3 Cross validator".
            if not line or line.startswith("|"):
                continue
            fields = [f.strip() for f in line.split(",")]
            if len(fields) != len(COLUMNS):
                raise ValueError(f"{path}:{lineno}: expected {len(COLUMNS)} comma-separated fields, "
                                 f"got {len(fields)}; is this an original UCI adult file?")
            fields[-1] = fields[-1].rstrip(".")  # adult.test writes ">50K." / "<=50K."
            rows.append(fields)
    return rows


def encode_adult(rows: list[list[str]], scale: str | None = "minmax"):
    """Rows of 15 string fields -> (X float32 [n, 108], y int64, feature_names, scaling stats)."""
    col = {name: i for i, name in enumerate(COLUMNS)}
    n = len(rows)
    num = np.empty((n, len(NUMERIC)), dtype=np.float64)
    for j, name in enumerate(NUMERIC):
        c = col[name]
        try:
            num[:, j] = [float(r[c]) for r in rows]
        except ValueError as exc:
            raise ValueError(f"adult: non-numeric value in column {name!r}: {exc}") from None
    blocks = [num]
    names = list(NUMERIC)
    for name in CATEGORICAL:
        c = col[name]
        values = np.array([r[c] for r in rows])
        cats, codes = np.unique(values, return_inverse=True)  # sorted categories, "?" included
        onehot = np.zeros((n, len(cats)), dtype=np.float64)
        onehot[np.arange(n), codes] = 1.0
        blocks.append(onehot)
        names.extend(f"{name}={cat}" for cat in cats)
    X = np.concatenate(blocks, axis=1)
    labels = np.array([r[col["income"]] for r in rows])
    bad = ~np.isin(labels, ["<=50K", ">50K"])
    if bad.any():
        raise ValueError(f"adult: unexpected income label(s) {sorted(set(labels[bad]))[:5]}")
    y = (labels == ">50K").astype(np.int64)
    X, stats = scale_features(X, scale)
    return X, y, names, stats


def load_adult(root: str | os.PathLike | None = None, *, split: str = "all", download: bool = False,
               scale: str | None = "minmax") -> Dataset:
    """Load UCI Adult: 48,842 rows x 108 features (train rows first, ``meta["n_train"]`` = 32,561).

    root      folder holding ``adult.data`` and ``adult.test`` (default: ``$DVGS_FAST_DATA``,
              ``../shared/data``, then the download cache)
    split     "all" (train then test rows), "train" or "test"
    download  fetch the two files into the cache (checksum-verified) when not found
    scale     "minmax" (DVRL, default), "standard" or None; fitted on train+test feature values
    """
    data_path, test_path = locate(["adult.data", "adult.test"], root, download=download, dataset="adult")
    train_rows = _read_adult_file(data_path)
    test_rows = _read_adult_file(test_path)
    X, y, names, stats = encode_adult(train_rows + test_rows, scale)
    ds = Dataset(X=X, y=y, feature_names=names, n_classes=2, name="adult",
                 meta={"n_train": len(train_rows), "n_test": len(test_rows),
                       "files": [str(data_path), str(test_path)], "scaling": stats,
                       "label": "income >50K"})
    return select_split(ds, split)
