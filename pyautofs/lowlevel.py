"""The raw bindings: ioctls, uapi structs, mount syscalls, mountinfo, pipes, packets.

For people who build their own engine. This module only re-exports.
"""

from __future__ import annotations

# -- the fd-message protocol, sans I/O (_proto._fdmsg)
from ._proto._fdmsg import FdMessageReader as FdMessageReader
from ._proto._fdmsg import ancillary as ancillary
from ._proto._fdmsg import encode_message as encode_message
from ._proto._fdmsg import single_record_fds as single_record_fds
from ._proto._moved import Getattr as _Getattr
from ._proto._moved import moved_names as _moved_names

# -- packets (_proto._packets)
from ._proto._packets import ExpireDirect as ExpireDirect
from ._proto._packets import ExpireIndirect as ExpireIndirect
from ._proto._packets import ExpireMultiV4 as ExpireMultiV4
from ._proto._packets import MissingDirect as MissingDirect
from ._proto._packets import MissingIndirect as MissingIndirect
from ._proto._packets import MissingV4 as MissingV4
from ._proto._packets import Packet as Packet
from ._proto._packets import PacketError as PacketError
from ._proto._packets import PacketType as PacketType
from ._proto._packets import decode_packet as decode_packet
from ._proto._packets import encode_v4_packet as encode_v4_packet
from ._proto._packets import encode_v5_packet as encode_v5_packet

# -- /dev/autofs and the legacy ioctls (_sys._autofs)
from ._sys._autofs import AUTOFS_DEVICE as AUTOFS_DEVICE
from ._sys._autofs import AUTOFS_SUPER_MAGIC as AUTOFS_SUPER_MAGIC
from ._sys._autofs import AutofsControl as AutofsControl
from ._sys._autofs import AutofsType as AutofsType
from ._sys._autofs import ExpireFlags as ExpireFlags
from ._sys._autofs import LegacyMountRoot as LegacyMountRoot
from ._sys._autofs import MountPointStatus as MountPointStatus

# -- ioctl numbers and uapi structs (_sys._ioctl, _sys._uapi)
from ._sys._ioctl import DevIoctl as DevIoctl
from ._sys._ioctl import LegacyIoctl as LegacyIoctl
from ._sys._ioctl import ioc as ioc

# -- mounting (_sys._mount)
from ._sys._mount import AutofsOptions as AutofsOptions
from ._sys._mount import FsContext as FsContext
from ._sys._mount import MountFlags as MountFlags
from ._sys._mount import UmountFlags as UmountFlags
from ._sys._mount import mount as mount
from ._sys._mount import mount_autofs as mount_autofs
from ._sys._mount import move_mount as move_mount
from ._sys._mount import umount2 as umount2
from ._sys._mount import unshare_mount_namespace as unshare_mount_namespace

# -- mountinfo and /proc (_sys._mountinfo)
from ._sys._mountinfo import AutofsMount as AutofsMount
from ._sys._mountinfo import MountInfo as MountInfo
from ._sys._mountinfo import PipeHolder as PipeHolder
from ._sys._mountinfo import autofs_mounts as autofs_mounts
from ._sys._mountinfo import find_autofs_mount as find_autofs_mount
from ._sys._mountinfo import find_pipe_holders as find_pipe_holders
from ._sys._mountinfo import parse_mountinfo as parse_mountinfo
from ._sys._mountinfo import read_mountinfo as read_mountinfo

# -- an autofs mount this process owns, driven synchronously (_sys._owned)
from ._sys._owned import OwnedAutofsMount as OwnedAutofsMount
from ._sys._owned import adopt_owned as adopt_owned
from ._sys._owned import mount_owned as mount_owned
from ._sys._owned import request_pipe as request_pipe

