"""LINCS GCTX reading (real CMap fixtures), streaming, z-scoring and the writer."""
from __future__ import annotations

import h5py
import numpy as np
import pytest

from dvgs_fast.datasets import GctxReader, GctxWriter, load_lincs, write_gctx
from dvgs_fast.datasets.lincs import read_version


@pytest.fixture
def modzs272(data_file):
    return data_file("lincs/modzs_n272x978.gctx")


@pytest.fixture
def highprec(data_file):
    return data_file("lincs/test_l1000_highprecision.gctx")


def _raw(path):
    with h5py.File(path, "r") as fh:
        return fh["0/DATA/0/matrix"][...].astype(np.float64)


# ---------------------------------------------------------------------------------------------
# real files
# ---------------------------------------------------------------------------------------------


def test_modzs_272_latin1_metadata(modzs272):
    d = load_lincs(modzs272)
    assert d.X.shape == (272, 978) and d.X.dtype == np.float32 and d.y is None
    assert d.meta["version"] == "GCTX1.0"  # stored as a plain bytes attribute here
    np.testing.assert_array_equal(d.X, _raw(modzs272).astype(np.float32))
    ids = d.meta["sample_ids"]
    assert len(ids) == 272 and len(set(ids)) == 272 and ids[0] == "CPC006_A549_6H:BRD-U88459701-000-01-8:10"
    assert len(d.feature_names) == 978 and d.feature_names[0] == "200814_at"
    doses = d.meta["col_meta"]["pert_idose"]
    assert "10 \u00b5M" in set(doses)  # b"10 \xb5M" decoded as latin-1 (micro sign)
    assert set(d.meta["col_meta"]) >= {"cell_id", "pert_iname", "distil_ss"}
    assert d.meta["row_meta"]["pr_gene_symbol"][0] == "PSME1"


def test_highprecision_377_with_37_fields(highprec):
    d = load_lincs(highprec)
    assert d.X.shape == (377, 978)
    assert len(d.meta["col_meta"]) == 37  # all column fields besides "id"
    cm = d.meta["col_meta"]
    assert cm["pert_time"].dtype.kind == "i" and cm["qc_iqr"].dtype.kind == "f"
    assert cm["pert_dose"][0] == "-666"  # string metadata kept as stored
    sel = load_lincs(highprec, col_meta_fields=["cell_id", "pert_iname"], landmark_only=True)
    assert set(sel.meta["col_meta"]) == {"cell_id", "pert_iname"}
    assert sel.meta["gene_selection"] == "landmark flag" and sel.X.shape == (377, 978)  # all are landmarks
    lab = load_lincs(highprec, label_field="pert_type", col_meta_fields=[])
    assert lab.n_classes == len(lab.meta["classes"]) >= 2 and lab.y.shape == (377,)
    assert "ctl_vehicle" in set(lab.meta["classes"])
    with pytest.raises(ValueError, match="col_meta_fields"):
        load_lincs(highprec, col_meta_fields=["nope"])
    with pytest.raises(ValueError, match="label_field"):
        load_lincs(highprec, label_field="nope")


def test_tiny_files(data_file):
    mini = data_file("lincs/mini_gctx_with_metadata_n2x3.gctx")
    with h5py.File(mini, "r") as fh:
        assert isinstance(fh.attrs["version"], np.ndarray)  # the 1-element-array variant
    d = load_lincs(mini)
    assert d.X.shape == (2, 3) and d.meta["version"] == "GCTX1.0"
    assert np.isnan(d.meta["row_meta"]["pr_model_id"]).all()  # -666 in float metadata -> NaN
    np.testing.assert_allclose(d.X, _raw(mini), rtol=1e-6)
    small = load_lincs(data_file("lincs/modzs_n25x50.gctx"), landmark_only=True)
    assert small.X.shape[0] == 25 and small.meta["gene_selection"] == "landmark flag"
    assert small.X.shape[1] == int((small.meta["row_meta"]["is_lm"] == 1).sum())


