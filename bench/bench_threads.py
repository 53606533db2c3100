"""How many intra-op threads the small-model work of dvgs_fast should use: the measurements behind
``dvgs_fast.threads`` (its threshold) and behind the CLI's default.

    python bench/bench_threads.py kernels [--out DIR]     # ~5 min on 2 cores
    python bench/bench_threads.py cli [--out DIR]         # ~30-60 min on a loaded 2-core machine
    python bench/bench_threads.py table DIR [DIR...]      # markdown of the JSON files found in DIR

``kernels``: one training step (forward, backward, Adam) of the CLI's MLP layout
``d -> h -> h -> 10`` on ``rows`` samples, for a grid of sizes, at 1 thread and at all cores,
interleaved (each round runs both, the order alternating), CPU time (``time.process_time``, all
threads of the process) and wall time per step. The size of a step is its largest matrix product
in multiply-adds, ``rows * max(d, h) * h`` -- the quantity ``dvgs_fast.threads`` decides on.

``cli``: ``dvgs-fast run`` end to end (a fresh process per run, removal curves included) on
digits, Adult and the LINCS autoencoder (the bundled 272 x 978 GCTX file, and a generated
LINCS-shaped file of 20,000 samples read out of core) with the default thread choice, with
``--threads 1`` and with ``--threads 2``; CPU time of the child process (user + system) and wall
time.

Both run twice: ``idle`` (nothing of ours besides the benchmark; other users' jobs may run: the
1-minute load average is recorded with every row) and ``loaded`` (one busy-looping process per
core runs beside it for the whole measurement, the way a second job on a shared machine does).
Results go to ``--out`` (default ``runs/bench_threads``): ``threads_<part>.json`` and
``threads_<part>.md``; nothing in the repository is written.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import cpu_model  # noqa: E402


def load_avg() -> float:
    return round(os.getloadavg()[0], 2)


def _spin(stop) -> None:                        # pragma: no cover - runs in a child process
    x = 0
    while not stop.is_set():
        for _ in range(100_000):
            x += 1


@contextlib.contextmanager
def load(kind: str):
    """'idle': nothing; 'loaded': one busy-looping process per core for the block's duration."""
    if kind == "idle":
        yield
        return
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    procs = [ctx.Process(target=_spin, args=(stop,), daemon=True) for _ in range(CORES)]
    for p in procs:
        p.start()
    time.sleep(1.0)
    try:
        yield
    finally:
        stop.set()
        for p in procs:
            p.join(5)


def machine() -> dict:
    import torch
    return {"cpu": cpu_model(), "cores": CORES, "python": platform.python_version(),
            "torch": torch.__version__, "isa": torch.backends.cpu.get_cpu_capability(),
            "date": time.strftime("%Y-%m-%d")}


# ---------------------------------------------------------------------------------- kernels
KERNEL_SIZES = [(100, 64, 100), (500, 108, 100), (1000, 64, 100), (2000, 108, 100), (500, 978, 256),
                (2000, 978, 256), (4096, 978, 256), (4096, 978, 1024), (8192, 978, 1024)]


def _step_fn(rows: int, d: int, h: int):
    import torch
    from torch import nn
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(d, h), nn.Mish(), nn.LayerNorm(h, elementwise_affine=False), nn.Linear(h, h),
                        nn.Mish(), nn.LayerNorm(h, elementwise_affine=False), nn.Linear(h, 10))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    x, y = torch.randn(rows, d), torch.randint(0, 10, (rows,))

    def step():
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return step


def _time_steps(step, threads: int, seconds: float) -> tuple[float, float, int]:
    import torch
    torch.set_num_threads(threads)
    step()
    n, c0, w0 = 0, time.process_time(), time.perf_counter()
    while time.perf_counter() - w0 < seconds or n < 3:
        step()
        n += 1
    return (time.process_time() - c0) / n, (time.perf_counter() - w0) / n, n


