"""Opening a path without ever blocking: openat2(2) with RESOLVE_CACHED.

A root daemon that bind-mounts a source path named by a map walks that path on its own
thread. If a component is on a file system that hangs (an autofs mount nobody answers, an
NFS server that went away), the walk sleeps in the kernel, uninterruptibly, and the
daemon's event loop with it. RESOLVE_CACHED (Linux 5.12) makes the walk succeed only if
every component is already in the dentry cache and needs no revalidation or I/O: the
kernel does the whole lookup in RCU mode, and anything that would need to leave it (a
revalidation, an automount, a component not cached) fails at once with EAGAIN. So a hot
path can try it inline and hand only the misses to a thread.

The fd is ``O_PATH``: the file system's ``open`` is never called. With ``O_DIRECTORY`` the
final component is automounted like the others (here: refused with EAGAIN unless already
mounted), so the fd names what a plain walk would reach.
"""

from __future__ import annotations

import ctypes
import errno
import os

from ._libc import libc

__all__ = ["open_dir_cached"]

# openat2 came after the syscall tables were unified: one number everywhere.
_SYS_OPENAT2 = 437
_RESOLVE_CACHED = 0x20
_AT_FDCWD = -100


class _OpenHow(ctypes.Structure):
    _fields_ = (
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    )


_supported = True


def open_dir_cached(path: str) -> int | None:
    """An ``O_PATH`` fd on the directory ``path``, if the kernel can resolve it from its
    caches alone; None when it cannot without blocking (or cannot say: a kernel before
    5.12, not a directory, not found). None is never an answer about the path: the caller
    then does the slow walk, off its thread."""
    global _supported
    if not _supported:
        return None
    how = _OpenHow(os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, 0, _RESOLVE_CACHED)
    try:
        return int(
            libc.syscall(
                ctypes.c_long(_SYS_OPENAT2),
                ctypes.c_int(_AT_FDCWD),
                ctypes.c_char_p(os.fsencode(path)),
                ctypes.byref(how),
                ctypes.c_size_t(ctypes.sizeof(how)),
            )
        )
    except OSError as exc:
        if exc.errno in (errno.ENOSYS, errno.E2BIG, errno.EINVAL):
            _supported = False  # no openat2, or no RESOLVE_CACHED (before 5.12): never again
        return None
