"""ioctl command numbers, computed with the kernel's ``_IOC`` encoding.

The asm-generic encoding (x86_64, aarch64, riscv64, s390x, loongarch64) packs a command as
``dir << 30 | size << 16 | type << 8 | nr``, with ``_IOC_WRITE = 1`` and ``_IOC_READ = 2``.
powerpc, mips and sparc use a different layout (3 direction bits, 13 size bits, and
``_IOC_WRITE = 4``); :func:`ioc` follows the machine it runs on.

The legacy per-mount autofs ioctls were declared with the C type of their argument, so their
size field depends on the ABI: ``AUTOFS_IOC_SETTIMEOUT`` takes an ``unsigned long``, which
is why a 32-bit daemon on a 64-bit kernel needs a compat number.
"""

from __future__ import annotations

import enum
import platform

__all__ = [
    "ioc",
    "io",
    "ior",
    "iow",
    "iowr",
    "AUTOFS_IOCTL",
    "DevIoctl",
    "LegacyIoctl",
    "FIONREAD",
]

_MACHINE = platform.machine()
if _MACHINE.startswith(("ppc", "powerpc", "mips", "sparc")):
    _IOC_SIZEBITS, _IOC_NONE, _IOC_WRITE, _IOC_READ = 13, 1, 4, 2
else:
    _IOC_SIZEBITS, _IOC_NONE, _IOC_WRITE, _IOC_READ = 14, 0, 1, 2
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = 8
_IOC_SIZESHIFT = 16
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS


def ioc(direction: int, type_: int, nr: int, size: int) -> int:
    """Encode an ioctl number like the kernel's ``_IOC(dir, type, nr, size)``."""
    if not 0 <= size < (1 << _IOC_SIZEBITS):
        raise ValueError(f"ioctl argument size {size} does not fit in {_IOC_SIZEBITS} bits")
    return (
        (direction << _IOC_DIRSHIFT)
        | (type_ << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
        | (size << _IOC_SIZESHIFT)
    )


def io(type_: int, nr: int) -> int:
    """``_IO(type, nr)``: no argument."""
    return ioc(_IOC_NONE, type_, nr, 0)


def ior(type_: int, nr: int, size: int) -> int:
    """``_IOR(type, nr, size)``: the kernel writes ``size`` bytes."""
    return ioc(_IOC_READ, type_, nr, size)


def iow(type_: int, nr: int, size: int) -> int:
    """``_IOW(type, nr, size)``: the kernel reads ``size`` bytes."""
    return ioc(_IOC_WRITE, type_, nr, size)


def iowr(type_: int, nr: int, size: int) -> int:
    """``_IOWR(type, nr, size)``: both directions."""
    return ioc(_IOC_READ | _IOC_WRITE, type_, nr, size)


AUTOFS_IOCTL = 0x93
"""The autofs ioctl type byte, shared by the legacy and the /dev/autofs commands."""

_DEV_IOCTL_SIZE = 24  # sizeof(struct autofs_dev_ioctl) without the path
_SIZEOF_INT = 4
_SIZEOF_LONG = 8 if platform.architecture()[0] == "64bit" else 4
_SIZEOF_PACKET_EXPIRE = 268  # struct autofs_packet_expire


class DevIoctl(enum.IntEnum):
    """``AUTOFS_DEV_IOCTL_*``: the commands of the ``/dev/autofs`` control device."""

    VERSION = iowr(AUTOFS_IOCTL, 0x71, _DEV_IOCTL_SIZE)
    PROTOVER = iowr(AUTOFS_IOCTL, 0x72, _DEV_IOCTL_SIZE)
    PROTOSUBVER = iowr(AUTOFS_IOCTL, 0x73, _DEV_IOCTL_SIZE)
    OPENMOUNT = iowr(AUTOFS_IOCTL, 0x74, _DEV_IOCTL_SIZE)
    CLOSEMOUNT = iowr(AUTOFS_IOCTL, 0x75, _DEV_IOCTL_SIZE)
    READY = iowr(AUTOFS_IOCTL, 0x76, _DEV_IOCTL_SIZE)
    FAIL = iowr(AUTOFS_IOCTL, 0x77, _DEV_IOCTL_SIZE)
    SETPIPEFD = iowr(AUTOFS_IOCTL, 0x78, _DEV_IOCTL_SIZE)
    CATATONIC = iowr(AUTOFS_IOCTL, 0x79, _DEV_IOCTL_SIZE)
    TIMEOUT = iowr(AUTOFS_IOCTL, 0x7A, _DEV_IOCTL_SIZE)
    REQUESTER = iowr(AUTOFS_IOCTL, 0x7B, _DEV_IOCTL_SIZE)
    EXPIRE = iowr(AUTOFS_IOCTL, 0x7C, _DEV_IOCTL_SIZE)
    ASKUMOUNT = iowr(AUTOFS_IOCTL, 0x7D, _DEV_IOCTL_SIZE)
    ISMOUNTPOINT = iowr(AUTOFS_IOCTL, 0x7E, _DEV_IOCTL_SIZE)


class LegacyIoctl(enum.IntEnum):
    """``AUTOFS_IOC_*``: the per-mount ioctls issued on an fd of the autofs root."""

    READY = io(AUTOFS_IOCTL, 0x60)
    FAIL = io(AUTOFS_IOCTL, 0x61)
    CATATONIC = io(AUTOFS_IOCTL, 0x62)
    PROTOVER = ior(AUTOFS_IOCTL, 0x63, _SIZEOF_INT)
    SETTIMEOUT = iowr(AUTOFS_IOCTL, 0x64, _SIZEOF_LONG)
    SETTIMEOUT32 = iowr(AUTOFS_IOCTL, 0x64, 4)
    EXPIRE = ior(AUTOFS_IOCTL, 0x65, _SIZEOF_PACKET_EXPIRE)
    EXPIRE_MULTI = iow(AUTOFS_IOCTL, 0x66, _SIZEOF_INT)
    PROTOSUBVER = ior(AUTOFS_IOCTL, 0x67, _SIZEOF_INT)
    ASKUMOUNT = ior(AUTOFS_IOCTL, 0x70, _SIZEOF_INT)


FIONREAD = ior(ord("f"), 127, _SIZEOF_INT) if _IOC_SIZEBITS == 13 else 0x541B
"""Bytes queued in a pipe or socket (``TIOCINQ``). Generic arches kept the old i386 value."""
