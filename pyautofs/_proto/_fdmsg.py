"""The fd-message protocol, sans I/O: what to send, how to read what arrived, the limits.

One logical message carries any number of fds and some bytes of data over an AF_UNIX
socket (``SOCK_STREAM`` or ``SOCK_SEQPACKET``). The kernel takes at most 253 fds per
``sendmsg`` (``SCM_MAX_FD``), so a message is a few *records*, each sent by one
``sendmsg``, the fds riding on the record they were sent with::

    first record:  "PAFD" u16 version u16 flags u32 nfds u32 datalen  [+ inline data]
                   + SCM_RIGHTS with min(nfds, 253) fds
    data:          (stream) datalen raw bytes; (seqpacket) records of at most 64 KiB,
                   unless the data was inline (flag 1: datalen <= 4080)
    continuation:  "PAFC" u32 batch-index  + SCM_RIGHTS with the next min(left, 253) fds

Native byte order: both ends are on one machine. This module never touches a socket.
:func:`encode_message` says what to send; :class:`FdMessageReader` takes what each
``recvmsg`` returned and gives back whole messages; :func:`single_record_fds` is the fast
path for the common message (one record, no data). The drivers are
:mod:`pyautofs._sys._scm` (blocking, and batches with ``recvmmsg``) and
:class:`pyautofs.FdChannel` (trio).

How the kernel delivers fds, which the reader's rules follow (``net/unix/af_unix.c``):

- **seqpacket**: one ``recvmsg`` returns one record, with its fds. A record longer than the
  buffer sets ``MSG_TRUNC``; fds beyond the control buffer, or beyond ``RLIMIT_NOFILE``, are
  closed by the kernel, which sets ``MSG_CTRUNC``. The reader checks every record's size,
  magic, index and fd count.
- **stream**: fds ride with the first byte of the record they were sent with. One read never
  goes past the end of a record that carried fds, but it may take the tail of one record and
  the head of the next (fds included). So the fds of a read belong to the one record that
  declares fds *and starts inside that read*. The blocking drivers ask for exact lengths
  (:meth:`FdMessageReader.wanted`) so one call never eats into the next message; the batch
  driver reads fixed-size pieces and the reader reassembles them by that rule.

Ownership: every fd handed to :meth:`FdMessageReader.feed` belongs to the reader until it
comes out in a message. After an error (an :class:`FdPassError` from ``next_message``) or when the
driver gives up (peer gone, cancelled), :meth:`FdMessageReader.abort` hands back every fd
it still holds, and the driver closes them: no fd of a failed message stays open.
"""

from __future__ import annotations

import array
import errno
import socket
import struct
from collections.abc import Callable, Sequence
from typing import TypeAlias

from ._errors import ProtocolError

__all__ = [
    "SCM_MAX_FD",
    "ANC_MAX",
    "MAX_DATA",
    "INLINE_MAX",
    "CHUNK",
    "HEADER_SIZE",
    "FIRST_SEQPACKET",
    "MSG_CMSG_CLOEXEC",
    "MSG_CTRUNC",
    "MSG_TRUNC",
    "FdPassError",
    "FdMessageReader",
    "Ancillary",
    "encode_message",
    "ancillary",
    "fds_from_ancdata",
    "fds_from_control",
    "single_record_fds",
    "first_read_size",
    "unpack_fds",
    "fd_struct",
    "empty_header",
    "CONT_SIZE",
]

SCM_MAX_FD = 253
"""The kernel's limit of fds in one ``sendmsg``; no userspace header exports it."""

_MAGIC = b"PAFD"
_CONT_MAGIC = b"PAFC"
_VERSION = 1
_FLAG_INLINE = 1
_HEADER = struct.Struct("=4sHHII")
_CONT = struct.Struct("=4sI")
HEADER_SIZE = _HEADER.size
CONT_SIZE = _CONT.size
INLINE_MAX = 4096 - HEADER_SIZE
"""Data up to this size rides in the first record."""
CHUNK = 65536
"""The size of a data record on a seqpacket socket."""
MAX_DATA = 1 << 30
"""The most data one message may carry; a header claiming more is refused."""
FIRST_SEQPACKET = HEADER_SIZE + INLINE_MAX
ANC_MAX = socket.CMSG_SPACE(SCM_MAX_FD * 4)
"""A control buffer that holds the fds of any record."""

