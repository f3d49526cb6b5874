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

__all__ = ["seconds", "whole_seconds", "positive_int", "fd_number", "writable_fd_problem"]


def seconds(text: str) -> float:
    """A duration in seconds, >= 0 (0: off); fractions allowed."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0 (0: off), not {text}")
    return value


def whole_seconds(text: str) -> int:
    """A whole number of seconds, >= 0 (0: off)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of seconds") from None
    if value < 0:
        raise argparse.ArgumentTypeError(
            f"must be a whole number of seconds >= 0 (0: off), not {text}"
        )
    if value > 2**31 - 1:
        raise argparse.ArgumentTypeError(f"{text} seconds is more than the kernel accepts")
    return value


def positive_int(text: str) -> int:
    """A whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {text}")
    return value


def fd_number(text: str) -> int:
    """An fd number (>= 0); whether it is open is checked when the command starts."""
    try:
        fd = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an fd number") from None
    if fd < 0:
        raise argparse.ArgumentTypeError(f"must be an fd number >= 0, not {text}")
    return fd


def writable_fd_problem(fd: int) -> str | None:
    """Why ``fd`` cannot be written to by this process, or None."""
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    except OSError:
        return f"fd {fd} is not open in this process"
    if flags & os.O_ACCMODE == os.O_RDONLY:
        return f"fd {fd} is open read-only; it must be writable"
    return None
