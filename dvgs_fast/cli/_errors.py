"""The one exception type the command line turns into a one-line ``error: ...`` and exit code 2."""
from __future__ import annotations


class CLIError(Exception):
    """A problem the user can fix (bad option, missing file, ...): reported without a traceback."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


def one_line(message: object) -> str:
    """Collapse a (possibly multi-line) message into one line."""
    text = " ".join(str(message).split())
    return text or "unknown error"
