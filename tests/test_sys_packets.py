"""Packet decoding: every type, every malformed case, and arbitrary bytes."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyautofs.lowlevel import (
    ExpireDirect,
    ExpireIndirect,
    ExpireMultiV4,
    MissingDirect,
    MissingIndirect,
    MissingV4,
    PacketError,
    PacketType,
    decode_packet,
    encode_v4_packet,
    encode_v5_packet,
)


@pytest.mark.parametrize(
    ("ptype", "cls"),
    [
        (PacketType.MISSING_INDIRECT, MissingIndirect),
        (PacketType.EXPIRE_INDIRECT, ExpireIndirect),
        (PacketType.MISSING_DIRECT, MissingDirect),
        (PacketType.EXPIRE_DIRECT, ExpireDirect),
    ],
)
def test_v5_types(ptype: PacketType, cls: type) -> None:
    raw = encode_v5_packet(ptype, 7, b"key", dev=39, ino=1234, uid=1, gid=2, pid=3, tgid=4)
    assert len(raw) == 304
    pkt = decode_packet(raw)
    assert isinstance(pkt, cls)
    assert isinstance(pkt, (MissingIndirect, MissingDirect, ExpireIndirect, ExpireDirect))
    assert (pkt.token, pkt.dev, pkt.ino, pkt.uid, pkt.gid, pkt.pid, pkt.tgid, pkt.name) == (
        7,
        39,
        1234,
        1,
        2,
        3,
        4,
        b"key",
    )


@pytest.mark.parametrize("version", [3, 4])
def test_v4_types(version: int) -> None:
    m = decode_packet(encode_v4_packet(PacketType.MISSING, 9, b"k", version=version))
    assert isinstance(m, MissingV4) and (m.token, m.name, m.proto_version) == (9, b"k", version)
    e = decode_packet(encode_v4_packet(PacketType.EXPIRE_MULTI, 10, b"e", version=version))
    assert isinstance(e, ExpireMultiV4) and e.token == 10


def _v5(name_field: bytes, length: int, ptype: int = 3, version: int = 5) -> bytes:
    return struct.pack("=iiIIQIIIII256s4x", version, ptype, 1, 0, 0, 0, 0, 0, 0, length, name_field)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"", "short packet"),
        (b"\x05\0\0\0", "short packet"),
        (encode_v5_packet(PacketType.MISSING_INDIRECT, 1, b"k")[:300], "must be 304 bytes"),
        (encode_v5_packet(PacketType.MISSING_INDIRECT, 1, b"k") + b"x", "must be 304 bytes"),
        (encode_v4_packet(PacketType.MISSING, 1, b"k")[:271], "must be 272 bytes"),
        (_v5(b"k", 1, ptype=1), "unknown packet type 1"),
        (_v5(b"k", 1, ptype=99), "unknown packet type 99"),
        (_v5(b"abc", 2), "disagrees"),
        (_v5(b"x" * 256, 256), "not NUL-terminated"),
        (_v5(b"", 0), "empty name"),
        (_v5(b"a/b", 3), "contains '/'"),
        (_v5(b"k", 1, version=4), "protocol version 4"),
    ],
)
def test_malformed(raw: bytes, message: str) -> None:
    with pytest.raises(PacketError, match=message):
        decode_packet(raw)


@given(st.binary(max_size=400))
def test_arbitrary_bytes_give_a_packet_or_packet_error(raw: bytes) -> None:
    try:
        decode_packet(raw)
    except PacketError:
        pass


@given(st.integers(0, 303), st.integers(0, 255))
def test_mutated_packets_give_a_packet_or_packet_error(offset: int, byte: int) -> None:
    raw = bytearray(encode_v5_packet(PacketType.MISSING_INDIRECT, 5, b"somekey"))
    raw[offset] = byte
    try:
        decode_packet(bytes(raw))
    except PacketError:
        pass