def test_chunked_equals_full(modzs272, highprec):
    for path in (modzs272, highprec):
        full = load_lincs(path, landmark_only=True, zscore=True)
        for chunk in (1, 37, 268, 1000):
            r = load_lincs(path, chunked=True, chunk_size=chunk, landmark_only=True, zscore=True)
            assert isinstance(r, GctxReader)
            assert len(r) == full.X.shape[0] and r.n_features == full.X.shape[1]
            assert r.n_chunks == -(-len(r) // chunk)
            blocks = list(r)
            assert all(b.shape[0] <= chunk for b in blocks)
            np.testing.assert_allclose(np.concatenate(blocks), full.X, atol=2e-5)
            np.testing.assert_array_equal(r.sample_ids, full.meta["sample_ids"])
            mean, std = r.stats()
            np.testing.assert_allclose(mean, full.meta["zscore_stats"][0], rtol=1e-7, atol=1e-9)
            np.testing.assert_allclose(std, full.meta["zscore_stats"][1], rtol=1e-6)  # float32 data


def test_zscore_matches_numpy(highprec):
    raw = _raw(highprec)
    d = load_lincs(highprec, zscore=True)
    expect = (raw - raw.mean(0)) / raw.std(0)
    np.testing.assert_allclose(d.X, expect, atol=1e-4)
    np.testing.assert_allclose(d.meta["zscore_stats"][0], raw.mean(0), rtol=1e-7, atol=1e-9)
    # stats computed elsewhere (e.g. on training samples) are applied as given
    r = load_lincs(highprec, chunked=True, chunk_size=100, zscore_stats=(np.zeros(978), np.full(978, 2.0)))
    np.testing.assert_allclose(r.to_array(), raw / 2.0, rtol=1e-6)
    with pytest.raises(ValueError, match="zscore_stats"):
        load_lincs(highprec, zscore_stats=(np.zeros(3), np.ones(3)))


def test_read_rows_and_gene_list(modzs272):
    r = load_lincs(modzs272, chunked=True)
    raw = _raw(modzs272).astype(np.float32)
    idx = [200, 3, 3, 150]
    np.testing.assert_array_equal(r.read_rows(idx), raw[idx])
    np.testing.assert_array_equal(r.read(10, 20), raw[10:20])
    genes = [r.gene_ids[5], r.gene_ids[1]]
    d = load_lincs(modzs272, genes=genes)
    np.testing.assert_array_equal(d.X, raw[:, [5, 1]])
    assert d.feature_names == genes
    with pytest.raises(ValueError, match="genes"):
        load_lincs(modzs272, genes=["not_a_gene"])


def test_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gctx"):
        load_lincs(tmp_path / "nope.gctx")
    txt = tmp_path / "text.gctx"
    txt.write_text("#1.3\n978\t377\n")
    with pytest.raises(OSError, match="text.gctx"):
        load_lincs(txt)
    h5 = tmp_path / "plain.h5"
    with h5py.File(h5, "w") as fh:
        fh["x"] = np.zeros(3)
    with pytest.raises(ValueError, match="plain.h5.*not a GCTX"):
        load_lincs(h5)
    bad = tmp_path / "shape.gctx"
    with h5py.File(bad, "w") as fh:
        fh["0/DATA/0/matrix"] = np.zeros((3, 2))
        fh["0/META/COL/id"] = np.array([b"a", b"b"])
        fh["0/META/ROW/id"] = np.array([b"g1", b"g2", b"g3"])
    with pytest.raises(ValueError, match="samples x genes"):
        load_lincs(bad)


# ---------------------------------------------------------------------------------------------
# writer
# ---------------------------------------------------------------------------------------------


def test_writer_round_trips_real_file(modzs272, tmp_path):
    src = load_lincs(modzs272)
    out = write_gctx(tmp_path / "copy.gctx", src.X, src.feature_names, src.meta["sample_ids"],
                     col_meta=src.meta["col_meta"], row_meta=src.meta["row_meta"], chunks=50)
    back = load_lincs(out)
    np.testing.assert_array_equal(back.X, src.X)
    np.testing.assert_array_equal(back.meta["sample_ids"], src.meta["sample_ids"])
    assert back.feature_names == src.feature_names
    for k, v in src.meta["col_meta"].items():
        np.testing.assert_array_equal(back.meta["col_meta"][k], v)
    for k, v in src.meta["row_meta"].items():
        np.testing.assert_array_equal(back.meta["row_meta"][k], v)
    with h5py.File(out, "r") as fh:
        assert fh["0/DATA/0/matrix"].chunks == (50, 978)
        assert read_version(fh.attrs) == "GCTX1.0"


@pytest.mark.parametrize("version_as_array", [False, True])
def test_writer_blocks_missing_and_metadata(tmp_path, version_as_array):
    rng = np.random.default_rng(0)
    n, g = 103, 1000
    M = rng.standard_normal((n, g)).astype(np.float32)
    M[5, 7] = np.nan
    M[40, :3] = np.nan
    genes = [f"g{i}" for i in range(g)]
    lm = np.zeros(g, dtype=np.int64)
    lm[[10, 500, 999]] = 1
    path = tmp_path / "blocks.gctx"
    with GctxWriter(path, genes, n_samples=n, row_meta={"pr_is_lm": lm}, chunks=16,
                    version_as_array=version_as_array) as w:
        for s in range(0, n, 25):
            k = min(25, n - s)
            w.append(M[s:s + k], col_ids=[f"s{i}" for i in range(s, s + k)],
                     col_meta={"dose": np.full(k, 1.5), "cell": np.array([b"caf\xe9"] * k),
                               "plate": np.arange(s, s + k)})
        assert not path.exists()  # only complete files get the real name
    with h5py.File(path, "r") as fh:
        assert (fh["0/DATA/0/matrix"][5, 7]) == -666  # NaN stored as the GCTX missing marker
        assert isinstance(fh.attrs["version"], np.ndarray) == version_as_array
    d = load_lincs(path)
    assert d.meta["version"] == "GCTX1.0"
    np.testing.assert_array_equal(np.isnan(d.X), np.isnan(M))
    np.testing.assert_array_equal(np.nan_to_num(d.X), np.nan_to_num(M))
    assert d.meta["sample_ids"][-1] == "s102"
    assert d.meta["col_meta"]["cell"][0] == "caf\u00e9"  # latin-1 bytes decoded
    np.testing.assert_array_equal(d.meta["col_meta"]["plate"], np.arange(n))
    # landmark flag selects the three flagged genes
    lmk = load_lincs(path, landmark_only=True)
    assert lmk.feature_names == ["g10", "g500", "g999"]
    # z-scoring ignores missing values, chunked and in memory alike
    z = load_lincs(path, zscore=True)
    zc = load_lincs(path, zscore=True, chunked=True, chunk_size=10).to_array()
    ref = (M - np.nanmean(M.astype(np.float64), 0)) / np.nanstd(M.astype(np.float64), 0)
    np.testing.assert_allclose(z.X, ref, atol=1e-5)
    np.testing.assert_allclose(zc, ref, atol=1e-5)
    filled = load_lincs(path, zscore=True, fill_missing=0.0)
    assert not np.isnan(filled.X).any() and filled.X[5, 7] == 0.0


def test_writer_without_flag_takes_first_978(tmp_path):
    path = write_gctx(tmp_path / "nolm.gctx", np.ones((4, 1000), np.float32),
                      [f"g{i}" for i in range(1000)], None)
    d = load_lincs(path, landmark_only=True)
    assert d.X.shape == (4, 978) and d.meta["gene_selection"] == "first 978 genes"
    assert list(d.meta["sample_ids"]) == ["0", "1", "2", "3"]


def test_writer_errors_and_abort(tmp_path):
    path = tmp_path / "x.gctx"
    with pytest.raises(ValueError, match="rows"):
        with GctxWriter(path, ["a", "b"], n_samples=3) as w:
            w.append(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="n_samples"):
        with GctxWriter(path, ["a", "b"], n_samples=3) as w:
            w.append(np.zeros((2, 2)))  # one row short at close
    with pytest.raises(ValueError, match="col_ids"):
        with GctxWriter(path, ["a", "b"]) as w:
            w.append(np.zeros((1, 2)), col_ids=["s0"])
            w.append(np.zeros((1, 2)))
    with pytest.raises(RuntimeError):
        with GctxWriter(path, ["a", "b"]) as w:
            w.append(np.zeros((1, 2)))
            raise RuntimeError("crash mid-write")
    assert not path.exists() and not list(tmp_path.glob(".x.gctx*"))  # nothing left behind
    with pytest.raises(ValueError, match="matrix"):
        write_gctx(path, np.zeros((2, 3)), ["a", "b"], None)
