"""Passing any number of file descriptors over a unix socket (SCM_RIGHTS), without loss.

The kernel takes at most 253 fds per ``sendmsg`` (``SCM_MAX_FD``). One logical message
here carries any number: the first record holds a header and up to 253 fds, and each
further batch rides on a small continuation record. The receiver checks every record, so
a stray or foreign message is recognised instead of being misread.

Wire format (native byte order; both ends are on one machine)::

    first record:   "PAFD" u16 version u16 flags u32 nfds u32 datalen  [+ inline data]
                    + SCM_RIGHTS with min(nfds, 253) fds
    data:           (stream) datalen raw bytes; (seqpacket) records of at most 64 KiB,
                    unless the data was inline
    continuation:   "PAFC" u32 batch-index  + SCM_RIGHTS with the next min(left, 253) fds

Why exact lengths: on a SOCK_STREAM socket the fds ride with the first byte of the data
they were sent with, and a read that consumes that byte receives them. The receiver
therefore reads the header, then exactly ``datalen`` bytes, then each continuation header,
so it never swallows the next message's fds. On SOCK_SEQPACKET each record is read whole.

Received fds are close-on-exec atomically (``MSG_CMSG_CLOEXEC``): without it a concurrent
fork+exec leaks them. On any failure the receiver closes every fd it got for the message
and raises :class:`FdPassError` (an ``OSError``) saying what happened. ``MSG_CTRUNC``
means the kernel installed fewer fds than were sent (the receiver hit RLIMIT_NOFILE, or
a foreign sender sent more than fits) and closed the rest itself: that is reported, never
silently dropped.

The protocol is written once, as a generator that yields the next syscall to make. The
synchronous functions here run it with blocking calls; the trio :class:`FdChannel` runs it
by trying each call first and waiting for readiness only on ``BlockingIOError``.
"""

from __future__ import annotations

import _socket
import array
import errno
import os
import socket
import struct
from collections.abc import Callable, Generator, Sequence
from functools import partial
from typing import Any, TypeAlias

from .._proto._errors import ProtocolError

__all__ = [
    "parse_single_record",
    "first_record_size",
    "ANC_MAX",
    "MSG_CMSG_CLOEXEC",
    "SCM_MAX_FD",
    "FdPassError",
    "send_fds",
    "recv_fds",
    "send_protocol",
    "recv_protocol",
    "run_blocking",
    "peer_credentials",
    "PeerCredentials",
    "worker_listener",
    "accept_peer",
]

SCM_MAX_FD = 253
"""The kernel's limit of fds in one ``sendmsg``; no userspace header exports it."""

_MAGIC = b"PAFD"
_CONT_MAGIC = b"PAFC"
_VERSION = 1
_HEADER = struct.Struct("=4sHHII")
_CONT = struct.Struct("=4sI")
_INLINE_MAX = 4096 - _HEADER.size  # data up to this size rides in the first record
_CHUNK = 65536  # seqpacket data records
_MAX_DATA = 1 << 30
_ANC_MAX = socket.CMSG_SPACE(SCM_MAX_FD * 4)
_FLAG_INLINE = 1
_CLOEXEC = getattr(socket, "MSG_CMSG_CLOEXEC", 0x40000000)
ANC_MAX = _ANC_MAX
MSG_CMSG_CLOEXEC = _CLOEXEC
_SOL_SOCKET = socket.SOL_SOCKET
_SCM_RIGHTS = socket.SCM_RIGHTS
_TRUNCATED = socket.MSG_CTRUNC | socket.MSG_TRUNC
_STREAM = int(socket.SOCK_STREAM)
# ``socket.socket.type`` converts to an enum on every access; the C getter is an int.
_sock_type: Callable[[socket.socket], int] = _socket.socket.type.__get__
# Headers of data-less messages, prebuilt: the hot path packs nothing.
_EMPTY_HEADERS = [_HEADER.pack(_MAGIC, _VERSION, _FLAG_INLINE, n, 0) for n in range(SCM_MAX_FD + 1)]


class FdPassError(ProtocolError):
    """An fd message could not be received whole; no fd of it was left open."""


# A step of the protocol: a thunk that makes one syscall. ``send_protocol`` and
# ``recv_protocol`` yield steps and receive their results.
Step: TypeAlias = Callable[[], Any]
_RecvResult: TypeAlias = "tuple[bytes, list[tuple[int, int, bytes]], int, Any]"


