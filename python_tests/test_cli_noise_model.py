"""The command line's corruption and LINCS preprocessing against the original DVGS code
(dvgs/utils.py load_data, scripts/lincs_preproc.py --zscore), checked with float64 references:

* feature noise is added to the *scaled* source rows only: x_i + sigma_i * N(0, I), sigma_i ~
  U(0, S), target and test rows untouched (the original adds it after min-max scaling);
* LINCS files read with --dataset lincs:FILE.gctx are z-scored per gene over every sample of the
  file before the split and the noise (the original z-scores all its signatures first).
"""
from __future__ import annotations

import h5py
import numpy as np
import pytest
from scipy import stats

from dvgs_fast.cli import _data as D


def _loaded(X, y=None, **kw):
    return D.Loaded(np.asarray(X, dtype=np.float32), y, 0 if y is None else int(y.max()) + 1, "csv", "t", **kw)


@pytest.mark.parametrize("level", [0.5, 3.0])
def test_feature_noise_is_per_sample_gaussian_on_the_source_only(level):
    rng = np.random.default_rng(11)
    n, d = 700, 400
    X = rng.uniform(0.0, 1.0, size=(n, d))          # already min-max scaled, as the loaders return it
    y = (X[:, 0] > 0.5).astype(np.int64)
    ld = _loaded(X, y)
    data = D.split_and_corrupt(ld, 400, 150, None, D.Noise("feature", level), seed=5)
    src = data.idx_source
    resid = data.x_source.astype(np.float64) - X[src]
    sigma = np.asarray(data.sigma, dtype=np.float64)
    assert sigma.shape == (400,) and sigma.min() >= 0.0 and sigma.max() <= level
    # sigma ~ U(0, level): a KS test that a wrong law (e.g. U(0, level / 2) or |N|) fails
    assert stats.kstest(sigma / level, "uniform").pvalue > 1e-3
    # per-row noise: mean 0, sd sigma_i (in the scaled units: nothing rescales after the noise)
    sd = resid.std(axis=1)
    np.testing.assert_allclose(sd, sigma, rtol=0.15, atol=0.02 * level)
    assert abs(resid.mean()) < 0.01 * level
    z = resid[sigma > 0.05 * level] / sigma[sigma > 0.05 * level, None]
    assert stats.kstest(z.ravel()[::7], "norm").pvalue > 1e-3
    # target and test rows are the clean rows
    rest = np.setdiff1d(np.arange(n), src)
    clean = {tuple(np.round(r, 5)) for r in X[rest].astype(np.float32)}
    assert all(tuple(np.round(r, 5)) in clean for r in data.x_target)
    assert all(tuple(np.round(r, 5)) in clean for r in data.x_test)
    assert data.is_corrupted is None and data.task == "classification"


def test_feature_noise_added_after_scaling_on_adult(data_root):
    """Adult as the CLI loads it: min-max scaled over train+test, then the source rows get the
    noise in scaled units (not scaled again afterwards), so the clean target stays in [0, 1]."""
    ld = D.load(D.parse_dataset("adult"), data_root)
    assert ld.X.min() >= 0.0 and ld.X.max() <= 1.0
    data = D.split_and_corrupt(ld, 1000, 400, 0, D.parse_noise("feature:3.0"), seed=0)
    assert data.x_target.min() >= 0.0 and data.x_target.max() <= 1.0
    resid = data.x_source.astype(np.float64) - ld.X[data.idx_source].astype(np.float64)
    sd, sigma = resid.std(axis=1), np.asarray(data.sigma)
    slope = float(np.sum(sd * sigma) / np.sum(sigma * sigma))     # sd = slope * sigma through 0
    assert abs(slope - 1.0) < 0.03, slope
    assert np.corrcoef(sd, sigma)[0, 1] > 0.99


def _gctx_landmarks_f64(path):
    """float64 reference: landmark columns of the file's matrix, z-scored per gene (population sd)."""
    with h5py.File(path, "r") as fh:
        m = fh["0/DATA/0/matrix"][...].astype(np.float64)
        lm = fh["0/META/ROW/pr_is_lmark"][...] if "pr_is_lmark" in fh["0/META/ROW"] else None
    if lm is not None:
        keep = np.array([(v.decode() if isinstance(v, bytes) else str(v)).strip().lower() in ("y", "1", "true")
                         for v in lm])
        if keep.sum() == 978:
            m = m[:, keep]
    m[m == -666] = np.nan
    mu, sd = np.nanmean(m, axis=0), np.nanstd(m, axis=0)
    return np.nan_to_num((m - mu) / np.where(sd > 0, sd, 1.0), nan=0.0)


@pytest.mark.parametrize("rel", ["lincs/test_l1000_highprecision.gctx", "lincs/modzs_n272x978.gctx"])
def test_lincs_file_is_zscored_per_gene(data_file, rel):
    path = data_file(rel)
    ld = D.load(D.DatasetSpec("lincs", path), None)
    ref = _gctx_landmarks_f64(path)
    assert ld.X.shape == ref.shape and ld.X.shape[1] == 978
    np.testing.assert_allclose(ld.X, ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ld.X.mean(axis=0), 0.0, atol=1e-4)
    np.testing.assert_allclose(ld.X.std(axis=0), 1.0, atol=1e-3)
    assert any("z-scored per gene" in n for n in ld.notes)


def test_lincs_noise_after_zscore(tmp_path):
    """The noise is added to z-scored rows: the clean part of a noisy source row is the z-scored row."""
    from dvgs_fast.datasets import write_gctx
    rng = np.random.default_rng(3)
    raw = rng.normal(5.0, 3.0, size=(90, 30)) * rng.uniform(0.5, 4.0, size=30)   # unscaled genes
    path = tmp_path / "t.gctx"
    write_gctx(path, raw.astype(np.float32), [f"g{i}" for i in range(30)], None)
    ld = D.load(D.DatasetSpec("lincs", path), None)
    z = (raw - raw.mean(0)) / raw.std(0)
    np.testing.assert_allclose(ld.X, z, atol=1e-4)
    data = D.split_and_corrupt(ld, 60, 20, 0, D.Noise("feature", 5.0), seed=1)
    tgt_rows = [np.flatnonzero(np.all(np.abs(z - r) < 1e-4, axis=1)) for r in data.x_target]
    assert all(len(t) == 1 for t in tgt_rows)                  # every target row is a clean z-scored row
    resid = data.x_source.astype(np.float64) - z[data.idx_source]
    assert np.corrcoef(resid.std(axis=1), data.sigma)[0, 1] > 0.95
