"""``FdChannel``: the fd-message protocol (:mod:`pyautofs._proto._fdmsg`) over trio.

A thin driver: the protocol module says what to send and parses what arrived; this module
makes the syscalls on a non-blocking socket. Each syscall is tried first; only when it
raises ``BlockingIOError`` does the task wait for readiness and try again. That is what
makes a hot path fast: trio's own socket methods wait and then retry, which costs a trip
through the scheduler per message even when data is already there.

:meth:`FdChannel.receive_many` takes every message already queued (up to a limit) in one
go, through the same batch reader as :func:`pyautofs.recv_fds_many` (``recvmmsg`` on a
stream), so a busy channel pays for one schedule point per batch, not per message.

A message is all-or-nothing. If a receiving task is cancelled, or fails, half-way through
a message, every fd received for it (and, in ``receive_many``, for the whole batch) is
closed and the channel is marked broken: the stream is out of step, so further use raises
``trio.BrokenResourceError``. Cancelled while waiting between messages, nothing is lost.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Sequence

import trio

from .._proto._fdmsg import (
    ANC_MAX,
    MSG_CMSG_CLOEXEC,
    SCM_MAX_FD,
    FdMessageReader,
    FdPassError,
    ancillary,
    empty_header,
    encode_message,
    fds_from_ancdata,
    first_read_size,
    single_record_fds,
)
from .._sys._scm import close_fds, is_stream, read_available

__all__ = ["FdChannel"]

_BIG_READ = 1 << 20  # the most one read of message data asks for


class FdChannel:
    """Send and receive fds (any number per message) with data over an AF_UNIX socket.

    Speaks the same protocol as :func:`pyautofs.send_fds` / :func:`pyautofs.recv_fds`, so
    one end may be synchronous and the other async. Works on SOCK_STREAM and
    SOCK_SEQPACKET. Received fds are close-on-exec; on a failed message none is left open.
    The channel owns its socket (and makes it non-blocking: a socket shared with another
    process shares that flag); :meth:`aclose` (or ``async with``) closes it.
    """

    __slots__ = ("_broken", "_fd", "_first_size", "_receiving", "_sending", "_sock", "_stream")

    def __init__(self, sock: socket.socket) -> None:
        if sock.family != socket.AF_UNIX:
            raise ValueError("FdChannel needs an AF_UNIX socket")
        sock.setblocking(False)
        self._sock = sock
        self._fd = sock.fileno()
        self._broken = False
        self._sending = False
        self._receiving = False
        self._stream = is_stream(sock)
        self._first_size = first_read_size(self._stream)

    @classmethod
    def from_trio_socket(cls, sock: trio.socket.SocketType) -> FdChannel:
        """Wrap a trio socket (the channel takes it over)."""
        return cls(socket.socket(fileno=sock.detach()))

    @classmethod
    def pair(cls, kind: int = socket.SOCK_SEQPACKET) -> tuple[FdChannel, FdChannel]:
        """Two connected channels (a socketpair)."""
        a, b = socket.socketpair(socket.AF_UNIX, kind)
        return cls(a), cls(b)

    @property
    def socket(self) -> socket.socket:
        """The underlying (non-blocking) stdlib socket."""
        return self._sock

    def _check(self, busy: bool, what: str) -> None:
        if self._broken:
            raise trio.BrokenResourceError("the channel broke in the middle of a message")
        if busy:
            raise trio.BusyResourceError(f"another task is {what} on this FdChannel")

    async def send(self, fds: Sequence[int], data: bytes = b"") -> None:
        """Send one message: ``data`` and any number of ``fds`` (which stay open here)."""
        self._check(self._sending, "sending")
        await trio.lowlevel.checkpoint_if_cancelled()
        nfds = len(fds)
        records: list[tuple[bytes | memoryview, Sequence[int]]]
        if not data and nfds <= SCM_MAX_FD:
            records = [(empty_header(nfds), fds)]
        else:
            records = encode_message(list(fds), data, self._stream)
        sock = self._sock
        self._sending = True
        try:
            for payload, record_fds in records:
                anc = ancillary(record_fds)
                view = memoryview(payload)
                while view:
                    try:
                        sent = sock.sendmsg((view,), anc) if anc else sock.send(view)
                    except BlockingIOError:
                        await trio.lowlevel.wait_writable(self._fd)
                        continue
                    if sent < len(view) and not self._stream:
                        raise FdPassError(
                            errno.EMSGSIZE, f"sendmsg sent {sent} of {len(view)} bytes of a record"
                        )
                    anc = []  # the fds went with the first byte
                    view = view[sent:]
        except BaseException:
            self._broken = True  # the peer may hold part of a message
            raise
        finally:
            self._sending = False
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def receive(self) -> tuple[bytes, list[int]]:
        """Receive one message: ``(data, fds)``. ``EOFError`` if the peer closed cleanly."""
        self._check(self._receiving, "receiving")
        await trio.lowlevel.checkpoint_if_cancelled()
        self._receiving = True
        reader = FdMessageReader(self._stream)
        try:
            # Try first: a whole single-record message needs no reader and no wait.
            try:
                msg, anc, flags, _ = self._sock.recvmsg(self._first_size, ANC_MAX, MSG_CMSG_CLOEXEC)
            except BlockingIOError:
                pass
            else:
                fds = single_record_fds(msg, anc, flags)
                if fds is not None:
                    await trio.lowlevel.cancel_shielded_checkpoint()
                    return b"", fds
                reader.feed(msg, fds_from_ancdata(anc), flags)
            while not reader.has_message():
                try:
                    msg, anc, flags, _ = self._sock.recvmsg(
                        min(reader.wanted(), _BIG_READ), ANC_MAX, MSG_CMSG_CLOEXEC
                    )
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(self._fd)
                    continue
                reader.feed(msg, fds_from_ancdata(anc) if anc else [], flags)
            message = reader.next_message()
        except EOFError:
            raise
        except BaseException as exc:
            self._give_up(reader, [], exc)
            raise
        finally:
            self._receiving = False
        assert message is not None
        await trio.lowlevel.cancel_shielded_checkpoint()
        return message

    async def receive_many(self, limit: int = 64) -> list[tuple[bytes, list[int]]]:
        """Receive every message already queued, up to ``limit`` (at least one: this waits
        for the first). Each item is ``(data, fds)`` as :meth:`receive` gives it.

        One schedule point per batch. On a stream whose messages carry data the list may
        hold one more than ``limit`` (a message begun is always finished). If a message
        fails, or the task is cancelled while a message is half-read, no fd of the whole
        batch stays open and the channel is broken. ``EOFError`` if the peer closed before
        any message (messages before the close are returned first).
        """
        if limit < 1:
            raise ValueError(f"limit must be at least 1, not {limit}")
        self._check(self._receiving, "receiving")
        await trio.lowlevel.checkpoint_if_cancelled()
        self._receiving = True
        reader = FdMessageReader(self._stream)
        out: list[tuple[bytes, list[int]]] = []
        try:
            while True:
                try:
                    if read_available(self._sock, reader, limit, out):
                        break
                except BlockingIOError:
                    pass  # nothing queued yet
                except EOFError:
                    if out:
                        break
                    raise
                await trio.lowlevel.wait_readable(self._fd)
        except EOFError:
            raise
        except BaseException as exc:
            self._give_up(reader, out, exc)
            raise
        finally:
            self._receiving = False
        await trio.lowlevel.cancel_shielded_checkpoint()
        return out

    def _give_up(
        self, reader: FdMessageReader, out: list[tuple[bytes, list[int]]], exc: BaseException
    ) -> None:
        """Close every fd a failed receive holds. Unless it was only cancelled (or
        interrupted) while waiting between messages, the stream is out of step: broken."""
        clean = not out and reader.at_boundary() and not isinstance(exc, OSError)
        close_fds([fd for _, fds in out for fd in fds])
        close_fds(reader.abort())
        if not clean:
            self._broken = True

    async def aclose(self) -> None:
        """Close the socket."""
        trio.lowlevel.notify_closing(self._sock)
        self._sock.close()
        await trio.lowlevel.checkpoint()

    async def __aenter__(self) -> FdChannel:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
