"""Checksum-verified downloads into the cache folder.

Every remote file the package knows has a pinned checksum: a download is written to a temporary
file, hashed, and only renamed into place when the hash matches, so an interrupted or tampered
download never becomes a "cached" file. Without network access the error says exactly which files
to place in which folder, so an offline machine can be set up by hand.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ._paths import cache_dir


class DownloadError(OSError):
    """A file could not be fetched (no network, HTTP error, ...)."""


class ChecksumError(DownloadError):
    """A file's content does not match its pinned checksum."""


@dataclass(frozen=True)
class RemoteFile:
    filename: str          # name in the cache / data folder
    url: str
    sha256: str | None = None
    md5: str | None = None
    size: int | None = None  # bytes, informational


_UCI = "https://archive.ics.uci.edu/ml/machine-learning-databases"

# sha256 values are those of the files in the project's shared data folder (SHA256SUMS there),
# which are the original, unmodified UCI bytes. The CIFAR-10 md5 is the one published with it.
REMOTE_FILES: dict[str, RemoteFile] = {
    "adult.data": RemoteFile("adult.data", f"{_UCI}/adult/adult.data",
                             sha256="5b00264637dbfec36bdeaab5676b0b309ff9eb788d63554ca0a249491c86603d",
                             size=3974305),
    "adult.test": RemoteFile("adult.test", f"{_UCI}/adult/adult.test",
                             sha256="a2a9044bc167a35b2361efbabec64e89d69ce82d9790d2980119aac5fd7e9c05",
                             size=2003153),
    "BlogFeedback.zip": RemoteFile("BlogFeedback.zip", f"{_UCI}/00304/BlogFeedback.zip",
                                   sha256="1ba74e5ad920f7cd037502b2968581cc695146a226a73eff52fe8ad875ed4bcf",
                                   size=2583605),
    "cifar-10-python.tar.gz": RemoteFile("cifar-10-python.tar.gz",
                                         "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                                         md5="c58f30108f718f92721af3b95e74349a", size=170498071),
}


def file_digest(path: str | os.PathLike, algorithm: str = "sha256", chunk: int = 1 << 20) -> str:
    """Hex digest of a file, read in 1 MiB pieces (CIFAR's tar is 170 MB)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        while True:
            buf = fh.read(chunk)
            if not buf:
                break
            h.update(buf)
    return h.hexdigest()


def verify_file(path: str | os.PathLike, *, sha256: str | None = None, md5: str | None = None) -> None:
    """Raise :class:`ChecksumError` (naming the file, expected and actual hash) on a mismatch."""
    for algo, want in (("sha256", sha256), ("md5", md5)):
        if want is None:
            continue
        got = file_digest(path, algo)
        if got.lower() != want.lower():
            raise ChecksumError(f"{path}: {algo} mismatch (expected {want}, got {got}); the file is "
                                f"corrupt, truncated or a different version; delete it and fetch it again")


def _urlopen(url: str, timeout: float):
    # Indirection so tests can monkeypatch the network away (``download._urlopen``) as well as
    # ``urllib.request.urlopen``.
    return urllib.request.urlopen(url, timeout=timeout)


def fetch(remote: RemoteFile | str, dest_dir: str | os.PathLike | None = None, *,
          timeout: float = 60.0, progress: bool = False) -> Path:
    """Download one known file into ``dest_dir`` (default: the cache) and verify it.

    A file already present and matching its checksum is not downloaded again. Raises
    :class:`DownloadError` when the network is unavailable and :class:`ChecksumError` when the
    downloaded bytes do not match.
    """
    if isinstance(remote, str):
        if remote not in REMOTE_FILES:
            raise ValueError(f"remote: unknown file {remote!r}; known: {', '.join(REMOTE_FILES)}")
        remote = REMOTE_FILES[remote]
    dest_dir = Path(dest_dir) if dest_dir is not None else cache_dir()
    dest = dest_dir / remote.filename
    if dest.exists():
        verify_file(dest, sha256=remote.sha256, md5=remote.md5)
        return dest
    dest_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{remote.filename}.", suffix=".part", dir=dest_dir)
    try:
        try:
            with os.fdopen(fd, "wb") as out, _urlopen(remote.url, timeout) as resp:
                bar = None
                if progress:
                    from tqdm.auto import tqdm
                    bar = tqdm(total=remote.size, unit="B", unit_scale=True, desc=remote.filename)
                while True:
                    buf = resp.read(1 << 20)
                    if not buf:
                        break
                    out.write(buf)
                    if bar is not None:
                        bar.update(len(buf))
                if bar is not None:
                    bar.close()
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            if isinstance(exc, ChecksumError):
                raise
            raise DownloadError(
                f"could not download {remote.url} ({exc}). Without network access, place the file "
                f"{remote.filename!r} in {dest_dir} (or in the folder given as root= / "
                f"$DVGS_FAST_DATA)") from exc
        verify_file(tmp, sha256=remote.sha256, md5=remote.md5)
        os.replace(tmp, dest)  # only a verified file ever gets the real name
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


def fetch_all(names: list[str], dest_dir: str | os.PathLike | None = None, **kw) -> list[Path]:
    """Fetch several files; on a network failure name *all* the files still needed."""
    dest_dir = Path(dest_dir) if dest_dir is not None else cache_dir()
    out = []
    for i, name in enumerate(names):
        try:
            out.append(fetch(name, dest_dir, **kw))
        except ChecksumError:
            raise
        except DownloadError as exc:
            missing = [n for n in names[i:] if not (dest_dir / n).exists()]
            urls = "; ".join(f"{n} <- {REMOTE_FILES[n].url}" for n in missing)
            raise DownloadError(f"download failed ({exc.__cause__ or exc}). Offline? Place these files "
                                f"in {dest_dir} (or pass root= a folder holding them): {urls}") from exc
    return out


def extract_tar(archive: str | os.PathLike, dest_dir: str | os.PathLike) -> Path:
    """Extract a (gzipped) tar safely: members may not escape ``dest_dir``."""
    import tarfile
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tf:
        root = dest_dir.resolve()
        for m in tf.getmembers():
            target = (dest_dir / m.name).resolve()
            if root not in target.parents and target != root:
                raise DownloadError(f"{archive}: member {m.name!r} would be written outside {dest_dir}")
            if m.issym() or m.islnk():
                raise DownloadError(f"{archive}: refusing link member {m.name!r}")
        try:
            tf.extractall(dest_dir, filter="data")
        except TypeError:  # Python without extraction filters; members were checked above
            tf.extractall(dest_dir)
    return dest_dir


def locate(required: list[str], root: str | os.PathLike | None, *, download: bool,
           dataset: str, remote_names: list[str] | None = None) -> list[Path]:
    """Paths of ``required`` files, all from one folder; download them when allowed.

    Looks in ``root`` (or ``$DVGS_FAST_DATA`` / ``../shared/data``) and the cache. When none has
    all of them and ``download`` is true, fetches ``remote_names`` (default: ``required``) into
    the cache. Otherwise raises FileNotFoundError saying what to place where.
    """
    from ._paths import search_roots
    roots = search_roots(root)
    for r in roots:
        paths = [r / name for name in required]
        if all(p.exists() for p in paths):
            return paths
    if download:
        fetch_all(remote_names or required)
        return [cache_dir() / name for name in required]
    looked = ", ".join(str(r) for r in roots)
    urls = "; ".join(f"{n} <- {REMOTE_FILES[n].url}" for n in (remote_names or required) if n in REMOTE_FILES)
    hint = f" or pass download=True to fetch them ({urls})" if urls else ""
    raise FileNotFoundError(f"{dataset}: files {', '.join(required)} not found together in any of: "
                            f"{looked}. Place them in one of those folders (or set $DVGS_FAST_DATA){hint}")


__all__ = ["locate", "DownloadError", "ChecksumError", "RemoteFile", "REMOTE_FILES", "fetch", "fetch_all",
           "verify_file", "file_digest", "extract_tar"]
