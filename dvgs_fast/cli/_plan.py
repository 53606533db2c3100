"""From parsed arguments to a checked ``Plan``: settings merged (flags over the config file),
methods, seeds, dataset, output folder, device -- every check that needs no data, before any
data is loaded."""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import _config as C
from ._errors import CLIError, one_line
from ._options import PROG, RUN_OPTIONS, curve_spec


class Status:
    def __init__(self, quiet: bool):
        self.quiet = quiet

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            print(f"{PROG}: {msg}", file=sys.stderr, flush=True)


def merge_settings(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any], dict[str, str]]:
    """(settings, [method] table, {dest: where it came from}) with flags over the config file."""
    converters = {dest: spec[1] for dest, spec in RUN_OPTIONS.items()}
    aliases = {flag.lstrip("-").replace("-", "_"): dest for dest, spec in RUN_OPTIONS.items()
               for flag in spec[0] if flag.startswith("--")}
    cfg, table = ({}, {})
    if args.config is not None:
        cfg, table = C.split_config(C.read_toml(args.config), args.config, converters, aliases)
    settings: dict[str, Any] = {}
    source: dict[str, str] = {}
    for dest in RUN_OPTIONS:
        v = getattr(args, dest)
        if v is not None:
            settings[dest], source[dest] = v, "flag"
        elif dest in cfg:
            settings[dest], source[dest] = cfg[dest], "config"
    return settings, table, source


def default_out(method: str, dataset: str) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in dataset)[:40]
    base = Path("runs") / f"{stamp}-{method}-{safe}"
    out, k = base, 2
    while out.exists():
        out = base.with_name(f"{base.name}-{k}")
        k += 1
    return out


