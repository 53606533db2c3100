"""``dvgs-fast``: value a dataset from the command line and write a report.

    dvgs-fast run                       # DVGS on the bundled digits data, 20% flipped labels
    dvgs-fast run --dataset adult --data-root ../shared/data --out runs/adult
    dvgs-fast run --config exp.toml --seed 3
    dvgs-fast info                      # build, methods, datasets

Precedence of settings: command-line flags > ``--config`` file > per-dataset defaults (see
``_data.PRESETS``) > the method's own defaults. Problems the user can fix end the run with one
line ``error: ...`` on stderr and exit code 2, before any long work where possible; ``--debug``
shows the traceback of unexpected errors.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import shlex
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import _config as C
from ._errors import CLIError, one_line

PROG = "dvgs-fast"

# dest -> (flags, converter, metavar, help). Defaults are None everywhere: a None means "not given
# on the command line", so the config file and the per-dataset defaults can fill it in.
RUN_OPTIONS: dict[str, tuple[tuple[str, ...], Any, str | None, str]] = {
    "method": (("--method", "-m"), C.text, "NAME[,NAME...]",
               "dvgs | lossval | dvrl | dshap | loo | random | ... (see dvgs-fast info; default: dvgs); "
               "several, comma-separated, compare them on the same split in one report"),
    "dataset": (("--dataset", "-d"), C.text, "NAME",
                "digits | breast_cancer | adult | blog | cifar10 | lincs | lincs:FILE.gctx | csv:FILE.csv "
                "(default: digits)"),
    "data_root": (("--data-root", "--data"), C.text, "DIR",
                  "folder with the data files (default: $DVGS_FAST_DATA, else ../shared/data)"),
    "download": (("--download",), C.flag, None, "fetch missing public data files (checksum-verified) into the cache"),
    "label_column": (("--label-column",), C.text, "NAME", "csv: the label column (default: the last one)"),
    "target": (("--target",), C.text, "csv:FILE.csv",
               "with --dataset csv:FILE: your own clean target set (same columns); every row of --dataset is "
               "then valued against it, with no injected noise unless --noise is given"),
    "noise": (("--noise",), C.text, "SPEC",
              "label:RATE (flip labels), feature:SIGMA (per-sample Gaussian noise) or none "
              "(default: label:0.2; lincs: feature:3.0)"),
    "n_source": (("--n-source",), C.pos_int, "N", "samples to value (default per dataset, digits: 1000)"),
    "n_target": (("--n-target",), C.pos_int, "N", "clean target samples (default per dataset, digits: 300)"),
    "n_test": (("--n-test",), C.nonneg_int, "N", "test samples for removal curves (default: the rest, at most 2000)"),
    "target_balance_by": (("--target-balance-by",), C.text, "FIELD",
                          "lincs with --data-root FILE.gctx: spread the target evenly over the values of this "
                          "sample metadata field (e.g. pert_id; default: random)"),
    "model": (("--model",), C.text, "KIND",
              "auto | mlp | logistic | convnet | autoencoder (default: auto = MLP for tabular data, conv net "
              "for images, autoencoder for lincs; logistic for the refitting methods dshap and loo)"),
    "hidden": (("--hidden", "--hidden-channels", "--hidden_channels"), C.pos_int, "N",
               "hidden width of the model (default: 100; autoencoder 256)"),
    "num_layers": (("--num-layers", "--num_layers"), C.pos_int, "N",
                   "hidden layers of the mlp (default 2) or of each side of the autoencoder (default 1)"),
    "latent": (("--latent-channels", "--latent_channels"), C.pos_int, "N",
               "code width of the autoencoder (default: 64)"),
    "dropout": (("--dropout", "--do"), C.fraction, "P", "dropout of the model (default per dataset)"),
    "epochs": (("--epochs",), C.pos_int, "N", "training epochs of the method"),
    "restarts": (("--restarts",), C.pos_int, "N", "model restarts (DVGS)"),
    "lr": (("--lr",), C.pos_float, "LR", "learning rate of the method"),
    "compute_every": (("--compute-every", "--compute_every"), C.pos_int, "N",
                      "DVGS: a similarity snapshot every N target steps (default: 1)"),
    "target_batch_size": (("--target-batch-size", "--target_batch_size"), C.pos_int, "N",
                          "DVGS: target mini-batch size (default per dataset)"),
    "source_batch_size": (("--source-batch-size", "--source_batch_size"), C.pos_int, "N",
                          "DVGS: source rows scored at a time (bounds memory; values do not depend on it)"),
    "max_time": (("--max-time",), C.pos_float, "SECONDS",
                 "wall-time budget of the method (default: none; dshap and dvrl 600)"),
    "device": (("--device",), C.text, "DEV", "cpu | cuda | cuda:N (default: cuda when available)"),
    "seed": (("--seed",), C.nonneg_int, "N", "seed of the split, the noise and the method (default: 0)"),
    "seeds": (("--seeds",), C.seed_list, "LIST",
              "several seeds, e.g. 0,1,2,3,4: repeat the run per seed and report mean +- 2 sd (a comparison)"),
    "threads": (("--threads",), C.pos_int, "N",
                "CPU threads for torch and the evaluation's BLAS/OpenMP (default: torch's default; 1 is "
                "fastest for the small default models on a busy machine)"),
    "out": (("--out", "-o"), C.text, "DIR", "output folder (default: runs/<timestamp>-<method>-<dataset>)"),
    "overwrite": (("--overwrite",), C.flag, None, "replace the report in an existing output folder"),
    "no_progress": (("--no-progress",), C.flag, None, "no progress bars or status lines"),
    "no_curves": (("--no-curves",), C.flag, None, "skip the remove-high/low retraining curves"),
    "curve_model": (("--curve-model",), lambda v: _curve_model(v), "KIND",
                    "model retrained for the removal curves: logistic (default; scikit-learn's logistic "
                    "regression, test accuracy, 6 points, cheap) or paper (the DVGS paper's setup: its MLP, "
                    "Adam 1e-4, 200 epochs, batch 250, 2 replicates, 10 points up to 50%%, test AUROC; lincs: "
                    "its 978-250-250-32 autoencoder, 300 epochs, 10 points up to 95%%, test R^2)"),
    "curve_epochs": (("--curve-epochs",), C.pos_int, "N",
                     "--curve-model paper: training epochs of every refit (default: the paper's, 200; lincs 300)"),
    "curve_repeats": (("--curve-repeats",), C.pos_int, "N",
                      "--curve-model paper: refits per point from new initialisations, averaged (default: the "
                      "paper's, 2; lincs 1)"),
}
# Options that only make sense on the command line.
CLI_ONLY = ("config", "debug")
# Options passed to the method's constructor when it has a parameter of that name.
METHOD_OPTIONS = {"epochs": "--epochs", "restarts": "--restarts", "lr": "--lr", "max_time": "--max-time",
                  "compute_every": "--compute-every", "target_batch_size": "--target-batch-size",
                  "source_batch_size": "--source-batch-size"}
REMOVAL_FRACTIONS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)
CURVE_MODELS = ("logistic", "paper")


def _curve_model(v: Any) -> str:
    t = C.text(v).strip().lower()
    if t not in CURVE_MODELS:
        raise ValueError(f"expected one of {', '.join(CURVE_MODELS)}, got {v!r}")
    return t


def curve_spec(settings: dict[str, Any]) -> dict[str, Any]:
    """The removal curves' model and settings from the run options (--curve-*), checked."""
    kind = settings.get("curve_model", "logistic")
    if kind == "logistic":
        for dest in ("curve_epochs", "curve_repeats"):
            if dest in settings:
                raise CLIError(f"{_flag_of(dest)}: applies to --curve-model paper (the default logistic "
                               f"regression is fitted to convergence, deterministically)")
    return {"model": kind, "epochs": settings.get("curve_epochs"), "repeats": settings.get("curve_repeats")}