def _fds_of(ancdata: list[tuple[int, int, bytes]], into: list[int]) -> bool:
    """Append the fds of every SCM_RIGHTS item to ``into``; True if there were any items."""
    found = False
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            found = True
            usable = len(payload) - len(payload) % 4
            into.extend(array.array("i", payload[:usable]))
    return found


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
    fds.clear()


def send_protocol(
    sock: socket.socket, fds: Sequence[int], data: bytes
) -> Generator[Step, Any, None]:
    """The sending side of one message, as a generator of syscall steps."""
    nfds = len(fds)
    ndata = len(data)
    if ndata > _MAX_DATA:
        raise ValueError(f"fd message data is limited to {_MAX_DATA} bytes, not {ndata}")
    inline = ndata <= _INLINE_MAX
    header = _HEADER.pack(_MAGIC, _VERSION, _FLAG_INLINE if inline else 0, nfds, ndata)
    first = fds[:SCM_MAX_FD]
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", first))] if first else []
    buffers = [header, data] if inline and ndata else [header]
    sent = yield partial(sock.sendmsg, buffers, anc)
    total = len(header) + (ndata if inline else 0)
    stream = _sock_type(sock) == _STREAM
    if sent < total:
        if not stream:
            raise FdPassError(errno.EMSGSIZE, f"sendmsg sent {sent} of {total} bytes of a record")
        # A stream socket may take part of a large first write; the fds went with it.
        rest = memoryview(header + (data if inline else b""))[sent:]
        while rest:
            n = yield partial(sock.send, rest)
            rest = rest[n:]
    if not inline:
        view = memoryview(data)
        while view:
            chunk = view if stream else view[:_CHUNK]
            n = yield partial(sock.send, chunk)
            if not stream and n != len(chunk):
                raise FdPassError(
                    errno.EMSGSIZE, f"send sent {n} of {len(chunk)} bytes of a record"
                )
            view = view[n:]
    index = 1
    for start in range(SCM_MAX_FD, nfds, SCM_MAX_FD):
        batch = array.array("i", fds[start : start + SCM_MAX_FD])
        cont = _CONT.pack(_CONT_MAGIC, index)
        anc_b = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, batch)]
        n = yield partial(sock.sendmsg, [cont], anc_b)
        if n < len(cont):  # only a stream can take part of 8 bytes; the fds went with it
            rest_c = memoryview(cont)[n:]
            while rest_c:
                m = yield partial(sock.send, rest_c)
                rest_c = rest_c[m:]
        index += 1


def _parse_first(
    msg: bytes, anc: list[tuple[int, int, bytes]], flags: int, stream: bool, fds: list[int]
) -> tuple[int, int, bool]:
    """Check the first record of a message; returns (nfds, ndata, data_is_inline)."""
    if stream and len(msg) < _HEADER.size:
        raise FdPassError(errno.EBADMSG, f"a {len(msg)}-byte header: not a pyautofs fd message")
    if not stream and flags & socket.MSG_TRUNC:
        raise FdPassError(errno.EBADMSG, "an oversized record: not a pyautofs fd message")
    if len(msg) < _HEADER.size:
        raise FdPassError(errno.EBADMSG, f"a {len(msg)}-byte record: not a pyautofs fd message")
    magic, version, mflags, nfds, ndata = _HEADER.unpack_from(msg)
    if magic != _MAGIC:
        raise FdPassError(errno.EBADMSG, f"not a pyautofs fd message (starts with {msg[:8]!r})")
    if version != _VERSION:
        raise FdPassError(errno.EBADMSG, f"fd message version {version} is not supported")
    if ndata > _MAX_DATA:
        raise FdPassError(errno.EBADMSG, f"fd message claims {ndata} bytes of data")
    _check_batch(fds, min(nfds, SCM_MAX_FD), nfds, flags)
    return nfds, ndata, bool(mflags & _FLAG_INLINE)


_FIRST_SEQPACKET = _HEADER.size + _INLINE_MAX


def _first_size(stream: bool) -> int:
    return _HEADER.size if stream else _FIRST_SEQPACKET


