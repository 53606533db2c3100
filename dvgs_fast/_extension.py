"""Load the compiled extension dvgs_fast._C, with checks that explain how to fix a bad build.

The build records what it was compiled against in the pure-Python module `_build_config`,
so a torch upgrade is caught *before* the shared library is loaded (where it would fail
with an unreadable undefined-symbol error or worse).
"""
from __future__ import annotations

import importlib
import os

import torch

REBUILD_HINT = ("Rebuild dvgs_fast against the installed torch: "
                "pip install --no-build-isolation --force-reinstall --no-deps <path to dvgs_fast source>")


def _base_version(v: str) -> str:
    return v.split("+")[0]


def load_extension():
    try:
        cfg = importlib.import_module("dvgs_fast._build_config")
    except ImportError as exc:
        raise ImportError(
            "dvgs_fast's compiled extension is missing (no dvgs_fast._build_config). Install the package "
            "with 'pip install --no-build-isolation .' from its source folder, not by putting the "
            "folder on sys.path.") from exc
    if _base_version(cfg.TORCH_VERSION) != _base_version(torch.__version__) and not os.environ.get(
            "DVGS_FAST_SKIP_VERSION_CHECK"):
        raise ImportError(
            f"dvgs_fast was built against torch {cfg.TORCH_VERSION} but torch {torch.__version__} is "
            f"installed. {REBUILD_HINT}")
    try:
        return importlib.import_module("dvgs_fast._C")
    except ImportError as exc:
        raise ImportError(f"dvgs_fast._C failed to load ({exc}). {REBUILD_HINT}") from exc


_C = load_extension()


def build_info() -> dict:
    """What the extension was compiled against: torch, CUDA and the GPU architectures."""
    return {
        "torch_version": _C.TORCH_VERSION,
        "with_cuda": bool(_C.WITH_CUDA),
        "cuda_version": _C.CUDA_VERSION or None,
        "cuda_arch_list": [a for a in _C.CUDA_ARCH_LIST.replace(" ", ";").split(";") if a],
        "runtime_torch_version": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
    }