_RUN_EPILOG = """\
settings: command-line flags > --config file > per-dataset defaults > the method's defaults.

examples:
  dvgs-fast run
  dvgs-fast run --dataset adult --restarts 3 --epochs 100 --out runs/adult
  dvgs-fast run --dataset lincs --noise feature:3.0
  dvgs-fast run --dataset csv:mydata.csv --label-column label --noise label:0.1
  dvgs-fast run --method dshap --max-time 600 --n-source 200

config file (TOML):
  dataset = "adult"          # any option, dashes or underscores: n-source = 1000
  noise = "label:0.2"
  [method]                   # keyword arguments of the method's class, e.g. DVGS(...)
  restarts = 3
  similarity = "cosine"
  (with a [method] table, set the method's name as  [run] method = "dvgs")

exit codes: 0 done, 2 bad arguments / missing or unreadable data, 1 unexpected error, 130 interrupted
"""


_COMPARE_EPILOG = """\
examples:
  dvgs-fast compare --method dvgs,lossval,dshap,loo,random --seeds 0,1,2
  dvgs-fast compare --dataset adult --method dvgs,dvrl,dshap --seeds 0,1,2,3,4 --max-time 120
  dvgs-fast run --method dvgs,random            # the same as compare

per-method settings in a config file (TOML):
  [method.dshap]
  max_time = 300
  [method.dvgs]
  restarts = 3

Options a method does not take (--epochs for dshap) apply to the others. Every method sees the same
split and corruption for a given seed. Values of each run are written as soon as it ends
(values/METHOD-seedN.csv), so an interrupted comparison keeps what it finished.
"""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``error: ...`` and exit code 2, no usage dump."""

    def error(self, message: str):  # noqa: D401 - argparse API
        raise CLIError(f"{one_line(message)} (see {self.prog} --help)")


def _argtype(conv):
    def f(s: str):
        try:
            return conv(s)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    f.__name__ = conv.__name__
    return f


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Fast data valuation: find mislabeled or noisy training samples.")
    p.add_argument("--version", action="version", version=f"{PROG} {_version()}")
    sub = p.add_subparsers(dest="command", metavar="{run,compare,info}")
    r = sub.add_parser("run", help="value a dataset and write a report",
                       description="Value the samples of a dataset with a data valuation method, score the values "
                                   "against the known corruption, and write values.csv, metrics.json, plots, "
                                   "report.md and report.html into --out. Without options: DVGS on the bundled "
                                   "digits data with 20% flipped labels (under a minute on 2 CPU cores).",
                       epilog=_RUN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    c = sub.add_parser("compare", help="several methods (and seeds) on the same split, one report side by side",
                       description="Run every --method (comma-separated) on the same split for every seed of "
                                   "--seeds, score them alike and write one report: detection AUROC/AUPRC, "
                                   "k-means F1 (or Spearman for feature noise) as mean +- 2 sd over the seeds, "
                                   "removal curves overlaid, wall and CPU time, and each run's status. Same "
                                   "options as run; `run --method a,b` or `run --seeds 0,1,2` does the same.",
                       epilog=_COMPARE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    for q in (r, c):
        for dest, (flags, conv, metavar, help_) in RUN_OPTIONS.items():
            if conv is C.flag:
                q.add_argument(*flags, dest=dest, action="store_const", const=True, default=None, help=help_)
            else:
                q.add_argument(*flags, dest=dest, type=_argtype(conv), metavar=metavar, default=None, help=help_)
        q.add_argument("--config", metavar="FILE.toml", default=None,
                       help="TOML file with defaults for any option above (top level or [run]) and a [method] "
                            "table of keyword arguments for the method ([method.NAME] per method); flags "
                            "override it")
        q.add_argument("--debug", action="store_true", help="show the traceback of unexpected errors")
    sub.add_parser("info", help="build information, methods and datasets")
    return p


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("dvgs_fast")
    except Exception:  # noqa: BLE001
        return "unknown"


# ---------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit code (0 ok, 1 unexpected error, 2 user error, 130 interrupt)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help(sys.stderr)
            raise CLIError(f"a command is needed: {PROG} run (value a dataset), {PROG} compare (several "
                           f"methods side by side) or {PROG} info")
        if args.command == "info":
            return _info()
        return _run_with_threads(args, argv)
    except CLIError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # stdout closed early (`dvgs-fast run | head`): not an error of the run; the files are written.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 0
    except SystemExit as exc:  # --help / --version
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one line, not a traceback
        if debug:
            raise
        print(f"error: unexpected {type(exc).__name__}: {one_line(exc)} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1


# ---------------------------------------------------------------------------------------------
# info
# ---------------------------------------------------------------------------------------------
def _info() -> int:
    import dvgs_fast
    from ._data import DATASETS, LINCS_DEFAULT_FILE, resolve_data_root
    from ._methods import METHODS, NotAvailable, load_class
    print(f"{PROG} {_version()}")
    bi = dvgs_fast.build_info()
    for k, v in (bi.items() if isinstance(bi, dict) else [("build", bi)]):
        print(f"  {k}: {v}")
    print("methods:")
    for name, (_, cls_name, _, desc) in METHODS.items():
        try:
            load_class(name)
            state = "available"
        except NotAvailable as exc:
            state = one_line(exc)
        print(f"  {name:<8} {cls_name:<16} {state:<20} {desc}")
    try:
        root = resolve_data_root(None)
    except CLIError as exc:
        root = None
        print(f"data root: {one_line(exc)}")
    else:
        print(f"data root: {root if root is not None else 'none found (set $DVGS_FAST_DATA or pass --data-root)'}")
    need = {"digits": None, "breast_cancer": None, "adult": ["adult.data", "adult.test"],
            "blog": ["BlogFeedback.zip"], "cifar10": ["cifar-10-batches-py", "cifar10_foolbox_samples"],
            "lincs": [LINCS_DEFAULT_FILE]}
    print("datasets:")
    for name in DATASETS:
        files = need[name]
        if files is None:
            state = "bundled with scikit-learn"
        elif root is None:
            state = "no data root"
        else:
            found = [f for f in files if (root / f).exists()]
            state = ("found: " + ", ".join(found)) if found else f"missing: place {' or '.join(files)} in {root}"
        print(f"  {name:<14} {state}")
    print("  csv:FILE.csv   any CSV with a header; the label column is the last one (or --label-column)")
    return 0


# ---------------------------------------------------------------------------------------------
# run
# ---------------------------------------------------------------------------------------------
class _Status:
    def __init__(self, quiet: bool):
        self.quiet = quiet

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            print(f"{PROG}: {msg}", file=sys.stderr, flush=True)


def _merge(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any], dict[str, str]]:
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


def _default_out(method: str, dataset: str) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in dataset)[:40]
    base = Path("runs") / f"{stamp}-{method}-{safe}"
    out, k = base, 2
    while out.exists():
        out = base.with_name(f"{base.name}-{k}")
        k += 1
    return out


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out: {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CLIError(f"--out: {out} already exists and is not empty; pass --overwrite to replace its report, "
                       f"or choose another --out")


def _flag_of(dest: str) -> str:
    return RUN_OPTIONS[dest][0][0]


def _run_with_threads(args: argparse.Namespace, argv: list[str]) -> int:
    """_run, with --threads applied for its duration (restored afterwards: main() may run in-process)."""
    threads = args.threads
    if threads is None and args.config is not None:
        threads = _merge(args)[0].get("threads")
    if threads is None:
        return _run(args, argv)
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
            return _run(args, argv)
        # threadpool_limits only reaches libraries already loaded: load the evaluation's
        # BLAS/OpenMP users (scipy, scikit-learn) first.
        import scipy.stats  # noqa: F401
        import sklearn.cluster  # noqa: F401
        import sklearn.linear_model  # noqa: F401
        with threadpool_limits(limits=threads):
            return _run(args, argv)
    finally:
        torch.set_num_threads(before)


def _launch_rank() -> int:
    """This process's rank under torchrun (0 when not launched by it)."""
    try:
        return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0
    except ValueError:
        return 0


