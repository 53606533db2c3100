"""Where data files are looked for, and where downloads are cached.

Real data is read in place, never copied: a loader looks in the folder its caller names, else in
``$DVGS_FAST_DATA``, else in ``<repo>/../shared/data`` (the project's shared read-only data folder
for an editable checkout), else in the download cache. Downloads go to ``$DVGS_FAST_CACHE`` or
``~/.cache/dvgs_fast``, never into the data folder (which may be read-only).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

DATA_ENV = "DVGS_FAST_DATA"
CACHE_ENV = "DVGS_FAST_CACHE"

# dvgs_fast/datasets/_paths.py -> parents[2] is the checkout root of an editable install.
_CHECKOUT_ROOT = Path(__file__).resolve().parents[2]


def default_data_roots() -> list[Path]:
    """Candidate data folders, in the order they are searched (existing or not)."""
    out: list[Path] = []
    env = os.environ.get(DATA_ENV)
    if env:
        out.append(Path(env).expanduser())
    out.append(_CHECKOUT_ROOT.parent / "shared" / "data")
    return out


def default_data_root() -> Path | None:
    """The first existing folder of :func:`default_data_roots`, or None."""
    for p in default_data_roots():
        if p.is_dir():
            return p
    return None


def cache_dir(create: bool = False) -> Path:
    """Download cache: ``$DVGS_FAST_CACHE`` or ``~/.cache/dvgs_fast``."""
    env = os.environ.get(CACHE_ENV)
    p = Path(env).expanduser() if env else Path.home() / ".cache" / "dvgs_fast"
    if create:
        p.mkdir(parents=True, exist_ok=True)
    return p


def search_roots(root: str | os.PathLike | None) -> list[Path]:
    """Folders to look in: the caller's root alone when given, else the defaults + the cache.

    An explicit root is authoritative (a typo should fail, not silently pick other data), but the
    cache is still consulted so that ``download=True`` results are found on the next call.
    """
    if root is not None:
        return [Path(root).expanduser(), cache_dir()]
    return [*default_data_roots(), cache_dir()]


def find_first(roots: Iterable[Path], relpaths: Iterable[str]) -> Path | None:
    """First ``root/relpath`` that exists, roots outermost (so one folder's files stay together)."""
    relpaths = list(relpaths)
    for r in roots:
        for rel in relpaths:
            p = r / rel
            if p.exists():
                return p
    return None
