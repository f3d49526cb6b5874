"""Passing any number of fds over a unix socket (SCM_RIGHTS), blocking, one or many at once.

This is a thin driver of the sans-IO protocol in :mod:`pyautofs._proto._fdmsg`, which owns
the wire format, the limits, the parsing and the fast-path check. Here are the syscalls:

- :func:`send_fds` / :func:`recv_fds`: one message per call. The common message (at most
  253 fds, no data) is one ``sendmsg`` and one ``recvmsg``; everything else goes through
  :func:`~pyautofs._proto._fdmsg.encode_message` and
  :class:`~pyautofs._proto._fdmsg.FdMessageReader`.
- :func:`recv_fds_many`: every message already queued, up to a limit, in as few syscalls as
  possible. On a stream socket that is ``recvmmsg(2)`` with one 16-byte piece per message
  (through ctypes, in :mod:`._recvmmsg`: Python has no ``recvmmsg``); the reader
  reassembles pieces that cross record boundaries. On a seqpacket socket a data record
  may be 64 KiB, more than a batch slot holds, so each record is read with its own
  ``recvmsg`` at its exact size, without waiting after the first.
- :func:`close_fds` (in :mod:`._closefds`): closes a list of fds by contiguous runs, one
  ``close_range(2)`` per run, where the kernel has it (5.9+).

Received fds are close-on-exec atomically (``MSG_CMSG_CLOEXEC``): without it a concurrent
fork+exec leaks them. A failed message (truncated, foreign, peer gone, out of fds) raises
:class:`FdPassError` (an ``OSError``) and no fd of it stays open; in a batch, no fd of the
whole batch stays open. ``MSG_CTRUNC`` (the kernel closed fds it could not install) is
always reported, never dropped.
"""

from __future__ import annotations

import _socket
import errno
import select
import socket
import struct
from collections.abc import Callable, Generator, Sequence
from functools import partial
from typing import Any, TypeAlias, TypeVar

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
    fds_from_ancdata,
    single_record_fds,
)
from ._closefds import close_fds
from ._recvmmsg import BATCH_MAX, recvmmsg_stream

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

_R = TypeVar("_R")
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
    return run_blocking(recv_protocol(sock, (msg, anc, flags)))  # data, or many records


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


def run_blocking(gen: Generator[Step, Any, _R], call: Callable[[Step], Any] | None = None) -> _R:
    """Run a protocol generator with plain (blocking) syscalls; return what it returns.

    ``call(step)`` runs each step instead of ``step()``: a caller that bounds every syscall
    (a socket timeout set before each, a clearer error after) does it there. Whatever a
    step raises is thrown into the generator, which closes the fds it received first.
    """
    try:
        step = next(gen)
        while True:
            try:
                result = step() if call is None else call(step)
            except BaseException as exc:
                step = gen.throw(exc)
                continue
            step = gen.send(result)
    except StopIteration as stop:
        value: _R = stop.value
        return value
    finally:
        gen.close()


# -- receiving many ------------------------------------------------------------------------


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
                want = min(limit - len(out), BATCH_MAX)
                mflags = MSG_CMSG_CLOEXEC | (flags or _MSG_WAITFORONE)
                recvmmsg_stream(sock, reader, want, out, mflags)
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
