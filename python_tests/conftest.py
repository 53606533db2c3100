"""Shared pytest fixtures.

Real data is read in place (never copied into the repo) from ``$DVGS_FAST_DATA`` or, failing
that, ``<repo>/../shared/data``. Tests that need it take the ``data_root`` fixture (a
``pathlib.Path``) and are skipped with a reason that says where the data was looked for when it
is absent. ``data_file("lincs/modzs_n272x978.gctx")`` additionally skips when one particular file
is missing, so a partial data folder still runs what it can.

This module deliberately imports nothing from ``dvgs_fast`` (torch only) so that a broken package
import cannot take every test module's fixtures down with it.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

_REPO_ROOT = Path(__file__).resolve().parent.parent


def _candidate_data_roots() -> list[Path]:
    env = os.environ.get("DVGS_FAST_DATA")
    out = []
    if env:
        out.append(Path(env).expanduser())
    out.append(_REPO_ROOT.parent / "shared" / "data")
    return out


def find_data_root() -> Path | None:
    """The first existing candidate folder, or None (also usable outside fixtures)."""
    for cand in _candidate_data_roots():
        if cand.is_dir():
            return cand.resolve()
    return None


@pytest.fixture(scope="session")
def data_root() -> Path:
    """Folder with the real data files; skips the test when none is found."""
    root = find_data_root()
    if root is None:
        looked = ", ".join(str(p) for p in _candidate_data_roots())
        pytest.skip(f"real data folder not found (looked in: {looked}); "
                    f"set DVGS_FAST_DATA to the folder holding adult.data, lincs/, ...")
    return root


@pytest.fixture(scope="session")
def data_file(data_root: Path):
    """``data_file(relpath) -> Path`` that skips the test when that one file is absent."""

    def _get(relpath: str) -> Path:
        p = data_root / relpath
        if not p.exists():
            pytest.skip(f"real data file {relpath!r} not found under {data_root}")
        return p

    return _get


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Every test module runs with one intra-op thread: the models are tiny, so one thread is
    fastest and immune to OpenMP spin-waits on a shared 2-core machine, and subprocess workers
    (fault injection, torchrun) use the same float reduction order. Tests about thread counts
    set them themselves."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
