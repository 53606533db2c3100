"""Turn pytest-benchmark JSON files into bench/REPORT.md (+ PNG plots).

    python bench/report.py RESULTS.json [MORE.json ...] [--out runs/bench/REPORT.md] [--title ...]

Conventions the benchmarks follow (in `benchmark.extra_info`):
  timing          bench/_timing.py's summary of one interleaved comparison: thread count, load
                  average, and per named implementation its CPU and wall medians and its ratio
                  to the baseline (baseline CPU median / this CPU median, same run). One report
                  row per implementation. pytest-benchmark's own statistics are not used.
  n               problem size, for the time/memory-vs-N plots (series = group without "N=...")
  peak_mem_bytes  peak RSS (CPU) or torch.cuda.max_memory_allocated (GPU) above the start
  method, dataset, auroc (float or list over seeds), auroc_std: the quality table
  device          "cpu" / "cuda"; device_name for GPUs
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import re
import statistics
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _fmt_time(s: float) -> str:
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} µs"


def _fmt_bytes(b) -> str:
    if b is None:
        return "–"
    b = float(b)
    for unit in ("B", "KB", "MB", "GB"):
        if abs(b) < 1024 or unit == "GB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024
    return f"{b:.1f} GB"


def _machine(data: dict) -> str:
    mi = data.get("machine_info", {})
    cpu = mi.get("cpu", {}) or {}
    brand = cpu.get("brand_raw") or cpu.get("brand") or mi.get("processor") or "unknown CPU"
    cores = cpu.get("count")
    gpus = sorted({b.get("extra_info", {}).get("device_name") for b in data.get("benchmarks", [])} - {None})
    desc = f"{brand}" + (f", {cores} logical cores" if cores else "")
    if mi.get("torch_cpu_isa"):
        desc += f", torch {mi.get('torch_version', '?')} (CPU capability {mi['torch_cpu_isa']})"
    if mi.get("load_avg_at_start"):
        desc += f", load average at start {mi['load_avg_at_start'][0]:.1f}"
    if gpus:
        desc += "; GPU: " + ", ".join(gpus)
    return desc


def load(paths: list[str]) -> list[dict]:
    runs = []
    for p in paths:
        with open(p) as fh:
            data = json.load(fh)
        data["_path"] = p
        runs.append(data)
    return runs


def _ratio(row: dict, key: str) -> str:
    v = row.get(key)
    return "–" if v is None else f"{v:.2f}x"


def speed_table(run: dict) -> list[str]:
    """One row per named implementation: CPU and wall medians, ratios to the group's baseline."""
    lines = ["| benchmark | threads | implementation | CPU median | wall median | rounds | CPU ratio | wall ratio "
             "| of floor | load avg | peak memory |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    benches = sorted(run.get("benchmarks", []), key=lambda b: (b.get("group") or b["name"], b["name"]))
    per_group: dict[str, int] = {}
    for b in benches:
        per_group[b.get("group") or b["name"]] = per_group.get(b.get("group") or b["name"], 0) + 1
    for b in benches:
        ei = b.get("extra_info", {})
        g = b.get("group") or b["name"]
        if per_group[g] > 1:
            # several tests in one group (a parametrized benchmark: seeds, configurations): every
            # row says which one it is, e.g. "[seed=0]"
            params = b.get("params") or {}
            g += " [" + (", ".join(f"{k}={v}" for k, v in params.items()) if params else b["name"]) + "]"
        t = ei.get("timing")
        if t is None:  # a benchmark that does not use bench/_timing.py: wall time only
            lines.append(f"| {g} | ? | {ei.get('impl', b['name'])} | – | {_fmt_time(b['stats']['median'])} | "
                         f"{b['stats']['rounds']} | – | – | – | – | {_fmt_bytes(ei.get('peak_mem_bytes'))} |")
            continue
        load = t.get("load_avg")
        load_s = "–" if not load else (f"{load[0]:.1f}" if load[0] == load[1] else f"{load[0]:.1f}–{load[1]:.1f}")
        base = t.get("baseline")
        for name, row in t["impls"].items():
            label = f"{name} (baseline)" if name == base else name
            of = row.get("of_floor")
            of_s = "–" if of is None else f"{of:.2f}x" + (f" ({row['path']})" if row.get("path") else "")
            lines.append(f"| {g} | {t.get('threads')} | {label} | {_fmt_time(row['cpu_median_s'])} | "
                         f"{_fmt_time(row['wall_median_s'])} | {row['rounds']} | {_ratio(row, 'cpu_ratio')} | "
                         f"{_ratio(row, 'wall_ratio')} | {of_s} | {load_s} | "
                         f"{_fmt_bytes(ei.get('peak_mem_bytes'))} |")
    return lines


DATASETS = ("adult", "blog", "digits", "breast_cancer", "cifar10", "lincs")


def _dataset_of(b: dict) -> str:
    """extra_info's dataset, else the first known dataset name in the group or test name."""
    ei = b.get("extra_info", {})
    if ei.get("dataset"):
        return ei["dataset"]
    text = f"{b.get('group') or ''} {b.get('name', '')}".lower()
    return next((d for d in DATASETS if d in text), "?")


def quality_rows(runs: list[dict]) -> dict[tuple[str, str], list[float]]:
    rows: dict[tuple[str, str], list[float]] = defaultdict(list)
    for run in runs:
        for b in run.get("benchmarks", []):
            ei = b.get("extra_info", {})
            if "auroc" in ei and "method" in ei:
                vals = ei["auroc"] if isinstance(ei["auroc"], list) else [ei["auroc"]]
                rows[(ei["method"], _dataset_of(b))].extend(float(v) for v in vals)
    return rows


def plot_scaling(runs: list[dict], out_dir: Path, stem: str) -> list[Path]:
    series: dict[tuple[str, str], list[tuple[int, float, float | None]]] = defaultdict(list)
    for run in runs:
        for b in run.get("benchmarks", []):
            ei = b.get("extra_info", {})
            if "n" not in ei or "timing" not in ei or ei.get("m") is not None:
                continue
            fam = re.sub(r"\s*N=M=\S+", "", b.get("group") or b["name"]).strip()
            for impl, row in ei["timing"]["impls"].items():
                series[(fam, impl)].append((int(ei["n"]), row["cpu_median_s"], ei.get("peak_mem_bytes")))
    fams = sorted({f for f, _ in series if len({n for n, *_ in series[(f, _)]}) > 1})
    paths = []
    for what, idx, ylabel in (("time", 1, "CPU time, median (s)"), ("memory", 2, "peak memory (MB)")):
        if not fams:
            break
        fig, axes = plt.subplots(1, len(fams), figsize=(4.5 * len(fams), 3.6), squeeze=False)
        for ax, fam in zip(axes[0], fams):
            for (f, impl), pts in sorted(series.items()):
                if f != fam:
                    continue
                pts = sorted(p for p in pts if p[idx] is not None)
                if not pts:
                    continue
                ys = [p[idx] / (2**20 if idx == 2 else 1) for p in pts]
                ax.plot([p[0] for p in pts], ys, marker="o", label=impl)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("N")
            ax.set_ylabel(ylabel)
            ax.set_title(fam, fontsize=9)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
        fig.tight_layout()
        p = out_dir / f"{stem}_{what}_vs_n.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths


def plot_quality(rows, out_dir: Path, stem: str) -> Path | None:
    if not rows:
        return None
    datasets = sorted({d for _, d in rows})
    methods = sorted({m for m, _ in rows})
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(methods) * len(datasets) / 2), 3.8))
    width = 0.8 / max(1, len(datasets))
    for j, d in enumerate(datasets):
        xs, ys, es = [], [], []
        for i, m in enumerate(methods):
            v = rows.get((m, d))
            if v:
                xs.append(i + j * width)
                ys.append(statistics.mean(v))
                es.append(statistics.pstdev(v) if len(v) > 1 else 0)
        ax.bar(xs, ys, width, yerr=es, label=d, capsize=2)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xticks([i + width * (len(datasets) - 1) / 2 for i in range(len(methods))])
    ax.set_xticklabels(methods, rotation=20)
    ax.set_ylabel("detection AUROC")
    ax.set_ylim(0.3, 1.0)
    ax.legend(fontsize=8)
    fig.tight_layout()
    p = out_dir / f"{stem}_auroc.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p