def check_out(out: Path, overwrite: bool) -> None:
    from ..report import STAGE_SUFFIX
    try:
        name_max = os.pathconf(out.parent if out.parent.is_dir() else ".", "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        name_max = 255
    longest = name_max - len(STAGE_SUFFIX)          # the run writes into <out>.incomplete first
    if len(os.fsencode(out.name)) > longest:
        raise CLIError(f"--out: the folder name {out.name[:40]}... is {len(os.fsencode(out.name))} bytes long; "
                       f"this file system allows {name_max}, and the run first writes into <name>{STAGE_SUFFIX}: "
                       f"use at most {longest}")
    try:
        _check_out(out, overwrite)
    except OSError as exc:
        raise CLIError(f"--out: {out} cannot be used ({exc.strerror or exc})") from None


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out: {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CLIError(f"--out: {out} already exists and is not empty; pass --overwrite to replace its report, "
                       f"or choose another --out")


def launch_rank() -> int:
    """This process's rank under torchrun (0 when not launched by it)."""
    try:
        return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0
    except ValueError:
        return 0


@dataclass
class Plan:
    """Everything decided before any data is loaded (all checks that need no data are done)."""

    settings: dict[str, Any]
    table: dict[str, Any]
    methods: list[str]
    seeds: list[int]
    compare: bool                      # several methods or seeds: one side-by-side report
    spec: Any
    target_path: Path | None
    noise: Any                         # explicit --noise (None: the dataset's default)
    model_choice: str
    device: str | None
    out: Path
    overwrite: bool
    root: Path | None
    lincs_gctx: Path | None
    main_rank: bool
    progress: bool
    status: Any
    command: str = ""
    attribution_metrics: list = field(default_factory=list)     # --metric: "lds", "loo"
    out_is_default: bool = False       # runs/<timestamp>-...: a taken name moves on to the next free one


def method_list(text: str) -> list[str]:
    from ._methods import METHODS
    names = [t.strip().lower() for t in str(text).split(",")]
    if not names or any(not t for t in names):
        raise CLIError(f"--method: expected a name or a comma-separated list (dvgs,dshap,loo), got {text!r}")
    for name in names:
        if name not in METHODS:
            raise CLIError(f"--method: unknown method {name!r}; choose one of {', '.join(METHODS)}")
    if len(set(names)) != len(names):
        raise CLIError(f"--method: {text!r} names a method twice")
    return names


def make_plan(args: argparse.Namespace, argv: list[str]) -> Plan:
    settings, table, _ = merge_settings(args)
    # Under torchrun every rank loads the same data (same seed) and runs the method (DVGS and
    # dshap split their work across the ranks); only rank 0 evaluates, prints and writes --out.
    main_rank = launch_rank() == 0
    status = Status(bool(settings.get("no_progress")) or not main_rank)
    progress = not settings.get("no_progress") and main_rank

    from ._data import parse_dataset, parse_noise, parse_target, resolve_data_root
    from ._methods import load_class
    from ._models import MODEL_CHOICES

    methods = method_list(settings.get("method", "dvgs"))
    curve_spec(settings)               # --curve-* checked before any data is loaded
    from ._counterfactual import parse_metrics
    attribution_metrics = parse_metrics(settings["metric"]) if "metric" in settings else []
    for dest in ("n_query", "lds_subsets", "gt_seeds", "loo_rows"):
        if dest in settings and not attribution_metrics:
            raise CLIError(f"{RUN_OPTIONS[dest][0][0]}: applies with --metric lds,loo")
    if "seed" in settings and "seeds" in settings:
        raise CLIError("--seeds: give either --seed N or --seeds LIST, not both")
    seeds = settings.get("seeds", [settings.get("seed", 0)])
    compare = getattr(args, "command", "run") == "compare" or len(methods) > 1 or "seeds" in settings
    compare = compare or bool(attribution_metrics)     # LDS / LOO are laid out in the comparison report
    spec = parse_dataset(settings.get("dataset", "digits"))
    target_path = None
    if "target" in settings:
        target_path = parse_target(settings["target"])
        if spec.kind != "csv":
            raise CLIError(f"--target: a target file needs your own data, --dataset csv:FILE.csv (with "
                           f"--dataset {spec.label} the target is drawn from the dataset itself)")
        if not target_path.is_file():
            raise CLIError(f"--target csv:{target_path}: file not found")
    noise = parse_noise(settings["noise"]) if "noise" in settings else None
    model_choice = settings.get("model", "auto")
    if model_choice not in MODEL_CHOICES:
        raise CLIError(f"--model: unknown value {model_choice!r}; choose one of {', '.join(MODEL_CHOICES)}")
    device = settings.get("device")
    if device is not None:
        from .._validation import resolve_device
        try:
            device = str(resolve_device(device))
        except ValueError as exc:
            raise CLIError(f"--device: {one_line(exc).removeprefix('device: ')}") from None
    label = methods[0] if not compare else ("compare-" + "-".join(methods))[:60]
    out = Path(settings["out"]).expanduser() if "out" in settings else default_out(label, spec.label)
    overwrite = bool(settings.get("overwrite"))
    if main_rank:
        check_out(out, overwrite)
        from ..report import INCOMPLETE_MARK, STAGE_SUFFIX, stage_holder
        stage = out.with_name(out.name + STAGE_SUFFIX)
        if stage.exists() and not (stage / INCOMPLETE_MARK).is_file():
            raise CLIError(f"--out: {stage} (where the run writes until it finishes) exists and is not an "
                           f"unfinished dvgs-fast run; move it away or choose another --out")
        holder = stage_holder(stage)
        if holder is not None and "out" in settings:     # a default name moves on to the next free one
            raise CLIError(f"--out: {stage} is being written by another dvgs-fast run ({holder}); wait for it "
                           f"to finish or choose another --out")
    for m in methods:
        load_class(m)                  # a missing optional package fails before loading any data
    method_tables(table, methods)     # a misplaced [method] table fails before loading data
    # --dataset lincs --data-root FILE.gctx (or a folder with one): the paper's LINCS run, out of core.
    lincs_gctx = None
    if spec.kind == "lincs" and spec.path is None and "data_root" in settings:
        from ._lincs import find_gctx
        lincs_gctx = find_gctx(settings["data_root"])
    if "target_balance_by" in settings and lincs_gctx is None:
        raise CLIError("--target-balance-by: only for --dataset lincs --data-root FILE.gctx (the out-of-core LINCS run)")
    root = None
    if lincs_gctx is not None:
        pass
    elif spec.kind not in ("digits", "breast_cancer", "csv") and not (spec.kind == "lincs" and spec.path):
        root = resolve_data_root(settings.get("data_root"))
    elif "data_root" in settings:
        root = resolve_data_root(settings["data_root"])
    return Plan(settings=settings, table=table, methods=methods, seeds=list(seeds), compare=compare, spec=spec,
                target_path=target_path, noise=noise, model_choice=model_choice, device=device, out=out,
                overwrite=overwrite, root=root, lincs_gctx=lincs_gctx, main_rank=main_rank, progress=progress,
                status=status, command=" ".join(shlex.quote(a) for a in [PROG, *argv]),
                attribution_metrics=attribution_metrics, out_is_default="out" not in settings)


def method_tables(table: dict[str, Any], methods: list[str]) -> dict[str, dict[str, Any]]:
    """The config's [method] table per method: [method.NAME] sub-tables, or (one method only) a
    flat [method] table."""
    from ._methods import METHODS
    per = {k: v for k, v in table.items() if k in METHODS and isinstance(v, dict)}
    flat = {k: v for k, v in table.items() if k not in per}
    for k in per:
        if k not in methods:
            raise CLIError(f"[method.{k}]: {k} is not among --method {','.join(methods)}")
    if flat and len(methods) > 1:
        raise CLIError(f"[method] {next(iter(flat))}: with several methods, put each method's settings in its "
                       f"own table, [method.{methods[0]}]")
    return {m: {**flat, **per.get(m, {})} for m in methods}
