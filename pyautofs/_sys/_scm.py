"""Passing any number of fds over a unix socket (SCM_RIGHTS), blocking, one or many at once.

This is a thin driver of the sans-IO protocol in :mod:`pyautofs._proto._fdmsg`, which owns
the wire format, the limits, the parsing and the fast-path check. Here are the syscalls:

- :func:`send_fds` / :func:`recv_fds`: one message per call. The common message (at most
  253 fds, no data) is one ``sendmsg`` and one ``recvmsg``; everything else goes through
  :func:`~pyautofs._proto._fdmsg.encode_message` and
  :class:`~pyautofs._proto._fdmsg.FdMessageReader`.
- :func:`recv_fds_many`: every message already queued, up to a limit, in as few syscalls as
  possible. On a stream socket that is ``recvmmsg(2)`` with one 16-byte piece per message
  (through ctypes: Python has no ``recvmmsg``); the reader reassembles pieces that cross
  record boundaries. On a seqpacket socket a data record may be 64 KiB, more than a batch
  slot holds, so each record is read with its own ``recvmsg`` at its exact size, without
  waiting after the first.
- :func:`close_fds`: closes a list of fds by contiguous runs, one ``close_range(2)`` per
  run, where the kernel has it (5.9+); fds received together are usually contiguous, and
  fds the process already held make gaps, hence runs rather than one range.

Received fds are close-on-exec atomically (``MSG_CMSG_CLOEXEC``): without it a concurrent
fork+exec leaks them. A failed message (truncated, foreign, peer gone, out of fds) raises
:class:`FdPassError` (an ``OSError``) and no fd of it stays open; in a batch, no fd of the
whole batch stays open. ``MSG_CTRUNC`` (the kernel closed fds it could not install) is
always reported, never dropped.
"""

from __future__ import annotations

import _socket
import ctypes
import errno
import os
import select
import socket
import struct
import threading
from collections.abc import Callable, Generator, Iterable, Sequence
from functools import partial
from typing import Any, TypeAlias

from .._proto._fdmsg import (
    ANC_MAX,
    FIRST_SEQPACKET,
    HEADER_SIZE,
    MSG_CMSG_CLOEXEC,
    MSG_CTRUNC,
    MSG_TRUNC,
    SCM_MAX_FD,
    Ancillary,
    FdMessageReader,
    FdPassError,
    ancillary,
    empty_header,
    encode_message,
    fd_struct,
    fds_from_ancdata,
    fds_from_control,
    single_record_fds,
)

__all__ = [
    "SCM_MAX_FD",
    "FdPassError",
    "send_fds",
    "recv_fds",
    "recv_fds_many",
    "close_fds",
    "read_available",
    "Step",
    "send_protocol",
    "recv_protocol",
    "run_blocking",
    "is_stream",
    "peer_credentials",
    "PeerCredentials",
]

_STREAM = int(socket.SOCK_STREAM)
_MSG_DONTWAIT = int(socket.MSG_DONTWAIT)
_MSG_WAITFORONE = 0x10000  # linux/socket.h; the socket module does not export it
# ``socket.socket.type`` converts to an enum on every access; the C getter is an int.
_sock_type: Callable[[socket.socket], int] = _socket.socket.type.__get__
_TRUNCATED = MSG_CTRUNC | MSG_TRUNC
_BIG_READ = 1 << 20  # the most one read of message data asks for


def is_stream(sock: socket.socket) -> bool:
    """Whether ``sock`` is a SOCK_STREAM socket (without the enum conversion)."""
    return _sock_type(sock) == _STREAM


# -- sending -------------------------------------------------------------------------------


def send_fds(sock: socket.socket, fds: Sequence[int], data: bytes = b"") -> None:
    """Send ``fds`` (any number) and ``data`` as one message on an AF_UNIX socket.

    Works on SOCK_STREAM and SOCK_SEQPACKET sockets in blocking mode. The receiver gets
    them all together from :func:`recv_fds` (or :func:`recv_fds_many`, or
    :meth:`FdChannel.receive <pyautofs.FdChannel.receive>`). The sender's fds stay open.
    """
    nfds = len(fds)
    if not data and nfds <= SCM_MAX_FD:  # the common message: one record, prebuilt header
        header = empty_header(nfds)
        sent = sock.sendmsg((header,), ancillary(fds))
        if sent < HEADER_SIZE:  # only a stream takes part of a write; the fds went with it
            sock.sendall(header[sent:])
        return
    stream = is_stream(sock)
    for payload, record_fds in encode_message(fds, data, stream):
        sent = sock.sendmsg((payload,), ancillary(record_fds)) if record_fds else sock.send(payload)
        if sent < len(payload):
            if not stream:
                raise FdPassError(
                    errno.EMSGSIZE, f"sendmsg sent {sent} of {len(payload)} bytes of a record"
                )
            sock.sendall(memoryview(payload)[sent:])