def recv_protocol(
    sock: socket.socket, first: tuple[bytes, list[tuple[int, int, bytes]], int] | None = None
) -> Generator[Step, Any, tuple[bytes, list[int]]]:
    """The receiving side of one message, as a generator of syscall steps.

    ``first`` is the first record's (data, ancdata, flags) if the caller already read it.
    Returns (data, fds). Raises :class:`FdPassError` with every received fd closed.
    """
    fds: list[int] = []
    stream = _sock_type(sock) == _STREAM
    try:
        if first is None:
            msg, anc, flags, _ = yield partial(
                sock.recvmsg, _first_size(stream), _ANC_MAX, _CLOEXEC
            )
        else:
            msg, anc, flags = first
        _fds_of(anc, fds)
        if not msg:
            if fds:
                raise FdPassError(errno.EBADMSG, f"fds arrived without data ({len(fds)} fds)")
            raise EOFError("the peer closed the connection")
        if stream:
            while len(msg) < _HEADER.size:  # a header split across writes
                more = yield partial(sock.recv, _HEADER.size - len(msg))
                if not more:
                    raise FdPassError(
                        errno.ECONNRESET, "the peer closed the connection inside a message header"
                    )
                msg += more
        nfds, ndata, inline = _parse_first(msg, anc, flags, stream, fds)
        if inline and not stream:
            data = bytes(msg[_HEADER.size :])
            if len(data) != ndata:
                raise FdPassError(
                    errno.EBADMSG,
                    f"fd message says {ndata} bytes of data, the record has {len(data)}",
                )
        else:
            parts: list[bytes] = []
            left = ndata
            while left:
                want = left if stream else min(left, _CHUNK)
                chunk = yield partial(sock.recv, want)
                if not chunk:
                    raise FdPassError(
                        errno.ECONNRESET,
                        "the peer closed the connection in the middle of a message: got "
                        f"{ndata - left} of {ndata} data bytes and {len(fds)} of {nfds} fds",
                    )
                if not stream and len(chunk) != want:
                    raise FdPassError(errno.EBADMSG, "a data record of the wrong size")
                parts.append(chunk)
                left -= len(chunk)
            data = b"".join(parts)
        index = 1
        while len(fds) < nfds:
            before = len(fds)
            cmsg, canc, cflags, _ = yield partial(sock.recvmsg, _CONT.size, _ANC_MAX, _CLOEXEC)
            _fds_of(canc, fds)
            if not cmsg:
                raise FdPassError(
                    errno.ECONNRESET,
                    "the peer closed the connection in the middle of a message: got "
                    f"{before} of {nfds} fds",
                )
            if len(cmsg) != _CONT.size:
                raise FdPassError(
                    errno.EBADMSG, "a short continuation record: not a pyautofs fd message"
                )
            cmagic, cindex = _CONT.unpack(cmsg)
            if cmagic != _CONT_MAGIC or cindex != index:
                raise FdPassError(
                    errno.EBADMSG,
                    f"expected continuation {index} of an fd message, got something else",
                )
            _check_batch(fds, min(nfds - before, SCM_MAX_FD), nfds, cflags, before)
            index += 1
    except BaseException:
        _close_all(fds)
        raise
    return data, fds


def _check_batch(fds: list[int], expected: int, total: int, flags: int, before: int = 0) -> None:
    got = len(fds) - before
    if got == expected:
        if flags & socket.MSG_CTRUNC:
            raise FdPassError(
                errno.EBADMSG,
                f"control data truncated (MSG_CTRUNC) after {len(fds)} of {total} fds",
            )
        return
    if flags & socket.MSG_CTRUNC:
        raise FdPassError(
            errno.EMFILE,
            f"receiver ran out of fds: got {before + got} of {total} (RLIMIT_NOFILE is "
            "reached, or the sender sent more than announced); the kernel closed the rest",
        )
    if got == 0:
        raise FdPassError(
            errno.EBADMSG, f"data arrived without its fds: expected {expected}, got none"
        )
    raise FdPassError(errno.EBADMSG, f"expected {expected} fds in a record, got {got}")


def run_blocking(gen: Generator[Step, Any, Any]) -> Any:
    """Run a protocol generator with blocking syscalls (EINTR is retried by Python)."""
    try:
        step = next(gen)
        while True:
            step = gen.send(step())
    except StopIteration as stop:
        return stop.value


