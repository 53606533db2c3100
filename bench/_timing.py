"""Timing every benchmark uses, so that a figure can be trusted on a shared machine.

* Threads are pinned for each measurement (torch intra-op threads; 1 by default, all cores as a
  separate row where a benchmark asks for it) and recorded.
* CPU time (time.process_time: all threads of the process, so spin-waiting counts) and wall time
  are both recorded; ratios are taken on CPU time, which other jobs on the machine inflate far
  less than wall time. The 1-minute load average is recorded before and after.
* A comparison is measured in one run, interleaved: every round runs every implementation once,
  the order reversed every other round, so drift in the machine's load falls on all of them.

Results go into pytest-benchmark's extra_info as {"timing": {...}} (see `record`), which
bench/report.py turns into REPORT.md rows: one row per implementation, named, with its ratio.
pytest-benchmark's own statistics (time of one whole round) are not used.
"""
from __future__ import annotations

import contextlib
import os
import statistics
import time
from typing import Any, Callable

import torch

ALL_CORES = os.cpu_count() or 1


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else the platform's machine type: the benches' records."""
    import platform
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_avg() -> float:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:  # pragma: no cover - not Unix
        return float("nan")


@contextlib.contextmanager
def pinned_threads(n: int):
    """torch intra-op threads = n inside the block (restored after)."""
    old = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """One call: (result, CPU seconds, wall seconds)."""
    c0, w0 = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.process_time() - c0, time.perf_counter() - w0


class Comparison:
    """Interleaved rounds of several implementations at a pinned thread count."""

    def __init__(self, impls: dict[str, Callable[[], Any]], *, threads: int = 1, warmup: int = 1):
        self.impls = impls
        self.threads = int(threads)
        self.warmup = warmup
        self.cpu: dict[str, list[float]] = {k: [] for k in impls}
        self.wall: dict[str, list[float]] = {k: [] for k in impls}
        self.results: dict[str, Any] = {}
        self.loads: list[float] = []
        self._round = 0

    def run_round(self) -> None:
        names = list(self.impls)
        if self._round % 2:
            names.reverse()
        with pinned_threads(self.threads):
            for name in names:
                out, c, w = timed(self.impls[name])
                self.results[name] = out
                self.cpu[name].append(c)
                self.wall[name].append(w)
        self.loads.append(load_avg())
        self._round += 1

    def run(self, benchmark, rounds: int, group: str) -> "Comparison":
        """`rounds` interleaved rounds (after the warm-up ones), driven by benchmark.pedantic."""
        benchmark.group = group  # before pedantic: pytest-benchmark reads it when the run ends
        self.loads.append(load_avg())
        with pinned_threads(self.threads):
            for _ in range(self.warmup):
                for fn in self.impls.values():
                    fn()
        benchmark.pedantic(self.run_round, rounds=rounds, iterations=1, warmup_rounds=0)
        return self

    def cpu_median(self, name: str) -> float:
        return statistics.median(self.cpu[name])

    def wall_median(self, name: str) -> float:
        return statistics.median(self.wall[name])

    def summary(self, baseline: str | None) -> dict:
        rows = {}
        for name in self.impls:
            row = {"cpu_median_s": self.cpu_median(name), "wall_median_s": self.wall_median(name),
                   "cpu_min_s": min(self.cpu[name]), "rounds": len(self.cpu[name])}
            if baseline is not None and name != baseline and baseline in self.impls:
                row["cpu_ratio"] = self.cpu_median(baseline) / self.cpu_median(name)
                row["wall_ratio"] = self.wall_median(baseline) / self.wall_median(name)
            rows[name] = row
        return {"threads": self.threads, "baseline": baseline, "impls": rows,
                "load_avg": [min(self.loads), max(self.loads)] if self.loads else None,
                "torch_cpu_isa": torch.backends.cpu.get_cpu_capability()}


def record(benchmark, cmp: Comparison, baseline: str | None, **extra) -> dict:
    """Put a comparison's summary (and extra JSON-able facts) into the benchmark's extra_info."""
    summ = cmp.summary(baseline)
    benchmark.extra_info["timing"] = summ
    benchmark.extra_info.update(extra)
    return summ


def measure(benchmark, group: str, impl: str, fn: Callable[[], Any], *, threads: int = 1, rounds: int = 1,
            warmup: int = 0, **extra) -> Any:
    """A single implementation (no comparison): same recording, one row in the report."""
    cmp = Comparison({impl: fn}, threads=threads, warmup=warmup).run(benchmark, rounds, group)
    record(benchmark, cmp, None, **extra)
    return cmp.results[impl]


def report_markdown(title: str, doc: dict, script: str, setting: str, header: list[str], aligns: str,
                    rows: list[list[str]]) -> str:
    """A bench's markdown report: the title, the line that says when, on what and how it was
    measured (doc: "date", "torch", "rounds", "load" [first, last]), then one table. aligns: one
    character per column, "l" or "r"."""
    lo, hi = doc["load"][0], doc["load"][-1]
    lines = [f"# {title}", "",
             f"{doc['date']}; {cpu_model()}, {ALL_CORES} cores (load {lo:.1f}-{hi:.1f}); torch {doc['torch']}; "
             f"1 thread; CPU time, median of {doc['rounds']} interleaved rounds; `python bench/{script}`. {setting}",
             "", "| " + " | ".join(header) + " |", "|" + "|".join("---:" if a == "r" else "---" for a in aligns) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def bench_setup(doc: str, out: str, rounds: int):
    """(args, output folder): --out / --rounds parsed (the description: the docstring's first
    paragraph), 1 torch thread, the folder made -- how a timing bench script starts."""
    import argparse
    from pathlib import Path
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--out", default=out)
    ap.add_argument("--rounds", type=int, default=rounds)
    a = ap.parse_args()
    torch.set_num_threads(1)
    folder = Path(a.out)
    folder.mkdir(parents=True, exist_ok=True)
    return a, folder
