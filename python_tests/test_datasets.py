"""dvgs_fast.datasets: real-data loaders, downloads, splits and corruptions."""
from __future__ import annotations

import io
import pickle
import tarfile
import urllib.error
import urllib.request

import numpy as np
import pytest

from dvgs_fast import datasets as ds
from dvgs_fast.datasets import download as dl

# ---------------------------------------------------------------------------------------------
# Adult
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adult(data_file):
    data_file("adult.data")
    data_file("adult.test")
    return ds.load_adult(data_file("adult.data").parent)


def test_adult_shape_and_encoding(adult):
    assert adult.X.shape == (32_561 + 16_281, 108)
    assert adult.meta["n_train"] == 32_561 and adult.meta["n_test"] == 16_281
    assert adult.X.dtype == np.float32 and adult.y.dtype == np.int64
    assert adult.n_classes == 2 and len(adult.feature_names) == 108
    assert adult.X.min() == 0.0 and adult.X.max() == 1.0  # min-max scaled
    # "?" kept as its own category; the test file's "." stripped from labels (both classes occur there)
    assert {"workclass=?", "occupation=?", "native-country=?"} <= set(adult.feature_names)
    assert set(np.unique(adult.y[adult.test_idx])) == {0, 1}
    # every one-hot block has exactly one 1 per row: 8 categorical columns
    assert np.allclose(adult.X[:, 6:].sum(axis=1), 8)
    # published class balance: about 24% earn >50K in both parts
    assert 0.23 < adult.y[: adult.meta["n_train"]].mean() < 0.25
    assert 0.23 < adult.y[adult.meta["n_train"]:].mean() < 0.25


def test_adult_first_row_and_parts(adult, data_root):
    # first row of adult.data: 39, State-gov, ..., Male, 2174, 0, 40, United-States, <=50K
    names = adult.feature_names
    row = adult.X[0]
    for on in ("workclass=State-gov", "education=Bachelors", "sex=Male", "native-country=United-States"):
        assert row[names.index(on)] == 1.0
    assert adult.y[0] == 0
    train, test = adult.train(), adult.test()
    assert len(train) == 32_561 and len(test) == 16_281
    np.testing.assert_array_equal(test.X[0], adult.X[32_561])
    only_test = ds.load_adult(data_root, split="test")
    np.testing.assert_array_equal(only_test.X, test.X)


def test_adult_split_dvrl_style(adult):
    sp = adult.split(1000, 400, 2000, seed=3)
    assert sp.x_source.shape == (1000, 108) and sp.x_target.shape == (400, 108)
    assert sp.idx_source.max() < 32_561 <= min(sp.idx_target.min(), sp.idx_test.min())
    assert not set(sp.idx_target) & set(sp.idx_test)
    with pytest.raises(ValueError, match="n_source"):
        adult.split(40_000, 10, 10)


def test_adult_bad_file(tmp_path):
    (tmp_path / "adult.data").write_text("1, 2, 3\n")
    (tmp_path / "adult.test").write_text("|1x3 Cross validator\n")
    with pytest.raises(ValueError, match="expected 15"):
        ds.load_adult(tmp_path)


# ---------------------------------------------------------------------------------------------
# BlogFeedback
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def blog(data_file):
    return ds.load_blog(data_file("BlogFeedback.zip").parent)


def test_blog_shape(blog):
    assert blog.meta["n_train"] == 52_397
    assert blog.X.shape == (52_397 + 7_624, 280)
    assert len(blog.meta["test_files"]) == 60
    assert blog.X.dtype == np.float32 and 0.0 <= blog.X.min() and blog.X.max() <= 1.0
    comments = blog.meta["comments_24h"]
    np.testing.assert_array_equal(blog.y, (comments > 0).astype(np.int64))
    assert 0.2 < blog.y.mean() < 0.5
    tr = blog.train()
    assert tr.X.shape == (52_397, 280) and tr.meta["comments_24h"].shape == (52_397,)