# -- pipes (_sys._pipes)
from ._sys._pipes import PAGE_SIZE as PAGE_SIZE
from ._sys._pipes import PipeFlags as PipeFlags
from ._sys._pipes import SpliceFlags as SpliceFlags
from ._sys._pipes import bytes_queued as bytes_queued
from ._sys._pipes import get_pipe_size as get_pipe_size
from ._sys._pipes import packet_mode as packet_mode
from ._sys._pipes import pipe2 as pipe2
from ._sys._pipes import pipe_inode as pipe_inode
from ._sys._pipes import pipe_max_size as pipe_max_size
from ._sys._pipes import set_packet_mode as set_packet_mode
from ._sys._pipes import set_pipe_size as set_pipe_size
from ._sys._pipes import splice as splice
from ._sys._pipes import tee as tee

# -- trusting a path or a program before running it (_sys._trust)
from ._sys._trust import SAFE_PATH as SAFE_PATH
from ._sys._trust import UntrustedPathError as UntrustedPathError
from ._sys._trust import check_trusted as check_trusted
from ._sys._trust import trusted_program as trusted_program

# -- uapi structs (_sys._uapi)
from ._sys._uapi import AutofsDevIoctl as AutofsDevIoctl
from ._sys._uapi import AutofsPacketExpire as AutofsPacketExpire
from ._sys._uapi import AutofsPacketExpireMulti as AutofsPacketExpireMulti
from ._sys._uapi import AutofsPacketMissing as AutofsPacketMissing
from ._sys._uapi import AutofsV5Packet as AutofsV5Packet

# -- fd passing (_sys._scm)

__all__ = [
    "ExpireDirect",
    "ExpireIndirect",
    "ExpireMultiV4",
    "MissingDirect",
    "MissingIndirect",
    "MissingV4",
    "Packet",
    "PacketError",
    "PacketType",
    "decode_packet",
    "encode_v4_packet",
    "encode_v5_packet",
    "AUTOFS_DEVICE",
    "AUTOFS_SUPER_MAGIC",
    "AutofsControl",
    "OwnedAutofsMount",
    "adopt_owned",
    "mount_owned",
    "request_pipe",
    "AutofsType",
    "ExpireFlags",
    "LegacyMountRoot",
    "MountPointStatus",
    "DevIoctl",
    "LegacyIoctl",
    "ioc",
    "AutofsOptions",
    "FsContext",
    "MountFlags",
    "UmountFlags",
    "mount",
    "mount_autofs",
    "move_mount",
    "umount2",
    "unshare_mount_namespace",
    "AutofsMount",
    "MountInfo",
    "PipeHolder",
    "autofs_mounts",
    "find_autofs_mount",
    "find_pipe_holders",
    "parse_mountinfo",
    "read_mountinfo",
    "PAGE_SIZE",
    "PipeFlags",
    "SpliceFlags",
    "bytes_queued",
    "get_pipe_size",
    "packet_mode",
    "pipe2",
    "pipe_inode",
    "pipe_max_size",
    "set_packet_mode",
    "set_pipe_size",
    "splice",
    "tee",
    "AutofsDevIoctl",
    "AutofsPacketExpire",
    "AutofsPacketExpireMulti",
    "AutofsPacketMissing",
    "AutofsV5Packet",
    "FdMessageReader",
    "ancillary",
    "encode_message",
    "single_record_fds",
    "SAFE_PATH",
    "UntrustedPathError",
    "check_trusted",
    "trusted_program",
]

# Names that moved to another facade still import from here for one release, with a
# DeprecationWarning, and are the same objects.
__getattr__: _Getattr = _moved_names(
    __name__,
    {
        "Adopted": "pyautofs.restore",
        "AutofsHandover": "pyautofs.restore",
        "AutofsMode": "pyautofs",
        "PipeHandover": "pyautofs.restore",
        "adopt_handover": "pyautofs.restore",
        "autofs_pipe_image": "pyautofs.restore",
        "handover_for": "pyautofs.restore",
        "receive_handover": "pyautofs.restore",
        "recreate_autofs_mount": "pyautofs.restore",
        "send_confirmation": "pyautofs.restore",
        "send_handover": "pyautofs.restore",
        "take_over_autofs_mount": "pyautofs.restore",
        "wait_confirmation": "pyautofs.restore",
    },
)
