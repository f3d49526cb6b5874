"""ctypes mirrors of the autofs uapi structs (``linux/auto_fs.h``, ``linux/auto_dev-ioctl.h``).

Sizes and offsets are pinned by ``tests/test_uapi.py`` against the values the kernel's own
headers give on x86_64: ``autofs_dev_ioctl`` 24 bytes plus the path, ``autofs_v5_packet``
304, ``autofs_packet_missing`` and ``autofs_packet_expire_multi`` 272,
``autofs_packet_expire`` 268.

``autofs_wqt_t`` (the wait-queue token) is ``unsigned int`` everywhere but ia64 and alpha,
which Linux no longer supports, so it is a ``c_uint`` here.
"""

from __future__ import annotations

import ctypes

__all__ = [
    "NAME_MAX",
    "AUTOFS_DEV_IOCTL_VERSION_MAJOR",
    "AUTOFS_DEV_IOCTL_VERSION_MINOR",
    "AutofsDevIoctl",
    "AutofsPacketHdr",
    "AutofsPacketMissing",
    "AutofsPacketExpire",
    "AutofsPacketExpireMulti",
    "AutofsV5Packet",
    "dev_ioctl_buffer",
]

NAME_MAX = 255
AUTOFS_DEV_IOCTL_VERSION_MAJOR = 1
AUTOFS_DEV_IOCTL_VERSION_MINOR = 1


class _ArgsProtover(ctypes.Structure):
    _fields_ = (("version", ctypes.c_uint32),)


class _ArgsProtosubver(ctypes.Structure):
    _fields_ = (("sub_version", ctypes.c_uint32),)


class _ArgsOpenmount(ctypes.Structure):
    _fields_ = (("devid", ctypes.c_uint32),)


class _ArgsReady(ctypes.Structure):
    _fields_ = (("token", ctypes.c_uint32),)


class _ArgsFail(ctypes.Structure):
    _fields_ = (("token", ctypes.c_uint32), ("status", ctypes.c_int32))


class _ArgsSetpipefd(ctypes.Structure):
    _fields_ = (("pipefd", ctypes.c_int32),)


class _ArgsTimeout(ctypes.Structure):
    _fields_ = (("timeout", ctypes.c_uint64),)


class _ArgsRequester(ctypes.Structure):
    _fields_ = (("uid", ctypes.c_uint32), ("gid", ctypes.c_uint32))


class _ArgsExpire(ctypes.Structure):
    _fields_ = (("how", ctypes.c_uint32),)


class _ArgsAskumount(ctypes.Structure):
    _fields_ = (("may_umount", ctypes.c_uint32),)


class _ArgsIsmountpointIn(ctypes.Structure):
    _fields_ = (("type", ctypes.c_uint32),)


class _ArgsIsmountpointOut(ctypes.Structure):
    _fields_ = (("devid", ctypes.c_uint32), ("magic", ctypes.c_uint32))


class _ArgsIsmountpoint(ctypes.Union):
    _fields_ = (("in_", _ArgsIsmountpointIn), ("out", _ArgsIsmountpointOut))


class _DevIoctlArgs(ctypes.Union):
    _fields_ = (
        ("protover", _ArgsProtover),
        ("protosubver", _ArgsProtosubver),
        ("openmount", _ArgsOpenmount),
        ("ready", _ArgsReady),
        ("fail", _ArgsFail),
        ("setpipefd", _ArgsSetpipefd),
        ("timeout", _ArgsTimeout),
        ("requester", _ArgsRequester),
        ("expire", _ArgsExpire),
        ("askumount", _ArgsAskumount),
        ("ismountpoint", _ArgsIsmountpoint),
    )


class AutofsDevIoctl(ctypes.Structure):
    """``struct autofs_dev_ioctl``: the 24-byte header of every /dev/autofs command.

    A command that names a path is sent as this header followed by the NUL-terminated path,
    with ``size`` covering both; see :func:`dev_ioctl_buffer`.
    """

    _fields_ = (
        ("ver_major", ctypes.c_uint32),
        ("ver_minor", ctypes.c_uint32),
        ("size", ctypes.c_uint32),
        ("ioctlfd", ctypes.c_int32),
        ("arg", _DevIoctlArgs),
    )


def dev_ioctl_buffer(ioctlfd: int = -1, path: bytes | None = None) -> ctypes.Array[ctypes.c_char]:
    """A zeroed, initialised ``autofs_dev_ioctl`` with room for ``path`` after the header.

    Returns the raw buffer; view its header with ``AutofsDevIoctl.from_buffer(buf)``.
    """
    header = ctypes.sizeof(AutofsDevIoctl)
    size = header if path is None else header + len(path) + 1
    buf = ctypes.create_string_buffer(size)
    hdr = AutofsDevIoctl.from_buffer(buf)
    hdr.ver_major = AUTOFS_DEV_IOCTL_VERSION_MAJOR
    hdr.ver_minor = AUTOFS_DEV_IOCTL_VERSION_MINOR
    hdr.size = size
    hdr.ioctlfd = ioctlfd
    if path is not None:
        ctypes.memmove(ctypes.addressof(buf) + header, path, len(path))
    return buf


class AutofsPacketHdr(ctypes.Structure):
    """``struct autofs_packet_hdr``: protocol version and packet type."""

    _fields_ = (("proto_version", ctypes.c_int), ("type", ctypes.c_int))


class AutofsPacketMissing(ctypes.Structure):
    """``struct autofs_packet_missing``: a v3/v4 mount request (272 bytes)."""

    _fields_ = (
        ("hdr", AutofsPacketHdr),
        ("wait_queue_token", ctypes.c_uint),
        ("len", ctypes.c_int),
        ("name", ctypes.c_char * (NAME_MAX + 1)),
    )


class AutofsPacketExpire(ctypes.Structure):
    """``struct autofs_packet_expire``: the v3 result of ``AUTOFS_IOC_EXPIRE`` (268 bytes)."""

    _fields_ = (
        ("hdr", AutofsPacketHdr),
        ("len", ctypes.c_int),
        ("name", ctypes.c_char * (NAME_MAX + 1)),
    )


class AutofsPacketExpireMulti(ctypes.Structure):
    """``struct autofs_packet_expire_multi``: a v4 expire request (272 bytes)."""

    _fields_ = (
        ("hdr", AutofsPacketHdr),
        ("wait_queue_token", ctypes.c_uint),
        ("len", ctypes.c_int),
        ("name", ctypes.c_char * (NAME_MAX + 1)),
    )


class AutofsV5Packet(ctypes.Structure):
    """``struct autofs_v5_packet``: every v5 request, missing or expire (304 bytes)."""

    _fields_ = (
        ("hdr", AutofsPacketHdr),
        ("wait_queue_token", ctypes.c_uint),
        ("dev", ctypes.c_uint32),
        ("ino", ctypes.c_uint64),
        ("uid", ctypes.c_uint32),
        ("gid", ctypes.c_uint32),
        ("pid", ctypes.c_uint32),
        ("tgid", ctypes.c_uint32),
        ("len", ctypes.c_uint32),
        ("name", ctypes.c_char * (NAME_MAX + 1)),
    )