def kernels(out: Path, rounds: int, seconds: float) -> dict:
    rows = []
    for state in ("idle", "loaded"):
        with load(state):
            for (r, d, h) in KERNEL_SIZES:
                step = _step_fn(r, d, h)
                cpu = {1: [], CORES: []}
                wall = {1: [], CORES: []}
                la = [load_avg()]
                for k in range(rounds):
                    order = (1, CORES) if k % 2 == 0 else (CORES, 1)
                    for t in order:
                        c, w, _ = _time_steps(step, t, seconds)
                        cpu[t].append(c)
                        wall[t].append(w)
                la.append(load_avg())
                row = {"load": state, "rows": r, "d": d, "h": h, "macs": r * max(d, h) * h,
                       "cpu_ms_1": 1e3 * statistics.median(cpu[1]), "wall_ms_1": 1e3 * statistics.median(wall[1]),
                       f"cpu_ms_{CORES}": 1e3 * statistics.median(cpu[CORES]),
                       f"wall_ms_{CORES}": 1e3 * statistics.median(wall[CORES]), "loadavg": [min(la), max(la)]}
                row["wall_gain"] = row["wall_ms_1"] / row[f"wall_ms_{CORES}"]
                row["cpu_cost"] = row[f"cpu_ms_{CORES}"] / row["cpu_ms_1"]
                rows.append(row)
                print(json.dumps(row), flush=True)
    doc = {"part": "kernels", "machine": machine(), "rounds": rounds, "seconds_per_measurement": seconds,
           "rows": rows}
    _write(out, "kernels", doc, kernel_table(doc))
    return doc


def kernel_table(doc: dict) -> str:
    n = doc["machine"]["cores"]
    lines = [f"One training step (forward, backward, Adam) of an MLP d -> h -> h -> 10 on `rows` samples; "
             f"median of {doc['rounds']} interleaved rounds; {doc['machine']['cpu']}, {n} cores, torch "
             f"{doc['machine']['torch']}, {doc['machine']['date']}. `loaded`: one busy-looping process per core "
             f"beside it. `macs`: the step's largest matrix product (rows x max(d, h) x h).", "",
             f"| load | rows | d | h | macs | wall 1 thr (ms) | wall {n} thr (ms) | wall gain of {n} thr | "
             f"CPU 1 thr (ms) | CPU {n} thr (ms) | CPU cost of {n} thr | load avg |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in doc["rows"]:
        lines.append(f"| {r['load']} | {r['rows']} | {r['d']} | {r['h']} | {r['macs']:.2e} | {r['wall_ms_1']:.2f} | "
                     f"{r[f'wall_ms_{n}']:.2f} | {r['wall_gain']:.2f}x | {r['cpu_ms_1']:.2f} | {r[f'cpu_ms_{n}']:.2f} | "
                     f"{r['cpu_cost']:.2f}x | {r['loadavg'][0]:.1f}-{r['loadavg'][1]:.1f} |")
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------------- cli
def _cli_cases(tmp: Path) -> list[tuple[str, list[str]]]:
    big = tmp / "lincs_like_20k.gctx"
    if not big.exists():
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from make_lincs_like import make
        make(big, n=20_000, seed=0, progress=False)
    return [("digits", ["--dataset", "digits"]),
            ("adult", ["--dataset", "adult"]),
            ("lincs (272 x 978 file)", ["--dataset", "lincs"]),
            ("lincs-like 20k x 978, out of core, 5 epochs",
             ["--dataset", "lincs", "--data-root", str(big), "--n-target", "2000", "--epochs", "5"])]


def _run_cli(args: list[str], out: Path) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    w0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "dvgs_fast.cli", "run", *args, "--no-progress", "--out", str(out)],
                       capture_output=True, text=True)
    wall = time.perf_counter() - w0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        raise SystemExit(f"dvgs-fast run {' '.join(args)} failed:\n{p.stderr}")
    m = json.loads((out / "metrics.json").read_text())
    return {"wall_s": wall, "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
            "threads": m["settings"]["threads"], "threads_reason": m["settings"].get("threads_reason"),
            "valuation_s": m["timings"]["valuation"], "auroc": m["metrics"].get("auroc"),
            "spearman": m["metrics"].get("noise_spearman")}


