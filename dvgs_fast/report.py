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
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._io import LockBusy, SymlinkError, atomic_write_bytes, atomic_write_text, hold_lock, refuse_link, release_lock

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
    # How complete the values are (dvgs_fast.result.ValuationResult): stderr / counts per sample,
    # the status and, for a "stopped" run, what stopped it and how far it got.
    stderr: np.ndarray | None = None
    counts: np.ndarray | None = None
    status: str = "completed"
    stopped_by: str | None = None
    progress: str = ""
    class_names: list[str] | None = None         # label code -> the data's own label (values.csv)
    curves_skipped: str | None = None            # why there are no removal curves, when asked for

    def __post_init__(self) -> None:
        self.values = np.asarray(self.values, dtype=np.float64).reshape(-1)
        if self.counts is not None:
            self.counts = np.asarray(self.counts).astype(np.int64, copy=False).reshape(-1)
        if self.stderr is not None:
            self.stderr = np.asarray(self.stderr, dtype=np.float64).reshape(-1)

    @property
    def n(self) -> int:
        return int(self.values.shape[0])

    @property
    def valued(self) -> np.ndarray:
        """Samples that were evaluated at least once; the others hold a placeholder value."""
        if self.counts is None:
            return np.ones(self.n, dtype=bool)
        return self.counts > 0

    @property
    def n_valued(self) -> int:
        return int(self.valued.sum())

    def _label(self, code: Any) -> str:
        c = int(code)
        if self.class_names is not None and 0 <= c < len(self.class_names):
            return str(self.class_names[c])
        return str(c)


def status_banner(rep: RunReport) -> str | None:
    """One paragraph that a report opens with when its values are incomplete (None otherwise).

    A budget that ends a run early must never hide: the banner says what stopped it, how far it
    got, how many samples were valued and what the metrics below are computed over."""
    partial = rep.n_valued < rep.n
    if rep.status != "stopped" and not partial:
        return None
    parts = []
    if rep.status == "stopped":
        how = f" by {rep.stopped_by}" if rep.stopped_by and rep.stopped_by != "stopped" else ""
        parts.append(f"STOPPED EARLY: {rep.method} was stopped{how}"
                     f"{' after ' + rep.progress if rep.progress else ''}.")
    if partial:
        parts.append(f"Only {rep.n_valued} of {rep.n} samples were valued; the other "
                     f"{rep.n - rep.n_valued} hold a placeholder (counts == 0 in {VALUES_CSV}), and every "
                     f"metric below is computed over the {rep.n_valued} valued samples only.")
        if rep.curves_skipped:
            parts.append(rep.curves_skipped)
    else:
        parts.append(f"All {rep.n} samples were valued, but by a run cut short: its values are less "
                     f"reliable than a completed run's (raise --max-time or the iteration count).")
    return " ".join(parts)


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------
def write_values_csv(rep: RunReport, path: Path) -> Path:
    """One row per source sample: index, source_row, (cid), value, stderr, counts, rank (1 = lowest),
    label, corrupted / noise_sigma.

    stderr is empty where the method has no notion of spread (NaN); counts 0 marks a sample that
    was never valued (a run stopped by its budget): its value is a placeholder and its rank empty."""
    cols = ["index", "source_row", "value", "stderr", "counts", "rank"]
    if rep.sample_ids is not None:
        cols.insert(2, "cid")
    if rep.labels is not None:
        cols.append("label")
    if rep.is_corrupted is not None:
        cols.append("corrupted")
    if rep.sigma is not None:
        cols.append("noise_sigma")
    valued = rep.valued
    ranks = np.zeros(rep.n, dtype=np.int64)            # 0 = not ranked (never valued)
    idx = np.flatnonzero(valued)
    ranks[idx[np.argsort(rep.values[idx], kind="stable")]] = np.arange(1, idx.size + 1)
    counts = np.ones(rep.n, dtype=np.int64) if rep.counts is None else rep.counts
    stderr = np.full(rep.n, np.nan) if rep.stderr is None else rep.stderr
    rows = np.arange(rep.n) if rep.source_rows is None else np.asarray(rep.source_rows)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for i in range(rep.n):
        se = float(stderr[i])
        r: list[Any] = [i, int(rows[i]), repr(float(rep.values[i])), repr(se) if math.isfinite(se) else "",
                        int(counts[i]), int(ranks[i]) if ranks[i] else ""]
        if rep.sample_ids is not None:
            r.insert(2, str(rep.sample_ids[i]))
        if rep.labels is not None:
            r.append(rep._label(rep.labels[i]))
        if rep.is_corrupted is not None:
            r.append(int(bool(rep.is_corrupted[i])))
        if rep.sigma is not None:
            r.append(f"{float(rep.sigma[i]):.6g}")
        w.writerow(r)
    atomic_write_text(path, buf.getvalue())
    return path


