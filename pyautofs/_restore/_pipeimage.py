"""Pipe images: capture a pipe without consuming it, and rebuild it elsewhere.

:func:`snapshot_pipe` records a pipe's size, mode and contents. The contents are copied with
``tee`` into a private pipe, which duplicates buffer references and leaves the original
untouched, and then read out of the private copy.

**Packet boundaries.** In a packet-mode pipe (the writer has ``O_DIRECT``, as autofs request
pipes do) every write of up to a page is its own buffer, and one ``read`` returns at most one
such buffer. ``tee`` keeps that mark on the copies, so reading the private copy with a buffer
large enough for everything stops at the end of each packet: the length of each read *is*
the packet's length. A plain pipe gives everything back in one read. To tell "one read
returned everything because it was plain data" from "it was one last packet", one byte of
plain data (a sentinel) is appended to the private copy once it has a free slot: a read that
reaches the sentinel was plain data, a read that stops short of it ended on a packet. CRIU
refuses packet-mode pipes other than autofs ones and keeps no boundaries; we keep them.

**What a read end shows.** ``O_DIRECT`` lives on the *writing* file. ``pipe2(O_DIRECT)`` and
autofs both put it there only; the read end's ``F_GETFL`` (and its fdinfo ``flags:``) never
shows it. Only the queued buffers reveal packet mode through a read end, so an *empty*
packet pipe captured through its read end looks plain unless the caller says otherwise
(``packet=True``; :func:`~pyautofs.restore.dump_autofs_mount` does, since every autofs pipe is
packetised), or the fd handed in is the write end.

Limits: a pipe captured while another process writes or reads it is captured as of the
``tee`` (one call, so one consistent point in time). Plain bytes that were queued *before* a
packet in the same pipe (a writer that toggled ``O_DIRECT``) come back out of that packet's
read and are kept as part of that packet. A pipe of a single slot that is full is the one
case where plain data and a packet look the same; ``packet_mode`` then decides.

**Restore** (:func:`restore_pipe`): size first, even for an empty pipe (CRIU once lost the
size of empty pipes), then the packets (one ``write`` each, in packet mode), then any plain
data, then the final mode of each end.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
import zlib
from typing import Any

import attrs

from .._proto._errors import FormatError
from .._sys._pipes import (
    PipeFlags,
    SpliceFlags,
    bytes_queued,
    get_pipe_size,
    pipe2,
    set_packet_mode,
    set_pipe_size,
    tee,
)

__all__ = ["PipeImage", "PipeImageError", "snapshot_pipe", "restore_pipe"]

_MAGIC = b"PYAFPIPE"
_VERSION = 1
# magic, version, flags, size, packet count, data length, crc32 of everything else.
_HEADER = struct.Struct("<8sHHIIII")
_LENGTH = struct.Struct("<I")
_FLAG_PACKET = 0x1
_FLAG_NONBLOCK = 0x2
_KNOWN_FLAGS = _FLAG_PACKET | _FLAG_NONBLOCK
_MAX_SIZE = (1 << 31) - 1  # F_SETPIPE_SZ takes an int


class PipeImageError(FormatError):
    """Bytes that are not a pipe image this version of pyautofs can read."""


def _positive_size(instance: object, attribute: attrs.Attribute[Any], value: int) -> None:
    if not 0 < value <= _MAX_SIZE:
        raise ValueError(f"pipe size must be 1..{_MAX_SIZE} bytes, not {value}")


def _packets_valid(
    instance: object, attribute: attrs.Attribute[Any], value: tuple[bytes, ...]
) -> None:
    for i, packet in enumerate(value):
        if not packet:
            raise ValueError(f"packet {i} is empty: a pipe never holds an empty packet")


@attrs.frozen
class PipeImage:
    """What a pipe held: its size, its mode and its contents.

    ``packets`` are the queued packet-mode buffers in order (one ``read`` each); ``data`` is
    plain (stream) data queued after them. A plain pipe has only ``data``; an autofs request
    pipe has only ``packets``. ``packet_mode`` is the mode the write end is left in on
    restore; ``nonblock`` is ``O_NONBLOCK`` of the captured read end (systemd sets it).
    """

    size: int = attrs.field(validator=_positive_size)
    packet_mode: bool = False
    nonblock: bool = False
    packets: tuple[bytes, ...] = attrs.field(
        default=(), validator=_packets_valid, repr=lambda p: f"<{len(p)} packets>"
    )
    data: bytes = attrs.field(default=b"", repr=lambda d: f"<{len(d)} bytes>")

    @property
    def contents(self) -> bytes:
        """Every queued byte, in order, without boundaries."""
        return b"".join(self.packets) + self.data

    @property
    def nbytes(self) -> int:
        """How many bytes were queued."""
        return sum(map(len, self.packets)) + len(self.data)

    def without_contents(self) -> PipeImage:
        """The same pipe, empty: size and mode only."""
        return attrs.evolve(self, packets=(), data=b"")

    def to_bytes(self) -> bytes:
        """Serialise: a versioned binary format with a CRC32, read by :meth:`from_bytes`."""
        flags = (_FLAG_PACKET if self.packet_mode else 0) | (_FLAG_NONBLOCK if self.nonblock else 0)
        lengths = b"".join(_LENGTH.pack(len(p)) for p in self.packets)
        body = lengths + b"".join(self.packets) + self.data
        head = _HEADER.pack(
            _MAGIC, _VERSION, flags, self.size, len(self.packets), len(self.data), 0
        )
        crc = zlib.crc32(body, zlib.crc32(head[:-4]))
        return head[:-4] + _LENGTH.pack(crc) + body

    @classmethod
    def from_bytes(cls, raw: bytes | bytearray | memoryview) -> PipeImage:
        """Parse :meth:`to_bytes` output. Anything else raises :class:`PipeImageError`."""
        buf = bytes(raw)
        if len(buf) < _HEADER.size:
            raise PipeImageError(
                f"pipe image truncated: {len(buf)} bytes, the header alone is {_HEADER.size}"
            )
        magic, version, flags, size, count, data_len, crc = _HEADER.unpack_from(buf)
        if magic != _MAGIC:
            raise PipeImageError(f"not a pipe image (magic {magic!r}, expected {_MAGIC!r})")
        if version != _VERSION:
            raise PipeImageError(
                f"pipe image format version {version} is not supported (this reads {_VERSION})"
            )
        if zlib.crc32(buf[_HEADER.size :], zlib.crc32(buf[: _HEADER.size - 4])) != crc:
            raise PipeImageError("pipe image is corrupt: CRC32 mismatch")
        if flags & ~_KNOWN_FLAGS:
            raise PipeImageError(f"pipe image has unknown flags {flags:#x}")
        if not 0 < size <= _MAX_SIZE:
            raise PipeImageError(f"pipe image has an impossible pipe size {size}")
        pos = _HEADER.size
        table_end = pos + count * _LENGTH.size
        if table_end > len(buf):
            raise PipeImageError(f"pipe image truncated: {count} packet lengths do not fit")
        lengths = [_LENGTH.unpack_from(buf, pos + i * _LENGTH.size)[0] for i in range(count)]
        if 0 in lengths:
            raise PipeImageError("pipe image has an empty packet")
        expected = table_end + sum(lengths) + data_len
        if expected != len(buf):
            raise PipeImageError(
                f"pipe image length mismatch: header says {expected} bytes, got {len(buf)}"
            )
        packets = []
        pos = table_end
        for n in lengths:
            packets.append(buf[pos : pos + n])
            pos += n
        return cls(
            size=size,
            packet_mode=bool(flags & _FLAG_PACKET),
            nonblock=bool(flags & _FLAG_NONBLOCK),
            packets=tuple(packets),
            data=buf[pos:],
        )


def _readable_fd(fd: int) -> int:
    """``fd`` if it can be read, else a fresh read-only open of the same pipe.

    ``tee`` needs an input opened for reading. A write end is reopened through
    ``/proc/self/fd``, which opens the pipe itself (a new file, as a FIFO open would), with
    O_NONBLOCK so the open never waits for a writer.
    """
    if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE != os.O_WRONLY:
        return fd
    return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)


def _try_write_sentinel(fd: int) -> bool:
    try:
        os.write(fd, b"\0")
    except BlockingIOError:
        return False
    return True


def snapshot_pipe(fd: int, *, packet: bool | None = None) -> PipeImage:
    """Capture the pipe behind ``fd`` (either end) without consuming what it holds.

    ``packet`` says whether the pipe is in packet mode; by default it is True when ``fd``
    itself has ``O_DIRECT`` (a write end in packet mode) or when any queued buffer is a
    packet. Pass ``packet=True`` for an empty pipe known to be packetised, such as an autofs
    request pipe seen through its read end.
    """
    if not stat.S_ISFIFO(os.fstat(fd).st_mode):
        raise OSError(errno.EINVAL, f"snapshot_pipe: fd {fd} is not a pipe")
    fl = fcntl.fcntl(fd, fcntl.F_GETFL)
    is_write_end = fl & os.O_ACCMODE == os.O_WRONLY
    size = get_pipe_size(fd)
    packet_mode = bool(fl & os.O_DIRECT) if packet is None else packet
    nonblock = bool(fl & os.O_NONBLOCK) and not is_write_end
    src = _readable_fd(fd)
    try:
        if bytes_queued(src) == 0:
            return PipeImage(size=size, packet_mode=packet_mode, nonblock=nonblock)
        packets, data = _copy_out(src, size, packet_mode)
    finally:
        if src != fd:
            os.close(src)
    if packet is None and packets:
        packet_mode = True
    return PipeImage(
        size=size, packet_mode=packet_mode, nonblock=nonblock, packets=packets, data=data
    )


def _copy_out(src: int, size: int, packet_mode: bool) -> tuple[tuple[bytes, ...], bytes]:
    """tee everything ``src`` holds into a private pipe and read it back, packet by packet."""
    pr, pw = pipe2(PipeFlags.CLOEXEC | PipeFlags.NONBLOCK)
    try:
        # Same number of slots as the source, so every buffer reference fits.
        if get_pipe_size(pw) < size:
            set_pipe_size(pw, size)
        # tee always starts at the head of its input, so a second call would copy the same
        # buffers again: one call, asked for more than any pipe holds, takes the snapshot.
        try:
            total = tee(src, pw, _MAX_SIZE, SpliceFlags.NONBLOCK)
        except BlockingIOError:  # emptied since we looked
            total = 0
        packets: list[bytes] = []
        data = b""
        sentinel = _try_write_sentinel(pw)
        remaining = total
        while remaining:
            want = remaining + 1 if sentinel else remaining
            chunk = os.read(pr, want)
            n = len(chunk)
            if n == 0:
                raise OSError(errno.EIO, "snapshot_pipe: private copy ended early")
            if sentinel and n == want:
                data = chunk[:-1]  # reached the sentinel: plain data
                remaining = 0
            elif n < remaining or sentinel:
                packets.append(chunk)  # the read stopped at the end of a packet
                remaining -= n
            elif packet_mode:
                packets.append(chunk)  # the full single-slot case: trust the mode
                remaining = 0
            else:
                data = chunk
                remaining = 0
            if not sentinel and remaining:
                sentinel = _try_write_sentinel(pw)
        return tuple(packets), data
    finally:
        os.close(pr)
        os.close(pw)


def _write_all(fd: int, data: bytes, what: str) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            raise OSError(
                errno.ENOSPC, f"restore_pipe: {what} does not fit in the pipe's size"
            ) from None
        view = view[n:]


def restore_pipe(image: PipeImage, *, cloexec: bool = True) -> tuple[int, int]:
    """Make a new pipe like ``image``: returns ``(read_fd, write_fd)``.

    The size is set first, then the packets are written one ``write`` each with the write
    end in packet mode, then plain data, then the write end is left in ``image.packet_mode``
    (blocking) and the read end in ``image.nonblock``. Both fds are close-on-exec unless
    ``cloexec=False``. Contents that do not fit the size raise ``OSError(ENOSPC)``.
    """
    flags = PipeFlags.NONBLOCK | (PipeFlags.DIRECT if image.packets else PipeFlags.NONE)
    if cloexec:
        flags |= PipeFlags.CLOEXEC
    r, w = pipe2(flags)
    try:
        if get_pipe_size(w) != image.size:
            set_pipe_size(w, image.size)
        for i, packet in enumerate(image.packets):
            # A packet-mode write of up to a page is one buffer; EAGAIN means no free slot.
            _write_all(w, packet, f"packet {i} of {len(image.packets)}")
        if image.data:
            if image.packets:
                set_packet_mode(w, False)
            _write_all(w, image.data, f"{len(image.data)} bytes of data")
        set_packet_mode(w, image.packet_mode)
        os.set_blocking(w, True)
        if not image.nonblock:
            os.set_blocking(r, True)
    except BaseException:
        os.close(r)
        os.close(w)
        raise
    return r, w