def cli(out: Path, rounds: int, only: list[str] | None, loads: tuple[str, ...] = ("idle", "loaded")) -> dict:
    rows = []
    settings = [("default", []), ("--threads 1", ["--threads", "1"]), ("--threads 2", ["--threads", "2"])]
    with tempfile.TemporaryDirectory(prefix="bench_threads_") as tmp:
        tmp = Path(tmp)
        cases = [c for c in _cli_cases(tmp) if not only or any(o in c[0] for o in only)]
        for state in loads:
            with load(state):
                for name, args in cases:
                    got: dict[str, list[dict]] = {s: [] for s, _ in settings}
                    for k in range(rounds):
                        order = settings if k % 2 == 0 else settings[::-1]
                        for s, extra in order:
                            la = load_avg()
                            r = _run_cli(args + extra, tmp / f"run-{len(rows)}-{k}-{s.replace(' ', '')}")
                            r["loadavg"] = la
                            got[s].append(r)
                    for s, _ in settings:
                        rs = got[s]
                        row = {"load": state, "case": name, "setting": s, "threads": rs[0]["threads"],
                               "threads_reason": rs[0]["threads_reason"],
                               "wall_s": statistics.median(r["wall_s"] for r in rs),
                               "cpu_s": statistics.median(r["cpu_s"] for r in rs),
                               "valuation_s": statistics.median(r["valuation_s"] for r in rs),
                               "auroc": rs[0]["auroc"], "spearman": rs[0]["spearman"],
                               "loadavg": [min(r["loadavg"] for r in rs), max(r["loadavg"] for r in rs)],
                               "rounds": len(rs)}
                        rows.append(row)
                        print(json.dumps(row), flush=True)
    doc = {"part": "cli", "machine": machine(), "rounds": rounds, "rows": rows}
    _write(out, "cli" + ("" if len(loads) == 2 else "_" + "_".join(loads)), doc, cli_table(doc))
    return doc


def cli_table(doc: dict) -> str:
    m = doc["machine"]
    lines = [f"`dvgs-fast run` end to end, a fresh process per run (median of {doc['rounds']} interleaved rounds); "
             f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}, {m['date']}. CPU = user + system time of the "
             f"process. `loaded`: one busy-looping process per core beside it.", "",
             "| load | data | threads setting | threads used | wall (s) | CPU (s) | valuation wall (s) | "
             "AUROC / Spearman | load avg |", "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for r in doc["rows"]:
        q = r["auroc"] if r["auroc"] is not None else r["spearman"]
        lines.append(f"| {r['load']} | {r['case']} | {r['setting']} | {r['threads']} | {r['wall_s']:.1f} | "
                     f"{r['cpu_s']:.1f} | {r['valuation_s']:.1f} | {q if q is None else f'{q:.3f}'} | "
                     f"{r['loadavg'][0]:.1f}-{r['loadavg'][1]:.1f} |")
    return "\n".join(lines) + "\n"


def _write(out: Path, part: str, doc: dict, table: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"threads_{part}.json").write_text(json.dumps(doc, indent=1))
    (out / f"threads_{part}.md").write_text(table)
    print(f"wrote {out / f'threads_{part}.json'} and .md")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("part", choices=("kernels", "cli", "table"))
    ap.add_argument("dirs", nargs="*", help="table: folders holding threads_*.json")
    ap.add_argument("--out", default="runs/bench_threads", help="output folder (default: runs/bench_threads)")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--seconds", type=float, default=1.0, help="kernels: seconds per measurement")
    ap.add_argument("--only", action="append", help="cli: run only the cases whose name contains this")
    ap.add_argument("--loads", default="idle,loaded", help="cli: idle, loaded or both (default)")
    a = ap.parse_args(argv)
    if a.part == "kernels":
        kernels(Path(a.out), a.rounds or 3, a.seconds)
    elif a.part == "cli":
        cli(Path(a.out), a.rounds or 2, a.only, tuple(a.loads.split(",")))
    else:
        for d in a.dirs:
            for f in sorted(Path(d).glob("threads_*.json")):
                doc = json.loads(f.read_text())
                print((kernel_table if doc["part"] == "kernels" else cli_table)(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
