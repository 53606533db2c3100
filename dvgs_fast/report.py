"""Run reports: values.csv, metrics.json, plots/*.png, report.md and a self-contained report.html.

Used by ``dvgs-fast run``; usable on its own: fill a :class:`RunReport` and call
:func:`write_report`. Every file is written atomically (``dvgs_fast._io``); plots are drawn on an
Agg canvas without touching pyplot's global state. ``report.html`` embeds its plots as base64
PNGs, so it can be mailed or archived as one file.
"""
from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._io import atomic_write_bytes, atomic_write_text

VALUES_CSV = "values.csv"
METRICS_JSON = "metrics.json"
REPORT_MD = "report.md"
REPORT_HTML = "report.html"
PLOTS_DIR = "plots"
# Every file a report may write (used to clear a previous report before --overwrite).
PLOT_NAMES = ("discovery.png", "values_hist.png", "values_vs_noise.png", "remove_curves.png")
OUTPUT_NAMES = (VALUES_CSV, METRICS_JSON, REPORT_MD, REPORT_HTML)


@dataclass
class RunReport:
    """Everything a report shows. Arrays are per source sample, in source order."""

    method: str
    dataset: str
    noise: str                                   # "label:0.2", "feature:3", "none"
    values: np.ndarray
    noise_description: str = ""
    source_rows: np.ndarray | None = None        # rows of the loaded dataset
    sample_ids: np.ndarray | None = None         # the samples' own ids (LINCS: cid), in values.csv
    labels: np.ndarray | None = None             # labels as valued (noisy when label noise)
    is_corrupted: np.ndarray | None = None
    sigma: np.ndarray | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    curves: list[Any] = field(default_factory=list)   # dvgs_fast.evaluate.RemovalCurve
    timings: dict[str, float] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    method_settings: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)   # more JSON for metrics.json
    notes: list[str] = field(default_factory=list)
    command: str = ""

    def __post_init__(self) -> None:
        self.values = np.asarray(self.values, dtype=np.float64).reshape(-1)

    @property
    def n(self) -> int:
        return int(self.values.shape[0])


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------
def write_values_csv(rep: RunReport, path: Path) -> Path:
    """One row per source sample: index, source_row, value, rank (1 = lowest), label, corrupted / noise_sigma."""
    cols = ["index", "source_row", "value", "rank"]
    if rep.sample_ids is not None:
        cols.insert(2, "cid")
    if rep.labels is not None:
        cols.append("label")
    if rep.is_corrupted is not None:
        cols.append("corrupted")
    if rep.sigma is not None:
        cols.append("noise_sigma")
    ranks = np.empty(rep.n, dtype=np.int64)
    ranks[np.argsort(rep.values, kind="stable")] = np.arange(1, rep.n + 1)
    rows = np.arange(rep.n) if rep.source_rows is None else np.asarray(rep.source_rows)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for i in range(rep.n):
        r: list[Any] = [i, int(rows[i]), repr(float(rep.values[i])), int(ranks[i])]
        if rep.sample_ids is not None:
            r.insert(2, str(rep.sample_ids[i]))
        if rep.labels is not None:
            r.append(int(rep.labels[i]))
        if rep.is_corrupted is not None:
            r.append(int(bool(rep.is_corrupted[i])))
        if rep.sigma is not None:
            r.append(f"{float(rep.sigma[i]):.6g}")
        w.writerow(r)
    atomic_write_text(path, buf.getvalue())
    return path


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if math.isfinite(f) else None   # JSON has no NaN
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if isinstance(obj, Path):
        return str(obj)
    return repr(obj)


def metrics_document(rep: RunReport) -> dict[str, Any]:
    doc = {"method": rep.method, "dataset": rep.dataset, "noise": rep.noise, **rep.sizes,
           "metrics": rep.metrics, "timings": rep.timings, "settings": rep.settings,
           "method_settings": rep.method_settings, "notes": rep.notes, "command": rep.command}
    doc.update(rep.extra)
    return _jsonable(doc)


