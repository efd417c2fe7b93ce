"""Errors a user can cause: a clear message, exit code 2, no traceback."""
from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path


class UserError(Exception):
    """Bad input from the user (a spec, a data file, an override).

    The message names the file, key or line and the bad value. Command-line
    entry points print it and exit with code 2; bugs keep their traceback.
    """

    exit_code = 2


def cli_errors(main: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap a CLI ``main`` so that a UserError prints one message and exits 2."""

    @wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs) or 0
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return exc.exit_code
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130

    return wrapper


def prog_name(as_file: str) -> str:
    """The usage line's command: the installed one (``finetune-sweep``) when run so, else ``as_file``."""
    name = Path(sys.argv[0]).name
    return name if name.startswith("finetune-") else as_file
