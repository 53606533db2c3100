"""Datasets for the command line: names, per-dataset defaults, loading, splitting and corruption.

Everything a run needs from a dataset ends up in one :class:`RunData`: the source set (the one
being valued, corrupted on purpose so the valuation can be scored), the clean target set, a test
set for removal curves, and the ground truth of the corruption.
"""
from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._errors import CLIError, one_line

DATASETS = ("digits", "breast_cancer", "adult", "blog", "cifar10", "lincs")
DATASET_HELP = "digits | breast_cancer | adult | blog | cifar10 | lincs | lincs:FILE.gctx | csv:FILE.csv"
LINCS_DEFAULT_FILE = "lincs/modzs_n272x978.gctx"

# Defaults per dataset. n_test None = all rows left over (capped at max_test). `dvgs` holds the DVGS
# settings used when the method is dvgs and nothing else sets them; `dropout` the default MLP's.
PRESETS: dict[str, dict[str, Any]] = {
    # The bundled default run: must finish in well under a minute on 2 CPU cores.
    "digits": {"n_source": 1000, "n_target": 300, "noise": "label:0.2", "dropout": 0.2,
               "dvgs": {"epochs": 20, "lr": 3e-3, "target_batch_size": 100, "restarts": 1}},
    "breast_cancer": {"n_source": 300, "n_target": 100, "noise": "label:0.2", "dropout": 0.2,
                      "dvgs": {"epochs": 50, "lr": 3e-3, "target_batch_size": 100, "restarts": 1}},
    # DVGS paper, Adult experiment: 1000 source / 400 target, MLP 100-100 with Mish and dropout
    # 0.5, Adam lr 1e-3, 100 epochs x 3 restarts, target batch 500, balanced class weights.
    "adult": {"n_source": 1000, "n_target": 400, "max_test": 2000, "noise": "label:0.2", "dropout": 0.5,
              "dvgs": {"epochs": 100, "lr": 1e-3, "target_batch_size": 500, "restarts": 3,
                       "class_weight": "balanced"}},
    "blog": {"n_source": 1000, "n_target": 400, "max_test": 2000, "noise": "label:0.2", "dropout": 0.5,
             "dvgs": {"epochs": 100, "lr": 1e-3, "target_batch_size": 500, "restarts": 3,
                      "class_weight": "balanced"}},
    "cifar10": {"n_source": 1000, "n_target": 400, "max_test": 1000, "noise": "label:0.2", "dropout": 0.2,
                "dvgs": {"epochs": 30, "lr": 1e-3, "target_batch_size": 100, "restarts": 1}},
    # Only the 20 sample PNGs: a demonstration that the image path works, not a benchmark.
    "cifar10_samples": {"n_source": 12, "n_target": 8, "noise": "label:0.2", "dropout": 0.0,
                        "dvgs": {"epochs": 20, "lr": 1e-3, "target_batch_size": 8, "restarts": 1}},
    # LINCS has no labels: an autoencoder, values by reconstruction-gradient similarity, feature
    # noise as the ground truth.
    "lincs": {"n_source": 150, "n_target": 60, "noise": "feature:3.0", "dropout": 0.0,
              "dvgs": {"epochs": 20, "lr": 1e-3, "target_batch_size": 30, "restarts": 1}},
    # Your own data: nothing is corrupted on purpose, the sizes come from the file (csv_sizes).
    "csv": {"n_source": None, "n_target": None, "max_test": 2000, "noise": "none", "dropout": 0.2,
            "dvgs": {"epochs": 50, "lr": 1e-3, "target_batch_size": 128, "restarts": 1}},
}


# ---------------------------------------------------------------------------------------------
# parsing
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DatasetSpec:
    kind: str                 # one of DATASETS or "csv"
    path: Path | None = None  # csv:PATH / lincs:PATH

    @property
    def label(self) -> str:
        return f"{self.kind}:{self.path}" if self.path is not None else self.kind


