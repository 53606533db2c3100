"""PNG plots of valuation quality.

Figures are drawn with matplotlib's object API on an Agg canvas, never through ``pyplot``: no
global backend is switched (a user's notebook backend is untouched), nothing needs a display, and
no figure leaks into pyplot's registry. Each function writes one PNG atomically and returns its
path.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from .._io import atomic_write_bytes
from ._checks import as_mask, as_values
from .curves import DiscoveryCurve, RemovalCurve, discovery_curve


def _figure(figsize=(5.5, 4.0)):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=figsize, dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"path: plots are written as PNG; use a .png file name, got {str(path)!r}")
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
    return path


def _named(values, default: str = "values") -> dict[str, object]:
    if isinstance(values, Mapping):
        if not values:
            raise ValueError("values: the dict of methods is empty")
        return dict(values)
    return {default: values}


def plot_discovery_curve(values, is_corrupted, path: str | os.PathLike, *, fractions=None,
                         title: str | None = None, seed: int | None = 0) -> Path:
    """Corrupted-sample discovery curve(s) with the random and optimal baselines.

    ``values`` may be one array or a dict ``{method name: values}`` to compare methods.
    """
    curves: dict[str, DiscoveryCurve] = {}
    for name, v in _named(values).items():
        curves[name] = discovery_curve(v, is_corrupted, fractions=fractions, seed=seed)
    ref = next(iter(curves.values()))
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(ref.fractions, ref.optimal, color="0.3", linestyle="--", label="optimal")
    ax.plot(ref.fractions, ref.random, color="0.6", linestyle=":", label="random")
    for name, c in curves.items():
        ax.plot(c.fractions, c.found, marker="o", markersize=3, label=f"{name} (AUC {c.auc():.3f})")
    ax.set_xlabel("fraction of data inspected (lowest values first)")
    ax.set_ylabel("fraction of corrupted samples found")
    ax.set_xlim(float(ref.fractions[0]), float(ref.fractions[-1]))
    ax.set_ylim(0.0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    _set_title(ax, title or f"Discovery of corrupted samples ({ref.n_corrupted}/{ref.n})")
    return _save(fig, path)


def plot_remove_curves(curves: RemovalCurve | Iterable[RemovalCurve] | Mapping[str, RemovalCurve],
                       path: str | os.PathLike, *, title: str | None = None) -> Path:
    """Test score vs fraction removed, one line per curve (solid = remove-high, dashed = remove-low).

    ``curves`` is a :class:`RemovalCurve`, a list of them (their ``label`` names the method) or a
    dict ``{label: curve}``.
    """
    if isinstance(curves, RemovalCurve):
        items = [(curves.label, curves)]
    elif isinstance(curves, Mapping):
        items = list(curves.items())
    else:
        items = [(c.label, c) for c in curves]
    if not items:
        raise ValueError("curves: nothing to plot")
    for name, c in items:
        if not isinstance(c, RemovalCurve):
            raise ValueError(f"curves: expected RemovalCurve objects, got {type(c).__name__}")
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    colors: dict[str, str] = {}
    for name, c in items:
        key = name or "values"
        if key not in colors:
            colors[key] = f"C{len(colors) % 10}"
        ax.plot(c.fractions, c.scores, color=colors[key], marker="o", markersize=3,
                linestyle="-" if c.mode == "high" else "--", label=f"{key}: remove {c.mode}")
    ax.set_xlabel("fraction of training data removed")
    ax.set_ylabel(f"test {items[0][1].metric_label}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _set_title(ax, title or "Performance after removing high / low valued data")
    return _save(fig, path)


def plot_value_histogram(values, is_corrupted, path: str | os.PathLike, *, bins: int = 50,
                         title: str | None = None) -> Path:
    """Overlaid histograms of the values of clean and corrupted samples (shared bins);
    ``is_corrupted=None`` (no ground truth): one histogram of all values."""
    v = as_values(values)
    m = None if is_corrupted is None else as_mask(is_corrupted, v.shape[0], need_both=False)
    if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or bins < 1:
        raise ValueError(f"bins: expected a positive integer, got {bins!r}")
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:  # all values equal: give the single bar a visible width
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, int(bins) + 1)
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    if m is None:
        ax.hist(v, bins=edges, alpha=0.8, color="C7", label=f"all samples ({v.shape[0]})")
    else:
        if (~m).any():
            ax.hist(v[~m], bins=edges, alpha=0.6, color="C0", label=f"clean ({int((~m).sum())})")
        if m.any():
            ax.hist(v[m], bins=edges, alpha=0.6, color="C3", label=f"corrupted ({int(m.sum())})")
    ax.set_xlabel("data value")
    ax.set_ylabel("samples")
    ax.legend(fontsize=8)
    _set_title(ax, title or "Data values of clean vs corrupted samples")
    return _save(fig, path)


def _set_title(ax, text: str, width: int = 64) -> None:
    """Titles name the dataset and file (``lincs (test_l1000_highprecision.gctx)``): wrapped, so a
    long one stays inside the figure instead of being cut at its edges."""
    import textwrap
    ax.set_title(textwrap.fill(text, width))