# Methods whose natural end can be hours away on a CPU get a default time budget when neither the
# command line nor the config sets one, printed at the start (never silently). Data Shapley (TMC)
# runs until its convergence rule holds; DVRL runs 2000 outer iterations. Measured on Adult
# (1000 source / 400 target, 1 thread, this project's 2-core CPU): TMC with the default linear refit
# costs ~0.7 CPU s per permutation, DVRL with the CLI's MLP predictor ~0.25 CPU s per outer
# iteration. Ten minutes thus gives ~800 permutations (the DVGS paper ran 200-1000) and about the
# full 2000 DVRL iterations on an idle core, and still answers within a coffee break; on a busy
# machine the run stops earlier, says status "stopped", and its report opens with a banner.
DEFAULT_MAX_TIME = {"dvrl": 600.0, "dshap": 600.0}


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


def _method_list(text: str) -> list[str]:
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


def _plan(args: argparse.Namespace, argv: list[str]) -> Plan:
    settings, table, _ = _merge(args)
    # Under torchrun every rank loads the same data (same seed) and runs the method (DVGS and
    # dshap split their work across the ranks); only rank 0 evaluates, prints and writes --out.
    main_rank = _launch_rank() == 0
    status = _Status(bool(settings.get("no_progress")) or not main_rank)
    progress = not settings.get("no_progress") and main_rank

    from ._data import parse_dataset, parse_noise, parse_target, resolve_data_root
    from ._methods import load_class
    from ._models import MODEL_CHOICES

    methods = _method_list(settings.get("method", "dvgs"))
    curve_spec(settings)               # --curve-* checked before any data is loaded
    if "seed" in settings and "seeds" in settings:
        raise CLIError("--seeds: give either --seed N or --seeds LIST, not both")
    seeds = settings.get("seeds", [settings.get("seed", 0)])
    compare = getattr(args, "command", "run") == "compare" or len(methods) > 1 or "seeds" in settings
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
    out = Path(settings["out"]).expanduser() if "out" in settings else _default_out(label, spec.label)
    overwrite = bool(settings.get("overwrite"))
    if main_rank:
        _check_out(out, overwrite)
        from ..report import INCOMPLETE_MARK, STAGE_SUFFIX
        stage = out.with_name(out.name + STAGE_SUFFIX)
        if stage.exists() and not (stage / INCOMPLETE_MARK).is_file():
            raise CLIError(f"--out: {stage} (where the run writes until it finishes) exists and is not an "
                           f"unfinished dvgs-fast run; move it away or choose another --out")
    for m in methods:
        load_class(m)                  # a missing optional package fails before loading any data
    _method_tables(table, methods)     # a misplaced [method] table fails before loading data
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
                status=status, command=" ".join(shlex.quote(a) for a in [PROG, *argv]))


