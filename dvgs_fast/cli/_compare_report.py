"""How ``dvgs-fast compare`` shows its runs: summaries over seeds (mean +- 2 sd), the tables,
the banner for stopped or failed runs, the plots (metrics by method, mean removal and discovery
curves, times) and compare.md / compare.html / runs.csv. ``_compare.run_compare`` produces the
runs; this module only presents them."""
from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

COMPARE_MD = "compare.md"
COMPARE_HTML = "compare.html"
COMPARE_JSON = "compare.json"
RUNS_CSV = "runs.csv"
VALUES_DIR = "values"
PLOTS_DIR = "plots"
GROUND_TRUTH_DIR = "ground_truth"       # --metric lds,loo: the retrains, cached per seed
OUTPUT_NAMES = (COMPARE_MD, COMPARE_HTML, COMPARE_JSON, RUNS_CSV, VALUES_DIR, PLOTS_DIR, GROUND_TRUTH_DIR)

# metric key -> column title; shown when any run has it
METRIC_COLUMNS = (("auroc", "AUROC"), ("auprc", "AUPRC"), ("kmeans_f1", "k-means F1"),
                  ("discovery_auc", "discovery AUC"), ("noise_spearman", "Spearman"), ("lds", "LDS"),
                  ("loo_spearman", "LOO Spearman"))


def mean_sd(xs: list[float]) -> tuple[float | None, float | None]:
    """(mean, sample sd with ddof 1) over the finite numbers; sd None with fewer than two."""
    v = [float(x) for x in xs if x is not None and math.isfinite(float(x))]
    if not v:
        return None, None
    m = float(np.mean(v))
    return m, (float(np.std(v, ddof=1)) if len(v) > 1 else None)


def fmt_mean_sd(xs: list[float], digits: int = 3) -> str:
    m, sd = mean_sd(xs)
    if m is None:
        return "-"
    if sd is None:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {2 * sd:.{digits}f}"


def status_of(run: dict[str, Any]) -> str:
    if run["status"] == "failed":
        return "failed"
    if run["status"] == "stopped":
        return f"stopped ({run.get('stopped_by') or 'budget'})"
    return run["status"]


def summarize_runs(runs: list[dict[str, Any]], methods: list[str]) -> list[dict[str, Any]]:
    """One entry per method: per-seed metric lists, mean/sd, times, statuses."""
    out = []
    for m in methods:
        rs = [r for r in runs if r["method"] == m]
        ok = [r for r in rs if r["status"] != "failed"]
        entry: dict[str, Any] = {"method": m, "seeds": [r["seed"] for r in rs], "n_runs": len(rs),
                                 "n_failed": len(rs) - len(ok)}
        for key, _ in METRIC_COLUMNS:
            vals = [r["metrics"].get(key) for r in ok if r["metrics"].get(key) is not None]
            if vals:
                mean, sd = mean_sd(vals)
                entry[key] = {"values": vals, "mean": mean, "sd": sd}
        for key in ("wall_s", "cpu_s"):
            mean, sd = mean_sd([r[key] for r in ok])
            entry[key] = {"values": [r[key] for r in ok], "mean": mean, "sd": sd}
        counts: dict[str, int] = {}
        for r in rs:
            counts[status_of(r)] = counts.get(status_of(r), 0) + 1
        entry["status"] = counts
        entry["valued_min"] = min((r["n_valued"] / r["n"] for r in ok), default=None)
        out.append(entry)
    return out


def _status_cell(entry: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}/{entry['n_runs']}" if len(entry["status"]) > 1 or v != entry["n_runs"] else k
                     for k, v in entry["status"].items())


