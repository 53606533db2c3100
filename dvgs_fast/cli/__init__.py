"""The ``dvgs-fast`` command line (``dvgs-fast run``, ``dvgs-fast info``); see ``_main``."""
from __future__ import annotations

from ._errors import CLIError
from ._main import build_parser, main

__all__ = ["main", "build_parser", "CLIError"]