def _method_tables(table: dict[str, Any], methods: list[str]) -> dict[str, dict[str, Any]]:
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


def _load_data(plan: Plan, seed: int):
    """(RunData, noise, preset, seconds) for one seed: loaded, split and corrupted."""
    from . import _data as D
    status, settings, spec, root = plan.status, plan.settings, plan.spec, plan.root
    t0 = time.perf_counter()
    status(f"loading {spec.label}" + (f" from {root}" if root is not None else ""))
    split = D.split_and_corrupt
    target = None
    if plan.lincs_gctx is not None:
        from . import _lincs
        status(f"reading {plan.lincs_gctx} (z-score statistics: one pass over the file)")
        loaded, preset, split = (_lincs.load(plan.lincs_gctx, settings.get("target_balance_by")), _lincs.PRESET,
                                 _lincs.split)
    elif plan.target_path is not None:
        loaded, target = D.load_csv_pair(spec.path, plan.target_path, settings.get("label_column"))
        preset = D.PRESETS[loaded.preset]
    else:
        loaded = D.load(spec, root, download=bool(settings.get("download")), label_column=settings.get("label_column"))
        preset = D.PRESETS[loaded.preset]
    noise = plan.noise
    if noise is None:
        # Your own target file means your own data: nothing is corrupted on purpose unless asked.
        noise = D.parse_noise("none" if target is not None else preset["noise"])
    if target is not None:
        data = D.split_with_target(loaded, target, settings.get("n_source"), settings.get("n_target"),
                                   settings.get("n_test"), noise, seed, max_test=preset.get("max_test"))
    else:
        n_source = settings.get("n_source", preset["n_source"])
        # An explicit --n-target is used as given; only the out-of-core LINCS run sizes its default
        # from the file (None), so it must see whether the user set it.
        n_target = settings.get("n_target", None if plan.lincs_gctx is not None else preset["n_target"])
        data = split(loaded, n_source, n_target, settings.get("n_test"), noise, seed, max_test=preset.get("max_test"))
    return data, noise, preset, time.perf_counter() - t0


