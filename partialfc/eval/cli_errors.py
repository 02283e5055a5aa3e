"""One line on stderr and exit status 2 for the expected errors of the eval and export CLIs.

A user who points ``verification`` at a truncated ``.bin`` or ``export`` at the wrong
file made a mistake in the input, not a bug report: they need the file and what is
wrong with it, not fifty lines of traceback. The library code raises ValueError
(TypeError for unusable stored arguments) or OSError with that message; ``run_cli``
prints it as ``PROG: error: MESSAGE`` on one line. Anything else is a bug and keeps
its traceback.
"""
from __future__ import annotations

import sys
from typing import Callable

__all__ = ["EXIT_USAGE", "one_line", "run_cli"]

EXIT_USAGE = 2  # argparse's status for bad arguments; the same for bad input files
EXPECTED_ERRORS = (ValueError, TypeError, OSError)


def one_line(error: BaseException) -> str:
    """The message of ``error`` on a single line (an embedded newline would split it)."""
    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, OSError) and error.filename is not None and str(error.filename) not in text:
        text = f"{error.filename}: {text}"
    return text


def run_cli(prog: str, body: Callable[[], int]) -> int:
    """``body()``; an expected error becomes ``PROG: error: ...`` on stderr and status 2."""
    try:
        return body()
    except EXPECTED_ERRORS as error:
        print(f"{prog}: error: {one_line(error)}", file=sys.stderr)
        return EXIT_USAGE