# Plain ints: ``flags & socket.MSG_CTRUNC`` goes through enum's __rand__ (about 0.5 µs).
MSG_CTRUNC = int(socket.MSG_CTRUNC)
MSG_TRUNC = int(socket.MSG_TRUNC)
MSG_CMSG_CLOEXEC = int(getattr(socket, "MSG_CMSG_CLOEXEC", 0x40000000))
_TRUNCATED = MSG_CTRUNC | MSG_TRUNC
_SOL_SOCKET = int(socket.SOL_SOCKET)
_SCM_RIGHTS = int(socket.SCM_RIGHTS)

# Prebuilt and cached: the hot paths pack and allocate nothing they can avoid.
_EMPTY_HEADERS = [_HEADER.pack(_MAGIC, _VERSION, _FLAG_INLINE, n, 0) for n in range(SCM_MAX_FD + 1)]
_FD_STRUCTS = [struct.Struct(f"={n}i") for n in range(SCM_MAX_FD + 1)]
_ARRAY_FROM = 24  # from this many fds on, array.tolist() beats struct.unpack + list()


def _unpacker(n: int) -> Callable[[bytes], list[int]]:
    """A function from an SCM_RIGHTS payload of ``n`` fds to the list of them."""
    if n < _ARRAY_FROM:
        unpack = _FD_STRUCTS[n].unpack
        return lambda payload: [*unpack(payload)]
    return lambda payload: array.array("i", payload).tolist()


# header bytes -> (payload size, unpacker), for every data-less one-record message with fds
_BY_HEADER = {_EMPTY_HEADERS[n]: (4 * n, _unpacker(n)) for n in range(1, SCM_MAX_FD + 1)}
# struct cmsghdr: size_t cmsg_len; int cmsg_level; int cmsg_type; then data, aligned.
_CMSGHDR = struct.Struct("@Nii")
_CMSG_ALIGN = struct.calcsize("@N")

Ancillary: TypeAlias = "list[tuple[int, int, bytes]]"


class FdPassError(ProtocolError):
    """An fd message could not be received whole; no fd of it was left open."""


def empty_header(nfds: int) -> bytes:
    """The first record of a data-less message with ``nfds`` (<= 253) fds, prebuilt."""
    return _EMPTY_HEADERS[nfds]


def first_read_size(stream: bool) -> int:
    """How many bytes the first ``recvmsg`` of a message may read."""
    return HEADER_SIZE if stream else FIRST_SEQPACKET


def fd_struct(n: int) -> struct.Struct:
    """The cached ``struct.Struct`` of ``n`` (<= 253) C ints."""
    return _FD_STRUCTS[n]


def unpack_fds(payload: bytes) -> list[int]:
    """The fds in an SCM_RIGHTS payload (a whole number of C ints)."""
    n = len(payload) >> 2
    if n < _ARRAY_FROM:
        return list(_FD_STRUCTS[n].unpack(payload))
    return array.array("i", payload).tolist()


def ancillary(fds: Sequence[int]) -> Ancillary:
    """The ``sendmsg`` ancillary data carrying ``fds`` (at most 253), packed by a cached
    ``struct.Struct`` for that count."""
    if not fds:
        return []
    return [(_SOL_SOCKET, _SCM_RIGHTS, _FD_STRUCTS[len(fds)].pack(*fds))]


def single_record_fds(msg: bytes, anc: Ancillary, flags: int) -> list[int] | None:
    """The fast path: the fds of a whole data-less one-record message, or None.

    The record must equal the prebuilt header for the number of fds that came with it:
    one dict lookup checks the magic, the version, the count and the absence of data.
    Anything else (None) takes :class:`FdMessageReader`, which owns the fds from then on.
    """
    if not flags & _TRUNCATED and len(anc) == 1:
        expect = _BY_HEADER.get(msg)
        if expect is not None:
            level, kind, payload = anc[0]
            if kind == _SCM_RIGHTS and level == _SOL_SOCKET and len(payload) == expect[0]:
                return expect[1](payload)
    return None


def fds_from_ancdata(anc: Ancillary) -> list[int]:
    """Every fd in the SCM_RIGHTS items of ``recvmsg`` ancillary data (other items, such as
    credentials, carry none and are skipped)."""
    fds: list[int] = []
    for level, kind, payload in anc:
        if level == _SOL_SOCKET and kind == _SCM_RIGHTS:
            usable = len(payload) & ~3
            fds.extend(array.array("i", payload[:usable]))
    return fds


def fds_from_control(control: bytes | memoryview) -> list[int]:
    """Every fd in a raw control buffer as the kernel filled it (``msg_controllen`` bytes)."""
    fds: list[int] = []
    offset = 0
    size = len(control)
    hdr = _CMSGHDR.size
    while offset + hdr <= size:
        length, level, kind = _CMSGHDR.unpack_from(control, offset)
        if length < hdr or offset + length > size:
            break
        if level == _SOL_SOCKET and kind == _SCM_RIGHTS:
            data = bytes(control[offset + hdr : offset + length])
            fds.extend(array.array("i", data[: len(data) & ~3]))
        offset += (length + _CMSG_ALIGN - 1) & ~(_CMSG_ALIGN - 1)
    return fds