def _accepted_params(method: str) -> set[str] | None:
    """Names the method's constructor takes (None: it takes any keyword)."""
    import inspect
    from ._methods import load_class
    try:
        params = inspect.signature(load_class(method)).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return set(params)


def _build_method(plan: Plan, method: str, data, preset: dict[str, Any], seed: int,
                  table: dict[str, Any], *, skip_foreign: bool = False):
    """(Built, model description, budget line or None). skip_foreign: an explicit option this
    method does not take is left out (compare: --epochs is for the methods that have epochs)."""
    from . import _models as M
    from ._methods import build
    settings = plan.settings
    choice = plan.model_choice
    table = dict(table)
    if "model" in table and "model" not in settings:
        # [method.NAME] model = "logistic": a per-method --model (a comparison's refitting
        # methods may need a cheaper model than the gradient methods). With --model as well,
        # build() refuses the table entry (two explicit choices).
        if not (isinstance(table["model"], str) and table["model"] in M.MODEL_CHOICES):
            raise CLIError(f"[method] model: expected one of {', '.join(M.MODEL_CHOICES)} (the model's kind, as "
                           f"--model), got {table['model']!r}")
        choice = table.pop("model")
    kind = M.resolve_kind(choice, data.task, data.sample_shape, method)
    hidden = settings.get("hidden", M.default_hidden(kind))
    dropout = settings.get("dropout", preset["dropout"])
    n_out = data.n_classes if data.task == "classification" else 0
    arch = M.arch_options(settings)     # --num-layers / --latent-channels (the original LINCS flags)
    model_factory = M.factory(kind, data.sample_shape, n_out, hidden=hidden, dropout=dropout, **arch)
    model_desc = M.describe(kind, data.sample_shape, n_out, hidden, dropout, **arch)
    explicit = {k: (_flag_of(k), settings[k]) for k in METHOD_OPTIONS if k in settings}
    if skip_foreign:
        accepted = _accepted_params(method)
        if accepted is not None:
            explicit = {k: v for k, v in explicit.items() if k in accepted}
    defaults: dict[str, Any] = {"seed": seed, "progress": plan.progress}
    if plan.device is not None:
        explicit["device"] = ("--device", plan.device)
    if data.task == "reconstruction":
        defaults["loss"] = "mse"
    if method == "dvgs":
        defaults.update(preset["dvgs"])
    budget = None
    if "max_time" not in explicit and "max_time" not in table and method in DEFAULT_MAX_TIME:
        defaults["max_time"] = DEFAULT_MAX_TIME[method]
        budget = (f"{method}: time budget {DEFAULT_MAX_TIME[method]:g} s (the default for {method}; "
                  f"--max-time SECONDS to change it)")
    built = build(method, model_factory, model_desc, explicit=explicit, defaults=defaults, table=table)
    return built, model_desc, budget