def write_values_early(rep: RunReport, out_dir: str | Path) -> Path:
    """values.csv alone, right after the valuation (the report comes later): an interrupt during
    the evaluation keeps the values."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    p = write_values_csv(rep, out_dir / VALUES_CSV)
    _usual_permissions([p])
    return p


def jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if math.isfinite(f) else None   # JSON has no NaN
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if isinstance(obj, Path):
        return str(obj)
    return repr(obj)


def metrics_document(rep: RunReport) -> dict[str, Any]:
    doc = {"method": rep.method, "dataset": rep.dataset, "noise": rep.noise, **rep.sizes,
           "status": rep.status, "stopped_by": rep.stopped_by, "progress": rep.progress or None,
           "n_valued": rep.n_valued, "banner": status_banner(rep), "metrics": rep.metrics, "timings": rep.timings, "settings": rep.settings,
           "method_settings": rep.method_settings, "notes": rep.notes, "command": rep.command}
    doc.update(rep.extra)
    return jsonable(doc)


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
    # Unvalued samples (a budget-stopped run) hold placeholders: plot the valued ones only.
    ok = rep.valued
    if not ok.any():
        return out
    if ok.sum() < rep.n:
        tag += f", {int(ok.sum())} of {rep.n} valued"
    v = rep.values[ok]
    bad = None if rep.is_corrupted is None else np.asarray(rep.is_corrupted, dtype=bool)[ok]
    if bad is not None and bad.any() and not bad.all():
        out.append(plot_discovery_curve({rep.method: v}, bad, plots_dir / "discovery.png",
                                        title=f"Corrupted-sample discovery: {tag}"))
        out.append(plot_value_histogram(v, bad, plots_dir / "values_hist.png",
                                        title=f"Values of clean vs corrupted samples: {tag}"))
    else:
        out.append(plot_value_histogram(v, np.zeros(v.shape[0], dtype=bool), plots_dir / "values_hist.png",
                                        title=f"Data values: {tag}"))
    if rep.sigma is not None:
        out.append(_plot_values_vs_noise(v, np.asarray(rep.sigma)[ok], plots_dir / "values_vs_noise.png",
                                         rep.metrics.get("noise_spearman")))
    if rep.curves:
        # Curves carry their method name in .label (solid = remove high, dashed = remove low).
        c0 = rep.curves[0]
        reps = c0.info.get("repeats", 1)
        out.append(plot_remove_curves(list(rep.curves), plots_dir / "remove_curves.png",
                                      title=f"Test {c0.metric_label} after removing data: {tag}"
                                            + (f" (mean of {reps} refits per point)" if reps > 1 else "")))
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
    n = str(rep.n) if rep.n_valued == rep.n else f"{rep.n_valued} of {rep.n} valued"
    row = [rep.method, rep.dataset, rep.noise, n, _fmt(m.get("auroc")), _fmt(m.get("auprc")),
           _fmt(m.get("kmeans_f1"))]
    if "noise_spearman" in m:
        head.append("Spearman")
        row.append(_fmt(m.get("noise_spearman")))
    head += ["time (s)", "status"]
    row += [_fmt(rep.timings.get("valuation"), 1), status_text(rep.status, rep.stopped_by)]
    return head, [row]


def status_text(status: str, stopped_by: str | None) -> str:
    """"completed", "converged" or "stopped (max_time)"."""
    if status == "stopped" and stopped_by and stopped_by != "stopped":
        return f"stopped ({stopped_by})"
    return status


def text_table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip()]
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return "\n".join(lines)


def summary_table(rep: RunReport) -> str:
    """The printed summary: the banner of an incomplete run (if any) above the one-row table."""
    table = text_table(*summary_rows(rep))
    banner = status_banner(rep)
    if banner is None:
        return table
    import textwrap
    return "\n".join(["!" * 78, *textwrap.wrap(banner, 78), "!" * 78, table])


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    esc = [[c.replace("|", "\\|") for c in r] for r in [head, *rows]]
    lines = ["| " + " | ".join(esc[0]) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in esc[1:]]
    return "\n".join(lines)


_METRIC_LABELS = {
    "auroc": "detection AUROC (low value = corrupted)", "auprc": "detection AUPRC",
    "kmeans_f1": "k-means F1 (OpenDataVal)", "discovery_auc": "discovery curve AUC",
    "noise_spearman": "Spearman(value, -noise sigma)", "n_corrupted": "corrupted samples",
    "n": "samples scored (valued)", "n_unvalued": "samples never valued (not scored)", "value_mean": "value mean", "value_std": "value std",
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
    if rep.curves and rep.curves[0].info.get("model"):
        rows.append(["removal curves: model retrained", rep.curves[0].info["model"]])
    for c in rep.curves:
        pairs = ", ".join(f"{f:.0%}: {s:.3f}" for f, s in zip(c.fractions, c.scores))
        reps = c.info.get("repeats", 1)
        rows.append([f"test {c.metric_label}, remove {c.mode} first"
                     + (f" (mean of {reps} refits)" if reps > 1 else ""), pairs])
    return rows


def setting_rows(rep: RunReport) -> list[list[str]]:
    rows = [["method", rep.method], ["dataset", rep.dataset],
            ["noise", f"{rep.noise} ({rep.noise_description})" if rep.noise_description else rep.noise]]
    rows += [[k.replace("_", " "), _fmt(v)] for k, v in rep.sizes.items()]
    rows += [[k.replace("_", " "), _fmt(v) if not isinstance(v, (dict, list)) else json.dumps(jsonable(v))]
             for k, v in rep.settings.items()]
    for k, v in rep.method_settings.items():
        rows.append([f"{rep.method}.{k}", _fmt(v) if not isinstance(v, (dict, list)) else json.dumps(jsonable(v))])
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
    idx = np.flatnonzero(rep.valued)             # an unvalued sample's placeholder is not "low"
    order = idx[np.argsort(rep.values[idx], kind="stable")][:k]
    rows = []
    for r, i in enumerate(order, 1):
        row = [str(r), str(int(i)), str(int(rep.source_rows[i]) if rep.source_rows is not None else int(i)),
               f"{rep.values[i]:.4g}"]
        if rep.labels is not None:
            row.append(rep._label(rep.labels[i]))
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
    parts = [f"# {_title(rep)}", ""]
    banner = status_banner(rep)
    if banner is not None:
        parts += [f"> **{banner}**", ""]
    parts += [_md_table(*summary_rows(rep)), ""]
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
.note{color:#555}code{background:#f6f6f6;padding:0 .2em}
.banner{background:#fff3cd;border:2px solid #d9534f;color:#7a1f1c;font-weight:600;padding:.7em 1em;margin:1em 0}"""


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
             f"<title>{title}</title>", f"<style>{_CSS}</style></head><body>", f"<h1>{title}</h1>"]
    banner = status_banner(rep)
    if banner is not None:
        parts.append(f'<div class="banner" role="alert">{html.escape(banner)}</div>')
    parts.append(_html_table(*summary_rows(rep)))
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
    refuse_links_in(out_dir, ())
    for name in OUTPUT_NAMES:
        p = out_dir / name
        if p.is_file():
            p.unlink()
    for name in PLOT_NAMES:
        p = out_dir / PLOTS_DIR / name
        if p.is_file():
            p.unlink()


