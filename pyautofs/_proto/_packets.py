"""Decoding the packets the kernel writes into an autofs pipe. Bytes in, events out.

This module is pure: no I/O, no ctypes, no trio. The engine reads one packet per ``read``
(the pipe is in packet mode) and hands the bytes to :func:`decode_packet`.

Layouts (x86_64 and every other 64-bit Linux; see ``reference/autofs-kernel.md`` §1):

- v5 (``autofs_v5_packet``, 304 bytes): header (version, type), token, dev, ino (u64),
  uid, gid, pid, tgid, len, name[256], and 4 bytes of tail padding.
- v3/v4 (``autofs_packet_missing`` / ``autofs_packet_expire_multi``, 272 bytes): header,
  token, len, name[256].

The kernel zero-fills the packet, so the name is NUL-terminated within its 256 bytes and
``len`` equals the length up to the NUL. Anything else is malformed and raises
:class:`PacketError`: the engine logs it and keeps reading, since a packet with no valid
token cannot be answered anyway.
"""

from __future__ import annotations

import enum
import struct

import attrs

from ._errors import FormatError

__all__ = [
    "PacketType",
    "PacketError",
    "MissingIndirect",
    "MissingDirect",
    "ExpireIndirect",
    "ExpireDirect",
    "MissingV4",
    "ExpireMultiV4",
    "Packet",
    "V5_PACKET_SIZE",
    "V4_PACKET_SIZE",
    "decode_packet",
    "encode_v5_packet",
    "encode_v4_packet",
]

NAME_MAX = 255
V5_PACKET_SIZE = 304
V4_PACKET_SIZE = 272

_HDR = struct.Struct("=ii")
_V5 = struct.Struct("=iiIIQIIIII256s4x")
_V4 = struct.Struct("=iiIi256s")
assert _V5.size == V5_PACKET_SIZE and _V4.size == V4_PACKET_SIZE


class PacketType(enum.IntEnum):
    """``autofs_ptype_*``."""

    MISSING = 0
    """v3/v4 mount request."""
    EXPIRE = 1
    """v3 expire: only the result of the AUTOFS_IOC_EXPIRE ioctl, never on the pipe."""
    EXPIRE_MULTI = 2
    """v4 expire request."""
    MISSING_INDIRECT = 3
    EXPIRE_INDIRECT = 4
    MISSING_DIRECT = 5
    EXPIRE_DIRECT = 6


class PacketError(FormatError):
    """The bytes are not a packet the kernel could have written."""


@attrs.frozen
class _V5Base:
    """The fields every v5 request packet carries (the base of the four v5 packet types)."""

    token: int
    """The wait-queue token to answer with READY or FAIL, exactly once."""
    dev: int
    """``st_dev`` of the autofs mount the request is for."""
    ino: int
    """Inode of that mount's root (identifies a direct/offset mount together with dev)."""
    uid: int
    gid: int
    pid: int
    """The requesting thread (in the reader's pid namespace)."""
    tgid: int
    """The requesting process."""
    name: bytes
    """For indirect mounts the key; for direct/offset mounts a dummy (the root's hashed
    pointer, 16 hex digits): identify those by (dev, ino)."""
    proto_version: int = 5


@attrs.frozen
class MissingIndirect(_V5Base):
    """v5: a process looked up ``name`` in an indirect mount's root; mount it."""


@attrs.frozen
class MissingDirect(_V5Base):
    """v5: a process walked onto a direct or offset mount point; mount on top of it."""


@attrs.frozen
class ExpireIndirect(_V5Base):
    """v5: the kernel picked key ``name`` to expire; unmount it, then answer."""


@attrs.frozen
class ExpireDirect(_V5Base):
    """v5: the kernel picked a direct or offset mount to expire; unmount what covers it."""


@attrs.frozen
class MissingV4:
    """v3/v4: mount request for ``name``."""

    proto_version: int
    token: int
    name: bytes


@attrs.frozen
class ExpireMultiV4:
    """v4: expire request for ``name``."""

    proto_version: int
    token: int
    name: bytes


Packet = MissingIndirect | MissingDirect | ExpireIndirect | ExpireDirect | MissingV4 | ExpireMultiV4

_V5_TYPES: dict[int, type[MissingIndirect | MissingDirect | ExpireIndirect | ExpireDirect]] = {
    PacketType.MISSING_INDIRECT: MissingIndirect,
    PacketType.EXPIRE_INDIRECT: ExpireIndirect,
    PacketType.MISSING_DIRECT: MissingDirect,
    PacketType.EXPIRE_DIRECT: ExpireDirect,
}


def _name(raw: bytes, length: int) -> bytes:
    nul = raw.find(b"\0")
    if nul < 0:
        raise PacketError("name is not NUL-terminated within 256 bytes")
    if length != nul:
        raise PacketError(f"len={length} disagrees with the NUL-terminated name ({nul} bytes)")
    if nul == 0:
        raise PacketError("empty name")
    name = raw[:nul]
    if b"/" in name:
        raise PacketError(f"name {name!r} contains '/'")
    return name


def decode_packet(data: bytes | bytearray | memoryview) -> Packet:
    """Decode one packet as read from the pipe; raises :class:`PacketError` if malformed.

    A v5 packet must be exactly 304 bytes and a v3/v4 one 272 bytes (the kernel writes the
    whole struct, and the pipe's packet mode keeps one packet per read).
    """
    size = len(data)
    if size < _HDR.size:
        raise PacketError(f"short packet: {size} bytes")
    version, ptype = _HDR.unpack_from(data)
    if ptype in _V5_TYPES:
        if size != V5_PACKET_SIZE:
            raise PacketError(
                f"v5 packet of type {ptype} must be {V5_PACKET_SIZE} bytes, not {size}"
            )
        if version != 5:
            raise PacketError(f"packet type {ptype} with protocol version {version}")
        _, _, token, dev, ino, uid, gid, pid, tgid, length, raw = _V5.unpack(data)
        return _V5_TYPES[ptype](token, dev, ino, uid, gid, pid, tgid, _name(raw, length))
    if ptype in (PacketType.MISSING, PacketType.EXPIRE_MULTI):
        if size != V4_PACKET_SIZE:
            raise PacketError(
                f"v3/v4 packet of type {ptype} must be {V4_PACKET_SIZE} bytes, not {size}"
            )
        if version not in (3, 4):
            raise PacketError(f"packet type {ptype} with protocol version {version}")
        _, _, token, length, raw = _V4.unpack(data)
        cls = MissingV4 if ptype == PacketType.MISSING else ExpireMultiV4
        return cls(version, token, _name(raw, length))
    raise PacketError(f"unknown packet type {ptype}")


def encode_v5_packet(
    ptype: PacketType,
    token: int,
    name: bytes,
    *,
    dev: int = 0,
    ino: int = 0,
    uid: int = 0,
    gid: int = 0,
    pid: int = 0,
    tgid: int = 0,
) -> bytes:
    """Build a v5 packet as the kernel would (for tests, replays and pipe images)."""
    return _V5.pack(5, int(ptype), token, dev, ino, uid, gid, pid, tgid, len(name), name)


def encode_v4_packet(ptype: PacketType, token: int, name: bytes, *, version: int = 4) -> bytes:
    """Build a v3/v4 packet as the kernel would."""
    return _V4.pack(version, int(ptype), token, len(name), name)
