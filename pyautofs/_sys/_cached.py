"""A bind mount that never blocks: only when the source's path is all in the dentry cache.

A bind mount walks its source path, and a walk through a hung file system (an NFS server
that went away, an autofs mount nobody answers) blocks in the kernel. The engine therefore
runs such mounts in a worker thread; that costs a thread round trip on every request. This
module gives the fast path: ``openat2(RESOLVE_CACHED)`` resolves the source only from the
dentry cache and fails with EAGAIN instead of doing any I/O or revalidation that could
block; ``open_tree(OPEN_TREE_CLONE)`` + ``move_mount`` then bind that exact object on the
target without walking the source again. On EAGAIN (or a kernel without openat2's
RESOLVE_CACHED, Linux < 5.12) the caller falls back to its thread.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat

from ._libc import call, libc
from ._mount import move_mount

__all__ = ["bind_if_cached"]

_SYS_OPENAT2 = 437  # the unified number (x86_64 and asm-generic)
_SYS_OPEN_TREE = 428
_RESOLVE_CACHED = 0x20
_AT_FDCWD = -100
_AT_EMPTY_PATH = 0x1000
_OPEN_TREE_CLONE = 1
_OPEN_TREE_CLOEXEC = os.O_CLOEXEC
_O_PATH = getattr(os, "O_PATH", 0o10000000)


class _OpenHow(ctypes.Structure):
    _fields_ = (("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64))


_unsupported = False


def bind_if_cached(source: str, target: str) -> bool:
    """Bind-mount ``source`` on ``target`` if that cannot block; False if it might (then
    nothing was done). ``FileNotFoundError`` if the cache knows ``source`` does not exist."""
    global _unsupported
    if _unsupported:
        return False
    how = _OpenHow(_O_PATH | os.O_CLOEXEC, 0, _RESOLVE_CACHED)
    try:
        fd = call(
            libc.syscall,
            ctypes.c_long(_SYS_OPENAT2),
            ctypes.c_int(_AT_FDCWD),
            os.fsencode(source),
            ctypes.byref(how),
            ctypes.c_size_t(ctypes.sizeof(how)),
        )
    except OSError as exc:
        if exc.errno == errno.EAGAIN:
            return False  # not all in the cache: a walk might block
        if exc.errno in (errno.ENOSYS, errno.EINVAL, errno.E2BIG):
            _unsupported = True
            return False
        if exc.errno == errno.ENOENT:
            raise FileNotFoundError(
                errno.ENOENT, f"{source} (from the map) does not exist", target
            ) from None
        return False  # anything else: let the careful path report it
    try:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            return False  # a file onto a directory: let mount(2) say ENOTDIR
        tree = call(
            libc.syscall,
            ctypes.c_long(_SYS_OPEN_TREE),
            ctypes.c_int(fd),
            b"",
            ctypes.c_uint(_OPEN_TREE_CLONE | _OPEN_TREE_CLOEXEC | _AT_EMPTY_PATH),
        )
    except OSError:
        return False
    finally:
        os.close(fd)
    try:
        move_mount(tree, target)
    finally:
        os.close(tree)
    return True