# -- receiving one message -----------------------------------------------------------------


def recv_fds(sock: socket.socket) -> tuple[bytes, list[int]]:
    """Receive one message sent by :func:`send_fds`: ``(data, fds)``, fds close-on-exec.

    Raises :class:`FdPassError` (an ``OSError``) if the message is truncated, foreign or
    malformed, if the peer dies in the middle of it, or if this process runs out of fds;
    no fd of that message is left open. Raises ``EOFError`` if the peer closed the
    connection between messages.
    """
    stream = _sock_type(sock) == _STREAM
    msg, anc, flags, _ = sock.recvmsg(
        HEADER_SIZE if stream else FIRST_SEQPACKET, ANC_MAX, MSG_CMSG_CLOEXEC
    )
    fds = single_record_fds(msg, anc, flags)
    if fds is not None:
        return b"", fds
    reader = FdMessageReader(stream)
    try:
        reader.feed(msg, fds_from_ancdata(anc), flags)
        while not reader.has_message():
            _read_once(sock, reader, 0)
        message = reader.next_message()
    except BaseException:
        close_fds(reader.abort())
        raise
    assert message is not None
    return message


def _read_once(sock: socket.socket, reader: FdMessageReader, flags: int) -> None:
    """One ``recvmsg`` of what the reader wants next, fed to it."""
    msg, anc, mflags, _ = sock.recvmsg(
        min(reader.wanted(), _BIG_READ), ANC_MAX, MSG_CMSG_CLOEXEC | flags
    )
    reader.feed(msg, fds_from_ancdata(anc) if anc else [], mflags)


# -- the protocol as a generator of syscalls, for callers that run each step themselves ---

Step: TypeAlias = Callable[[], Any]
"""One syscall of a message, as a thunk: :func:`send_protocol` and :func:`recv_protocol`
yield them, and take each one's result back (or an exception thrown in)."""


def send_protocol(
    sock: socket.socket, fds: Sequence[int], data: bytes
) -> Generator[Step, Any, None]:
    """The syscalls that send one message, as a generator of :data:`Step`.

    For callers that bound each syscall themselves (a deadline over the whole message, as
    the restore handover does); :func:`run_blocking` runs it plainly.
    """
    stream = is_stream(sock)
    for payload, record_fds in encode_message(fds, data, stream):
        anc = ancillary(record_fds)
        view = memoryview(payload)
        while view:
            if anc:
                sent = yield partial(sock.sendmsg, (view,), anc)
            else:
                sent = yield partial(sock.send, view)
            if sent < len(view) and not stream:
                raise FdPassError(
                    errno.EMSGSIZE, f"sendmsg sent {sent} of {len(view)} bytes of a record"
                )
            anc = []  # the fds went with the first byte
            view = view[sent:]


def recv_protocol(
    sock: socket.socket, first: tuple[bytes, Ancillary, int] | None = None
) -> Generator[Step, Any, tuple[bytes, list[int]]]:
    """The syscalls that receive one message, as a generator of :data:`Step`; returns
    ``(data, fds)``. ``first`` is the first record's (data, ancdata, flags) if the caller
    already read it. Whatever ends it early (an error, one thrown in, ``close()``) closes
    every fd received for the message first.
    """
    reader = FdMessageReader(is_stream(sock))
    try:
        if first is not None:
            msg, anc, flags = first
            reader.feed(msg, fds_from_ancdata(anc), flags)
        while not reader.has_message():
            msg, anc, flags, _ = yield partial(
                sock.recvmsg, min(reader.wanted(), _BIG_READ), ANC_MAX, MSG_CMSG_CLOEXEC
            )
            reader.feed(msg, fds_from_ancdata(anc) if anc else [], flags)
        message = reader.next_message()
    except BaseException:
        close_fds(reader.abort())
        raise
    assert message is not None
    return message


def run_blocking(gen: Generator[Step, Any, Any]) -> Any:
    """Run a protocol generator with plain (blocking) syscalls; return what it returns."""
    try:
        step = next(gen)
        while True:
            try:
                result = step()
            except BaseException as exc:
                step = gen.throw(exc)
                continue
            step = gen.send(result)
    except StopIteration as stop:
        return stop.value


# -- receiving many ------------------------------------------------------------------------


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
_BATCH_MAX = 64  # pieces per recvmmsg
_SOL_SOCKET = int(socket.SOL_SOCKET)
_SCM_RIGHTS = int(socket.SCM_RIGHTS)


class _MmsgBuffers:
    """Data, control and header arrays for ``recvmmsg`` of up to 64 pieces of 16 bytes.

    The kernel rewrites each header's ``msg_controllen`` and ``msg_flags``; a pristine copy
    of the header array goes back before every call, with one ``memmove``.
    """

    def __init__(self) -> None:
        n, piece = _BATCH_MAX, HEADER_SIZE
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


