"""Pipe syscalls: pipe2, pipe size, bytes queued, tee and splice.

What the kernel does with pipes that matters here (``fs/pipe.c``, ``fs/splice.c``; seen on
Linux 6.18):

- A pipe is a ring of *buffers* (slots), one page each at most. Its size is the number of
  slots times the page size. ``F_SETPIPE_SZ`` rounds the request up to a power-of-two number
  of pages (1 -> 4096, 4097 -> 8192, 196608 -> 262144) and returns the size it set.
  Growing a pipe above ``/proc/sys/fs/pipe-max-size`` (1 MiB by default) needs
  CAP_SYS_RESOURCE (EPERM otherwise, even for root without that capability); shrinking below
  what is queued gives EBUSY. Growing past the per-user ``pipe-user-pages-*`` limits needs
  CAP_SYS_RESOURCE or CAP_SYS_ADMIN.
- **Packet mode** is the ``O_DIRECT`` flag of the *writing* file: each ``write`` of at most a
  page becomes its own buffer marked ``PIPE_BUF_FLAG_PACKET`` and is never merged with the
  next one; a ``read`` returns at most one such buffer and throws away whatever of it the
  reader's buffer could not hold. ``pipe2(O_DIRECT)`` sets the flag on the write end only
  (the read end's ``F_GETFL`` shows no ``O_DIRECT``), and ``F_SETFL`` may toggle it on any
  pipe end later. autofs sets it on the write side of its request pipe at mount and at
  SETPIPEFD. So from a read end alone, packet mode is only visible in the queued buffers,
  not in any flag.
- ``tee`` copies buffer *references* from one pipe to another without consuming them, and
  the copies keep the packet mark. With ``SPLICE_F_NONBLOCK`` it answers EAGAIN on an empty
  pipe that still has writers (0 when no writer is left), and EAGAIN when the output pipe
  has no free slot; without the flag it would block. Both ends must be pipes, the input
  opened for reading.
- ``FIONREAD`` on a pipe counts the bytes queued in all buffers; it says nothing about
  buffer boundaries.
"""

from __future__ import annotations

import enum
import errno
import fcntl
import os
import stat
import struct

from ._ioctl import FIONREAD
from ._libc import call, libc

__all__ = [
    "PAGE_SIZE",
    "PipeFlags",
    "SpliceFlags",
    "pipe2",
    "get_pipe_size",
    "set_pipe_size",
    "pipe_max_size",
    "bytes_queued",
    "tee",
    "splice",
    "pipe_inode",
    "packet_mode",
    "set_packet_mode",
]

PAGE_SIZE = os.sysconf("SC_PAGESIZE")
"""One pipe buffer holds at most this many bytes; pipe sizes are powers of two of it."""

_F_SETPIPE_SZ: int = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_F_GETPIPE_SZ: int = getattr(fcntl, "F_GETPIPE_SZ", 1032)
_INT = struct.Struct("i")
_ZERO_INT = bytes(_INT.size)


class PipeFlags(enum.IntFlag):
    """Flags of ``pipe2(2)``."""

    NONE = 0
    CLOEXEC = os.O_CLOEXEC
    DIRECT = os.O_DIRECT
    """Packet mode; ``pipe2`` puts it on the write end only."""
    NONBLOCK = os.O_NONBLOCK
    """Set on both ends."""


class SpliceFlags(enum.IntFlag):
    """``SPLICE_F_*`` flags of ``splice(2)``, ``tee(2)`` and ``vmsplice(2)``."""

    NONE = 0
    MOVE = 1
    NONBLOCK = 2
    """Do not block on the pipes (the other fd's own O_NONBLOCK still applies)."""
    MORE = 4
    GIFT = 8


def pipe2(flags: PipeFlags = PipeFlags.CLOEXEC) -> tuple[int, int]:
    """A new pipe as ``(read_fd, write_fd)``."""
    return os.pipe2(int(flags))


def get_pipe_size(fd: int) -> int:
    """``F_GETPIPE_SZ``: the pipe's capacity in bytes."""
    return fcntl.fcntl(fd, _F_GETPIPE_SZ)


def set_pipe_size(fd: int, size: int) -> int:
    """``F_SETPIPE_SZ``: resize the pipe and return the size the kernel chose.

    The kernel rounds up to a power-of-two number of pages. Above ``pipe-max-size`` this needs
    CAP_SYS_RESOURCE (EPERM); below what is queued it fails with EBUSY. Errors name the size.
    """
    try:
        return fcntl.fcntl(fd, _F_SETPIPE_SZ, size)
    except OSError as exc:
        assert exc.errno is not None
        hint = ""
        if exc.errno == errno.EPERM:
            hint = f" (above pipe-max-size {pipe_max_size()} needs CAP_SYS_RESOURCE)"
        elif exc.errno == errno.EBUSY:
            hint = " (more is queued than fits)"
        raise OSError(
            exc.errno, f"fcntl(F_SETPIPE_SZ, {size}): {os.strerror(exc.errno)}{hint}"
        ) from None


def pipe_max_size() -> int:
    """``/proc/sys/fs/pipe-max-size``: the largest size an unprivileged process may set."""
    with open("/proc/sys/fs/pipe-max-size", "rb") as f:
        return int(f.read())


def bytes_queued(fd: int) -> int:
    """``FIONREAD``: how many bytes the pipe holds now."""
    return int(_INT.unpack(fcntl.ioctl(fd, FIONREAD, _ZERO_INT))[0])


def tee(fd_in: int, fd_out: int, length: int, flags: SpliceFlags = SpliceFlags.NONBLOCK) -> int:
    """``tee(2)``: duplicate up to ``length`` queued bytes of pipe ``fd_in`` into ``fd_out``.

    Nothing is consumed from ``fd_in``. Returns the bytes duplicated; 0 when ``fd_in`` is
    empty and has no writer. With ``SpliceFlags.NONBLOCK`` (the default) an empty input or a
    full output raises ``BlockingIOError`` instead of blocking.
    """
    return call(libc.tee, fd_in, fd_out, length, int(flags))


def splice(fd_in: int, fd_out: int, length: int, flags: SpliceFlags = SpliceFlags.NONE) -> int:
    """``splice(2)`` without offsets: move up to ``length`` bytes; one side must be a pipe."""
    return os.splice(fd_in, fd_out, length, flags=int(flags))


def pipe_inode(fd: int) -> int:
    """The pipe's inode number: what ``pipe_ino=`` and ``/proc/*/fd`` links name.

    Raises ``OSError(EINVAL)`` when ``fd`` is not a pipe or FIFO.
    """
    st = os.fstat(fd)
    if not stat.S_ISFIFO(st.st_mode):
        raise OSError(errno.EINVAL, f"fd {fd} is not a pipe")
    return st.st_ino


def packet_mode(fd: int) -> bool:
    """Whether writes through ``fd`` are packetised (``O_DIRECT`` on this open file).

    Meaningful for a write end. A read end never shows it: see the module notes.
    """
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)


def set_packet_mode(fd: int, on: bool) -> None:
    """Turn packet mode (``O_DIRECT``) on or off for writes through ``fd``."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    new = flags | os.O_DIRECT if on else flags & ~os.O_DIRECT
    if new != flags:
        fcntl.fcntl(fd, fcntl.F_SETFL, new)