def write_report(paths: list[str], out: Path, title: str, notes: list[str] | None = None) -> Path:
    runs = load(paths)
    out.parent.mkdir(parents=True, exist_ok=True)
    img_dir = out.parent / "report_img"
    img_dir.mkdir(exist_ok=True)
    stem = out.stem.lower()
    lines = [f"# {title}", "", f"Generated {_dt.date.today().isoformat()} by `python bench/report.py "
             + " ".join(Path(p).name for p in paths) + "`.", ""]
    for run in runs:
        when = run.get("datetime", "?")
        lines += [f"## Run `{Path(run['_path']).name}`", "",
                  f"- machine: {_machine(run)}",
                  f"- date: {when}",
                  f"- python {run.get('machine_info', {}).get('python_version', '?')}",
                  "", "Medians of interleaved rounds at a pinned thread count. CPU = process CPU time (all "
                  "threads), the basis of every ratio; ratio = the group's baseline / this implementation, "
                  "measured in the same run. 'of floor' = CPU time / the floor of bench_sinkhorn.py.", ""]
        lines += speed_table(run)
        lines.append("")
    rows = quality_rows(runs)
    if rows:
        lines += ["## Quality: detection AUROC of corrupted samples (mean ± std over seeds)", "",
                  "| method | dataset | AUROC | runs |", "|---|---|---:|---:|"]
        for (m, d), v in sorted(rows.items()):
            sd = statistics.pstdev(v) if len(v) > 1 else 0.0
            lines.append(f"| {m} | {d} | {statistics.mean(v):.3f} ± {sd:.3f} | {len(v)} |")
        lines.append("")
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    figs = plot_scaling(runs, img_dir, stem)
    q = plot_quality(rows, img_dir, stem)
    if q:
        figs.append(q)
    if figs:
        lines += ["## Plots", ""] + [f"![{p.stem}]({p.relative_to(out.parent).as_posix()})" for p in figs] + [""]
    out.write_text("\n".join(lines))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+", help="pytest-benchmark JSON files (--benchmark-json)")
    ap.add_argument("--out", default=str(Path("runs") / "bench" / "REPORT.md"),
                    help="default runs/bench/REPORT.md (untracked); --out bench/REPORT.md replaces the committed one")
    ap.add_argument("--title", default="dvgs_fast benchmark report")
    ap.add_argument("--note", action="append", default=[], help="a remark to print under Notes (repeatable)")
    args = ap.parse_args(argv)
    for p in args.results:
        if not Path(p).is_file():
            ap.error(f"results file not found: {p}")
    print(write_report(args.results, Path(args.out), args.title, args.note))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