def _recvmmsg_stream(
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


def _drain(reader: FdMessageReader, out: list[tuple[bytes, list[int]]]) -> None:
    while reader.has_message():
        message = reader.next_message()
        assert message is not None
        out.append(message)


def read_available(
    sock: socket.socket,
    reader: FdMessageReader,
    limit: int,
    out: list[tuple[bytes, list[int]]],
    *,
    wait_first: bool = False,
) -> bool:
    """Read whole messages into ``out`` until it holds ``limit`` and no message is open,
    without waiting (except for the first read, with ``wait_first`` on a blocking socket).

    Returns True when done, False when the socket ran dry while a message was open (the
    caller waits for readability and calls again). Raises ``BlockingIOError`` when nothing
    at all was queued, ``EOFError`` when the peer closed it between messages. The caller
    owns ``out``'s fds and, on any exception, must close them and ``reader.abort()``'s.
    """
    flags = 0 if wait_first else _MSG_DONTWAIT
    while len(out) < limit or not reader.at_boundary():
        try:
            if reader.stream and reader.at_boundary():
                want = min(limit - len(out), _BATCH_MAX)
                mflags = MSG_CMSG_CLOEXEC | (flags or _MSG_WAITFORONE)
                _recvmmsg_stream(sock, reader, want, out, mflags)
            else:
                _read_once(sock, reader, flags)
                _drain(reader, out)
        except BlockingIOError:
            if not reader.at_boundary():
                return False
            if out:
                return True
            raise
        flags = _MSG_DONTWAIT
    return True


def recv_fds_many(sock: socket.socket, limit: int = 64) -> list[tuple[bytes, list[int]]]:
    """Receive up to ``limit`` messages: every one already queued, without waiting for more.

    On a blocking socket this waits for the first message; on a non-blocking one it raises
    ``BlockingIOError`` when none is queued (sockets with a timeout are refused). A message
    that has begun to arrive is always finished, waiting for its rest; so on a stream whose
    messages carry data the list may hold one more than ``limit``, as bytes already read
    cannot be put back.

    The fds of every message in the batch are open at once: with large messages keep
    ``limit`` times the fds per message well under ``RLIMIT_NOFILE`` (running out is
    reported as below, with ``EMFILE``).

    Each item is ``(data, fds)`` as :func:`recv_fds` returns it, fds close-on-exec. If a
    message fails, :class:`FdPassError` is raised and no fd of the whole batch stays open
    (the whole messages before it are dropped too, and the error says how many). At the end
    of the connection the messages before it are returned, and the next call raises
    ``EOFError``.
    """
    if limit < 1:
        raise ValueError(f"limit must be at least 1, not {limit}")
    timeout = sock.gettimeout()
    if timeout:
        raise ValueError("recv_fds_many needs a blocking or non-blocking socket, not a timeout")
    reader = FdMessageReader(is_stream(sock))
    out: list[tuple[bytes, list[int]]] = []
    try:
        done = read_available(sock, reader, limit, out, wait_first=timeout is None)
        if not done:
            poller = select.poll()
            poller.register(sock, select.POLLIN)
            while not done:  # in the middle of a message: wait for its rest
                poller.poll()
                done = read_available(sock, reader, limit, out)
    except EOFError:
        if out:
            return out
        raise
    except BaseException as exc:
        dropped = len(out)
        close_fds([fd for _, fds in out for fd in fds])
        close_fds(reader.abort())
        if dropped and isinstance(exc, FdPassError):
            raise FdPassError(
                exc.errno,
                f"{exc.strerror} ({dropped} whole messages received before it in this batch "
                "were dropped too, their fds closed)",
            ) from exc
        raise
    return out


# -- closing -------------------------------------------------------------------------------


def _load_close_range() -> Callable[[int, int, int], int]:
    try:
        func = _libc.close_range
    except AttributeError:  # glibc < 2.34: the raw syscall (436 on every architecture)
        raw = _libc.syscall
        raw.restype = ctypes.c_long
        uint = ctypes.c_uint

        def via_syscall(first: int, last: int, flags: int) -> int:
            return int(raw(436, uint(first), uint(last), uint(flags)))

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


# -- credentials ---------------------------------------------------------------------------


class PeerCredentials(tuple[int, int, int]):
    """``SO_PEERCRED``: (pid, uid, gid) of the peer when it connected."""

    __slots__ = ()

    @property
    def pid(self) -> int:
        """The peer's process id at connect time."""
        return self[0]

    @property
    def uid(self) -> int:
        """The peer's user id."""
        return self[1]

    @property
    def gid(self) -> int:
        """The peer's group id."""
        return self[2]


_UCRED = struct.Struct("=iII")


def peer_credentials(sock: socket.socket) -> PeerCredentials:
    """The peer's (pid, uid, gid) as the kernel recorded them at connect time."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    return PeerCredentials(_UCRED.unpack(raw))
