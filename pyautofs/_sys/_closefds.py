"""Closing many fds at once: one ``close_range(2)`` per contiguous run.

Fds received together are usually contiguous, and fds the process already held make gaps,
hence runs rather than one range. ``close_range`` exists from Linux 5.9 and glibc 2.34;
with an older glibc it is called through ``syscall(2)``; on an older kernel (ENOSYS) or
under a seccomp filter that refuses it (EPERM) every fd is closed on its own from then on.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Callable, Iterable

from ._libc import syscall_number

__all__ = ["close_fds"]

_libc = ctypes.CDLL(None, use_errno=True)  # its own handle: argtypes set here stay here


def _load_close_range() -> Callable[[int, int, int], int]:
    try:
        func = _libc.close_range
    except AttributeError:  # glibc < 2.34: the raw syscall
        raw = _libc.syscall
        number = ctypes.c_long(syscall_number("close_range"))
        raw.restype = ctypes.c_long
        uint = ctypes.c_uint

        def via_syscall(first: int, last: int, flags: int) -> int:
            return int(raw(number, uint(first), uint(last), uint(flags)))

        return via_syscall
    func.argtypes = (ctypes.c_uint, ctypes.c_uint, ctypes.c_uint)
    func.restype = ctypes.c_int
    return func


_close_range = _load_close_range()
_RUN_MIN = 4  # shorter runs: os.close() each is cheaper than one ctypes call
_have_close_range = True


def close_fds(fds: Iterable[int]) -> None:
    """Close every fd in ``fds``: each contiguous ascending run with one ``close_range(2)``
    (Linux 5.9+; plain ``close`` elsewhere), short runs and the rest one ``close`` each.

    Errors are ignored: after ``close`` fails the fd is gone all the same, and ``EBADF``
    means it already was. Only numbers in ``fds`` are closed.
    """
    close = os.close
    it = iter(fds)
    first = next(it, None)
    if first is None:
        return
    start = prev = first
    for fd in it:
        if fd == prev + 1:
            prev = fd
            continue
        _close_run(start, prev, close)
        start = prev = fd
    _close_run(start, prev, close)


def _close_run(start: int, end: int, close: Callable[[int], None]) -> None:
    global _have_close_range
    if end - start + 1 >= _RUN_MIN and _have_close_range:
        if _close_range(start, end, 0) == 0:
            return
        if ctypes.get_errno() in (errno.ENOSYS, errno.EPERM):  # old kernel, or seccomp
            _have_close_range = False
    for fd in range(start, end + 1):
        try:
            close(fd)
        except OSError:
            pass
