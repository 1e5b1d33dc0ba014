"""Errors the engine raises for the user, each carrying the exit code the CLI returns.

Exit codes: 2 bad usage or input, 3 model missing/corrupt/refused, 4 out of memory or disk,
5 numerical failure, 130 interrupted. The message is one line: what, where, what to do.
"""

from __future__ import annotations


class DdpmError(Exception):
    """Base of every error meant for the user rather than for a traceback."""

    exit_code = 1


class InputError(DdpmError):
    """Bad usage or bad input data (an option, an image, a data folder)."""

    exit_code = 2


class ModelError(DdpmError):
    """A checkpoint that is missing, corrupt, or refused (pickle, remote code)."""

    exit_code = 3


class ResourceError(DdpmError):
    """Out of memory (host or device) or out of disk."""

    exit_code = 4


class NumericalError(DdpmError):
    """Non-finite values where finite ones are required (loss, weights, images)."""

    exit_code = 5
