"""Scale proof of projected-gradient attribution: 1,000,000 training x 50,000 query vectors
(k = 4,096, a synthetic store), every score computed blockwise, top-100 per query written out,
the resident memory of the process measured.

    python bench/bench_trak_scale.py --out runs/bench/trak_scale [--n 1000000 --queries 50000
                                      --dim 4096 --top-k 100 --threads 2 --query-chunk 5000]

What runs (the library's own code paths, nothing bench-specific in between):

1. ``gradstore.write_store``: the training store [n, k] float16 (8 GB at full size) and the
   query store [queries, k], written block by block, each block's vectors N(0, 1) drawn from a
   generator seeded by its first row (a stand-in for projected gradients: the scoring cost
   does not depend on the values);
2. ``gradstore.score_into`` into an ``attribution.ScoreSink(keep=False, top_k=100)``: queries a
   chunk at a time (``--query-chunk`` rows, one pass over the training store each), training
   blocks of 4,096 rows, float32 GEMM per block, the sink's running top-k (and bottom-k) per
   query. Each finished chunk's top-100 is saved (``topk_chunk_XXXX.npz``), so a killed run
   continues with the next chunk;
3. a check: for 16 random queries, the exact top-100 from one dense pass equals the written one.

Memory: ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (the process's peak resident set, pages of
the store read through pread never count) and /proc/self/statm samples. Timing: CPU time
(time.process_time) and wall time per chunk, torch threads pinned (``--threads``), load
average recorded. Writes results.json / results.md and the top-k arrays under ``--out``; the
stores go to ``--store-dir`` (default ``<out>/stores``; ~8.4 GB at full size).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _timing import load_avg  # noqa: E402

from dvgs_fast.attribution import ScoreSink  # noqa: E402
from dvgs_fast.gradstore import GradientStore, score_into, write_store  # noqa: E402
from dvgs_fast.sources import TensorSource  # noqa: E402


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def synthetic_store(directory: Path, n: int, dim: int, seed: int, progress: bool) -> GradientStore:
    """A [n, dim] float16 store of N(0, 1) rows, each block drawn from (seed, first row)."""
    rows = TensorSource(torch.arange(n, dtype=torch.float64).unsqueeze(1))

    def compute(x, _y):
        g = torch.Generator().manual_seed(seed * 1_000_003 + int(x[0, 0]))
        return torch.randn(x.shape[0], dim, generator=g)

    res = write_store(directory, rows, compute, dim=dim, dtype="float16", block_rows=4096,
                      fingerprint={"synthetic": "N(0,1)", "seed": seed, "n": n, "dim": dim},
                      progress=progress, desc=f"writing {directory.name}", checkpoint_every=30.0)
    if res.store is None:
        raise SystemExit(f"{directory}: the store was not completed")
    return res.store


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/bench/trak_scale")
    ap.add_argument("--store-dir", default=None)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=50_000)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--top-k", type=int, default=100)
    ap.add_argument("--query-chunk", type=int, default=5000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--summary", action="store_true",
                    help="only summarise the query chunks finished so far (results_partial.md), compute nothing")
    args = ap.parse_args(argv)
    if args.summary:
        return summary(Path(args.out), args)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stores = Path(args.store_dir) if args.store_dir else out / "stores"

    t0, c0 = time.perf_counter(), time.process_time()
    train = synthetic_store(stores / "train", args.n, args.dim, 0, args.progress)
    query = synthetic_store(stores / "query", args.queries, args.dim, 1, args.progress)
    setup = {"cpu_s": time.process_time() - c0, "wall_s": time.perf_counter() - t0}

    chunks = []
    log = out / "chunks.jsonl"
    done = {}
    if log.exists():
        for line in log.read_text().splitlines():
            rec = json.loads(line)
            done[rec["q0"]] = rec
    for q0 in range(0, args.queries, args.query_chunk):
        q1 = min(q0 + args.query_chunk, args.queries)
        path = out / f"topk_chunk_{q0 // args.query_chunk:04d}.npz"
        if q0 in done and path.exists():
            chunks.append(done[q0])
            continue
        load0 = load_avg()
        c0, w0 = time.process_time(), time.perf_counter()
        qv = torch.from_numpy(query.read(q0, q1)).float()
        sink = ScoreSink(q1 - q0, args.n, keep=False, top_k=args.top_k)
        score_into(sink, qv, train)
        res = sink.finish("synthetic")
        cpu, wall = time.process_time() - c0, time.perf_counter() - w0
        np.savez(path, top_indices=res.top_indices, top_scores=res.top_scores.astype(np.float32))
        rec = {"q0": q0, "q1": q1, "cpu_s": cpu, "wall_s": wall, "load_before": load0, "load_after": load_avg(),
               "peak_rss_bytes": peak_rss_bytes(), "rss_bytes": rss_bytes()}
        with open(log, "a") as fh:
            fh.write(json.dumps(rec) + "\n")
        chunks.append(rec)
        print(f"queries {q0}:{q1}  {cpu:.0f} CPU s  {wall:.0f} wall s  peak RSS {rec['peak_rss_bytes'] / 2**30:.2f} GiB",
              flush=True)

    top_i = np.concatenate([np.load(out / f"topk_chunk_{j:04d}.npz")["top_indices"]
                            for j in range(len(chunks))])
    top_s = np.concatenate([np.load(out / f"topk_chunk_{j:04d}.npz")["top_scores"]
                            for j in range(len(chunks))])
    np.save(out / f"top{args.top_k}_indices.npy", top_i)
    np.save(out / f"top{args.top_k}_scores.npy", top_s)

    # check: exact top-k of a few queries from one dense pass
    rng = np.random.default_rng(0)
    pick = np.sort(rng.choice(args.queries, min(16, args.queries), replace=False))
    qv = torch.from_numpy(np.stack([query.read(int(j), int(j) + 1)[0] for j in pick])).float()
    exact = torch.empty(len(pick), args.n)
    for a, b, blk in train.blocks(rows=8192):
        exact[:, a:b] = qv @ blk.t()
    ref = exact.topk(args.top_k, dim=1)
    same_sets = all(set(ref.indices[r].tolist()) == set(top_i[j].tolist()) for r, j in enumerate(pick))
    max_score_err = float((ref.values - torch.from_numpy(top_s[pick])).abs().max())

    cpu = sum(c["cpu_s"] for c in chunks)
    wall = sum(c["wall_s"] for c in chunks)
    result = {
        "n_train": args.n, "n_query": args.queries, "dim": args.dim, "top_k": args.top_k, "store_dtype": "float16",
        "train_store_bytes": train.nbytes, "query_store_bytes": query.nbytes, "query_chunk": args.query_chunk,
        "threads": args.threads, "scores_computed": args.n * args.queries,
        "scoring_cpu_s": cpu, "scoring_wall_s": wall,
        "scores_per_cpu_s": args.n * args.queries / cpu, "gflop_per_cpu_s": 2 * args.n * args.queries * args.dim / cpu / 1e9,
        "peak_rss_bytes": max(c["peak_rss_bytes"] for c in chunks), "peak_rss_this_process": peak_rss_bytes(),
        "setup_this_process": setup, "chunks": chunks, "check_queries": pick.tolist(),
        "check_topk_sets_equal": same_sets, "check_max_score_err": max_score_err,
        "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version(),
    }
    (out / "results.json").write_text(json.dumps(result, indent=1))
    md = [f"# TRAK-scale scoring: {args.n:,} training x {args.queries:,} queries, k = {args.dim}, top-{args.top_k}",
          "",
          "| what | value |", "|---|---|",
          f"| training store | {args.n:,} x {args.dim} float16, {train.nbytes / 2**30:.2f} GiB on disk |",
          f"| query store | {args.queries:,} x {args.dim} float16, {query.nbytes / 2**30:.2f} GiB |",
          f"| scores computed | {args.n * args.queries:.3g} (all of them, blockwise; none kept) |",
          f"| scoring CPU time | {cpu:,.0f} s ({threads_note(args.threads)}) |",
          f"| scoring wall time | {wall:,.0f} s (load average {chunks[0]['load_before']}-{chunks[-1]['load_after']}) |",
          f"| throughput | {2 * args.n * args.queries * args.dim / cpu / 1e9:.1f} GFLOP per CPU second |",
          f"| peak RSS | {result['peak_rss_bytes'] / 2**30:.2f} GiB (ru_maxrss of the scoring process) |",
          f"| top-{args.top_k} written | `top{args.top_k}_indices.npy` [{args.queries}, {args.top_k}] |",
          f"| check | exact top-{args.top_k} sets of {len(pick)} random queries equal: {same_sets}; max score diff "
          f"{max_score_err:.2e} |", ""]
    (out / "results.md").write_text("\n".join(md))
    print("\n".join(md))
    return result


def summary(out: Path, args) -> dict:
    """What the finished chunks measured, and the whole run's CPU time at their rate."""
    chunks = [json.loads(line) for line in (out / "chunks.jsonl").read_text().splitlines()]
    done = sum(c["q1"] - c["q0"] for c in chunks)
    cpu = sum(c["cpu_s"] for c in chunks)
    wall = sum(c["wall_s"] for c in chunks)
    scores = done * args.n
    res = {"queries_done": done, "queries": args.queries, "n_train": args.n, "dim": args.dim,
           "cpu_s": cpu, "wall_s": wall, "gflop_per_cpu_s": 2 * scores * args.dim / cpu / 1e9,
           "projected_total_cpu_s": cpu * args.queries / done, "peak_rss_bytes": max(c["peak_rss_bytes"] for c in chunks),
           "chunks": chunks}
    md = [f"# TRAK-scale scoring, partial: {done:,} of {args.queries:,} queries x {args.n:,} training rows, "
          f"k = {args.dim}", "",
          "| what | value |", "|---|---|",
          f"| query chunks finished | {len(chunks)} ({done:,} queries, each against all {args.n:,} rows, "
          f"top-{args.top_k} written) |",
          f"| CPU time | {cpu:,.0f} s ({2 * scores * args.dim / cpu / 1e9:.1f} GFLOP per CPU second), "
          f"{threads_note(args.threads)} |",
          f"| wall time | {wall:,.0f} s (load average {chunks[0]['load_before']}-{chunks[-1]['load_after']}) |",
          f"| peak RSS | {res['peak_rss_bytes'] / 2**30:.2f} GiB (ru_maxrss; the same for any number of chunks) |",
          f"| the whole run at this rate | {res['projected_total_cpu_s']:,.0f} CPU s |", ""]
    (out / "results_partial.md").write_text("\n".join(md))
    (out / "results_partial.json").write_text(json.dumps(res, indent=1))
    print("\n".join(md))
    return res


def threads_note(t: int) -> str:
    return f"{t} torch thread{'s' if t != 1 else ''}"


if __name__ == "__main__":
    main()