def parse_dataset(text: str) -> DatasetSpec:
    if not isinstance(text, str) or not text.strip():
        raise CLIError(f"--dataset: expected one of {DATASET_HELP}, got {text!r}")
    text = text.strip()
    kind, sep, rest = text.partition(":")
    kind = kind.lower().replace("-", "_")
    if sep:
        if kind not in ("csv", "lincs"):
            raise CLIError(f"--dataset: only csv: and lincs: take a file (csv:PATH, lincs:PATH), got {text!r}")
        if not rest:
            raise CLIError(f"--dataset: {kind}: needs a file name, e.g. {kind}:data.{'csv' if kind == 'csv' else 'gctx'}")
        return DatasetSpec(kind, Path(rest).expanduser())
    if kind == "csv":
        raise CLIError("--dataset: csv needs a file: --dataset csv:PATH")
    if kind not in DATASETS:
        raise CLIError(f"--dataset: unknown dataset {text!r}; choose one of {DATASET_HELP}")
    return DatasetSpec(kind)


@dataclass(frozen=True)
class Noise:
    kind: str          # "label", "feature" or "none"
    level: float = 0.0

    @property
    def label(self) -> str:
        return "none" if self.kind == "none" else f"{self.kind}:{self.level:g}"

    def describe(self) -> str:
        if self.kind == "label":
            return f"{self.level:.0%} flipped labels"
        if self.kind == "feature":
            return f"Gaussian feature noise, sigma ~ U(0, {self.level:g})"
        return "no corruption"


def parse_target(text: str) -> Path:
    """--target csv:FILE.csv (or a path ending in .csv): a clean target set of the user's own."""
    if not isinstance(text, str) or not text.strip():
        raise CLIError(f"--target: expected csv:FILE.csv, got {text!r}")
    t = text.strip()
    kind, sep, rest = t.partition(":")
    if sep and kind.lower() == "csv":
        if not rest:
            raise CLIError("--target: csv: needs a file name, e.g. --target csv:clean.csv")
        return Path(rest).expanduser()
    if t.lower().endswith(".csv"):
        return Path(t).expanduser()
    raise CLIError(f"--target: expected csv:FILE.csv (a clean set with the columns of --dataset), got {text!r}")


def parse_noise(text: str) -> Noise:
    if not isinstance(text, str):
        raise CLIError(f"--noise: expected label:RATE, feature:SIGMA or none, got {text!r}")
    t = text.strip().lower()
    if t in ("none", "0", ""):
        return Noise("none")
    kind, sep, level = t.partition(":")
    if kind not in ("label", "feature") or not sep:
        raise CLIError(f"--noise: expected label:RATE (e.g. label:0.2), feature:SIGMA (e.g. feature:3.0) "
                       f"or none, got {text!r}")
    try:
        v = float(level)
    except ValueError:
        raise CLIError(f"--noise: {kind}: needs a number, got {level!r}") from None
    if kind == "label" and not (0.0 < v < 1.0):
        raise CLIError(f"--noise: the label flip rate must be in (0, 1), got {level}")
    if kind == "feature" and not (math.isfinite(v) and v > 0.0):
        raise CLIError(f"--noise: the feature noise sigma must be > 0, got {level}")
    return Noise(kind, v)


# ---------------------------------------------------------------------------------------------
# data root
# ---------------------------------------------------------------------------------------------
def resolve_data_root(arg: str | None) -> Path | None:
    """--data-root, else $DVGS_FAST_DATA, else ./../shared/data, else the checkout's shared data."""
    if arg is not None:
        p = Path(arg).expanduser()
        if not p.is_dir():
            raise CLIError(f"--data-root: folder {p} does not exist; create it and place the data files "
                           f"there, or point --data-root at the folder holding them")
        return p
    env = os.environ.get("DVGS_FAST_DATA")
    if env:
        p = Path(env).expanduser()
        if not p.is_dir():
            raise CLIError(f"$DVGS_FAST_DATA: folder {p} does not exist; fix the variable or pass --data-root DIR")
        return p
    p = Path("..") / "shared" / "data"
    if p.is_dir():
        return p.resolve()
    from ..datasets import default_data_root
    return default_data_root()


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------
@dataclass
class Loaded:
    """A loaded dataset before splitting (X: [n, ...] float32; y: int64 or None)."""

    X: np.ndarray
    y: np.ndarray | None
    n_classes: int
    preset: str
    name: str
    train_idx: np.ndarray | None = None
    heldout_idx: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    class_names: list[str] | None = None   # label code -> the file's own label (csv)


