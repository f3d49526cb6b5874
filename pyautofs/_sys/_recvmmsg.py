"""``recvmmsg(2)`` of a stream of fd messages: many 16-byte pieces per syscall.

Python has no ``recvmmsg``, so this calls libc's through ctypes, with preallocated
per-thread buffers: 64 pieces of :data:`~pyautofs._proto._fdmsg.HEADER_SIZE` bytes, each
with room for one control message of up to 253 fds. The kernel rewrites each header's
``msg_controllen`` and ``msg_flags``, so a pristine copy of the header array goes back
before every call (one ``memmove``), and the results of a whole batch are read with one
``struct.unpack``. :func:`~pyautofs._sys._scm.recv_fds_many` drives it.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct
import threading

from .._proto._fdmsg import (
    ANC_MAX,
    HEADER_SIZE,
    MSG_CTRUNC,
    MSG_TRUNC,
    SCM_MAX_FD,
    FdMessageReader,
    empty_header,
    fd_struct,
    fds_from_control,
)
from ._closefds import close_fds

__all__ = ["BATCH_MAX", "recvmmsg_stream"]

_TRUNCATED = MSG_CTRUNC | MSG_TRUNC


class _Iovec(ctypes.Structure):
    _fields_ = (("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t))


class _Msghdr(ctypes.Structure):
    _fields_ = (
        ("msg_name", ctypes.c_void_p),
        ("msg_namelen", ctypes.c_uint),
        ("msg_iov", ctypes.c_void_p),
        ("msg_iovlen", ctypes.c_size_t),
        ("msg_control", ctypes.c_void_p),
        ("msg_controllen", ctypes.c_size_t),
        ("msg_flags", ctypes.c_int),
    )


class _Mmsghdr(ctypes.Structure):
    _fields_ = (("msg_hdr", _Msghdr), ("msg_len", ctypes.c_uint))


_CONTROLLEN_AT = _Msghdr.msg_controllen.offset
_FLAGS_AT = _Msghdr.msg_flags.offset
_LEN_AT = _Mmsghdr.msg_len.offset
_ENTRY = ctypes.sizeof(_Mmsghdr)
# (msg_controllen, msg_flags, msg_len) of one mmsghdr
_ENTRY_FORMAT = f"{_CONTROLLEN_AT}xNi{_LEN_AT - _FLAGS_AT - 4}xI{_ENTRY - _LEN_AT - 4}x"
_CMSGHDR = struct.Struct("@Nii")
_CMSG_DATA = _CMSGHDR.size
_CMSG_ALIGN = struct.calcsize("@N")
BATCH_MAX = 64  # pieces per recvmmsg
_SOL_SOCKET = int(socket.SOL_SOCKET)
_SCM_RIGHTS = int(socket.SCM_RIGHTS)


class _MmsgBuffers:
    """Data, control and header arrays for ``recvmmsg`` of up to 64 pieces of 16 bytes.

    The kernel rewrites each header's ``msg_controllen`` and ``msg_flags``; a pristine copy
    of the header array goes back before every call, with one ``memmove``.
    """

    def __init__(self) -> None:
        n, piece = BATCH_MAX, HEADER_SIZE
        self.data = ctypes.create_string_buffer(n * piece)
        self.control = ctypes.create_string_buffer(n * ANC_MAX)
        self.iovs = (_Iovec * n)()
        self.headers = (_Mmsghdr * n)()
        base_d = ctypes.addressof(self.data)
        base_c = ctypes.addressof(self.control)
        for i in range(n):
            self.iovs[i].iov_base = base_d + i * piece
            self.iovs[i].iov_len = piece
            h = self.headers[i].msg_hdr
            h.msg_iov = ctypes.addressof(self.iovs[i])
            h.msg_iovlen = 1
            h.msg_control = base_c + i * ANC_MAX
            h.msg_controllen = ANC_MAX
        self.size = n * _ENTRY
        self.pristine = ctypes.create_string_buffer(bytes(self.headers), self.size)
        self.header_view = memoryview(self.headers).cast("B")
        self.data_view = memoryview(self.data).cast("B")
        self.control_view = memoryview(self.control).cast("B")
        self.results = [struct.Struct("@" + _ENTRY_FORMAT * k) for k in range(n + 1)]


_libc = ctypes.CDLL(None, use_errno=True)
_recvmmsg = _libc.recvmmsg
_recvmmsg.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int, ctypes.c_void_p)
_recvmmsg.restype = ctypes.c_int
_memmove = ctypes.memmove
_local = threading.local()


def _buffers() -> _MmsgBuffers:
    bufs: _MmsgBuffers | None = getattr(_local, "bufs", None)
    if bufs is None:
        bufs = _local.bufs = _MmsgBuffers()
    return bufs


def recvmmsg_stream(
    sock: socket.socket,
    reader: FdMessageReader,
    want: int,
    out: list[tuple[bytes, list[int]]],
    flags: int,
) -> None:
    """One ``recvmmsg`` of up to ``want`` 16-byte pieces of a stream; whole messages go to
    ``out``. Raises ``BlockingIOError`` when nothing was queued.

    A piece at a message boundary that is exactly a data-less header with its fds is taken
    on the spot (the fast path). Anything else goes through ``reader``, which reassembles
    pieces that cross record boundaries. Every fd the call received ends up in ``out``, in
    the reader, or closed (on an error, those of the pieces after the failing one).
    """
    bufs = _buffers()
    _memmove(bufs.headers, bufs.pristine, bufs.size)
    fd = sock.fileno()
    while True:
        got = _recvmmsg(fd, bufs.headers, want, flags, None)
        if got >= 0:
            break
        err = ctypes.get_errno()
        if err != errno.EINTR:
            raise OSError(err, f"recvmmsg: {os.strerror(err)}")
    results = bufs.results[got].unpack_from(bufs.header_view)
    data = bufs.data_view
    control = bufs.control_view
    header_of = empty_header
    unpack_cmsg = _CMSGHDR.unpack_from
    if got > 1 and reader.at_boundary():
        uniform = _uniform_batch(bufs, got, results)
        if uniform is not None:
            out += uniform
            return
    i = 0
    try:
        while i < got:
            controllen, mflags, length = results[3 * i : 3 * i + 3]
            start = i * HEADER_SIZE
            off = i * ANC_MAX
            i += 1
            if length == HEADER_SIZE and not mflags & _TRUNCATED and reader.at_boundary():
                # The fast path: one SCM_RIGHTS item, and the prebuilt header for its count.
                if controllen >= _CMSG_DATA:
                    clen, level, kind = unpack_cmsg(control, off)
                    n = (clen - _CMSG_DATA) >> 2
                    if (
                        0 < n <= SCM_MAX_FD
                        and controllen == (clen + _CMSG_ALIGN - 1) & ~(_CMSG_ALIGN - 1)
                        and kind == _SCM_RIGHTS
                        and level == _SOL_SOCKET
                        and data[start : start + HEADER_SIZE] == header_of(n)
                    ):
                        out.append((b"", list(fd_struct(n).unpack_from(control, off + _CMSG_DATA))))
                        continue
                elif not controllen and data[start : start + HEADER_SIZE] == header_of(0):
                    out.append((b"", []))
                    continue
            fds = fds_from_control(control[off : off + controllen]) if controllen else []
            reader.feed(bytes(data[start : start + length]), fds, mflags)
            while reader.has_message():
                message = reader.next_message()
                assert message is not None
                out.append(message)
    except BaseException:
        for j in range(i, got):  # pieces not looked at yet: their fds are still ours
            cl = results[3 * j]
            if cl:
                close_fds(fds_from_control(control[j * ANC_MAX : j * ANC_MAX + cl]))
        raise


_UNIFORM_MAX = 16  # fds per message for which a whole batch is checked at once
_heads: dict[tuple[int, int], struct.Struct] = {}


def _uniform_batch(
    bufs: _MmsgBuffers, got: int, results: tuple[int, ...]
) -> list[tuple[bytes, list[int]]] | None:
    """The fast path for a whole batch: ``got`` data-less messages of the same small fd
    count, each exactly one piece. Checked with a few C-level operations over the batch
    (one ``unpack`` of every control header, one comparison of all the data) rather than
    per message; None when the batch is not that shape, and nothing was taken.
    """
    controllen = results[0]
    if controllen < _CMSG_DATA:
        return None
    clen, _, _ = _CMSGHDR.unpack_from(bufs.control_view, 0)
    n = (clen - _CMSG_DATA) >> 2
    if (
        not 0 < n <= _UNIFORM_MAX
        or controllen != (clen + _CMSG_ALIGN - 1) & ~(_CMSG_ALIGN - 1)
        or results[0::3].count(controllen) != got
        or results[1::3].count(0) != got
        or results[2::3].count(HEADER_SIZE) != got
        or bufs.data_view[: got * HEADER_SIZE] != empty_header(n) * got
    ):
        return None
    heads = _heads.get((got, n))
    if heads is None:
        pad = ANC_MAX - _CMSG_DATA - 4 * n
        heads = _heads[(got, n)] = struct.Struct("@" + f"Nii{n}i{pad}x" * got)
    values = heads.unpack_from(bufs.control_view)
    stride = 3 + n
    if (
        values[0::stride].count(clen) != got
        or values[1::stride].count(_SOL_SOCKET) != got
        or values[2::stride].count(_SCM_RIGHTS) != got
    ):
        return None  # not SCM_RIGHTS alone: the per-message path sorts it out
    if n == 1:
        return [(b"", [fd]) for fd in values[3::4]]
    return [(b"", list(values[i + 3 : i + stride])) for i in range(0, got * stride, stride)]
