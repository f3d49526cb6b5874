"""uapi struct layouts and ioctl numbers, pinned to the kernel's x86_64 values."""

from __future__ import annotations

import ctypes
import platform

import pytest

from pyautofs.lowlevel import (
    AutofsDevIoctl,
    AutofsPacketExpire,
    AutofsPacketExpireMulti,
    AutofsPacketMissing,
    AutofsV5Packet,
    DevIoctl,
    LegacyIoctl,
)

x86_64 = pytest.mark.skipif(platform.machine() != "x86_64", reason="values are x86_64's")


def test_struct_sizes() -> None:
    assert ctypes.sizeof(AutofsDevIoctl) == 24
    assert ctypes.sizeof(AutofsV5Packet) == 304
    assert ctypes.sizeof(AutofsPacketMissing) == 272
    assert ctypes.sizeof(AutofsPacketExpireMulti) == 272
    assert ctypes.sizeof(AutofsPacketExpire) == 268


def test_dev_ioctl_offsets() -> None:
    assert [
        getattr(AutofsDevIoctl, f).offset
        for f in ("ver_major", "ver_minor", "size", "ioctlfd", "arg")
    ] == [
        0,
        4,
        8,
        12,
        16,
    ]
    hdr = AutofsDevIoctl()
    base = ctypes.addressof(hdr)
    assert ctypes.addressof(hdr.arg.fail) - base == 16
    assert type(hdr.arg.fail).status.offset == 4  # fail.status at 20
    assert type(hdr.arg.timeout).timeout.size == 8
    assert type(hdr.arg.requester).gid.offset == 4  # requester.gid at 20
    assert type(hdr.arg.ismountpoint.out).magic.offset == 4  # out.magic at 20


def test_v5_packet_offsets() -> None:
    offsets = {name: getattr(AutofsV5Packet, name).offset for name, *_ in AutofsV5Packet._fields_}
    assert offsets == {
        "hdr": 0,
        "wait_queue_token": 8,
        "dev": 12,
        "ino": 16,
        "uid": 24,
        "gid": 28,
        "pid": 32,
        "tgid": 36,
        "len": 40,
        "name": 44,
    }
    assert AutofsPacketMissing.name.offset == 16
    assert AutofsPacketExpire.name.offset == 12


@x86_64
def test_dev_ioctl_numbers() -> None:
    expected = {name: 0xC0189371 + i for i, name in enumerate(DevIoctl.__members__)}
    assert {m.name: m.value for m in DevIoctl} == expected
    assert int(DevIoctl.ISMOUNTPOINT) == 0xC018937E


@x86_64
def test_legacy_ioctl_numbers() -> None:
    assert int(LegacyIoctl.READY) == 0x00009360
    assert int(LegacyIoctl.FAIL) == 0x00009361
    assert int(LegacyIoctl.CATATONIC) == 0x00009362
    assert int(LegacyIoctl.PROTOVER) == 0x80049363
    assert int(LegacyIoctl.SETTIMEOUT) == 0xC0089364
    assert int(LegacyIoctl.SETTIMEOUT32) == 0xC0049364
    assert int(LegacyIoctl.EXPIRE) == 0x810C9365
    assert int(LegacyIoctl.EXPIRE_MULTI) == 0x40049366
    assert int(LegacyIoctl.PROTOSUBVER) == 0x80049367
    assert int(LegacyIoctl.ASKUMOUNT) == 0x80049370
