"""User-facing errors. The command line prints their message on one line and exits with
status 2; anything else escaping is a bug and keeps its traceback."""

from __future__ import annotations

__all__ = ["AutotpError", "CaptureError", "InputError", "first_line"]


class AutotpError(Exception):
    """Bad input: a missing file, a model transformers does not know, a corrupt shard, ..."""


class CaptureError(AutotpError):
    """The model could not be exported to a graph."""


class InputError(AutotpError, ValueError):
    """An argument autotp cannot work with (a ValueError too, as it was before it had a class)."""


def first_line(exc: BaseException) -> str:
    """``Type: first line of the message``: an exception in one line of an error we raise."""
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
