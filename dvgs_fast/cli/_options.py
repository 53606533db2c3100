"""The ``dvgs-fast`` command line's options and parser: every flag in one table (``RUN_OPTIONS``),
shared by ``run`` and ``compare`` and by the ``--config`` file's keys.

Defaults are None everywhere: a None means "not given on the command line", so the config file
and the per-dataset defaults can fill it in (precedence: flags > config > dataset > method)."""
from __future__ import annotations

import argparse
from typing import Any

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
    "solver": (("--solver",), C.text, "NAME",
               "influence: direct | cg | lissa | arnoldi | kfac | ekfac | datainf (default: ekfac)"),
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
    "metric": (("--metric",), C.text, "LIST",
               "lds,loo: also score each method's attribute() against retraining (linear datamodeling score, "
               "leave-one-out Spearman) on --n-query test rows, in a comparison report (also with one method); "
               "methods without attribute() show '-'"),
    "n_query": (("--n-query",), C.pos_int, "N", "--metric: queries (the first N test rows; default 100)"),
    "lds_subsets": (("--lds-subsets",), C.pos_int, "M", "--metric lds: random half-subsets retrained (default 100)"),
    "gt_seeds": (("--gt-seeds",), C.pos_int, "N", "--metric: retrain seeds averaged in the ground truth (default 2)"),
    "loo_rows": (("--loo-rows",), C.pos_int, "N", "--metric loo: source rows left out one at a time (default 100)"),
    "curve_model": (("--curve-model",), lambda v: curve_model(v), "KIND",
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
                  "source_batch_size": "--source-batch-size", "solver": "--solver"}


REMOVAL_FRACTIONS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)


CURVE_MODELS = ("logistic", "paper")


def curve_model(v: Any) -> str:
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
                raise CLIError(f"{flag_of(dest)}: applies to --curve-model paper (the default logistic "
                               f"regression is fitted to convergence, deterministically)")
    return {"model": kind, "epochs": settings.get("curve_epochs"), "repeats": settings.get("curve_repeats")}


def flag_of(dest: str) -> str:
    return RUN_OPTIONS[dest][0][0]


RUN_EPILOG = """\
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


COMPARE_EPILOG = """\
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
    p.add_argument("--version", action="version", version=f"{PROG} {version()}")
    sub = p.add_subparsers(dest="command", metavar="{run,compare,info}")
    r = sub.add_parser("run", help="value a dataset and write a report",
                       description="Value the samples of a dataset with a data valuation method, score the values "
                                   "against the known corruption, and write values.csv, metrics.json, plots, "
                                   "report.md and report.html into --out. Without options: DVGS on the bundled "
                                   "digits data with 20% flipped labels (under a minute on 2 CPU cores).",
                       epilog=RUN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    c = sub.add_parser("compare", help="several methods (and seeds) on the same split, one report side by side",
                       description="Run every --method (comma-separated) on the same split for every seed of "
                                   "--seeds, score them alike and write one report: detection AUROC/AUPRC, "
                                   "k-means F1 (or Spearman for feature noise) as mean +- 2 sd over the seeds, "
                                   "removal curves overlaid, wall and CPU time, and each run's status. Same "
                                   "options as run; `run --method a,b` or `run --seeds 0,1,2` does the same.",
                       epilog=COMPARE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
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


def version() -> str:
    try:
        from importlib.metadata import version
        return version("dvgs_fast")
    except Exception:  # noqa: BLE001
        return "unknown"