def _cli_hint(msg: str) -> str:
    # Loader messages are written for the Python API; say it the command line's way.
    return (msg.replace("pass download=True", "pass --download")
               .replace("download=True", "--download")
               .replace("root= a folder", "--data-root a folder")
               .replace("root= /", "--data-root / "))


def load(spec: DatasetSpec, root: Path | None, *, download: bool = False,
         label_column: str | None = None) -> Loaded:
    from .. import datasets as D
    try:
        if spec.kind in ("digits", "breast_cancer"):
            ds = D.load_digits() if spec.kind == "digits" else D.load_breast_cancer()
            return Loaded(ds.X, ds.y, ds.n_classes, spec.kind, spec.kind, files=["scikit-learn bundled data"])
        if spec.kind in ("adult", "blog"):
            loader = D.load_adult if spec.kind == "adult" else D.load_blog
            ds = loader(root, download=download)
            return Loaded(ds.X, ds.y, ds.n_classes, spec.kind, spec.kind, ds.train_idx, ds.test_idx,
                          files=[str(f) for f in ds.meta.get("files", [])])
        if spec.kind == "cifar10":
            return _load_cifar(root, download)
        if spec.kind == "lincs":
            return _load_lincs(spec, root)
        if spec.kind == "csv":
            return _load_csv(spec.path, label_column)
    except CLIError:
        raise
    except FileNotFoundError as exc:
        raise CLIError(_cli_hint(one_line(exc))) from None
    except (ValueError, OSError, KeyError) as exc:
        # DownloadError / ChecksumError are OSErrors; corrupt files are ValueErrors naming the path.
        raise CLIError(_cli_hint(one_line(exc))) from None
    raise CLIError(f"--dataset: unknown dataset {spec.label!r}")  # pragma: no cover


def _load_cifar(root: Path | None, download: bool) -> Loaded:
    from .. import datasets as D
    try:
        ds = D.load_cifar10(root, download=download)
        return Loaded(ds.X, ds.y, 10, "cifar10", "cifar10", ds.train_idx, ds.test_idx,
                      files=[ds.meta.get("folder", "")])
    except FileNotFoundError as full_missing:
        try:
            ds = D.load_cifar10_samples(root)
        except FileNotFoundError:
            raise CLIError(_cli_hint(one_line(full_missing)) + " (the 20 sample PNGs of "
                           "cifar10_foolbox_samples/ were not found either)") from None
        note = (f"only the {len(ds)} CIFAR-10 sample PNGs were found ({ds.meta['folder']}); for the full "
                f"set place cifar-10-batches-py/ in the data root or pass --download")
        return Loaded(ds.X, ds.y, 10, "cifar10_samples", "cifar10 (samples)", notes=[note],
                      files=[ds.meta["folder"]])


