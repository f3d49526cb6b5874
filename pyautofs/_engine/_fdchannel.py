"""``FdChannel``: the fd-passing protocol of :mod:`pyautofs._sys._scm` over a trio socket.

The protocol is written once, as generators that yield the next syscall to make
(``send_protocol`` / ``recv_protocol``). Here each syscall is tried first; only when it
raises ``BlockingIOError`` does the task wait for readiness and try again. That is what
makes a hot path fast: trio's own socket methods wait and then retry, which costs a trip
through the scheduler per message even when data is already there.

A message is all-or-nothing. If the receiving task is cancelled half-way through a batched
message, the fds received so far are closed and the channel is marked broken: the stream is
out of step, so further use raises ``trio.BrokenResourceError``.
"""

from __future__ import annotations

import socket
from collections.abc import Generator, Sequence
from typing import Any

import trio

from .._sys._scm import (
    ANC_MAX,
    MSG_CMSG_CLOEXEC,
    Step,
    first_record_size,
    parse_single_record,
    recv_protocol,
    send_protocol,
)

__all__ = ["FdChannel"]


class FdChannel:
    """Send and receive fds (any number per message) with data over an AF_UNIX socket.

    Speaks the same protocol as :func:`pyautofs.send_fds` / :func:`pyautofs.recv_fds`, so
    one end may be synchronous and the other async. Works on SOCK_STREAM and
    SOCK_SEQPACKET. Received fds are close-on-exec; on a failed message none is left open.
    The channel owns its socket: :meth:`aclose` (or ``async with``) closes it.
    """

    __slots__ = ("_broken", "_fd", "_first_size", "_receiving", "_sending", "_sock")

    def __init__(self, sock: socket.socket) -> None:
        if sock.family != socket.AF_UNIX:
            raise ValueError("FdChannel needs an AF_UNIX socket")
        sock.setblocking(False)
        self._sock = sock
        self._fd = sock.fileno()
        self._broken = False
        self._sending = False
        self._receiving = False
        self._first_size = first_record_size(sock)

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

    async def _drive(
        self, gen: Generator[Step, Any, Any], readable: bool, first: Any = None
    ) -> Any:
        """Run a protocol generator: try each syscall, wait only on BlockingIOError."""
        wait = trio.lowlevel.wait_readable if readable else trio.lowlevel.wait_writable
        try:
            step = next(gen)
            while True:
                try:
                    result = step()
                except BlockingIOError:
                    try:
                        await wait(self._fd)
                    except BaseException as exc:
                        gen.throw(exc)  # closes what the message received so far
                        raise
                    continue
                step = gen.send(result)
        except StopIteration as stop:
            return stop.value

    async def send(self, fds: Sequence[int], data: bytes = b"") -> None:
        """Send one message: ``data`` and any number of ``fds`` (which stay open here)."""
        if self._broken:
            raise trio.BrokenResourceError("the channel broke in the middle of a message")
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this FdChannel")
        await trio.lowlevel.checkpoint_if_cancelled()
        self._sending = True
        try:
            await self._drive(send_protocol(self._sock, list(fds), data), readable=False)
        except BaseException:
            self._broken = True
            raise
        finally:
            self._sending = False
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def receive(self) -> tuple[bytes, list[int]]:
        """Receive one message: ``(data, fds)``. ``EOFError`` if the peer closed cleanly."""
        if self._broken:
            raise trio.BrokenResourceError("the channel broke in the middle of a message")
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this FdChannel")
        await trio.lowlevel.checkpoint_if_cancelled()
        self._receiving = True
        try:
            # Try first: a whole single-record message needs no generator and no wait.
            try:
                msg, anc, flags, _ = self._sock.recvmsg(self._first_size, ANC_MAX, MSG_CMSG_CLOEXEC)
            except BlockingIOError:
                gen = recv_protocol(self._sock)
            else:
                fds = parse_single_record(msg, anc, flags)
                if fds is not None:
                    await trio.lowlevel.cancel_shielded_checkpoint()
                    return b"", fds
                gen = recv_protocol(self._sock, (msg, anc, flags))
            try:
                result: tuple[bytes, list[int]] = await self._drive(gen, readable=True)
            except EOFError:
                raise
            except BaseException:
                self._broken = True
                raise
        finally:
            self._receiving = False
        await trio.lowlevel.cancel_shielded_checkpoint()
        return result

    async def aclose(self) -> None:
        """Close the socket."""
        trio.lowlevel.notify_closing(self._sock)
        self._sock.close()
        await trio.lowlevel.checkpoint()

    async def __aenter__(self) -> FdChannel:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