def write_metrics_json(rep: RunReport, path: Path) -> Path:
    atomic_write_text(path, json.dumps(metrics_document(rep), indent=2) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------------
def _plot_values_vs_noise(values: np.ndarray, sigma: np.ndarray, path: Path, rho: float | None) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(5.5, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.scatter(sigma, values, s=8, alpha=0.6, color="C0")
    ax.set_xlabel("feature noise sigma of the sample")
    ax.set_ylabel("data value")
    title = "Data value vs feature noise"
    if rho is not None and math.isfinite(rho):
        title += f" (Spearman {rho:.3f})"
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
    return path


def make_plots(rep: RunReport, plots_dir: Path) -> list[Path]:
    """The plots that apply to this run, as PNG files in ``plots_dir``."""
    from .evaluate import plot_discovery_curve, plot_remove_curves, plot_value_histogram
    plots_dir.mkdir(parents=True, exist_ok=True)
    out: list[Path] = []
    tag = f"{rep.method} on {rep.dataset}"
    if rep.is_corrupted is not None:
        out.append(plot_discovery_curve({rep.method: rep.values}, rep.is_corrupted, plots_dir / "discovery.png",
                                        title=f"Corrupted-sample discovery: {tag}"))
        out.append(plot_value_histogram(rep.values, rep.is_corrupted, plots_dir / "values_hist.png",
                                        title=f"Values of clean vs corrupted samples: {tag}"))
    else:
        out.append(plot_value_histogram(rep.values, np.zeros(rep.n, dtype=bool), plots_dir / "values_hist.png",
                                        title=f"Data values: {tag}"))
    if rep.sigma is not None:
        out.append(_plot_values_vs_noise(rep.values, rep.sigma, plots_dir / "values_vs_noise.png",
                                         rep.metrics.get("noise_spearman")))
    if rep.curves:
        # Curves carry their method name in .label (solid = remove high, dashed = remove low).
        out.append(plot_remove_curves(list(rep.curves), plots_dir / "remove_curves.png",
                                      title=f"Test accuracy after removing data: {tag}"))
    return out


# ---------------------------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------------------------
def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        f = float(v)
        if not math.isfinite(f):
            return "-"
        return f"{f:.{digits}f}"
    return str(v)


def summary_rows(rep: RunReport) -> tuple[list[str], list[list[str]]]:
    """Header and one row: method, dataset, noise, n, AUROC, AUPRC, k-means F1, (Spearman), time."""
    m = rep.metrics
    head = ["method", "dataset", "noise", "n", "AUROC", "AUPRC", "k-means F1"]
    row = [rep.method, rep.dataset, rep.noise, str(rep.n), _fmt(m.get("auroc")), _fmt(m.get("auprc")),
           _fmt(m.get("kmeans_f1"))]
    if "noise_spearman" in m:
        head.append("Spearman")
        row.append(_fmt(m.get("noise_spearman")))
    head.append("time (s)")
    row.append(_fmt(rep.timings.get("valuation"), 1))
    return head, [row]


def text_table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip()]
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return "\n".join(lines)


def summary_table(rep: RunReport) -> str:
    return text_table(*summary_rows(rep))


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    esc = [[c.replace("|", "\\|") for c in r] for r in [head, *rows]]
    lines = ["| " + " | ".join(esc[0]) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in esc[1:]]
    return "\n".join(lines)


_METRIC_LABELS = {
    "auroc": "detection AUROC (low value = corrupted)", "auprc": "detection AUPRC",
    "kmeans_f1": "k-means F1 (OpenDataVal)", "discovery_auc": "discovery curve AUC",
    "noise_spearman": "Spearman(value, -noise sigma)", "n_corrupted": "corrupted samples",
    "n": "samples valued", "value_mean": "value mean", "value_std": "value std",
    "value_min": "value min", "value_max": "value max",
}


def metric_rows(rep: RunReport) -> list[list[str]]:
    rows = []
    for k, v in rep.metrics.items():
        if isinstance(v, dict):
            continue
        label = _METRIC_LABELS.get(k, k)
        if k.startswith("discovery@"):
            try:
                label = f"corrupted found among the lowest {float(k.split('@', 1)[1]):.0%}"
            except ValueError:
                pass
        rows.append([label, _fmt(v, 4)])
    for c in rep.curves:
        pairs = ", ".join(f"{f:.0%}: {s:.3f}" for f, s in zip(c.fractions, c.scores))
        rows.append([f"test {c.metric}, remove {c.mode} first", pairs])
    return rows


def setting_rows(rep: RunReport) -> list[list[str]]:
    rows = [["method", rep.method], ["dataset", rep.dataset],
            ["noise", f"{rep.noise} ({rep.noise_description})" if rep.noise_description else rep.noise]]
    rows += [[k.replace("_", " "), _fmt(v)] for k, v in rep.sizes.items()]
    rows += [[k.replace("_", " "), _fmt(v) if not isinstance(v, (dict, list)) else json.dumps(_jsonable(v))]
             for k, v in rep.settings.items()]
    for k, v in rep.method_settings.items():
        rows.append([f"{rep.method}.{k}", _fmt(v) if not isinstance(v, (dict, list)) else json.dumps(_jsonable(v))])
    rows += [[f"time: {k}", f"{v:.2f} s"] for k, v in rep.timings.items()]
    if rep.command:
        rows.append(["command", rep.command])
    return rows


def lowest_rows(rep: RunReport, k: int = 10) -> tuple[list[str], list[list[str]]]:
    head = ["rank", "index", "source row", "value"]
    if rep.labels is not None:
        head.append("label")
    if rep.is_corrupted is not None:
        head.append("corrupted")
    if rep.sigma is not None:
        head.append("noise sigma")
    order = np.argsort(rep.values, kind="stable")[:k]
    rows = []
    for r, i in enumerate(order, 1):
        row = [str(r), str(int(i)), str(int(rep.source_rows[i]) if rep.source_rows is not None else int(i)),
               f"{rep.values[i]:.4g}"]
        if rep.labels is not None:
            row.append(str(int(rep.labels[i])))
        if rep.is_corrupted is not None:
            row.append("yes" if rep.is_corrupted[i] else "no")
        if rep.sigma is not None:
            row.append(f"{rep.sigma[i]:.3g}")
        rows.append(row)
    return head, rows


# ---------------------------------------------------------------------------------------------
# documents
# ---------------------------------------------------------------------------------------------
def _title(rep: RunReport) -> str:
    return f"dvgs-fast: {rep.method} on {rep.dataset} ({rep.noise})"


def render_markdown(rep: RunReport, plots: list[Path], plots_rel: str = PLOTS_DIR) -> str:
    parts = [f"# {_title(rep)}", "", _md_table(*summary_rows(rep)), ""]
    if rep.notes:
        parts += ["Notes:", *[f"- {n}" for n in rep.notes], ""]
    parts += ["## Metrics", "", _md_table(["metric", "value"], metric_rows(rep)), ""]
    if plots:
        parts += ["## Plots", ""]
        parts += [f"![{p.stem}]({plots_rel}/{p.name})" for p in plots]
        parts.append("")
    parts += ["## Lowest-valued samples", "", _md_table(*lowest_rows(rep)), "",
              f"All values: [`{VALUES_CSV}`]({VALUES_CSV}); metrics: [`{METRICS_JSON}`]({METRICS_JSON}).", "",
              "## Settings", "", _md_table(["setting", "value"], setting_rows(rep)), ""]
    return "\n".join(parts)


_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;
max-width:60em;padding:0 1em;color:#222}h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0}th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left;
vertical-align:top}th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
figure{display:inline-block;margin:.5em}img{max-width:100%;height:auto;border:1px solid #eee}
.note{color:#555}code{background:#f6f6f6;padding:0 .2em}"""


def _html_table(head: list[str], rows: list[list[str]]) -> str:
    def cell(c: str) -> str:
        num = c.replace(".", "", 1).replace("-", "", 1).isdigit()
        return f'<td class="num">{html.escape(c)}</td>' if num else f"<td>{html.escape(c)}</td>"
    out = ["<table>", "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    out += ["<tr>" + "".join(cell(c) for c in r) + "</tr>" for r in rows]
    out.append("</table>")
    return "\n".join(out)


def render_html(rep: RunReport, plots: list[Path]) -> str:
    title = html.escape(_title(rep))
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{title}</title>", f"<style>{_CSS}</style></head><body>", f"<h1>{title}</h1>",
             _html_table(*summary_rows(rep))]
    if rep.notes:
        parts.append("<ul>" + "".join(f'<li class="note">{html.escape(n)}</li>' for n in rep.notes) + "</ul>")
    parts += ["<h2>Metrics</h2>", _html_table(["metric", "value"], metric_rows(rep))]
    if plots:
        parts.append("<h2>Plots</h2>")
        for p in plots:
            data = base64.b64encode(Path(p).read_bytes()).decode("ascii")
            parts.append(f'<figure><img alt="{html.escape(p.stem)}" src="data:image/png;base64,{data}">'
                         f"<figcaption>{html.escape(p.name)}</figcaption></figure>")
    parts += ["<h2>Lowest-valued samples</h2>", _html_table(*lowest_rows(rep)),
              f"<p>All values are in <code>{VALUES_CSV}</code>, all metrics in <code>{METRICS_JSON}</code>.</p>",
              "<h2>Settings</h2>", _html_table(["setting", "value"], setting_rows(rep)), "</body></html>", ""]
    return "\n".join(parts)


def clear_previous(out_dir: Path) -> None:
    """Remove the files an earlier report wrote here (only those; nothing else is touched)."""
    for name in OUTPUT_NAMES:
        p = out_dir / name
        if p.is_file():
            p.unlink()
    for name in PLOT_NAMES:
        p = out_dir / PLOTS_DIR / name
        if p.is_file():
            p.unlink()


def write_report(rep: RunReport, out_dir: str | Path) -> dict[str, Any]:
    """Write every file of the report into ``out_dir``; returns {kind: path(s)}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Any] = {"values": write_values_csv(rep, out_dir / VALUES_CSV)}
    plots = make_plots(rep, out_dir / PLOTS_DIR)
    paths["plots"] = plots
    paths["metrics"] = write_metrics_json(rep, out_dir / METRICS_JSON)
    md = out_dir / REPORT_MD
    atomic_write_text(md, render_markdown(rep, plots))
    paths["report_md"] = md
    h = out_dir / REPORT_HTML
    atomic_write_text(h, render_html(rep, plots))
    paths["report_html"] = h
    _usual_permissions([paths["values"], paths["metrics"], md, h, *plots])
    return paths


def _usual_permissions(paths: list[Path]) -> None:
    """Atomic writes go through mkstemp, which makes files private (0600); a report is meant to
    be shared like any file the user writes, so give it the permissions the umask asks for."""
    import os
    mask = os.umask(0)
    os.umask(mask)
    for p in paths:
        try:
            os.chmod(p, 0o666 & ~mask)
        except OSError:  # pragma: no cover - e.g. a file system without permissions
            pass