def _load_lincs(spec: DatasetSpec, root: Path | None) -> Loaded:
    from ..datasets import load_lincs
    if spec.path is not None:
        path = spec.path
    else:
        if root is None:
            raise CLIError(f"lincs: no data folder found; place {LINCS_DEFAULT_FILE} in a folder and pass "
                           f"--data-root DIR (or set $DVGS_FAST_DATA), or give a file: --dataset lincs:FILE.gctx")
        path = root / LINCS_DEFAULT_FILE
    if not path.exists():
        raise CLIError(f"lincs: GCTX file {path} not found; place it there, or name another file with "
                       f"--dataset lincs:FILE.gctx")
    try:
        import h5py  # noqa: F401
    except ImportError:
        raise CLIError("lincs: reading GCTX files needs h5py: pip install h5py") from None
    try:
        # z-scored per gene over every sample of the file, before the split and the noise: the
        # original's lincs_setup.sh runs lincs_preproc.py --zscore over all its signatures, and
        # its feature noise (sigma ~ U(0, 5) in exp8) is sized for unit-variance genes. Level 4
        # files (robust z-scores per plate) have gene sds of 1-4 and nonzero means without it.
        ds = load_lincs(path, landmark_only=True, zscore=True, fill_missing=0.0, col_meta_fields=[])
    except Exception as exc:  # noqa: BLE001 - h5py raises a zoo of types for damaged files
        msg = one_line(exc)
        raise CLIError(f"lincs: {msg}" if str(path) in msg else f"lincs: cannot read {path}: {msg}") from None
    X = np.nan_to_num(np.asarray(ds.X, dtype=np.float32), nan=0.0)
    note = (f"{X.shape[0]} samples x {X.shape[1]} landmark genes, z-scored per gene over the file "
            f"(as the original's lincs_preproc.py --zscore)")
    return Loaded(X, None, 0, "lincs", f"lincs ({path.name})", files=[str(path)], notes=[note])


_DELIMITERS = ",;\t|"
_DELIM_NAMES = {",": "','", ";": "';'", "\t": "tab", "|": "'|'"}


@dataclass
class CsvTable:
    """A CSV file as read: float64 features, the label column's cells, and where they came from."""

    path: Path
    header: list[str]
    label_name: str
    feature_names: list[str]
    X: np.ndarray               # [rows, features] float64
    labels: list[str]           # canonical label text per row (numbers as numbers: 1 == 1.0)
    lines: np.ndarray           # file line number of each row (for messages)
    delimiter: str


def _sniff_delimiter(path: Path, sample: str) -> str:
    """The delimiter of a CSV file: csv.Sniffer over the first lines, else the candidate that
    splits the header into the most fields; an error saying what was seen when none does."""
    try:
        return csv.Sniffer().sniff(sample, delimiters=_DELIMITERS).delimiter
    except csv.Error:
        pass
    first = next((ln for ln in sample.splitlines() if ln.strip()), "")
    counts = {d: first.count(d) for d in _DELIMITERS}
    best = max(counts, key=counts.get)
    if counts[best] == 0:
        shown = first if len(first) <= 60 else first[:57] + "..."
        raise CLIError(f"{path}: found no delimiter (',', ';', tab or '|') in the header line {shown!r}; "
                       f"a CSV needs a header of feature columns and a label column")
    return best


def _canonical_label(text: str) -> str:
    """Label cells that are numbers compare as numbers: '1', '1.0' and ' 1 ' are one class."""
    t = text.strip()
    try:
        f = float(t)
    except ValueError:
        return t
    if not math.isfinite(f):
        return t
    return str(int(f)) if f.is_integer() and abs(f) < 2 ** 53 else repr(f)


def _line_list(lines, limit: int = 8) -> str:
    shown = ", ".join(str(int(x)) for x in lines[:limit])
    return shown + (f", ... ({len(lines)} rows)" if len(lines) > limit else "")