def encode_message(
    fds: Sequence[int], data: bytes, stream: bool
) -> list[tuple[bytes | memoryview, Sequence[int]]]:
    """The records of one message, in order: ``(bytes, fds)`` for one ``sendmsg`` each.

    On a stream socket the driver may finish a record whose ``sendmsg`` took only part of
    the bytes with plain sends (the fds went with the first byte). On a seqpacket socket a
    short send is an error.
    """
    nfds = len(fds)
    ndata = len(data)
    if ndata > MAX_DATA:
        raise ValueError(f"fd message data is limited to {MAX_DATA} bytes, not {ndata}")
    inline = ndata <= INLINE_MAX
    first = fds[:SCM_MAX_FD]
    if inline:
        head = _EMPTY_HEADERS[nfds] if not ndata and nfds <= SCM_MAX_FD else None
        if head is None:
            head = _HEADER.pack(_MAGIC, _VERSION, _FLAG_INLINE, nfds, ndata) + data
        records: list[tuple[bytes | memoryview, Sequence[int]]] = [(head, first)]
    else:
        records = [(_HEADER.pack(_MAGIC, _VERSION, 0, nfds, ndata), first)]
        view = memoryview(data)
        if stream:
            records.append((view, ()))
        else:
            records += [(view[i : i + CHUNK], ()) for i in range(0, ndata, CHUNK)]
    for index, start in enumerate(range(SCM_MAX_FD, nfds, SCM_MAX_FD), 1):
        records.append((_CONT.pack(_CONT_MAGIC, index), fds[start : start + SCM_MAX_FD]))
    return records


# Reader phases.
_HEAD, _DATA, _CONT_PHASE = 0, 1, 2


