"""Errors a user can cause and fix: the commands report these as one line (exit status 2); any other exception is
a bug and keeps its traceback.

Each is a `ValueError` or `OSError` as well, so Python callers can keep catching those."""

from __future__ import annotations


class UsageError(ValueError):
    """A bad argument, setting, file or model given by the user."""


class MissingInputError(UsageError, FileNotFoundError):
    """A file, folder or hub model the user named does not exist."""


class OutputExistsError(UsageError, FileExistsError):
    """The output folder exists (and may not be replaced)."""


class OutputBusyError(UsageError, BlockingIOError):
    """Another process is writing the same output folder."""


class OutputNotWritableError(UsageError, PermissionError):
    """The output folder cannot be written."""


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its type name when it has none)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def validation_message(error: Exception) -> str:
    """The readable part of a validation error: its cause's first line (a strict config wraps the real message),
    else its last non-empty line."""
    cause = error.__cause__ or error.__context__
    if cause is not None and str(cause):
        return first_line(cause)
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__
