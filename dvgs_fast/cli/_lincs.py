"""``dvgs-fast run --dataset lincs --data-root PATH.gctx``: the LINCS experiment of the DVGS
paper, out of core.

* ``--data-root`` (or the original script's ``--data``) names a ``.gctx`` file, or a folder
  holding exactly one (an error lists them when there are several), or the folder the original's
  ``lincs_setup.sh`` fills (Level 4 and Level 5 files side by side: the Level 5 file
  ``level5*.gctx`` is used, as in the paper). A data folder with the bundled demo file
  (``lincs/modzs_n272x978.gctx``) keeps the small in-memory demonstration run instead.
* Landmark genes (978), z-scored per gene over the file (one streaming pass), missing -> 0.
* Target: ``--n-target`` samples (default min(5000, n/4)), drawn at random, or spread evenly
  over the values of a sample metadata field with ``--target-balance-by FIELD`` (e.g. pert_id):
  round-robin over the field's values in random order, random samples within each value.
* Source: every sample of the file (the target samples are valued too), streamed from the
  file for every snapshot (``dvgs_fast.sources.GctxSource``), never loaded whole;
  ``--n-source N`` values the first N samples only.
* Model: the paper's autoencoder (the original code's ``AE``), 978 -> 256 -> 64 -> 256 -> 978 (Mish)
  by default, or as the original script's flags say (``--num_layers 2 --hidden_channels 500
  --latent_channels 64 --do 0.2``: 978-500-500-64-500-500-978 with dropout 0.2), MSE; DVGS
  defaults of the original (500 epochs, target batch 512, Adam 1e-3) unless set
  (``--epochs``, ``--lr``, ``--compute_every``, ``--target_batch_size``, ``--source_batch_size``).
* No labels and, by default, no corruption: metrics.json holds value statistics only. With
  ``--noise feature:S`` the source rows get Gaussian noise of per-sample strength U(0, S)
  (generated per fixed block of rows as they stream, so it is the same at every pass) and the
  Spearman correlation of the values with the noise level is reported.
* values.csv carries the sample ids (``cid``).
* Long runs: set ``checkpoint_dir = "DIR"`` in the config's ``[method]`` table; a killed run
  rerun with the same command (and ``--overwrite`` if --out was already created) resumes from
  its last completed snapshot with the same values.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dvgs_fast.sources import GctxSource, Source
from ._errors import CLIError, one_line

PRESET = {"n_source": None, "n_target": 5000, "noise": "none", "dropout": 0.0,
          "dvgs": {"epochs": 500, "lr": 1e-3, "target_batch_size": 512, "restarts": 1,
                   "source_batch_size": 4096}}
_NOISE_BLOCK = 4096


def find_gctx(arg: str) -> Path | None:
    """The .gctx file --data-root names (a file, or a folder holding exactly one); None when the
    folder has the demo layout (lincs/modzs_n272x978.gctx) so the demo flow applies."""
    from ._data import LINCS_DEFAULT_FILE
    p = Path(arg).expanduser()
    if p.is_file():
        if p.suffix.lower() != ".gctx":
            raise CLIError(f"--data-root: {p} is a file but not a .gctx file; for --dataset lincs give a "
                           f"GCTX file or the folder holding it")
        return p
    if not p.is_dir():
        return None                     # the usual --data-root error follows
    if (p / LINCS_DEFAULT_FILE).exists():
        return None
    found = sorted(p.glob("*.gctx"))
    if len(found) == 1:
        return found[0]
    level5 = [f for f in found if f.name.lower().startswith("level5")]
    if len(found) > 1 and len(level5) == 1:
        return level5[0]            # the original's lincs_setup.sh folder: Level 4 and Level 5 files
    if len(found) > 1:
        raise CLIError(f"--data-root: {p} holds {len(found)} .gctx files ({', '.join(f.name for f in found)}); "
                       f"name one: --data-root {p / found[0].name}")
    return None


class _Loaded:
    """What the LINCS GCTX run loads: the streaming reader and the target rows."""

    preset = "lincs_gctx"

    def __init__(self, reader, path: Path, balance_by: str | None):
        self.reader, self.path, self.balance_by = reader, path, balance_by
        self.name = f"lincs ({path.name})"
        self.y = None
        self.n_classes = 0
        self.notes: list[str] = []
        self.files = [str(path)]


def load(path: Path, balance_by: str | None) -> _Loaded:
    from ..datasets import load_lincs
    try:
        import h5py  # noqa: F401
    except ImportError:
        raise CLIError("lincs: reading GCTX files needs h5py: pip install h5py") from None
    try:
        reader = load_lincs(path, landmark_only=True, zscore=True, fill_missing=0.0, chunked=True,
                            col_meta_fields=[])
        reader.stats()                   # the z-score pass, now: a damaged file fails here
    except CLIError:
        raise
    except Exception as exc:  # noqa: BLE001 - h5py raises many types for damaged files
        msg = one_line(exc)
        raise CLIError(f"lincs: {msg}" if str(path) in msg else f"lincs: cannot read {path}: {msg}") from None
    if balance_by is not None:
        import h5py
        with h5py.File(path, "r") as fh:
            fields = sorted(k for k in fh["0/META/COL"].keys() if k != "id")
        if balance_by not in fields:
            raise CLIError(f"--target-balance-by: {balance_by!r} is not a sample metadata field of {path} "
                           f"(fields: {', '.join(fields[:15])}{', ...' if len(fields) > 15 else ''})")
    return _Loaded(reader, Path(path), balance_by)


def pick_target(n: int, n_target: int, rng: np.random.Generator, codes: np.ndarray | None = None) -> np.ndarray:
    """Sorted row indices of the target: random, or balanced over `codes` (round-robin over the
    classes in random order, random members within each)."""
    if codes is None:
        return np.sort(rng.choice(n, size=n_target, replace=False))
    classes = rng.permutation(np.unique(codes))
    members = {c: list(rng.permutation(np.flatnonzero(codes == c))) for c in classes}
    out: list[int] = []
    while len(out) < n_target:
        for c in classes:
            if members[c]:
                out.append(int(members[c].pop()))
                if len(out) == n_target:
                    break
    return np.sort(np.asarray(out, dtype=np.int64))


class NoisySource(Source):
    """A source with Gaussian noise of per-row strength sigma added as it streams. The noise of
    row r comes from fixed blocks of rows (seeded by (seed, block)), so it is identical at every
    pass and however the rows are batched."""

    def __init__(self, inner: Source, sigma: np.ndarray, seed: int):
        self.inner, self.sigma, self.seed = inner, np.asarray(sigma, dtype=np.float64), int(seed)

    @property
    def length(self):
        return self.inner.length

    def describe(self):
        return f"Noisy({self.inner.describe()}, max sigma {float(self.sigma.max()):.3g}, seed {self.seed})"

    def identity(self):
        return self.inner.identity() + self.describe().encode()

    def _noise(self, a, b, d):
        out = np.empty((b - a, d), dtype=np.float64)
        for blk in range(a // _NOISE_BLOCK, (b - 1) // _NOISE_BLOCK + 1):
            lo, hi = blk * _NOISE_BLOCK, min((blk + 1) * _NOISE_BLOCK, len(self))
            z = np.random.default_rng([self.seed, 3, blk]).standard_normal((hi - lo, d))
            s, e = max(a, lo), min(b, hi)
            out[s - a:e - a] = z[s - lo:e - lo]
        return out

    def iter_chunks(self, start=0, stop=None, size=1024, validate=True):
        for a, b, x, y in self.inner.iter_chunks(start, stop, size, validate):
            xn = x.double().numpy() + self.sigma[a:b, None] * self._noise(a, b, x.shape[1])
            yield a, b, torch.from_numpy(xn.astype(np.float32)), y


def split(ld: _Loaded, n_source: int | None, n_target: int | None, n_test: int | None, noise, seed: int,
          max_test: int | None = None):
    """RunData for the out-of-core LINCS run (see the module docstring)."""
    from ._data import RunData
    r = ld.reader
    n = r.n_samples
    notes = [f"{n} samples x {r.n_features} landmark genes ({r.gene_selection}), z-scored per gene; "
             f"streamed from {ld.path} (out of core)"]
    if noise.kind == "label":
        raise CLIError(f"--noise label:{noise.level:g}: {ld.name} has no labels to flip; use "
                       f"--noise feature:SIGMA or --noise none")
    if n_test:
        raise CLIError("--n-test: the LINCS GCTX run values every sample and has no test set; leave --n-test out")
    if n_target is None:     # not given: the paper's 5000, at most a quarter of a small file
        n_target = min(PRESET["n_target"], max(1, n // 4))
    if n_target >= n:
        raise CLIError(f"--n-target: {ld.name} has {n} samples; --n-target {n_target} leaves none to value "
                       f"apart from the target")
    n_src = n if n_source is None else int(n_source)
    if n_src > n:
        raise CLIError(f"--n-source: {ld.name} has {n} samples, fewer than --n-source {n_src}")
    rng = np.random.default_rng([seed, 1])
    codes = None
    if ld.balance_by is not None:
        codes, classes = r.labels(ld.balance_by)
        notes.append(f"target balanced over {len(classes)} values of {ld.balance_by!r}")
    tgt = pick_target(n, n_target, rng, codes)
    x_target = r.read_rows(tgt)
    src = GctxSource(r)
    if n_src < n:
        src = src.slice(0, n_src)
        notes.append(f"valuing the first {n_src} of {n} samples (--n-source)")
    sigma = None
    if noise.kind == "feature":
        sigma = np.random.default_rng([seed, 3]).uniform(0.0, noise.level, size=n_src)
        src = NoisySource(src, sigma, seed)
    ids = np.asarray(r.sample_ids)[:n_src]
    data = RunData(name=ld.name, preset=ld.preset, task="reconstruction", n_classes=0,
                   x_source=src, y_source=None, y_source_clean=None,
                   x_target=np.asarray(x_target, dtype=np.float32), y_target=None,
                   x_test=np.zeros((0, r.n_features), dtype=np.float32), y_test=None,
                   idx_source=np.arange(n_src), noise=noise, is_corrupted=None, sigma=sigma,
                   notes=notes, files=list(ld.files))
    data.sample_ids = ids
    return data


__all__ = ["PRESET", "find_gctx", "load", "split", "pick_target"]