class FdMessageReader:
    """Reassemble fd messages from what ``recvmsg`` returned, one call at a time.

    ``feed(data, fds, flags)`` takes one read: its bytes, the fds that came with it (see
    :func:`fds_from_ancdata`) and its ``msg_flags``. Whole messages queue up and come out
    of :meth:`next_message`. :meth:`wanted` says how much the next read may take without
    crossing a record boundary. A problem is raised by :meth:`next_message` (after the
    whole messages before it): :class:`FdPassError`; the reader is then broken, and
    :meth:`abort` returns every fd it holds, for the driver to close.
    """

    __slots__ = (
        "_attached",
        "_base",
        "_broken",
        "_buf",
        "_data",
        "_error",
        "_fds",
        "_index",
        "_inline",
        "_left_data",
        "_nfds",
        "_phase",
        "_ready",
        "_stream",
    )

    def __init__(self, stream: bool) -> None:
        self._stream = stream
        self._buf = bytearray()  # stream: bytes received and not yet parsed
        self._base = 0  # stream: the absolute offset of _buf[0]
        # stream: (start, end, fds, ctrunc) of each read that brought fds or MSG_CTRUNC
        self._attached: list[tuple[int, int, list[int], bool]] = []
        self._ready: list[tuple[bytes, list[int]]] = []
        self._broken = False
        self._error: FdPassError | EOFError | None = None
        self._reset()

    def _reset(self) -> None:
        self._phase = _HEAD
        self._fds: list[int] = []
        self._nfds = 0
        self._data: list[bytes] = []
        self._left_data = 0
        self._index = 1
        self._inline = False

    # -- what the driver asks --------------------------------------------------------------

    @property
    def stream(self) -> bool:
        """Whether this reader follows stream rules (else seqpacket)."""
        return self._stream

    def at_boundary(self) -> bool:
        """True when no part of a message is buffered (whole ones may wait in the queue)."""
        return self._phase == _HEAD and not self._buf and not self._attached

    def has_message(self) -> bool:
        """True when :meth:`next_message` has something to give: a whole message, or the
        error that ended the stream."""
        return bool(self._ready) or self._error is not None

    def wanted(self) -> int:
        """How many bytes the next read should ask for (seqpacket: the record size).

        On a stream this never reaches past the current record, so a blocking driver that
        asks for exactly this much never consumes a byte (or an fd) of the next message.
        """
        if self._phase == _HEAD:
            if self._stream:
                return HEADER_SIZE - len(self._buf)
            return FIRST_SEQPACKET
        if self._phase == _DATA:
            if self._stream:
                return self._left_data - len(self._buf)
            return min(self._left_data, CHUNK)
        return CONT_SIZE - len(self._buf) if self._stream else CONT_SIZE

    def next_message(self) -> tuple[bytes, list[int]] | None:
        """The next whole message ``(data, fds)``, or None if none is complete yet. Its fds
        are the caller's now. After the whole messages, raises what went wrong, if
        anything did: :class:`FdPassError`, or ``EOFError`` for a close between messages
        (then :meth:`abort` returns what must be closed)."""
        if self._ready:
            return self._ready.pop(0)
        if self._error is not None:
            raise self._error
        return None

    def abort(self) -> list[int]:
        """Give up: return every fd held (partial and queued messages alike) and break."""
        self._broken = True
        out = list(self._fds)
        for _, fds in self._ready:
            out += fds
        for _, _, fds, _ in self._attached:
            out += fds
        self._fds = []
        self._ready = []
        self._attached = []
        self._buf = bytearray()
        return out

    # -- feeding -----------------------------------------------------------------------------

    def feed(self, data: bytes, fds: list[int], flags: int) -> None:
        """Take one read. ``data == b""`` means the peer closed the connection.

        Never raises for what arrived: a problem (an :class:`FdPassError`, or ``EOFError``
        for a clean close between messages) comes out of :meth:`next_message` once the
        whole messages before it have. The fds passed in are the reader's from this call on.
        """
        if self._broken:
            self._fds += fds  # still ours to hand back
            return
        try:
            if not data:
                self._fds += fds
                self._eof()
            elif self._stream:
                self._feed_stream(data, fds, flags)
            else:
                self._feed_record(data, fds, flags)
        except (FdPassError, EOFError) as exc:
            self._broken = True
            self._error = exc
        except BaseException:
            self._broken = True
            raise

    def _eof(self) -> None:
        if self._phase == _HEAD and not self._buf and not self._fds and not self._attached:
            raise EOFError("the peer closed the connection")
        if self._phase == _HEAD and not self._buf:
            raise FdPassError(errno.EBADMSG, f"fds arrived without data ({len(self._fds)} fds)")
        if self._phase == _HEAD:
            raise FdPassError(
                errno.ECONNRESET, "the peer closed the connection inside a message header"
            )
        got = len(self._fds) + sum(len(a[2]) for a in self._attached)
        raise FdPassError(
            errno.ECONNRESET,
            "the peer closed the connection in the middle of a message: got "
            f"{got} of {self._nfds} fds",
        )

    def _check_batch(self, got: int, expected: int, ctrunc: bool, before: int) -> None:
        """The fds of one record: exactly as many as announced, and never truncated."""
        if got == expected:
            if ctrunc:
                raise FdPassError(
                    errno.EBADMSG,
                    f"control data truncated (MSG_CTRUNC) after {before + got} of {self._nfds} fds",
                )
            return
        if ctrunc:
            raise FdPassError(
                errno.EMFILE,
                f"receiver ran out of fds: got {before + got} of {self._nfds} (RLIMIT_NOFILE "
                "is reached, or the sender sent more than announced); the kernel closed the "
                "rest",
            )
        if got == 0:
            raise FdPassError(
                errno.EBADMSG, f"data arrived without its fds: expected {expected}, got none"
            )
        raise FdPassError(errno.EBADMSG, f"expected {expected} fds in a record, got {got}")

    def _parse_header(self, head: bytes | bytearray) -> None:
        magic, version, mflags, nfds, ndata = _HEADER.unpack_from(head)
        if magic != _MAGIC:
            raise FdPassError(
                errno.EBADMSG, f"not a pyautofs fd message (starts with {bytes(head[:8])!r})"
            )
        if version != _VERSION:
            raise FdPassError(errno.EBADMSG, f"fd message version {version} is not supported")
        if ndata > MAX_DATA:
            raise FdPassError(errno.EBADMSG, f"fd message claims {ndata} bytes of data")
        self._nfds = nfds
        self._left_data = ndata
        self._inline = bool(mflags & _FLAG_INLINE)

    def _finish_if_done(self) -> None:
        """Queue the message once its data and fds are all in."""
        if self._left_data == 0 and len(self._fds) >= self._nfds:
            self._ready.append((b"".join(self._data), self._fds))
            self._reset()
        elif self._left_data == 0:
            self._phase = _CONT_PHASE
        else:
            self._phase = _DATA

    # seqpacket: one read is one record.
    def _feed_record(self, rec: bytes, fds: list[int], flags: int) -> None:
        before = len(self._fds)
        self._fds += fds
        if flags & MSG_TRUNC:
            raise FdPassError(errno.EBADMSG, "an oversized record: not a pyautofs fd message")
        ctrunc = bool(flags & MSG_CTRUNC)
        if self._phase == _HEAD:
            if len(rec) < HEADER_SIZE:
                raise FdPassError(
                    errno.EBADMSG, f"a {len(rec)}-byte record: not a pyautofs fd message"
                )
            self._parse_header(rec)
            self._check_batch(len(fds), min(self._nfds, SCM_MAX_FD), ctrunc, 0)
            if self._inline:
                body = bytes(rec[HEADER_SIZE:])
                if len(body) != self._left_data:
                    raise FdPassError(
                        errno.EBADMSG,
                        f"fd message says {self._left_data} bytes of data, the record has "
                        f"{len(body)}",
                    )
                self._data.append(body)
                self._left_data = 0
            elif len(rec) != HEADER_SIZE:
                raise FdPassError(errno.EBADMSG, "a first record of the wrong size")
        elif self._phase == _DATA:
            want = min(self._left_data, CHUNK)
            if fds or ctrunc:
                raise FdPassError(errno.EBADMSG, "fds arrived with a data record")
            if len(rec) != want:
                raise FdPassError(errno.EBADMSG, "a data record of the wrong size")
            self._data.append(rec)
            self._left_data -= want
        else:
            self._check_cont(rec, len(fds), ctrunc, before)
        self._finish_if_done()

    def _check_cont(self, rec: bytes | bytearray, got: int, ctrunc: bool, before: int) -> None:
        if len(rec) != CONT_SIZE:
            raise FdPassError(
                errno.EBADMSG, "a short continuation record: not a pyautofs fd message"
            )
        cmagic, cindex = _CONT.unpack_from(rec)
        if cmagic != _CONT_MAGIC or cindex != self._index:
            raise FdPassError(
                errno.EBADMSG,
                f"expected continuation {self._index} of an fd message, got something else",
            )
        self._check_batch(got, min(self._nfds - before, SCM_MAX_FD), ctrunc, before)
        self._index += 1

    # stream: reads are pieces of a byte stream; fds attach to the read they came with.
    def _feed_stream(self, data: bytes, fds: list[int], flags: int) -> None:
        start = self._base + len(self._buf)
        self._buf += data
        if fds or flags & MSG_CTRUNC:
            self._attached.append((start, start + len(data), fds, bool(flags & MSG_CTRUNC)))
        while self._parse_stream():
            pass

    def _claim(self, at: int) -> tuple[list[int], bool]:
        """The fds of the read in which a record declaring fds starts at offset ``at``."""
        while self._attached and self._attached[0][1] <= at:
            _, _, stray, ctrunc = self._attached.pop(0)
            self._fds += stray
            raise FdPassError(
                errno.EBADMSG,
                "fds arrived with bytes that do not start a record: not a pyautofs fd message"
                if stray or not ctrunc
                else "control data truncated (MSG_CTRUNC) on bytes that carry no fds",
            )
        if self._attached and self._attached[0][0] <= at:
            _, _, fds, ctrunc = self._attached.pop(0)
            return fds, ctrunc
        return [], False

    def _check_no_stray(self, upto: int) -> None:
        """No read that ended at or before ``upto`` may still hold unclaimed fds."""
        if self._attached and self._attached[0][1] <= upto:
            self._claim(upto)

    def _take(self, n: int) -> bytes:
        out = bytes(self._buf[:n])
        del self._buf[:n]
        self._base += n
        return out

    def _parse_stream(self) -> bool:
        """Parse what the buffer holds; True if something was consumed."""
        at = self._base
        if self._phase == _HEAD:
            if len(self._buf) < HEADER_SIZE:
                return False
            head = self._take(HEADER_SIZE)
            self._parse_header(head)
            first = min(self._nfds, SCM_MAX_FD)
            if first:
                fds, ctrunc = self._claim(at)
                self._fds += fds
                self._check_batch(len(fds), first, ctrunc, 0)
        elif self._phase == _DATA:
            if not self._buf:
                return False
            n = min(len(self._buf), self._left_data)
            self._data.append(self._take(n))
            self._left_data -= n
        else:
            if len(self._buf) < CONT_SIZE:
                return False
            rec = self._take(CONT_SIZE)
            fds, ctrunc = self._claim(at)
            before = len(self._fds)
            self._fds += fds
            self._check_cont(rec, len(fds), ctrunc, before)
        # Fds that came with bytes no record claimed make this message a lie: refuse it
        # before it is queued, so a bad message is never delivered.
        self._check_no_stray(self._base)
        self._finish_if_done()
        return True