def _value(plan: Plan, method: str, built, data):
    """(result, wall seconds, CPU seconds, the method's warnings as one-line notes)."""
    t0, c0 = time.perf_counter(), time.process_time()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = built.method.fit(data.x_source, data.y_source, data.x_target, data.y_target)
        except ValueError as exc:
            raise CLIError(f"{method}: {one_line(exc)}") from None
    t_value, c_value = time.perf_counter() - t0, time.process_time() - c0
    notes: list[str] = []
    # The method's own warnings (a budget that ran out, ...) belong in the report, once each.
    for w in caught:
        if issubclass(w.category, (UserWarning, RuntimeWarning)):
            msg = f"warning: {one_line(w.message)}"
            if msg not in notes:
                notes.append(msg)
    values = np.asarray(result.values, dtype=np.float64)
    valued = np.asarray(result.counts) > 0
    if values.shape != (data.n_source,) or not np.all(np.isfinite(values[valued])):
        raise CLIError(f"{method}: returned {values.shape} values, {int((~np.isfinite(values)).sum())} "
                       f"not finite, for {data.n_source} source samples")
    return result, t_value, c_value, notes


def _score(values: np.ndarray, counts: np.ndarray, data, seed: int, *, label: str, want_curves: bool,
           progress: bool, status=None, settings: dict[str, Any] | None = None):
    """(metrics, removal curves, why the curves were skipped or None, notes).

    Metrics are computed over the valued samples only (counts > 0): a budget-stopped run's
    unvalued samples hold placeholders, and scoring them would measure the budget, not the method.
    Removal curves retrain on the data ranked by value, which needs every sample ranked; their
    model is --curve-model (``settings``): a logistic regression, or the paper's network and
    filter settings (see :func:`_curve_setup`)."""
    from ..evaluate import summarize
    valued = np.asarray(counts) > 0
    k, n = int(valued.sum()), int(values.shape[0])
    notes: list[str] = []
    bad = None if data.is_corrupted is None else np.asarray(data.is_corrupted, dtype=bool)[valued]
    if bad is not None and (bad.all() or not bad.any()):
        notes.append(f"the {k} valued samples hold {int(bad.sum())} corrupted ones: detection metrics need "
                     f"both kinds, so they are not computed")
        bad = None
    sigma = None if data.sigma is None else np.asarray(data.sigma)[valued]
    if k:
        metrics = summarize(values[valued], bad, sigma, random_state=seed)
    else:
        metrics = {"n": 0}
    if k < n:
        metrics["n_unvalued"] = n - k
    curves, skipped = [], None
    spec = curve_spec(settings or {})
    paper = spec["model"] == "paper"
    if want_curves and data.n_test > 0 and (
            (data.task == "classification" and np.unique(data.y_test).size > 1)
            or (paper and data.task == "reconstruction")):
        if k < n:
            skipped = (f"Removal curves were skipped: they retrain on the data ranked by value, and {n - k} "
                       f"samples have no value.")
        else:
            from ..evaluate import remove_curves
            kw, desc = _curve_setup(spec, data)
            if status is not None:
                status(f"removal curves: retraining {desc}")
            xs = data.x_source.reshape(data.n_source, -1)
            xt = data.x_test.reshape(data.n_test, -1)
            ys, yt = (data.y_source, data.y_test) if data.task == "classification" else (xs, xt)
            try:
                got = remove_curves(values, xs, ys, xt, yt, seed=seed, label=label, progress=progress, **kw)
            except ValueError as exc:
                raise CLIError(f"removal curves: {one_line(exc)}") from None
            for mode in ("high", "low"):
                c = got[mode]
                c.info["model"] = desc
                curves.append(c)
                metrics[f"remove_{mode}"] = {
                    "fractions": c.fractions.tolist(), "scores": c.scores.tolist(), "metric": c.metric,
                    "replicate_scores": c.replicate_scores.tolist(), "n_kept": c.n_kept.tolist(),
                    "model": desc, "curve_model": spec["model"], "epochs": c.info.get("epochs"),
                    "repeats": c.info["repeats"], "selection": c.info["selection"]}
    return metrics, curves, skipped, notes