def send_fds(sock: socket.socket, fds: Sequence[int], data: bytes = b"") -> None:
    """Send ``fds`` (any number) and ``data`` as one message on an AF_UNIX socket.

    Works on SOCK_STREAM and SOCK_SEQPACKET sockets in blocking mode. The receiver gets
    them all together from :func:`recv_fds`. The sender's fds stay open.
    """
    nfds = len(fds)
    ndata = len(data)
    if nfds <= SCM_MAX_FD and ndata <= _INLINE_MAX:
        # The common case, one record: one sendmsg, no generator.
        if ndata:
            header = _HEADER.pack(_MAGIC, _VERSION, _FLAG_INLINE, nfds, ndata)
            buffers: tuple[bytes, ...] = (header, data)
        else:
            header = _EMPTY_HEADERS[nfds]
            buffers = (header,)
        anc = [(_SOL_SOCKET, _SCM_RIGHTS, array.array("i", fds))] if nfds else []
        sent = sock.sendmsg(buffers, anc)
        if sent < _HEADER.size + ndata:
            # Only a stream socket takes part of a small write; the fds went with it.
            sock.sendall((header + data)[sent:])
        return
    run_blocking(send_protocol(sock, fds, data))


def parse_single_record(
    msg: bytes, anc: list[tuple[int, int, bytes]], flags: int
) -> list[int] | None:
    """The fds of a whole data-less message in one record, or None for anything else.

    The header must equal the prebuilt one for that many fds: one comparison checks the
    magic, version, count and the absence of data. Anything else takes the general path.
    """
    if len(anc) == 1 and not flags & _TRUNCATED:
        level, kind, payload = anc[0]
        if (
            msg == _EMPTY_HEADERS[len(payload) >> 2]
            and kind == _SCM_RIGHTS
            and level == _SOL_SOCKET
        ):
            return array.array("i", payload).tolist()
    return None


def first_record_size(sock: socket.socket) -> int:
    """How many bytes the first recvmsg of a message may read on this socket."""
    return _HEADER.size if _sock_type(sock) == _STREAM else _FIRST_SEQPACKET


def recv_fds(sock: socket.socket) -> tuple[bytes, list[int]]:
    """Receive one message sent by :func:`send_fds`: ``(data, fds)``, fds close-on-exec.

    Raises :class:`FdPassError` (an ``OSError``) if the message is truncated, foreign or
    malformed, if the peer dies in the middle of it, or if this process runs out of fds;
    no fd of that message is left open. Raises ``EOFError`` if the peer closed the
    connection between messages.
    """
    stream = _sock_type(sock) == _STREAM
    msg, anc, flags, _ = sock.recvmsg(
        _HEADER.size if stream else _FIRST_SEQPACKET, _ANC_MAX, _CLOEXEC
    )
    # parse_single_record, inlined: this is the hot path.
    if len(anc) == 1 and not flags & _TRUNCATED:
        level, kind, payload = anc[0]
        if (
            msg == _EMPTY_HEADERS[len(payload) >> 2]
            and kind == _SCM_RIGHTS
            and level == _SOL_SOCKET
        ):
            return b"", array.array("i", payload).tolist()
    result: tuple[bytes, list[int]] = run_blocking(recv_protocol(sock, (msg, anc, flags)))
    return result


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


def worker_listener(name: str = "worker.sock", *, backlog: int = 16) -> tuple[socket.socket, str]:
    """A listening AF_UNIX socket for a restore worker: mode 0600 inside a fresh 0700 dir.

    The socket lives in the filesystem (never the abstract namespace, which has no
    permissions), in a directory only this user can enter, named uniquely so concurrent
    restores never collide. Returns (socket, path); remove the directory when done.
    """
    import tempfile

    directory = tempfile.mkdtemp(prefix="pyautofs-")  # created 0700
    path = os.path.join(directory, name)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)  # the socket file is created 0600
    try:
        sock.bind(path)
    except BaseException:
        sock.close()
        os.rmdir(directory)
        raise
    finally:
        os.umask(old)
    sock.listen(backlog)
    return sock, path


def accept_peer(
    listener: socket.socket, *, uid: int | None = None, pid: int | None = None
) -> tuple[socket.socket, PeerCredentials]:
    """Accept one connection whose peer has the expected uid (default: ours) and pid.

    Connections from anyone else are closed and refused with ``PermissionError`` naming who
    tried: a restore worker must take fds only from its coordinator.
    """
    want_uid = os.getuid() if uid is None else uid
    conn, _ = listener.accept()
    creds = peer_credentials(conn)
    if creds.uid != want_uid or (pid is not None and creds.pid != pid):
        conn.close()
        expected = f"uid {want_uid}" + (f", pid {pid}" if pid is not None else "")
        raise PermissionError(
            errno.EACCES,
            f"refused a connection from pid {creds.pid} uid {creds.uid}: expected {expected}",
        )
    return conn, creds
