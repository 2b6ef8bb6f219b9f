"""Errors a user can cause, and the one boundary that turns them into one line and exit code 2.

Code that reads a user's file raises :class:`MeritError` (or a subclass) naming the file, line or field
and what to do. :func:`as_user_error` is the CLI's last net: exceptions that can only come from the
user's files or machine (a file that cannot be opened, bytes that are not UTF-8, a truncated
safetensors header, ...) become a MeritError with the file named; anything else is a bug in merit and
keeps its traceback.
"""

from __future__ import annotations

import sys


class MeritError(Exception):
    """A problem with the user's input: config, data file or checkpoint. The message says where and what to do."""


class ConfigError(MeritError):
    """The run config is invalid."""


class DataError(MeritError):
    """A data file is missing or malformed."""


def warn(message: str) -> None:
    """A one-line warning on stderr: something was accepted, and the user should know how."""
    print(f"merit: warning: {message}", file=sys.stderr, flush=True)


def notice(message: str) -> None:
    """A one-line notice on stderr: merit repaired or redid something on its own."""
    print(f"merit: notice: {message}", file=sys.stderr, flush=True)


def as_user_error(exc: BaseException) -> MeritError | None:
    """The user-facing error an exception stands for, or None when it is a bug of ours.

    Only exceptions that carry the offending file are translated, so the line can say where.
    """
    if isinstance(exc, MeritError):
        return exc
    if isinstance(exc, OSError) and getattr(exc, "filename", None):
        what = exc.strerror or type(exc).__name__
        hint = {
            "PermissionError": "check its permissions",
            "IsADirectoryError": "give a file, not a folder",
            "NotADirectoryError": "a part of the path is a file, not a folder",
            "FileNotFoundError": "check the path",
            "FileExistsError": "remove it or choose another path",
        }.get(type(exc).__name__, "check the path, the disk and its permissions")
        return MeritError(f"{exc.filename}: {what}; {hint}")
    name = type(exc).__name__
    if name == "SafetensorError":  # a truncated or foreign weight file; the message names no file
        return MeritError(f"a weight file is not valid safetensors ({exc}); re-save or re-copy the checkpoint")
    return None
