"""Errors a user can cause: a clear message, exit code 2, no traceback."""
from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps


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


_INVOKED_AS: list[str] = []  # set by the ``finetune`` command: "finetune sweep", ...


def invoked_as(command: str) -> None:
    """Record the command a user typed (``finetune train``), for the usage lines of the parser it dispatches to."""
    _INVOKED_AS[:] = [command]


def prog_name(as_file: str) -> str:
    """The usage line's command: the one typed (``finetune train``) when run through ``finetune``, else ``as_file``."""
    return _INVOKED_AS[0] if _INVOKED_AS else as_file
