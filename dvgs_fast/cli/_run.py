"""``dvgs-fast run`` with one method and one seed: the pipeline's steps, the staged output folder
(written into ``<out>.incomplete``, renamed when complete) and the printed summary. Several
methods or seeds go to ``_compare.run_compare``."""
from __future__ import annotations

import argparse
import datetime as _dt
import sys
import time

import numpy as np

from ._errors import CLIError, one_line
from ._options import PROG
from ._pipeline import build_method, load_data, run_method, score_values, versions
from ._plan import make_plan, merge_settings, method_tables


def run_with_threads(args: argparse.Namespace, argv: list[str]) -> int:
    """run_command, with --threads applied for its duration (restored afterwards: main() may run in-process)."""
    threads = args.threads
    if threads is None and args.config is not None:
        threads = merge_settings(args)[0].get("threads")
    if threads is None:
        return run_command(args, argv)
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
            return run_command(args, argv)
        # threadpool_limits only reaches libraries already loaded: load the evaluation's
        # BLAS/OpenMP users (scipy, scikit-learn) first.
        import scipy.stats  # noqa: F401
        import sklearn.cluster  # noqa: F401
        import sklearn.linear_model  # noqa: F401
        with threadpool_limits(limits=threads):
            return run_command(args, argv)
    finally:
        torch.set_num_threads(before)


def run_command(args: argparse.Namespace, argv: list[str]) -> int:
    t_start = time.perf_counter()
    plan = make_plan(args, argv)
    if plan.compare:
        from ._compare import run_compare
        return run_compare(plan, t_start)
    method, seed, status = plan.methods[0], plan.seeds[0], plan.status
    settings = plan.settings

    # ---- data, model and method ------------------------------------------------------------------
    data, noise, preset, t_load = load_data(plan, seed)
    status(f"{data.name}: {data.n_source} source / {data.n_target} target / {data.n_test} test samples, "
           f"{noise.describe()}")
    for note in data.notes:
        status(f"note: {note}")
    built, model_desc, budget = build_method(plan, method, data, preset, seed,
                                              method_tables(plan.table, [method])[method])
    if budget is not None and plan.main_rank:
        print(f"{PROG}: {budget}", file=sys.stderr, flush=True)     # even with --no-progress
        data.notes.append(budget)

    from ..report import RunReport, StagedOutput, summary_table, write_report, write_values_early
    stage = StagedOutput(plan.out, plan.overwrite, unique=plan.out_is_default) if plan.main_rank else None
    if stage is not None:
        try:
            stage.open(plan.command)
            plan.out = stage.out           # a default name may have moved on to the next free one
        except (ValueError, OSError) as exc:
            raise CLIError(one_line(exc)) from None
        if stage.replaced_stale:
            status(f"note: replaced {stage.stage}, left by an earlier run that did not finish")
    try:
        # ---- valuation ---------------------------------------------------------------------------
        status(f"valuing with {method}: {model_desc}")
        result, t_value, c_value, wnotes = run_method(plan, method, built, data)
        if not plan.main_rank:
            return 0
        for msg in wnotes:
            if msg not in data.notes:
                data.notes.append(msg)
                print(f"{PROG}: {msg}", file=sys.stderr, flush=True)   # even with --no-progress
        import torch
        values = np.asarray(result.values, dtype=np.float64)
        run_settings = {"seed": seed, "device": result.info.get("device", plan.device or "auto"),
                        "threads": torch.get_num_threads(), "model": model_desc, "data_files": data.files}
        if args.config:
            run_settings["config"] = str(args.config)
        rep = RunReport(
            method=method, dataset=data.name, noise=noise.label, noise_description=noise.describe(),
            values=values, source_rows=data.idx_source, sample_ids=getattr(data, "sample_ids", None),
            labels=data.y_source, is_corrupted=data.is_corrupted, sigma=data.sigma,
            stderr=result.stderr, counts=result.counts, status=result.status,
            stopped_by=result.info.get("stopped_by") if result.status == "stopped" else None,
            progress=str(result.info.get("progress", "")), class_names=data.class_names,
            timings={"load": t_load, "valuation": t_value, "valuation_cpu": c_value},
            sizes={"n_source": data.n_source, "n_target": data.n_target, "n_test": data.n_test},
            settings=run_settings, method_settings={k: v for k, v in built.kwargs.items() if k != "progress"},
            notes=data.notes, command=plan.command)
        # The values are safe on disk before the (interruptible) evaluation starts.
        write_values_early(rep, stage.stage)

        # ---- evaluation --------------------------------------------------------------------------
        t0 = time.perf_counter()
        metrics, curves, skipped, snotes = score_values(values, result.counts, data, seed, label=method,
                                                  want_curves=not settings.get("no_curves"),
                                                  progress=plan.progress, status=status, settings=settings)
        rep.notes.extend(snotes)
        rep.metrics, rep.curves, rep.curves_skipped = metrics, curves, skipped
        if skipped:
            rep.notes.append(skipped)
        rep.timings["evaluation"] = time.perf_counter() - t0

        # ---- report ------------------------------------------------------------------------------
        rep.extra = {"method_timings": result.timings, "method_info": result.info,
                     "counts": {"valued": int((result.counts > 0).sum()),
                                "median": float(np.median(result.counts))},
                     "versions": versions(), "created": _dt.datetime.now().isoformat(timespec="seconds")}
        rep.timings["total"] = time.perf_counter() - t_start   # up to the report (which takes ~1 s)
        write_report(rep, stage.stage)
        try:
            stage.finish()
        except (ValueError, OSError) as exc:
            raise CLIError(one_line(exc)) from None
    except BaseException:
        if stage is not None:
            kept = stage.abandon()
            if kept:
                print(f"{PROG}: {kept}", file=sys.stderr, flush=True)
        raise

    print(summary_table(rep))
    t = rep.timings
    print(f"total {t['total']:.1f} s (load {t['load']:.1f}, valuation {t['valuation']:.1f}, "
          f"evaluation {t['evaluation']:.1f}); report: {plan.out / 'report.html'}")
    return 0