def read_csv_table(path: Path | None, label_column: str | None, *, flag: str = "--dataset") -> CsvTable:
    """Read a CSV with a header: delimiter detected, features numeric, labels non-blank."""
    if path is None or not path.is_file():
        raise CLIError(f"{flag} csv:{path}: file not found")
    try:
        with open(path, newline="", encoding="utf-8-sig", errors="replace") as fh:
            sample = fh.read(65536)
            delim = _sniff_delimiter(path, sample)
            fh.seek(0)
            rd = csv.reader(fh, delimiter=delim)
            rows, lines = [], []
            for r in rd:
                if r and any(c.strip() for c in r):
                    rows.append(r)
                    lines.append(rd.line_num)
    except OSError as exc:
        raise CLIError(f"{flag} csv:{path}: cannot read it: {one_line(exc)}") from None
    if len(rows) < 2:
        raise CLIError(f"{path}: needs a header line and at least one data row")
    header = [h.strip() for h in rows[0]]
    body, body_lines = rows[1:], lines[1:]
    width = len(header)
    seen = f"delimiter {_DELIM_NAMES[delim]}"
    if width < 2:
        raise CLIError(f"{path}: the header {rows[0]!r} has one column ({seen}); a CSV needs feature columns "
                       f"and a label column separated by ',', ';', tab or '|'")
    for r, ln in zip(body, body_lines):
        if len(r) != width:
            raise CLIError(f"{path}:{ln}: {len(r)} fields but the header has {width} ({seen})")
    if label_column is None:
        li = width - 1
    elif label_column in header:
        li = header.index(label_column)
    else:
        raise CLIError(f"--label-column: {label_column!r} is not a column of {path} (columns: "
                       f"{', '.join(header[:10])}{', ...' if width > 10 else ''})")
    feat_cols = [j for j in range(width) if j != li]
    X = np.empty((len(body), len(feat_cols)), dtype=np.float64)
    for k, j in enumerate(feat_cols):
        col = X[:, k]
        for i, r in enumerate(body):
            try:
                col[i] = float(r[j])
            except ValueError:
                cell = r[j].strip()
                what = "is blank" if not cell else f"is not a number ({cell[:30]!r})"
                raise CLIError(f"{path}:{body_lines[i]}: column {header[j]!r} {what}; features must be numeric "
                               f"(convert the column, fill the cell, or drop the row/column)") from None
        bad = ~np.isfinite(col)
        if bad.any():
            ln = np.asarray(body_lines)[bad]
            raise CLIError(f"{path}: column {header[j]!r} holds NaN/Inf on line(s) {_line_list(ln)}; "
                           f"fill or drop those rows")
    raw = [r[li].strip() for r in body]
    blank = [ln for v, ln in zip(raw, body_lines) if not v]
    if blank:
        raise CLIError(f"{path}: the label column {header[li]!r} is blank on line(s) {_line_list(blank)}; "
                       f"fill in the labels or drop those rows")
    return CsvTable(path=path, header=header, label_name=header[li], feature_names=[header[j] for j in feat_cols],
                    X=X, labels=[_canonical_label(v) for v in raw], lines=np.asarray(body_lines), delimiter=delim)


def _load_csv(path: Path, label_column: str | None) -> Loaded:
    return _csv_loaded(read_csv_table(path, label_column))


