"""``dvgs-fast``: value a dataset from the command line and write a report.

    dvgs-fast run                       # DVGS on the bundled digits data, 20% flipped labels
    dvgs-fast run --dataset adult --data-root ../shared/data --out runs/adult
    dvgs-fast run --config exp.toml --seed 3
    dvgs-fast info                      # build, methods, datasets

Precedence of settings: command-line flags > ``--config`` file > per-dataset defaults (see
``_data.PRESETS``) > the method's own defaults. Problems the user can fix end the run with one
line ``error: ...`` on stderr and exit code 2, before any long work where possible; ``--debug``
shows the traceback of unexpected errors.

The package, one job per module: ``_options`` (flags and parser), ``_config`` (TOML and value
converters), ``_plan`` (checked settings before any data), ``_data`` / ``_lincs`` (datasets),
``_models`` (the models the CLI builds), ``_methods`` (method registry), ``_pipeline`` (load,
build, value, score), ``_run`` (one run and its report), ``_compare`` / ``_compare_report``
(several methods and seeds side by side), ``_info``; this module is the entry point.
"""
from __future__ import annotations

import os
import sys
from typing import Sequence

from ._errors import CLIError, one_line
from ._info import info
from ._options import PROG, build_parser
from ._run import run_with_threads


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
            return info()
        return run_with_threads(args, argv)
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


__all__ = ["main", "build_parser"]
