"""Option converters shared by the command line and ``--config FILE.toml``, and the TOML reader."""
from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any, Callable

from ._errors import CLIError, one_line


# Converters take a command-line string or a TOML value and raise ValueError with a short reason.
def pos_int(v: Any) -> int:
    if isinstance(v, bool):
        raise ValueError(f"expected a positive integer, got {v!r}")
    if isinstance(v, str):
        try:
            v = int(v.strip())
        except ValueError:
            raise ValueError(f"expected a positive integer, got {v!r}") from None
    if not isinstance(v, int) or v <= 0:
        raise ValueError(f"expected a positive integer, got {v!r}")
    return v


def nonneg_int(v: Any) -> int:
    if isinstance(v, bool):
        raise ValueError(f"expected an integer >= 0, got {v!r}")
    if isinstance(v, str):
        try:
            v = int(v.strip())
        except ValueError:
            raise ValueError(f"expected an integer >= 0, got {v!r}") from None
    if not isinstance(v, int) or v < 0:
        raise ValueError(f"expected an integer >= 0, got {v!r}")
    return v


def pos_float(v: Any) -> float:
    if isinstance(v, bool):
        raise ValueError(f"expected a positive number, got {v!r}")
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"expected a positive number, got {v!r}") from None
    if not math.isfinite(f) or f <= 0:
        raise ValueError(f"expected a positive number, got {v!r}")
    return f


def fraction(v: Any) -> float:
    if isinstance(v, bool):
        raise ValueError(f"expected a number in [0, 1), got {v!r}")
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"expected a number in [0, 1), got {v!r}") from None
    if not (0.0 <= f < 1.0):
        raise ValueError(f"expected a number in [0, 1), got {v!r}")
    return f


def seed_list(v: Any) -> list[int]:
    """'0,1,2' (or a TOML list [0, 1, 2]) -> [0, 1, 2]: distinct integers >= 0."""
    items = v.split(",") if isinstance(v, str) else v
    if not isinstance(items, (list, tuple)) or not items:
        raise ValueError(f"expected a comma-separated list of seeds such as 0,1,2, got {v!r}")
    out = []
    for it in items:
        try:
            out.append(nonneg_int(it.strip() if isinstance(it, str) else it))
        except ValueError:
            raise ValueError(f"expected a comma-separated list of seeds (integers >= 0) such as 0,1,2, "
                             f"got {v!r}") from None
    if len(set(out)) != len(out):
        raise ValueError(f"a seed is repeated in {v!r}")
    return out


def text(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError(f"expected a string, got {v!r}")
    return v


def flag(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"expected true or false, got {v!r}")
    return v


def read_toml(path: str) -> dict[str, Any]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise CLIError(f"--config: file {p} not found")
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - depends on the Python version
        try:
            import tomli as tomllib
        except ImportError:
            raise CLIError("--config: reading TOML on Python 3.10 needs tomli: pip install tomli") from None
    try:
        with open(p, "rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise CLIError(f"--config: {p} is not valid TOML: {one_line(exc)}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CLIError(f"--config: cannot read {p}: {one_line(exc)}") from None


def split_config(doc: dict[str, Any], path: str, converters: dict[str, Callable[[Any], Any]],
                 aliases: dict[str, str] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(run options {dest: value}, [method] table) from a parsed TOML document.

    Top-level keys (or those of an optional [run] table) are option names with dashes or
    underscores (``n-source`` / ``n_source``), or any long flag of the option (``aliases``: flag
    name with underscores -> dest, so ``latent-channels`` works as ``--latent-channels`` does);
    ``[method]`` holds keyword arguments for the method.
    """
    aliases = aliases or {}
    opts: dict[str, Any] = {}
    method_table: dict[str, Any] = {}
    items = list(doc.items())
    for key, value in items:
        if key == "method" and isinstance(value, dict):
            method_table = dict(value)
            continue
        if key == "run" and isinstance(value, dict):
            items.extend(value.items())
            continue
        dest = key.replace("-", "_")
        dest = aliases.get(dest, dest)
        if dest not in converters:
            raise CLIError(f"--config {path}: unknown setting {key!r}; settings are the run options "
                           f"({', '.join(sorted(k.replace('_', '-') for k in converters))}) and a [method] table")
        try:
            opts[dest] = converters[dest](value)
        except ValueError as exc:
            raise CLIError(f"--config {path}: {key}: {exc}") from None
    return opts, method_table