def summary_table_rows(summary: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    keys = [(k, t) for k, t in METRIC_COLUMNS if any(k in e for e in summary)]
    head = ["method", *[f"{t} (mean ± 2 sd)" for _, t in keys], "wall (s)", "CPU (s)", "valued", "status"]
    rows = []
    for e in summary:
        row = [e["method"]]
        row += [fmt_mean_sd(e[k]["values"]) if k in e else "-" for k, _ in keys]
        row += [fmt_mean_sd(e["wall_s"]["values"], 1), fmt_mean_sd(e["cpu_s"]["values"], 1)]
        row.append("-" if e["valued_min"] is None else
                   ("all" if e["valued_min"] >= 1.0 else f"≥ {e['valued_min']:.0%}"))
        row.append(_status_cell(e))
        rows.append(row)
    return head, rows


def per_run_rows(runs: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    keys = [(k, t) for k, t in METRIC_COLUMNS if any(k in r["metrics"] for r in runs)]
    head = ["method", "seed", *[t for _, t in keys], "wall (s)", "CPU (s)", "valued", "status", "how far"]
    rows = []
    for r in runs:
        row = [r["method"], str(r["seed"])]
        for k, _ in keys:
            v = r["metrics"].get(k)
            row.append("-" if v is None or not math.isfinite(v) else f"{v:.3f}")
        row += [f"{r['wall_s']:.1f}", f"{r['cpu_s']:.1f}",
                "-" if r["status"] == "failed" else f"{r['n_valued']}/{r['n']}", status_of(r),
                r.get("progress") or r.get("error") or ""]
        rows.append(row)
    return head, rows


def banner(runs: list[dict[str, Any]]) -> str | None:
    """What the comparison's reader must know first: runs stopped by a budget, or failed."""
    stopped = [r for r in runs if r["status"] == "stopped"]
    partial = [r for r in runs if r["status"] != "failed" and r["n_valued"] < r["n"]]
    failed = [r for r in runs if r["status"] == "failed"]
    if not (stopped or failed):
        return None
    parts = []
    if stopped:
        which = ", ".join(f"{r['method']} seed {r['seed']} ({r.get('stopped_by') or 'budget'}"
                          f"{', ' + r['progress'] if r.get('progress') else ''})" for r in stopped)
        parts.append(f"{len(stopped)} of {len(runs)} runs were STOPPED EARLY by their budget: {which}.")
    if partial:
        parts.append(f"{len(partial)} of them did not value every sample; their metrics are computed over the "
                     f"valued samples only and their removal curves are skipped.")
    elif stopped:
        parts.append("Every sample was valued, but by runs cut short: their values are less reliable than "
                     "completed runs'.")
    if failed:
        parts.append(f"{len(failed)} runs FAILED: " + "; ".join(f"{r['method']} seed {r['seed']}: {r['error']}"
                                                            for r in failed))
    return " ".join(parts)


# ---------------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------------
def _figure(figsize=(6.0, 4.0)):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=figsize, dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    from .._io import atomic_write_bytes
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
    return path


def plot_metric_by_method(summary: list[dict[str, Any]], key: str, title: str, path: Path) -> Path | None:
    entries = [e for e in summary if key in e]
    if not entries:
        return None
    fig = _figure((max(4.5, 0.9 * len(entries) + 2), 4.0))
    ax = fig.add_subplot(1, 1, 1)
    for i, e in enumerate(entries):
        v = np.asarray(e[key]["values"], dtype=float)
        jitter = np.linspace(-0.12, 0.12, len(v)) if len(v) > 1 else np.zeros(1)
        ax.scatter(i + jitter, v, s=16, color=f"C{i % 10}", alpha=0.7, zorder=3)
        if e[key]["sd"] is not None:
            ax.errorbar(i + 0.3, e[key]["mean"], yerr=2 * e[key]["sd"], fmt="o", color="k", capsize=4,
                        markersize=4, zorder=4)
        else:
            ax.plot(i + 0.3, e[key]["mean"], "o", color="k", markersize=4)
    if key in ("auroc",):
        ax.axhline(0.5, color="0.6", linestyle=":", label="chance")
        ax.legend(fontsize=8, loc="lower right")
    ax.set_xticks(range(len(entries)))
    ax.set_xticklabels([e["method"] for e in entries], rotation=30, ha="right")
    ax.set_ylabel(title)
    ax.set_title(f"{title} per seed (black: mean ± 2 sd)")
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def plot_times(summary: list[dict[str, Any]], path: Path) -> Path | None:
    entries = [e for e in summary if e["wall_s"]["mean"] is not None]
    if not entries:
        return None
    fig = _figure((max(4.5, 0.9 * len(entries) + 2), 4.0))
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(entries))
    wall = [max(e["wall_s"]["mean"], 1e-3) for e in entries]
    cpu = [max(e["cpu_s"]["mean"] or 0.0, 1e-3) for e in entries]
    ax.bar(x - 0.2, wall, width=0.4, label="wall", color="C0")
    ax.bar(x + 0.2, cpu, width=0.4, label="CPU", color="C1")
    ax.set_yscale("log")
    ax.set_xticks(x)
    ax.set_xticklabels([e["method"] for e in entries], rotation=30, ha="right")
    ax.set_ylabel("seconds per run (mean over seeds)")
    ax.set_title("Valuation time")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def curves_description(curve: dict[str, Any]) -> str | None:
    """What a run's removal curves retrained and how ("model" and its settings, from _main._score)."""
    if not curve.get("model"):
        return None
    return f"removal curves: {curve['model']}"      # the model's line names epochs and replicates


def curves_line(runs: list[dict[str, Any]]) -> str | None:
    for r in runs:
        c = r.get("metrics", {}).get("remove_high")
        if c:
            return curves_description(c)
    return None


def plot_mean_curves(runs: list[dict[str, Any]], methods: list[str], path: Path, dataset: str) -> Path | None:
    """Removal curves, mean over the seeds per method (solid: remove high first, dashed: low)."""
    fig = _figure((8.0, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    drawn = metric = 0
    n_seeds = 0
    model = None
    for i, m in enumerate(methods):
        labelled = False
        for mode, style in (("high", "-"), ("low", "--")):
            curves = [r["metrics"][f"remove_{mode}"] for r in runs
                      if r["method"] == m and f"remove_{mode}" in r["metrics"]]
            if not curves:
                continue
            fr = np.asarray(curves[0]["fractions"])
            sc = np.mean([c["scores"] for c in curves], axis=0)
            metric = curves[0]["metric"]
            model = model or curves_description(curves[0])
            n_seeds = max(n_seeds, len(curves))
            # one legend entry per method (its colour); the line style is keyed once below
            ax.plot(fr, sc, linestyle=style, marker="o", markersize=3, color=f"C{i % 10}",
                    label=None if labelled else m)
            labelled = True
            drawn += 1
    if not drawn:
        return None
    ax.plot([], [], color="0.3", linestyle="-", label="remove high first")
    ax.plot([], [], color="0.3", linestyle="--", label="remove low first")
    from ..evaluate.curves import METRIC_LABELS
    ax.set_xlabel("fraction of training data removed")
    ax.set_ylabel(f"test {METRIC_LABELS.get(metric, metric)}")
    ax.set_title(f"Removing high / low valued data: {dataset}"
                 + (f" (mean of {n_seeds} seeds)" if n_seeds > 1 else ""))
    if model:
        ax.text(0.0, -0.16, model, transform=ax.transAxes, fontsize=7, va="top", wrap=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    return _save(fig, path)


def plot_mean_discovery(found: dict[str, list[np.ndarray]], fractions: np.ndarray, optimal: np.ndarray,
                        path: Path, dataset: str) -> Path | None:
    if not found:
        return None
    fig = _figure((8.0, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(fractions, optimal, color="0.3", linestyle="--", label="optimal")
    ax.plot(fractions, fractions, color="0.6", linestyle=":", label="random order")
    n_seeds = max(len(fs) for fs in found.values())
    for i, (m, fs) in enumerate(found.items()):
        ax.plot(fractions, np.mean(fs, axis=0), color=f"C{i % 10}", marker="o", markersize=2,
                label=m + (f" ({len(fs)} seeds)" if len(fs) != n_seeds else ""))
    ax.set_xlabel("fraction of data inspected (lowest values first)")
    ax.set_ylabel("fraction of corrupted samples found")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    ax.set_title(f"Discovery of corrupted samples: {dataset}"
                 + (f" (mean of {n_seeds} seeds)" if n_seeds > 1 else ""))
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# documents
# ---------------------------------------------------------------------------------------------
def _md_table(head: list[str], rows: list[list[str]]) -> str:
    esc = [[c.replace("|", "\\|") for c in r] for r in [head, *rows]]
    lines = ["| " + " | ".join(esc[0]) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in esc[1:]]
    return "\n".join(lines)


def _html_table(head: list[str], rows: list[list[str]]) -> str:
    out = ["<table>", "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    out += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows]
    out.append("</table>")
    return "\n".join(out)


def ground_truth_line(gt: dict[str, Any]) -> str:
    """What LDS / LOO Spearman were measured against (--metric)."""
    cpu = gt.get("cpu_s") or []
    rel = []
    for k in gt["metrics"]:
        vals = [r[k] for r in gt.get("reliability") or [] if r.get(k) is not None]
        if vals:
            rel.append(f"{k.upper()} {min(vals):.2f}" + (f"-{max(vals):.2f}" if max(vals) > min(vals) else ""))
    ceiling = (f" The ground truth's own seeds agree to a reliability of {', '.join(rel)} (Spearman-Brown of the "
               f"split-half agreement): roughly the best any method can score." if rel else "")
    return (f"LDS / LOO Spearman (--metric {','.join(gt['metrics'])}): each method's attribute() against "
            f"retraining {gt.get('recipe')}; mean over queries per seed, then mean ± 2 sd over seeds; the ground "
            f"truth cost {sum(cpu):.1f} CPU s in all (cached in `{gt.get('folder')}/`).{ceiling} Methods without "
            f"attribute() show '-'.")


def render_markdown(doc: dict[str, Any], plots: list[Path]) -> str:
    title = f"dvgs-fast compare: {doc['dataset']} ({doc['noise']}), seeds {', '.join(map(str, doc['seeds']))}"
    parts = [f"# {title}", ""]
    if doc["banner"]:
        parts += [f"> **{doc['banner']}**", ""]
    parts += [_md_table(*summary_table_rows(doc["summary"])), ""]
    parts += [f"{doc['sizes']['n_source']} source / {doc['sizes']['n_target']} target / {doc['sizes']['n_test']} "
              f"test samples, {doc['noise_description']}; every method sees the same split per seed. "
              f"mean ± 2 sd over the seeds (sample sd); times are the valuation's own (wall and process CPU), "
              f"{doc['settings']['threads']} torch thread(s), load average {doc['loadavg_start']} at the start "
              f"and {doc['loadavg_end']} at the end.", ""]
    if doc["notes"]:
        parts += ["Notes:", *[f"- {n}" for n in doc["notes"]], ""]
    if doc.get("curves"):
        parts += [doc["curves"][0].upper() + doc["curves"][1:] + ".", ""]
    if doc.get("ground_truth"):
        parts += [ground_truth_line(doc["ground_truth"]), ""]
    if plots:
        parts += ["## Plots", "", *[f"![{p.stem}]({PLOTS_DIR}/{p.name})" for p in plots], ""]
    parts += ["## Every run", "", _md_table(*per_run_rows(doc["runs"])), "",
              f"Values: `{VALUES_DIR}/METHOD-seedN.csv`; all numbers: [`{COMPARE_JSON}`]({COMPARE_JSON}), "
              f"[`{RUNS_CSV}`]({RUNS_CSV}).", "", "## Settings", ""]
    rows = [["command", doc["command"]], ["model(s)", "; ".join(f"{m}: {d}" for m, d in doc["models"].items())]]
    for m, s in doc["method_settings"].items():
        rows.append([m, json.dumps(s)])
    parts += [_md_table(["setting", "value"], rows), ""]
    return "\n".join(parts)


_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;
max-width:70em;padding:0 1em;color:#222}h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.5em}
table{border-collapse:collapse;margin:.5em 0}th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left}
th{background:#f3f3f3}figure{display:inline-block;margin:.5em}img{max-width:100%;height:auto}
.banner{background:#fff3cd;border:2px solid #d9534f;color:#7a1f1c;font-weight:600;padding:.7em 1em;margin:1em 0}"""


def render_html(doc: dict[str, Any], plots: list[Path]) -> str:
    title = html.escape(f"dvgs-fast compare: {doc['dataset']} ({doc['noise']})")
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{title}</title>",
             f"<style>{_CSS}</style></head><body>", f"<h1>{title}</h1>"]
    if doc["banner"]:
        parts.append(f'<div class="banner" role="alert">{html.escape(doc["banner"])}</div>')
    parts.append(_html_table(*summary_table_rows(doc["summary"])))
    if doc["notes"]:
        parts.append("<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in doc["notes"]) + "</ul>")
    if doc.get("curves"):
        parts.append(f"<p>{html.escape(doc['curves'][0].upper() + doc['curves'][1:])}.</p>")
    if doc.get("ground_truth"):
        parts.append(f"<p>{html.escape(ground_truth_line(doc['ground_truth']))}</p>")
    for p in plots:
        data = base64.b64encode(Path(p).read_bytes()).decode("ascii")
        parts.append(f'<figure><img alt="{html.escape(p.stem)}" src="data:image/png;base64,{data}"></figure>')
    parts += ["<h2>Every run</h2>", _html_table(*per_run_rows(doc["runs"])),
              f"<p>Command: <code>{html.escape(doc['command'])}</code></p>", "</body></html>", ""]
    return "\n".join(parts)


def write_runs_csv(runs: list[dict[str, Any]], path: Path) -> None:
    from .._io import atomic_write_text
    keys = [k for k, _ in METRIC_COLUMNS if any(k in r["metrics"] for r in runs)]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["method", "seed", "status", "stopped_by", "progress", "n", "n_valued", *keys, "wall_s", "cpu_s",
                "error"])
    for r in runs:
        w.writerow([r["method"], r["seed"], r["status"], r.get("stopped_by") or "", r.get("progress") or "",
                    r["n"], r["n_valued"],
                    *["" if r["metrics"].get(k) is None else repr(float(r["metrics"][k])) for k in keys],
                    f"{r['wall_s']:.3f}", f"{r['cpu_s']:.3f}", r.get("error") or ""])
    atomic_write_text(path, buf.getvalue())
