"""``dvgs-fast compare`` (or ``run --method a,b,c`` / ``run --seeds 0,1,2``): several methods on the
same split, repeated over seeds, in one report.

For every seed the data are loaded, split and corrupted once, and every method values the same
source against the same target; each run is scored the same way (over its valued samples only,
see ``_pipeline.score_values``) and its values are written at once (``values/METHOD-seedN.csv``), so an
interrupted comparison keeps every finished run. The report puts the methods side by side:
detection AUROC / AUPRC, k-means F1, discovery AUC (or Spearman with the noise level) as
mean +- 2 sd over the seeds (sample sd, ddof 1), wall and CPU time of the valuation, and each run's
status; plots overlay the removal and discovery curves (means over the seeds) and show the
per-seed AUROC and the times.

What OpenDataVal's ExperimentMediator does, plus: budgets that never hide (a stopped run is
flagged in the table and the banner, its metrics computed over what it valued), CPU as well as
wall time, one failed method does not lose the others, and files that are complete or marked so.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import sys
import textwrap
import time
import traceback
from typing import Any

import numpy as np

from ._compare_report import (COMPARE_HTML, COMPARE_JSON, COMPARE_MD, GROUND_TRUTH_DIR, METRIC_COLUMNS, OUTPUT_NAMES,
                              PLOTS_DIR, RUNS_CSV, VALUES_DIR, banner, curves_line, status_of,
                              plot_mean_curves, plot_mean_discovery, plot_metric_by_method, plot_times,
                              render_html, render_markdown, summarize_runs, summary_table_rows, write_runs_csv)
from ..report import jsonable
from ._counterfactual import attribution_metrics, ground_truths
from ._errors import CLIError, one_line
from ._options import METHOD_OPTIONS, PROG, flag_of
from ._pipeline import accepted_params, build_method, load_data, run_method, score_values, versions
from ._plan import method_tables

# ---------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------
def _loadavg() -> str:
    try:
        return "/".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:  # pragma: no cover - not on every platform
        return "n/a"


def run_compare(plan, t_start: float) -> int:
    from ..evaluate import discovery_curve
    from ..report import RunReport, StagedOutput, write_values_csv
    from .._io import atomic_write_text
    import torch

    status, settings, methods, seeds = plan.status, plan.settings, plan.methods, plan.seeds
    tables = method_tables(plan.table, methods)
    # An explicit option no method takes is a mistake; one that some take applies to those.
    for k in METHOD_OPTIONS:
        if k in settings:
            takers = [m for m in methods if (accepted_params(m) is None or k in accepted_params(m))]
            if not takers:
                raise CLIError(f"{flag_of(k)}: none of the methods {', '.join(methods)} has a {k!r} setting")
    stage = (StagedOutput(plan.out, plan.overwrite, names=OUTPUT_NAMES, unique=plan.out_is_default)
             if plan.main_rank else None)
    if stage is not None:
        try:
            stage.open(plan.command)
            plan.out = stage.out           # a default name may have moved on to the next free one
        except (ValueError, OSError) as exc:
            raise CLIError(one_line(exc)) from None
        (stage.stage / VALUES_DIR).mkdir()
    load_start = _loadavg()
    runs: list[dict[str, Any]] = []
    notes: list[str] = []
    found: dict[str, list[np.ndarray]] = {}
    disc_fr = disc_opt = None
    method_settings: dict[str, Any] = {}
    models: dict[str, str] = {}
    first = None
    gt_cost: list[tuple[float, float]] = []
    gt_reliability: list[dict] = []
    gt_recipe = None
    try:
        for si, seed in enumerate(seeds):
            data, noise, preset, _ = load_data(plan, seed)
            if first is None:
                first = (data, noise)
                status(f"{data.name}: {data.n_source} source / {data.n_target} target / {data.n_test} test samples, "
                       f"{noise.describe()}; methods {', '.join(methods)}; seeds {', '.join(map(str, seeds))}")
                for n in data.notes:
                    if n not in notes:
                        notes.append(n)
            # Build every method before valuing any: a bad setting fails before long work.
            built = {}
            for m in methods:
                b, desc, budget = build_method(plan, m, data, preset, seed, tables[m], skip_foreign=True)
                built[m] = b
                if si == 0:
                    # a method without a model parameter (KNN-Shapley, random) used none
                    from ._methods import _MODEL_PARAMS
                    models[m] = desc if any(k in b.kwargs for k in _MODEL_PARAMS) else "none"
                    method_settings[m] = {k: v for k, v in b.kwargs.items() if k not in ("progress", "seed")}
                    if budget is not None and plan.main_rank:
                        print(f"{PROG}: {budget}", file=sys.stderr, flush=True)
                        notes.append(budget)
            gts = None                        # this seed's ground truth (--metric), before any valuation:
            if plan.attribution_metrics and plan.main_rank:      # its checks fail before long work
                gts = ground_truths(plan, data, preset, seed, stage.stage / GROUND_TRUTH_DIR)
                gt_cost.append((gts.cpu_s, gts.wall_s))
                gt_recipe = gts.recipe
                gt_reliability.append(gts.reliability)
            for m in methods:
                status(f"seed {seed}: valuing with {m}")
                t0, c0 = time.perf_counter(), time.process_time()
                try:
                    result, t_value, c_value, wnotes = run_method(plan, m, built[m], data)
                except (KeyboardInterrupt, SystemExit):
                    raise
                except Exception as exc:  # noqa: BLE001 - one failing method must not lose the others
                    msg = one_line(exc) if isinstance(exc, CLIError) else f"{type(exc).__name__}: {one_line(exc)}"
                    print(f"{PROG}: {m} seed {seed} failed: {msg}", file=sys.stderr, flush=True)
                    if os.environ.get("DVGS_FAST_DEBUG"):
                        traceback.print_exc()
                    runs.append({"method": m, "seed": seed, "status": "failed", "error": msg, "metrics": {},
                                 "n": data.n_source, "n_valued": 0, "wall_s": time.perf_counter() - t0,
                                 "cpu_s": time.process_time() - c0})
                    continue
                if not plan.main_rank:
                    continue
                for w in wnotes:
                    tagged = f"{m} seed {seed}: {w}"
                    print(f"{PROG}: {tagged}", file=sys.stderr, flush=True)
                    notes.append(tagged)
                values = np.asarray(result.values, dtype=np.float64)
                rep = RunReport(method=m, dataset=data.name, noise=noise.label, values=values,
                                source_rows=data.idx_source, sample_ids=getattr(data, "sample_ids", None),
                                labels=data.y_source, is_corrupted=data.is_corrupted, sigma=data.sigma,
                                stderr=result.stderr, counts=result.counts, class_names=data.class_names)
                write_values_csv(rep, stage.stage / VALUES_DIR / f"{m}-seed{seed}.csv")
                metrics, _, skipped, snotes = score_values(values, result.counts, data, seed, label=m,
                                                       want_curves=not settings.get("no_curves"), progress=False,
                                                       settings=settings)
                for n in snotes + ([f"{m} seed {seed}: {skipped}"] if skipped else []):
                    notes.append(n if n.startswith(m) else f"{m} seed {seed}: {n}")
                if gts is not None:
                    status(f"seed {seed}: {m}: attribute() on {len(gts.x_query)} queries")
                    am, anote = attribution_metrics(m, built[m].method, data, gts)
                    metrics.update(am)
                    if anote and si == 0:
                        notes.append(anote)
                valued = np.asarray(result.counts) > 0
                if data.is_corrupted is not None and valued.all() and "auroc" in metrics:
                    dc = discovery_curve(values, data.is_corrupted, seed=seed)
                    found.setdefault(m, []).append(dc.found)
                    disc_fr, disc_opt = dc.fractions, dc.optimal
                run = {"method": m, "seed": seed, "status": result.status,
                       "stopped_by": result.info.get("stopped_by") if result.status == "stopped" else None,
                       "progress": str(result.info.get("progress", "")) or None, "n": int(values.shape[0]),
                       "n_valued": int(valued.sum()), "metrics": metrics, "wall_s": t_value, "cpu_s": c_value,
                       "method_timings": result.timings}
                runs.append(run)
                status(f"seed {seed}: {m} {status_of(run)}, "
                       + ", ".join(f"{t} {metrics[k]:.3f}" for k, t in METRIC_COLUMNS
                                   if isinstance(metrics.get(k), float) and math.isfinite(metrics[k]))
                       + f", {t_value:.1f} s wall / {c_value:.1f} s CPU")
                # A partial record after every run: an interrupted comparison keeps its numbers.
                atomic_write_text(stage.stage / COMPARE_JSON, json.dumps(jsonable({"partial": True, "runs": runs}),
                                                                         indent=1) + "\n")
        if not plan.main_rank:
            return 0
        data, noise = first
        summary = summarize_runs(runs, methods)
        doc = {"dataset": data.name, "noise": noise.label, "noise_description": noise.describe(),
               "methods": methods, "seeds": seeds,
               "sizes": {"n_source": data.n_source, "n_target": data.n_target, "n_test": data.n_test},
               "banner": banner(runs), "summary": summary, "runs": runs, "notes": notes,
               "curves": curves_line(runs),
               "settings": {"threads": torch.get_num_threads(), "device": plan.device or "auto",
                            "data_files": data.files},
               "models": models, "method_settings": method_settings, "command": plan.command,
               "loadavg_start": load_start, "loadavg_end": _loadavg(), "versions": versions(),
               "created": _dt.datetime.now().isoformat(timespec="seconds"),
               "total_s": time.perf_counter() - t_start}
        if plan.attribution_metrics:
            doc["ground_truth"] = {"metrics": plan.attribution_metrics, "recipe": gt_recipe,
                                   "cpu_s": [c for c, _ in gt_cost], "wall_s": [w for _, w in gt_cost],
                                   "reliability": gt_reliability, "folder": GROUND_TRUTH_DIR}
        pdir = stage.stage / PLOTS_DIR
        pdir.mkdir(exist_ok=True)
        plots = [p for p in (
            plot_metric_by_method(summary, "auroc", "detection AUROC", pdir / "auroc.png"),
            plot_metric_by_method(summary, "noise_spearman", "Spearman(value, -noise)", pdir / "spearman.png"),
            plot_mean_discovery(found, disc_fr, disc_opt, pdir / "discovery.png", data.name)
            if disc_fr is not None else None,
            plot_mean_curves(runs, methods, pdir / "remove_curves.png", data.name),
            plot_times(summary, pdir / "times.png")) if p is not None]
        atomic_write_text(stage.stage / COMPARE_JSON, json.dumps(jsonable(doc), indent=1) + "\n")
        write_runs_csv(runs, stage.stage / RUNS_CSV)
        atomic_write_text(stage.stage / COMPARE_MD, render_markdown(doc, plots))
        atomic_write_text(stage.stage / COMPARE_HTML, render_html(doc, plots))
        try:
            stage.finish()
        except (ValueError, OSError) as exc:
            raise CLIError(one_line(exc)) from None
    except BaseException:
        if stage is not None:
            kept = stage.abandon()
            if kept:
                print(f"{PROG}: {kept.replace('its values are', 'the values of the finished runs are')}",
                      file=sys.stderr, flush=True)
        raise

    from ..report import text_table
    if doc["banner"]:
        print("\n".join(["!" * 78, *textwrap.wrap(doc["banner"], 78), "!" * 78]))
    print(text_table(*summary_table_rows(summary)))
    print(f"total {doc['total_s']:.1f} s; report: {plan.out / COMPARE_HTML}")
    return 0 if not any(r["status"] == "failed" for r in runs) else 1
