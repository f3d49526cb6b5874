"""The libc loader: one table of foreign-function signatures, applied once.

Every foreign function pyautofs calls is declared in :data:`_SIGNATURES` with its argument
types, its return type and the C return convention that its errcheck function checks. The
loader applies the table to ``CDLL(None, use_errno=True)`` once, at import.

Errors keep the kernel's errno. A failing call raises ``OSError(errno, strerror, path)``,
which Python turns into the matching subclass (``PermissionError``, ``FileNotFoundError``,
...). The message names the call so that a user sees which syscall failed. ctypes does not
retry on ``EINTR`` the way Python's own ``os`` functions do (PEP 475), so :func:`call` does.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Callable
from typing import Any, NoReturn

__all__ = ["libc", "call", "raise_errno", "syscall_number"]

# The errcheck functions are named by the C return convention they check.


def _errcheck_minus_one(result: int, func: Any, args: tuple[Any, ...]) -> int:
    """For calls that return -1 and set errno on failure, anything else on success."""
    if result == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"{func.__name__}: {os.strerror(err)}")
    return result


def _errcheck_ssize(result: int, func: Any, args: tuple[Any, ...]) -> int:
    """For calls that return a negative ssize_t and set errno on failure."""
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{func.__name__}: {os.strerror(err)}")
    return result


c_int = ctypes.c_int
c_uint = ctypes.c_uint
c_long = ctypes.c_long
c_ulong = ctypes.c_ulong
c_ssize = ctypes.c_ssize_t
c_size = ctypes.c_size_t
c_char_p = ctypes.c_char_p
c_void_p = ctypes.c_void_p

# name: (argtypes, restype, errcheck). ``syscall`` is variadic; its argtypes stay unset.
_SIGNATURES: dict[str, tuple[list[Any] | None, Any, Callable[..., int]]] = {
    "ioctl": ([c_int, c_ulong, c_void_p], c_int, _errcheck_minus_one),
    "mount": ([c_char_p, c_char_p, c_char_p, c_ulong, c_char_p], c_int, _errcheck_minus_one),
    "umount2": ([c_char_p, c_int], c_int, _errcheck_minus_one),
    "unshare": ([c_int], c_int, _errcheck_minus_one),
    "tee": ([c_int, c_int, c_size, c_uint], c_ssize, _errcheck_ssize),
    "syscall": (None, c_long, _errcheck_minus_one),
}


def _load() -> ctypes.CDLL:
    lib = ctypes.CDLL(None, use_errno=True)
    for name, (argtypes, restype, errcheck) in _SIGNATURES.items():
        func = getattr(lib, name)
        if argtypes is not None:
            func.argtypes = argtypes
        func.restype = restype
        func.errcheck = errcheck
    return lib


libc = _load()


def raise_errno(
    err: int, what: str, path: str | bytes | os.PathLike[str] | None = None
) -> NoReturn:
    """Raise ``OSError(err, "<what>: <strerror>", path)``, as the right subclass."""
    if path is None:
        raise OSError(err, f"{what}: {os.strerror(err)}")
    raise OSError(err, f"{what}: {os.strerror(err)}", os.fsdecode(path))


def call(
    func: Callable[..., int], *args: Any, path: str | bytes | os.PathLike[str] | None = None
) -> int:
    """Call a table function, retrying on EINTR; attach ``path`` to any error."""
    while True:
        try:
            return func(*args)
        except OSError as exc:
            if exc.errno == errno.EINTR:
                continue
            if path is not None:
                raise OSError(exc.errno, exc.strerror, os.fsdecode(path)) from None
            raise


# x86_64 and the asm-generic table (aarch64, riscv64, loongarch64) agree on the new mount
# API numbers: they were added after the tables were unified.
_SYSCALLS = {
    "open_tree": 428,
    "move_mount": 429,
    "fsopen": 430,
    "fsconfig": 431,
    "fsmount": 432,
    "close_range": 436,
}


def syscall_number(name: str) -> int:
    """The number of a syscall that libc may lack a wrapper for (Linux >= 5.2 numbering)."""
    return _SYSCALLS[name]