def _curve_setup(spec: dict[str, Any], data) -> tuple[dict[str, Any], str]:
    """(keyword arguments of remove_curves, a one-line description) for --curve-model.

    logistic: scikit-learn's LogisticRegression, test accuracy at REMOVAL_FRACTIONS, exactly
    floor(f * n) samples removed. paper: the DVGS paper's ``filter_kwargs`` (configs/exp1, exp2,
    exp4; exp8 for lincs) -- the experiment's network re-initialised per refit, mini-batch Adam,
    the paper's fractions, replicates averaged, quantile thresholds, scored on the test set;
    --curve-epochs / --curve-repeats override its epochs / replicates."""
    if spec["model"] == "logistic":
        return ({"fractions": REMOVAL_FRACTIONS, "metric": "accuracy"},
                "logistic regression (scikit-learn, lbfgs), test accuracy")
    from ..evaluate import paper_settings
    from ._models import autoencoder, mlp
    d = int(np.prod(data.x_source.shape[1:]))
    task = "classification" if data.task == "classification" else "reconstruction"
    ps = paper_settings(task)
    epochs = spec["epochs"] or ps["epochs"]
    repeats = spec["repeats"] or ps["repeats"]
    if task == "classification":
        n_out = data.n_classes
        factory = lambda: mlp(d, n_out, 100, 0.5, 2)  # noqa: E731 - the exp1/exp2 network
        net = f"the paper's MLP {d}-100-100-{n_out} (Mish, dropout 0.5, LayerNorm)"
    else:
        factory = lambda: autoencoder(d, 250, 32, 2, 0.0)  # noqa: E731 - the exp8 autoencoder
        net = f"the paper's autoencoder {d}-250-250-32-250-250-{d} (Mish, MSE)"
    kw = {"fractions": ps["fractions"], "metric": ps["metric"], "model": factory, "repeats": repeats,
          "selection": ps["selection"],
          "torch_options": {"epochs": epochs, "lr": ps["lr"], "batch_size": ps["batch_size"]}}
    metric = "AUROC" if ps["metric"] == "auroc" else "R^2"
    desc = (f"{net}, Adam lr {ps['lr']:g}, {epochs} epochs, batch {ps['batch_size']}, "
            f"{repeats} replicate{'s' if repeats > 1 else ''} per point, test {metric}")
    return kw, desc