def test_blog_from_extracted_folder(tmp_path, data_file):
    """An extracted copy (here: a few members) is read like the zip."""
    import zipfile
    with zipfile.ZipFile(data_file("BlogFeedback.zip")) as zf:
        tests = sorted(n for n in zf.namelist() if "test" in n)[:2]
        train_head = b"".join(zf.read("blogData_train.csv").splitlines(keepends=True)[:50])
        (tmp_path / "blogData_train.csv").write_bytes(train_head)
        for n in tests:
            (tmp_path / n).write_bytes(zf.read(n))
    d = ds.load_blog(tmp_path, scale=None)
    assert d.meta["n_train"] == 50 and d.X.shape[1] == 280
    assert d.meta["test_files"] == tests


# ---------------------------------------------------------------------------------------------
# CIFAR-10
# ---------------------------------------------------------------------------------------------


def test_cifar10_samples(data_file):
    d = ds.load_cifar10_samples(data_file("cifar10_foolbox_samples").parent)
    assert d.X.shape == (20, 3, 32, 32) and d.X.dtype == np.float32
    # first CIFAR-10 test labels: cat ship ship airplane frog frog automobile frog cat automobile
    np.testing.assert_array_equal(d.y[:10], [3, 8, 8, 0, 6, 6, 1, 6, 3, 1])
    np.testing.assert_array_equal(d.meta["indices"], np.arange(20))
    assert 0.0 <= d.X.min() and d.X.max() <= 1.0
    assert np.allclose(d.X * 255, np.round(d.X * 255), atol=1e-4)  # exact 8-bit values


def _write_fake_cifar(folder, images_u8, labels):
    """Pickle batches in the official format (dict of bytes keys, [n, 3072] uint8)."""
    folder.mkdir(parents=True)
    flat = images_u8.reshape(len(images_u8), -1)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as fh:
            pickle.dump({b"data": flat, b"labels": list(labels), b"batch_label": name.encode()}, fh)


def test_cifar10_batches_parse_and_md5(tmp_path, data_file):
    samples = ds.load_cifar10_samples(data_file("cifar10_foolbox_samples").parent)
    u8 = np.round(samples.X * 255).astype(np.uint8)
    _write_fake_cifar(tmp_path / "cifar-10-batches-py", u8, samples.y)
    d = ds.load_cifar10(tmp_path, verify=False)
    assert d.X.shape == (120, 3, 32, 32) and d.meta["n_train"] == 100
    np.testing.assert_allclose(d.X[:20], samples.X, atol=1e-6)  # CHW order preserved
    te = ds.load_cifar10(tmp_path, split="test", verify=False, flatten=True)
    assert te.X.shape == (20, 3072) and te.name == "cifar10-test"
    raw = ds.load_cifar10(tmp_path, split="train", verify=False, as_uint8=True)
    assert raw.X.dtype == np.uint8
    # md5 checking is on by default and these files are not the official ones
    with pytest.raises(ds.ChecksumError, match="md5 mismatch"):
        ds.load_cifar10(tmp_path)


def test_cifar10_missing_and_not_a_batch(tmp_path, monkeypatch):
    monkeypatch.setenv("DVGS_FAST_CACHE", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        ds.load_cifar10(tmp_path)
    # an archive placed by hand is md5-checked before it is extracted
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"not the archive")
    with pytest.raises(ds.ChecksumError, match="cifar-10-python.tar.gz"):
        ds.load_cifar10(tmp_path)
    assert not (tmp_path / "cache").exists()
    from dvgs_fast.datasets.cifar10 import read_batch
    (tmp_path / "junk").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="not a CIFAR-10"):
        read_batch(tmp_path / "junk")


# ---------------------------------------------------------------------------------------------
# scikit-learn bundled sets
# ---------------------------------------------------------------------------------------------


def test_sklearn_sets():
    d = ds.load_digits()
    assert d.X.shape == (1797, 64) and d.n_classes == 10 and d.X.dtype == np.float32
    assert d.X.min() == 0.0 and d.X.max() == 1.0
    b = ds.load_breast_cancer(scale="standard")
    assert b.X.shape == (569, 30) and b.n_classes == 2
    assert np.allclose(b.X.mean(0), 0, atol=1e-5) and np.allclose(b.X.std(0), 1, atol=1e-4)
    assert ds.load_dataset("breast-cancer").X.max() == 1.0
    assert d.train_idx is None  # no official split: make_split draws from everything
    sp = d.split(500, 100, 300, seed=0)
    assert len(set(sp.idx_source) | set(sp.idx_target) | set(sp.idx_test)) == 900
    with pytest.raises(ValueError, match="scale"):
        ds.load_digits(scale="log")
    with pytest.raises(ValueError, match="name"):
        ds.load_dataset("mnist")


