"""Argument types that validate a value as argparse reads it: bad input is one line.

What 0 means is the same for every duration option of ``pyautofs``: **0 turns the limit or
the feature off** (never expire, no negative cache, no deadline). Negative values, NaN,
infinity and non-numbers are refused.
"""

from __future__ import annotations

import argparse
import fcntl
import math
import os
from typing import NoReturn, TypeVar

__all__ = [
    "seconds",
    "positive_seconds",
    "whole_seconds",
    "positive_int",
    "process_id",
    "pid_or_self",
    "fd_number",
    "writable_fd_problem",
]

_N = TypeVar("_N", int, float)


def _convert(text: str, kind: type[_N], what: str) -> _N:
    """``kind(text)``, or the one-line usage error ``'<text>' is not <what>``."""
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None


def _refuse(message: str) -> NoReturn:
    raise argparse.ArgumentTypeError(message)


def seconds(text: str) -> float:
    """A duration in seconds, >= 0 (0: off); fractions allowed."""
    value = _convert(text, float, "a number of seconds")
    if not math.isfinite(value) or value < 0:
        _refuse(f"must be a number of seconds >= 0 (0: off), not {text}")
    return value


def positive_seconds(text: str) -> float:
    """A duration in seconds, > 0 (and below a billion); fractions allowed."""
    value = _convert(text, float, "a number of seconds")
    if not 0 < value < 1e9:
        _refuse(f"must be more than 0 seconds, not {text}")
    return value


def _whole(text: str, what: str, minimum: int, refusal: str) -> int:
    """A whole number >= ``minimum``, or the usage error ``<refusal>, not <text>``."""
    value = _convert(text, int, what)
    if value < minimum:
        _refuse(f"{refusal}, not {text}")
    return value


def whole_seconds(text: str) -> int:
    """A whole number of seconds, >= 0 (0: off)."""
    value = _whole(
        text, "a whole number of seconds", 0, "must be a whole number of seconds >= 0 (0: off)"
    )
    if value > 2**31 - 1:
        _refuse(f"{text} seconds is more than the kernel accepts")
    return value


def positive_int(text: str) -> int:
    """A whole number >= 1."""
    return _whole(text, "a whole number", 1, "must be at least 1")


def process_id(text: str) -> int:
    """A process id (>= 1)."""
    return _whole(text, "a process id", 1, "must be a process id")


def pid_or_self(text: str) -> str:
    """A process id, or ``self`` (this process), kept as text for ``/proc/<pid>``."""
    if text == "self" or (text.isdigit() and int(text) > 0):
        return text
    _refuse(f"must be 'self' or a process id, not {text!r}")


def fd_number(text: str) -> int:
    """An fd number (>= 0); whether it is open is checked when the command starts."""
    return _whole(text, "an fd number", 0, "must be an fd number >= 0")


def writable_fd_problem(fd: int) -> str | None:
    """Why ``fd`` cannot be written to by this process, or None."""
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    except OSError:
        return f"fd {fd} is not open in this process"
    if flags & os.O_ACCMODE == os.O_RDONLY:
        return f"fd {fd} is open read-only; it must be writable"
    return None