def _versions() -> dict[str, str]:
    import dvgs_fast
    import torch
    return {"dvgs_fast": getattr(dvgs_fast, "__version__", _version()), "torch": torch.__version__,
            "python": sys.version.split()[0]}


def _run(args: argparse.Namespace, argv: list[str]) -> int:
    t_start = time.perf_counter()
    plan = _plan(args, argv)
    if plan.compare:
        from ._compare import run_compare
        return run_compare(plan, t_start)
    method, seed, status = plan.methods[0], plan.seeds[0], plan.status
    settings = plan.settings

    # ---- data, model and method ------------------------------------------------------------------
    data, noise, preset, t_load = _load_data(plan, seed)
    status(f"{data.name}: {data.n_source} source / {data.n_target} target / {data.n_test} test samples, "
           f"{noise.describe()}")
    for note in data.notes:
        status(f"note: {note}")
    built, model_desc, budget = _build_method(plan, method, data, preset, seed,
                                              _method_tables(plan.table, [method])[method])
    if budget is not None and plan.main_rank:
        print(f"{PROG}: {budget}", file=sys.stderr, flush=True)     # even with --no-progress
        data.notes.append(budget)

    from ..report import RunReport, StagedOutput, summary_table, write_report, write_values_early
    stage = StagedOutput(plan.out, plan.overwrite) if plan.main_rank else None
    if stage is not None:
        try:
            stage.open(plan.command)
        except (ValueError, OSError) as exc:
            raise CLIError(one_line(exc)) from None
        if stage.replaced_stale:
            status(f"note: replaced {stage.stage}, left by an earlier run that did not finish")
    try:
        # ---- valuation ---------------------------------------------------------------------------
        status(f"valuing with {method}: {model_desc}")
        result, t_value, c_value, wnotes = _value(plan, method, built, data)
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
        metrics, curves, skipped, snotes = _score(values, result.counts, data, seed, label=method,
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
                     "versions": _versions(), "created": _dt.datetime.now().isoformat(timespec="seconds")}
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