def _classes(tables: list[CsvTable]) -> list[str]:
    classes = sorted({v for t in tables for v in t.labels}, key=_natural_key)
    t0 = tables[0]
    if len(classes) < 2:
        raise CLIError(f"{t0.path}: label column {t0.label_name!r} has only one class ({classes[0]!r})")
    n = sum(len(t.labels) for t in tables)
    if len(classes) > max(50, n // 5):
        raise CLIError(f"{t0.path}: label column {t0.label_name!r} has {len(classes)} distinct values; the csv "
                       f"dataset expects class labels (pick another column with --label-column)")
    return classes


def _csv_loaded(tab: CsvTable, classes: list[str] | None = None, scale_with: np.ndarray | None = None) -> Loaded:
    classes = _classes([tab]) if classes is None else classes
    code = {c: i for i, c in enumerate(classes)}
    y = np.array([code[v] for v in tab.labels], dtype=np.int64)
    from ..datasets.base import scale_features
    if scale_with is None:
        Xs, _ = scale_features(tab.X, "minmax")
    else:
        Xs = _minmax_like(tab.X, scale_with)
    notes = [f"label column {tab.label_name!r}: classes {', '.join(classes[:10])}{' ...' if len(classes) > 10 else ''}"]
    if tab.delimiter != ",":
        notes.append(f"{tab.path.name}: delimiter {_DELIM_NAMES[tab.delimiter]} (detected)")
    ld = Loaded(np.asarray(Xs, dtype=np.float32), y, len(classes), "csv", f"csv ({tab.path.name})",
                notes=notes, files=[str(tab.path)])
    ld.class_names = list(classes)
    return ld


def _minmax_like(X: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Min-max scale X with the column range of ref (constant columns -> 0), as scale_features."""
    lo = ref.min(axis=0)
    rng = ref.max(axis=0) - lo
    return np.where(rng > 0, (X - lo) / np.where(rng > 0, rng, 1.0), 0.0)


def load_csv_pair(src_path: Path, tgt_path: Path, label_column: str | None) -> tuple[Loaded, Loaded]:
    """The user's data and their clean target set (--target csv:FILE): same columns, one class
    coding over both files, min-max scaling fitted on both (so neither leaves [0, 1])."""
    src = read_csv_table(src_path, label_column)
    tgt = read_csv_table(tgt_path, src.label_name if label_column is None else label_column, flag="--target")
    if label_column is None and tgt.header[-1] != src.label_name:
        raise CLIError(f"--target: the label column of {src_path} is its last column {src.label_name!r}, but "
                       f"{tgt_path} ends with {tgt.header[-1]!r}; give both files the same columns (or name the "
                       f"label with --label-column)")
    if set(tgt.header) != set(src.header) or len(tgt.header) != len(src.header):
        missing = [h for h in src.header if h not in tgt.header]
        extra = [h for h in tgt.header if h not in src.header]
        raise CLIError(f"--target: {tgt_path} must have the columns of {src_path}"
                       f"{'; missing: ' + ', '.join(missing[:8]) if missing else ''}"
                       f"{'; not in the data: ' + ', '.join(extra[:8]) if extra else ''}")
    order = [tgt.feature_names.index(f) for f in src.feature_names]   # same names, maybe reordered
    tgt.X = tgt.X[:, order]
    tgt.feature_names = list(src.feature_names)
    classes = _classes([src, tgt])
    both = np.concatenate([src.X, tgt.X], axis=0)
    ld_src = _csv_loaded(src, classes, both)
    ld_tgt = _csv_loaded(tgt, classes, both)
    only_tgt = sorted(set(tgt.labels) - set(src.labels), key=_natural_key)
    if only_tgt:
        ld_src.notes.append(f"--target: classes {', '.join(only_tgt[:10])} occur only in {tgt_path.name}")
    return ld_src, ld_tgt


def _natural_key(s: str):
    try:
        return (0, float(s), s)
    except ValueError:
        return (1, 0.0, s)


# ---------------------------------------------------------------------------------------------
# splitting and corruption
# ---------------------------------------------------------------------------------------------
@dataclass
class RunData:
    name: str
    preset: str
    task: str                      # "classification" or "reconstruction"
    n_classes: int
    x_source: np.ndarray
    y_source: np.ndarray | None    # as valued (noisy when label noise)
    y_source_clean: np.ndarray | None
    x_target: np.ndarray
    y_target: np.ndarray | None
    x_test: np.ndarray
    y_test: np.ndarray | None
    idx_source: np.ndarray         # rows of the loaded dataset
    noise: Noise
    is_corrupted: np.ndarray | None
    sigma: np.ndarray | None
    notes: list[str]
    files: list[str]
    class_names: list[str] | None = None
    target_file: str | None = None     # --target: the clean target came from this file

    @property
    def n_source(self) -> int:
        return int(self.x_source.shape[0])

    @property
    def n_target(self) -> int:
        return int(self.x_target.shape[0])

    @property
    def n_test(self) -> int:
        return int(self.x_test.shape[0])

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.x_source.shape[1:])


def csv_sizes(n_rows: int, n_source: int | None, n_target: int | None, n_test: int | None) -> tuple[int, int]:
    """(n_source, n_target) for --dataset csv:FILE without --target, sizes not given taken from the
    file: a fifth of the rows as the target set (at most 1000), a fifth kept for the removal
    curves' test set (at most 2000; see split_and_corrupt), every other row valued."""
    t = n_target if n_target is not None else min(1000, max(1, round(0.2 * n_rows)))
    if n_source is not None:
        return n_source, t
    te = n_test if n_test is not None else min(2000, round(0.2 * n_rows))
    s = n_rows - t - te
    if s < 2:
        raise CLIError(f"--dataset: {n_rows} rows are too few to split into samples to value, a target set "
                       f"({t}) and a test set ({te}); give a clean target set with --target csv:CLEAN.csv (every "
                       f"row is then valued) or set --n-source/--n-target/--n-test")
    return s, t


NO_GROUND_TRUTH = ("no corruption injected (the default for your own data; --noise label:RATE injects some and "
                   "scores its detection): there is no ground truth, so no detection metrics; the lowest values in "
                   "values.csv are the rows that agree least with the target set")


def same_file_target_warning(path: Path, n_target: int) -> str:
    return (f"warning: the target set is {n_target} rows drawn from {path.name} itself, not a clean set: if the "
            f"file's labels are noisy, so are the target's, and the values measure agreement with the file's own "
            f"majority; give a clean target set with --target csv:CLEAN.csv (then every row is valued)")


def split_and_corrupt(ld: Loaded, n_source: int, n_target: int, n_test: int | None,
                      noise: Noise, seed: int, *, max_test: int | None = None) -> RunData:
    if noise.kind == "label" and ld.y is None:
        raise CLIError(f"--noise label:{noise.level:g}: {ld.name} has no labels to flip; use "
                       f"--noise feature:SIGMA or --noise none")
    n = int(ld.X.shape[0])
    official = ld.train_idx is not None and ld.heldout_idx is not None
    if official:
        pool_src, pool_ho = int(len(ld.train_idx)), int(len(ld.heldout_idx))
        if n_source > pool_src:
            raise CLIError(f"--n-source: {ld.name} has {pool_src} training rows, fewer than --n-source {n_source}")
        if n_target > pool_ho:
            raise CLIError(f"--n-target: {ld.name} has {pool_ho} held-out rows, fewer than --n-target {n_target}")
        left = pool_ho - n_target
    else:
        if n_source + n_target > n:
            raise CLIError(f"--n-source/--n-target: {ld.name} has {n} samples, fewer than --n-source {n_source} "
                           f"+ --n-target {n_target} = {n_source + n_target}; lower --n-source/--n-target")
        left = n - n_source - n_target
    if n_test is None:
        n_test = left if max_test is None else min(left, max_test)
    elif n_test > left:
        raise CLIError(f"--n-test: only {left} samples are left for the test set after --n-source {n_source} "
                       f"and --n-target {n_target}, fewer than --n-test {n_test}")
    rng = np.random.default_rng([seed, 1])
    if ld.y is None:
        # Unlabelled (LINCS): split the rows directly.
        perm = rng.permutation(n)
        src, tgt = np.sort(perm[:n_source]), np.sort(perm[n_source:n_source + n_target])
        tst = np.sort(perm[n_source + n_target:n_source + n_target + n_test])
        xs, xt, xte = ld.X[src].copy(), ld.X[tgt].copy(), ld.X[tst].copy()
        ys = yt = yte = None
    else:
        from ..datasets import make_split
        try:
            sp = make_split(ld.X, ld.y, n_source, n_target, n_test, rng,
                            train_idx=ld.train_idx if official else None,
                            heldout_idx=ld.heldout_idx if official else None)
        except ValueError as exc:
            raise CLIError(one_line(exc)) from None
        src = sp.idx_source
        xs, ys, xt, yt, xte, yte = sp.x_source, sp.y_source, sp.x_target, sp.y_target, sp.x_test, sp.y_test
    y_clean = None if ys is None else ys.copy()
    is_corrupted = sigma = None
    if noise.kind == "label":
        from ..datasets import flip_labels
        ys, is_corrupted = flip_labels(ys, noise.level, np.random.default_rng([seed, 2]), n_classes=ld.n_classes)
        if not is_corrupted.any():
            raise CLIError(f"--noise label:{noise.level:g} flips no label of {n_source} source samples; "
                           f"raise the rate or --n-source")
    elif noise.kind == "feature":
        from ..datasets import add_feature_noise
        xs, sigma = add_feature_noise(xs, noise.level, np.random.default_rng([seed, 3]))
        xs = np.asarray(xs, dtype=np.float32)
    return RunData(name=ld.name, preset=ld.preset, class_names=ld.class_names,
                   task="classification" if ld.y is not None else "reconstruction",
                   n_classes=ld.n_classes, x_source=np.asarray(xs, dtype=np.float32), y_source=ys,
                   y_source_clean=y_clean, x_target=np.asarray(xt, dtype=np.float32), y_target=yt,
                   x_test=np.asarray(xte, dtype=np.float32), y_test=yte, idx_source=np.asarray(src),
                   noise=noise, is_corrupted=is_corrupted, sigma=sigma, notes=list(ld.notes),
                   files=list(ld.files))


def split_with_target(ld: Loaded, tgt: Loaded, n_source: int | None, n_target: int | None, n_test: int | None,
                      noise: Noise, seed: int, *, max_test: int | None = None) -> RunData:
    """--target csv:FILE: the target is the user's clean file (all of it, or --n-target rows of it
    drawn at random); the source is every row of --dataset (or --n-source rows drawn at random,
    the rest then available as a test set for the removal curves)."""
    n, nt = int(ld.X.shape[0]), int(tgt.X.shape[0])
    n_src = n if n_source is None else n_source
    if n_src > n:
        raise CLIError(f"--n-source: {ld.name} has {n} rows, fewer than --n-source {n_src}")
    if n_target is not None and n_target > nt:
        raise CLIError(f"--n-target: the --target file has {nt} rows, fewer than --n-target {n_target}")
    left = n - n_src
    if n_test is None:
        n_test = left if max_test is None else min(left, max_test)
    elif n_test > left:
        raise CLIError(f"--n-test: only {left} rows of {ld.name} are left after --n-source {n_src}, fewer than "
                       f"--n-test {n_test} (with --target the test set comes from the rows not valued)")
    rng = np.random.default_rng([seed, 1])
    if n_src == n:
        src, tst = np.arange(n), np.arange(0)
    else:
        perm = rng.permutation(n)
        src, tst = np.sort(perm[:n_src]), np.sort(perm[n_src:n_src + n_test])
    tg = np.arange(nt) if n_target is None else np.sort(rng.permutation(nt)[:n_target])
    xs, ys = ld.X[src], ld.y[src]
    y_clean = ys.copy()
    notes = list(ld.notes) + [n for n in tgt.notes if not n.startswith("label column")]
    notes.append(f"target: {'all ' if n_target is None else ''}{len(tg)} rows of {tgt.files[0]} (--target), "
                 f"source: {'every row' if n_src == n else f'{n_src} random rows'} of {ld.files[0]}")
    is_corrupted = sigma = None
    if noise.kind == "label":
        from ..datasets import flip_labels
        ys, is_corrupted = flip_labels(ys, noise.level, np.random.default_rng([seed, 2]), n_classes=ld.n_classes)
        if not is_corrupted.any():
            raise CLIError(f"--noise label:{noise.level:g} flips no label of {n_src} source samples; "
                           f"raise the rate or --n-source")
    elif noise.kind == "feature":
        from ..datasets import add_feature_noise
        xs, sigma = add_feature_noise(xs, noise.level, np.random.default_rng([seed, 3]))
    else:
        notes.append(NO_GROUND_TRUTH)
    return RunData(name=ld.name, preset=ld.preset, task="classification", n_classes=ld.n_classes,
                   x_source=np.asarray(xs, dtype=np.float32), y_source=ys, y_source_clean=y_clean,
                   x_target=np.asarray(tgt.X[tg], dtype=np.float32), y_target=tgt.y[tg],
                   x_test=np.asarray(ld.X[tst], dtype=np.float32), y_test=ld.y[tst], idx_source=src,
                   noise=noise, is_corrupted=is_corrupted, sigma=sigma, notes=notes,
                   files=list(ld.files) + list(tgt.files), class_names=ld.class_names,
                   target_file=tgt.files[0])