def refuse_links_in(out_dir: Path, names: tuple[str, ...]) -> None:
    """SymlinkError when a file or folder a report writes in `out_dir` is a link (a `plots` link
    would send the plots, and the removal of old ones, to another folder). `out_dir` itself may
    be a link: where the report lives is the user's choice."""
    for name in (*OUTPUT_NAMES, PLOTS_DIR, *names):
        refuse_link(out_dir / name)
    for name in PLOT_NAMES:
        refuse_link(out_dir / PLOTS_DIR / name)


INCOMPLETE_MARK = "INCOMPLETE.txt"
STAGE_SUFFIX = ".incomplete"
STAGE_LOCK = ".dvgs-fast.lock"          # in <out>.incomplete: held by the run writing it


def stage_holder(stage: Path) -> str | None:
    """Who holds the staging folder `stage` ("pid 123 on host since ..."), or None when no live
    process does (a stale folder of a killed run, or none at all). Takes nothing."""
    lock = stage / STAGE_LOCK
    if not lock.is_file() or lock.is_symlink():
        return None
    try:
        import fcntl
    except ImportError:                   # pragma: no cover - not POSIX: no liveness test
        return None
    try:
        fd = os.open(lock, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return os.read(fd, 200).decode(errors="replace").strip() or "holder's pid unknown"
    finally:
        os.close(fd)
    return None


class _ParentLock:
    """A short exclusive flock on the folder that holds `out` and `<out>.incomplete`: deciding
    whether a staging folder is stale, removing it and creating a new one (or renaming it at the
    end) is one step for every dvgs-fast process writing there."""

    def __init__(self, folder: Path):
        self.folder, self.fd = folder, None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:               # pragma: no cover - not POSIX
            return self
        self.fd = os.open(self.folder, os.O_RDONLY)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class StagedOutput:
    """An output folder that is complete or clearly marked as not.

    Everything is written into ``<out>.incomplete`` beside ``out`` (same parent, so the final
    rename is atomic), which holds an ``INCOMPLETE.txt`` saying so from the start; ``finish()``
    removes the mark and renames the folder to ``out``. A run that is killed leaves the
    ``.incomplete`` folder, never a half-written ``out``; one that is interrupted after its values
    were written keeps them there (``kept()`` says where).

    The run holds an flock on ``<out>.incomplete/.dvgs-fast.lock`` for its whole life. A
    ``.incomplete`` folder whose lock no live process holds is stale (an earlier run was killed)
    and is replaced: rerunning the same command recomputes the same values. One held by a live
    run is refused (two runs never write one folder). A folder of that name without the mark is
    not ours and is refused. ``unique`` (a name dvgs-fast chose itself, ``runs/<timestamp>-...``):
    a taken name is not an error, the next free one (``-2``, ``-3``, ...) is used and ``out``
    says which. ``out`` itself may exist only when ``overwrite``: then only the files a report
    writes are replaced in it (others are kept); any of them that is a symbolic link is refused.
    """

    def __init__(self, out: str | Path, overwrite: bool, names: tuple[str, ...] = (), unique: bool = False):
        self.out = Path(out)
        self.overwrite = overwrite
        self.names = names              # extra report files/folders to replace in an existing out
        self.unique = unique
        self.replaced_stale = False
        self._fd: int | None = None     # the held stage lock
        self._owned = False             # the staging folder is ours (created by this object)

    @property
    def stage(self) -> Path:
        return self.out.with_name(self.out.name + STAGE_SUFFIX)

    def open(self, description: str = "") -> Path:
        import datetime as _dt
        self.out.parent.mkdir(parents=True, exist_ok=True)
        with _ParentLock(self.out.parent):
            if self.unique:
                base, k = self.out, 2
                while os.path.lexists(self.out) or os.path.lexists(self.stage):
                    self.out = base.with_name(f"{base.name}-{k}")
                    k += 1
            self._claim_stage()
        if self.overwrite and self.out.is_dir():
            self._refuse_links()
        try:
            atomic_write_text(self.stage / INCOMPLETE_MARK,
                              f"This folder holds an unfinished dvgs-fast run (started "
                              f"{_dt.datetime.now().isoformat(timespec='seconds')}).\n"
                              f"When the run finishes it is renamed to {self.out.name}; if it is still here, "
                              f"the run was interrupted or killed. {VALUES_CSV}, if present, holds its values "
                              f"(complete for the valuation; the report files are missing or partial).\n"
                              + (f"command: {description}\n" if description else ""))
        except BaseException:
            self.abandon()
            raise
        return self.stage

    def _claim_stage(self) -> None:
        """Under the parent lock: replace a stale staging folder, refuse a live or foreign one,
        create ours and take its lock."""
        import shutil
        stage = self.stage
        if stage.is_symlink():
            raise ValueError(f"--out: {SymlinkError(stage)}")
        if stage.exists():
            if not (stage.is_dir() and (stage / INCOMPLETE_MARK).is_file()):
                raise ValueError(f"--out: {stage} exists and is not an unfinished dvgs-fast output "
                                 f"folder (no {INCOMPLETE_MARK}); move it away or choose another --out")
            holder = stage_holder(stage)
            if holder is not None:
                raise ValueError(f"--out: {stage} is being written by another dvgs-fast run ({holder}); wait for "
                                 f"it to finish or choose another --out")
            shutil.rmtree(stage)
            self.replaced_stale = True
        stage.mkdir()
        self._owned = True
        try:
            self._fd = hold_lock(stage / STAGE_LOCK)
        except LockBusy as busy:          # pragma: no cover - only under the parent lock
            raise ValueError(f"--out: {stage} is being written by another dvgs-fast run ({busy.holder})") from None
        except ImportError:               # pragma: no cover - not POSIX: no lock
            self._fd = None

    def _refuse_links(self) -> None:
        try:
            refuse_links_in(self.out, self.names)
        except SymlinkError as exc:
            raise ValueError(f"--out: {exc}") from None

    def _release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            release_lock(fd)

    def has_values(self) -> bool:
        # values.csv of a run, values/METHOD-seedN.csv of a comparison
        return self.stage.is_dir() and any(p.suffix == ".csv" for p in self.stage.rglob("*.csv"))

    def abandon(self) -> str | None:
        """After a failure: a line saying where the kept values are, or None (then the folder,
        holding nothing of value, is removed). Releases the folder's lock either way."""
        import shutil
        try:
            if not self._owned or not self.stage.is_dir():
                return None
            if self.has_values():
                return (f"the run did not finish; its values are kept in {self.stage} (marked incomplete by "
                        f"{INCOMPLETE_MARK}; the report files are missing)")
            shutil.rmtree(self.stage, ignore_errors=True)
            return None
        finally:
            self._release()

    def finish(self) -> Path:
        import shutil
        with _ParentLock(self.out.parent):
            occupied = self.out.is_dir() and any(self.out.iterdir())
            if occupied:
                if not self.overwrite:   # checked before the run; someone created it meanwhile
                    raise ValueError(f"--out: {self.out} appeared during the run; the report is in {self.stage}")
                self._refuse_links()
            (self.stage / INCOMPLETE_MARK).unlink(missing_ok=True)
            (self.stage / STAGE_LOCK).unlink(missing_ok=True)     # still held through the descriptor
            # a folder with files, or a link to a folder (the user's choice of place): move into it
            if occupied or (self.out.is_symlink() and self.out.is_dir()):
                clear_previous(self.out)
                for name in self.names:
                    p = self.out / name
                    if p.is_dir():
                        shutil.rmtree(p)
                    elif p.exists():
                        p.unlink()
                for entry in self.stage.iterdir():
                    dest = self.out / entry.name
                    if entry.is_dir() and dest.is_dir():      # plots/: merge (old report plots are cleared)
                        for f in entry.iterdir():
                            os.replace(f, dest / f.name)
                        entry.rmdir()
                    else:
                        os.replace(entry, dest)
                self.stage.rmdir()
            else:
                if self.out.is_dir():
                    self.out.rmdir()                          # an empty folder the user made
                os.replace(self.stage, self.out)
            self._release()
            self._owned = False
        return self.out


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
    mask = os.umask(0)
    os.umask(mask)
    for p in paths:
        try:
            os.chmod(p, 0o666 & ~mask)
        except OSError:  # pragma: no cover - e.g. a file system without permissions
            pass