# ---------------------------------------------------------------------------------------------
# downloads
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def empty_dirs(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("DVGS_FAST_CACHE", str(cache))
    root = tmp_path / "nodata"
    root.mkdir()
    return root, cache


def test_missing_files_message(empty_dirs):
    root, _ = empty_dirs
    with pytest.raises(FileNotFoundError, match="download=True") as ei:
        ds.load_adult(root)
    assert "adult.data" in str(ei.value) and str(root) in str(ei.value)


def test_download_offline_says_what_to_place_where(empty_dirs, monkeypatch):
    root, cache = empty_dirs

    def offline(*a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(ds.DownloadError) as ei:
        ds.load_adult(root, download=True)
    msg = str(ei.value)
    assert "adult.data" in msg and "adult.test" in msg and str(cache) in msg
    with pytest.raises(ds.DownloadError, match="BlogFeedback.zip"):
        ds.load_blog(root, download=True)
    assert not any(cache.iterdir())  # no partial files left behind


def test_download_checksum_mismatch(empty_dirs, monkeypatch):
    _, cache = empty_dirs
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: io.BytesIO(b"<html>moved</html>"))
    with pytest.raises(ds.ChecksumError, match="sha256 mismatch"):
        ds.fetch("adult.data")
    assert not list(cache.iterdir())  # the bad bytes never get the real name
    # a corrupt file already in the cache is caught too
    (cache / "adult.test").write_bytes(b"truncated")
    with pytest.raises(ds.ChecksumError):
        ds.fetch("adult.test")


def test_download_success_with_real_bytes(empty_dirs, monkeypatch, data_file):
    """Serve the real files in place of the network: verified, cached, then loadable."""
    root, cache = empty_dirs
    served = []

    def fake_urlopen(url, timeout=None):
        name = url.rsplit("/", 1)[-1]
        served.append(name)
        return io.BytesIO(data_file(name).read_bytes())

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    d = ds.load_adult(root, download=True, split="test")
    assert len(d) == 16_281 and sorted(served) == ["adult.data", "adult.test"]
    assert (cache / "adult.data").exists()
    ds.load_adult(root, download=True, split="test")  # second call: found in the cache
    assert len(served) == 2


@pytest.mark.parametrize("name", ["adult.data", "adult.test", "BlogFeedback.zip"])
def test_pinned_checksums_match_shared_files(data_file, name):
    ds.verify_file(data_file(name), sha256=dl.REMOTE_FILES[name].sha256)


def test_extract_tar_refuses_escaping_members(tmp_path):
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        info = tarfile.TarInfo("../escaped.txt")
        info.size = 2
        tf.addfile(info, io.BytesIO(b"hi"))
    with pytest.raises(ds.DownloadError, match="outside"):
        dl.extract_tar(archive, tmp_path / "out")
    assert not (tmp_path / "escaped.txt").exists()


# ---------------------------------------------------------------------------------------------
# make_split
# ---------------------------------------------------------------------------------------------


def test_make_split_pools_and_errors():
    X = np.arange(200, dtype=np.float32).reshape(100, 2)
    y = np.arange(100) % 3
    sp = ds.make_split(X, y, 30, 10, 20, seed=1, train_idx=np.arange(60))
    assert sp.idx_source.max() < 60 and sp.idx_target.min() >= 60 and sp.idx_test.min() >= 60
    assert not set(sp.idx_target) & set(sp.idx_test)
    np.testing.assert_array_equal(sp.x_source, X[sp.idx_source])
    np.testing.assert_array_equal(sp["y_test"], y[sp.idx_test])
    again = ds.make_split(X, y, 30, 10, 20, seed=1, train_idx=np.arange(60))
    np.testing.assert_array_equal(again.idx_test, sp.idx_test)  # reproducible by seed
    mask = np.zeros(100, bool)
    mask[80:] = True
    sp2 = ds.make_split(X, y, 50, 5, 15, seed=0, heldout_idx=mask)
    assert sp2.idx_source.max() < 80 and sp2.idx_target.min() >= 80
    with pytest.raises(ValueError, match="n_target \\+ n_test"):
        ds.make_split(X, y, 10, 30, 20, train_idx=np.arange(60))
    with pytest.raises(ValueError, match="n_source \\+ n_target \\+ n_test"):
        ds.make_split(X, y, 60, 30, 20)
    with pytest.raises(ValueError, match="y"):
        ds.make_split(X, y[:5], 1, 1, 1)
    with pytest.raises(ValueError, match="shares"):
        ds.make_split(X, y, 1, 1, 1, train_idx=np.arange(60), heldout_idx=np.arange(50, 100))
    with pytest.raises(ValueError, match="n_source"):
        ds.make_split(X, y, 0, 1, 1)


def test_make_split_torch_tensors():
    torch = pytest.importorskip("torch")
    X = torch.randn(50, 4)
    y = torch.arange(50) % 2
    sp = ds.make_split(X, y, 20, 10, 10, seed=0)
    assert isinstance(sp.x_source, torch.Tensor) and sp.x_source.shape == (20, 4)
    assert torch.equal(sp.x_target, X[torch.as_tensor(sp.idx_target)])


# ---------------------------------------------------------------------------------------------
# corruptions
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,rate,k", [(1000, 0.1, 10), (997, 0.2, 2), (50, 0.0, 5), (10, 1.0, 3)])
def test_flip_labels(n, rate, k):
    y = np.arange(n) % k
    y_noisy, bad = ds.flip_labels(y, rate, seed=7, n_classes=k)
    assert bad.dtype == bool and bad.sum() == int(np.floor(n * rate + 1e-9))
    assert np.all(y_noisy[bad] != y[bad]) and np.all(y_noisy[~bad] == y[~bad])
    assert y_noisy.min() >= 0 and y_noisy.max() < k
    y2, bad2 = ds.flip_labels(y, rate, seed=7, n_classes=k)
    np.testing.assert_array_equal(y2, y_noisy)
    np.testing.assert_array_equal(bad2, bad)
    np.testing.assert_array_equal(y, np.arange(n) % k)  # input untouched


def test_flip_labels_uniform_over_other_classes_and_errors():
    y = np.zeros(30_000, dtype=np.int64)
    y_noisy, bad = ds.flip_labels(y, 1.0, seed=0, n_classes=4)
    counts = np.bincount(y_noisy, minlength=4)
    assert counts[0] == 0 and np.all(np.abs(counts[1:] / 30_000 - 1 / 3) < 0.02)
    assert not np.array_equal(ds.flip_labels(np.arange(100) % 2, 0.3, seed=1)[1],
                              ds.flip_labels(np.arange(100) % 2, 0.3, seed=2)[1])
    with pytest.raises(ValueError, match="rate"):
        ds.flip_labels(y, 1.5)
    with pytest.raises(ValueError, match="n_classes"):
        ds.flip_labels(y, 0.1)  # only class 0 present and no n_classes given
    with pytest.raises(ValueError, match="y"):
        ds.flip_labels(np.array([0.5, 1.0]), 0.1)
    with pytest.raises(ValueError, match="y"):
        ds.flip_labels(np.array([0, 3]), 0.1, n_classes=2)


def test_add_feature_noise():
    X = np.zeros((4000, 200), dtype=np.float32)
    Xn, sigma = ds.add_feature_noise(X, 2.0, seed=3)
    assert Xn.dtype == np.float32 and Xn.shape == X.shape and sigma.shape == (4000,)
    assert 0 <= sigma.min() and sigma.max() <= 2.0 and abs(sigma.mean() - 1.0) < 0.05
    # per-sample noise std follows sigma
    est = Xn.std(axis=1)
    assert np.corrcoef(est, sigma)[0, 1] > 0.99
    Xn2, s2 = ds.add_feature_noise(X, 2.0, seed=3)
    np.testing.assert_array_equal(Xn, Xn2)
    img = np.ones((5, 3, 4, 4), dtype=np.float64)
    In, s = ds.add_feature_noise(img, 0.5, seed=0)
    assert In.shape == img.shape and In.dtype == np.float64
    assert np.allclose(ds.add_feature_noise(X[:3], 0.0, seed=0)[0], 0.0)
    with pytest.raises(ValueError, match="max_sigma"):
        ds.add_feature_noise(X, -1.0)
