"""mount(2), umount2(2), the new mount API, and the autofs mount options.

The new mount API (``fsopen``/``fsconfig``/``fsmount``/``move_mount``, Linux >= 5.2) has no
glibc wrappers in Debian 12, so it goes through ``syscall(2)``. Its great advantage over
mount(2) is the error channel: the kernel writes a message such as
``e autofs: Unknown parameter 'timeout'`` into the fs_context fd, and :class:`FsContext`
reads it into the raised ``OSError``.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import os
from typing import Any

import attrs

from ._fdobject import FdObject
from ._libc import call, libc, raise_errno, syscall_number

__all__ = [
    "MountFlags",
    "UmountFlags",
    "AutofsMode",
    "AutofsOptions",
    "FsContext",
    "mount",
    "umount2",
    "mount_autofs",
    "move_mount",
    "bind_fd",
    "unshare_mount_namespace",
]


class MountFlags(enum.IntFlag):
    """``MS_*`` flags of mount(2)."""

    NONE = 0
    RDONLY = 1
    NOSUID = 2
    NODEV = 4
    NOEXEC = 8
    SYNCHRONOUS = 16
    REMOUNT = 32
    MANDLOCK = 64
    DIRSYNC = 128
    NOSYMFOLLOW = 256
    NOATIME = 1024
    NODIRATIME = 2048
    BIND = 4096
    MOVE = 8192
    REC = 16384
    SILENT = 32768
    UNBINDABLE = 1 << 17
    PRIVATE = 1 << 18
    SLAVE = 1 << 19
    SHARED = 1 << 20
    RELATIME = 1 << 21
    STRICTATIME = 1 << 24
    LAZYTIME = 1 << 25


class UmountFlags(enum.IntFlag):
    """Flags of umount2(2)."""

    NONE = 0
    FORCE = 1
    """MNT_FORCE: abort pending requests (network filesystems)."""
    DETACH = 2
    """MNT_DETACH: lazy unmount: detach now, clean up when no longer busy."""
    EXPIRE = 4
    """MNT_EXPIRE: mark for expiry; a second call unmounts if unused since (EAGAIN first)."""
    NOFOLLOW = 8
    """UMOUNT_NOFOLLOW: do not follow a symlink in the target."""


def _opt(value: str | bytes | os.PathLike[str] | None) -> bytes | None:
    return None if value is None else os.fsencode(value)


def mount(
    source: str | bytes | os.PathLike[str] | None,
    target: str | bytes | os.PathLike[str],
    fstype: str | bytes | None,
    flags: MountFlags = MountFlags.NONE,
    data: str | bytes | None = None,
) -> None:
    """mount(2). Errors name the target: ``OSError(errno, "mount(fstype): ...", target)``."""
    try:
        call(
            libc.mount,
            _opt(source),
            os.fsencode(target),
            _opt(fstype),
            int(flags),
            _opt(data),
        )
    except OSError as exc:
        assert exc.errno is not None
        kind = (
            os.fsdecode(fstype)
            if fstype
            else "MS_" + "|".join(f.name or "?" for f in MountFlags if f and f in flags)
        )
        raise_errno(exc.errno, f"mount({kind})", target)


def umount2(target: str | bytes | os.PathLike[str], flags: UmountFlags = UmountFlags.NONE) -> None:
    """umount2(2)."""
    try:
        call(libc.umount2, os.fsencode(target), int(flags))
    except OSError as exc:
        assert exc.errno is not None
        raise_errno(exc.errno, "umount2", target)


def unshare_mount_namespace(make_private: bool = True) -> None:
    """Move this process into a new mount namespace, optionally making ``/`` rprivate.

    Must be called while the process has a single thread.
    """
    call(libc.unshare, 0x00020000)  # CLONE_NEWNS
    if make_private:
        mount("none", "/", None, MountFlags.REC | MountFlags.PRIVATE)


# -- autofs options ----------------------------------------------------------------------


class AutofsMode(enum.Enum):
    """The three kinds of autofs mount."""

    INDIRECT = "indirect"
    """Keys are names in the root; the daemon mounts on ``root/key``."""
    DIRECT = "direct"
    """The root itself is the trigger; the daemon mounts on top of it."""
    OFFSET = "offset"
    """Like direct, for the offsets of a multi-mount entry."""


def _nonneg(instance: object, attribute: attrs.Attribute[Any], value: int | None) -> None:
    if value is not None and value < 0:
        raise ValueError(f"autofs option {attribute.name}= must be >= 0, not {value}")


@attrs.frozen
class AutofsOptions:
    """The options the kernel accepts for an autofs mount (``inode.c: autofs_param_specs``).

    ``fd`` is the write end of the request pipe. ``pgrp`` is the owner process group: the
    processes that answer the kernel and never trigger mounts (default: the mounter's).
    There is no ``timeout`` option: the kernel rejects it; set the timeout with the TIMEOUT
    ioctl (:meth:`AutofsControl.set_timeout`) after mounting.
    """

    fd: int = attrs.field(validator=_nonneg)
    pgrp: int | None = attrs.field(default=None, validator=_nonneg)
    uid: int | None = attrs.field(default=None, validator=_nonneg)
    gid: int | None = attrs.field(default=None, validator=_nonneg)
    minproto: int = attrs.field(default=5)
    maxproto: int = attrs.field(default=5)
    mode: AutofsMode = AutofsMode.INDIRECT
    strictexpire: bool = False
    ignore: bool = False

    @minproto.validator
    def _check_minproto(self, attribute: attrs.Attribute[int], value: int) -> None:
        if not 3 <= value <= 5:
            raise ValueError(f"minproto must be 3..5, not {value}")

    @maxproto.validator
    def _check_maxproto(self, attribute: attrs.Attribute[int], value: int) -> None:
        if value < max(3, self.minproto):
            raise ValueError(f"maxproto must be >= minproto and >= 3, not {value}")

    @classmethod
    def from_string(cls, text: str) -> AutofsOptions:
        """Parse a mount option string such as ``fd=4,pgrp=12,minproto=5,maxproto=5,direct``.

        ``timeout=`` is refused with a pointer to the TIMEOUT ioctl, as the kernel would.
        """
        kwargs: dict[str, object] = {}
        for item in filter(None, text.split(",")):
            name, _, value = item.partition("=")
            if name in ("fd", "pgrp", "uid", "gid", "minproto", "maxproto"):
                kwargs[name] = int(value)
            elif name in ("indirect", "direct", "offset"):
                kwargs["mode"] = AutofsMode(name)
            elif name in ("strictexpire", "ignore"):
                kwargs[name] = True
            elif name == "timeout":
                raise ValueError(_TIMEOUT_HINT)
            else:
                raise ValueError(f"unknown autofs mount option {item!r}")
        return cls(**kwargs)  # type: ignore[arg-type]

    def pairs(self) -> list[tuple[str, str | None]]:
        """The options as (name, value) pairs; value None for a flag."""
        out: list[tuple[str, str | None]] = [("fd", str(self.fd))]
        for name in ("pgrp", "uid", "gid"):
            value = getattr(self, name)
            if value is not None:
                out.append((name, str(value)))
        out.append(("minproto", str(self.minproto)))
        out.append(("maxproto", str(self.maxproto)))
        out.append((self.mode.value, None))
        if self.strictexpire:
            out.append(("strictexpire", None))
        if self.ignore:
            out.append(("ignore", None))
        return out

    def to_string(self) -> str:
        """The option string for mount(2)'s data argument."""
        return ",".join(
            name if value is None else f"{name}={value}" for name, value in self.pairs()
        )


_TIMEOUT_HINT = (
    "autofs has no 'timeout' mount option (the kernel rejects it): mount first, then set "
    "the timeout with the TIMEOUT ioctl (AutofsControl.set_timeout)"
)


# -- the new mount API -------------------------------------------------------------------

_FSOPEN_CLOEXEC = 0x1
_FSMOUNT_CLOEXEC = 0x1
_FSCONFIG_SET_FLAG = 0
_FSCONFIG_SET_STRING = 1
_FSCONFIG_SET_FD = 5
_FSCONFIG_CMD_CREATE = 6
_MOVE_MOUNT_F_EMPTY_PATH = 0x4
_AT_FDCWD = -100


class FsContext(FdObject):
    """A filesystem context from ``fsopen(2)``: configure, create, then mount.

    Errors carry the kernel's own message from the context's log, for example
    ``fsconfig(timeout): Invalid argument: autofs: Unknown parameter 'timeout'``.
    """

    __slots__ = ("fstype",)

    def __init__(self, fstype: str) -> None:
        self.fstype: str = fstype
        super().__init__(
            call(
                libc.syscall,
                ctypes.c_long(syscall_number("fsopen")),
                fstype.encode(),
                ctypes.c_uint(_FSOPEN_CLOEXEC),
            )
        )

    def _messages(self) -> str:
        """Drain the context's message log (each read returns one message)."""
        messages = []
        while True:
            try:
                msg = os.read(self._fd, 1024)
            except OSError:
                break
            if not msg:
                break
            messages.append(msg.decode(errors="replace").rstrip("\n"))
        # Lines start with "e ", "w " or "i " (error, warning, info).
        return "; ".join(m[2:] if m[1:2] == " " else m for m in messages)

    def _fsconfig(self, cmd: int, key: bytes | None, value: object, aux: int, what: str) -> None:
        try:
            call(
                libc.syscall,
                ctypes.c_long(syscall_number("fsconfig")),
                ctypes.c_int(self._fd),
                ctypes.c_uint(cmd),
                key,
                value,
                ctypes.c_int(aux),
            )
        except OSError as exc:
            assert exc.errno is not None
            detail = self._messages()
            msg = f"{what}: {os.strerror(exc.errno)}" + (f": {detail}" if detail else "")
            raise OSError(exc.errno, msg) from None

    def set_string(self, key: str, value: str) -> None:
        """FSCONFIG_SET_STRING."""
        self._fsconfig(_FSCONFIG_SET_STRING, key.encode(), value.encode(), 0, f"fsconfig({key})")

    def set_flag(self, key: str) -> None:
        """FSCONFIG_SET_FLAG."""
        self._fsconfig(_FSCONFIG_SET_FLAG, key.encode(), None, 0, f"fsconfig({key})")

    def set_fd(self, key: str, fd: int) -> None:
        """FSCONFIG_SET_FD: the kernel resolves the fd now, not at create time."""
        self._fsconfig(_FSCONFIG_SET_FD, key.encode(), None, fd, f"fsconfig({key})")

    def create(self) -> None:
        """FSCONFIG_CMD_CREATE: make the superblock."""
        self._fsconfig(_FSCONFIG_CMD_CREATE, None, None, 0, f"fsconfig(create {self.fstype})")

    def mount(self, attr_flags: int = 0) -> int:
        """fsmount(2): a detached mount fd (close-on-exec), to attach with :func:`move_mount`."""
        try:
            return call(
                libc.syscall,
                ctypes.c_long(syscall_number("fsmount")),
                ctypes.c_int(self._fd),
                ctypes.c_uint(_FSMOUNT_CLOEXEC),
                ctypes.c_uint(attr_flags),
            )
        except OSError as exc:
            assert exc.errno is not None
            detail = self._messages()
            raise OSError(
                exc.errno, f"fsmount: {os.strerror(exc.errno)}" + (f": {detail}" if detail else "")
            ) from None


def move_mount(mount_fd: int, target: str | bytes | os.PathLike[str]) -> None:
    """move_mount(2) of a detached mount fd onto ``target``."""
    try:
        call(
            libc.syscall,
            ctypes.c_long(syscall_number("move_mount")),
            ctypes.c_int(mount_fd),
            b"",
            ctypes.c_int(_AT_FDCWD),
            os.fsencode(target),
            ctypes.c_uint(_MOVE_MOUNT_F_EMPTY_PATH),
        )
    except OSError as exc:
        assert exc.errno is not None
        raise_errno(exc.errno, "move_mount", target)


def mount_autofs(
    target: str | bytes | os.PathLike[str],
    options: AutofsOptions,
    *,
    source: str = "pyautofs",
    new_api: bool = False,
) -> int:
    """Mount autofs on ``target`` and return its device number (``st_dev``, the OPENMOUNT devid).

    ``new_api=True`` uses fsopen/fsconfig/fsmount/move_mount, whose errors carry the kernel's
    message; the default is mount(2).
    """
    if not new_api:
        try:
            mount(source, target, "autofs", MountFlags.NONE, options.to_string())
        except OSError as exc:
            if exc.errno == errno.EBADF:
                raise OSError(
                    exc.errno,
                    f"mount(autofs): fd={options.fd} is not the write end of a pipe",
                    os.fsdecode(target),
                ) from None
            raise
        return os.stat(target).st_dev
    with FsContext("autofs") as ctx:
        ctx.set_string("source", source)
        for name, value in options.pairs():
            if name == "fd":
                ctx.set_fd("fd", options.fd)
            elif value is None:
                ctx.set_flag(name)
            else:
                ctx.set_string(name, value)
        ctx.create()
        mfd = ctx.mount()
    try:
        move_mount(mfd, target)
    finally:
        os.close(mfd)
    return os.stat(target).st_dev


_OPEN_TREE_CLONE = 0x1
_OPEN_TREE_CLOEXEC = 0o2000000
_AT_EMPTY_PATH = 0x1000
_new_api_bind: bool | None = None  # None: not tried yet; False: this kernel refused it


def bind_fd(fd: int, target: str | bytes | os.PathLike[str]) -> bool:
    """Bind-mount the directory ``fd`` refers to (an ``O_PATH`` fd will do) on ``target``.

    ``open_tree(OPEN_TREE_CLONE)`` copies the mount at ``fd`` (not its submounts, like
    ``mount --bind``) into a detached mount, and ``move_mount`` attaches it: two syscalls,
    no path walk of the source, and cheaper than ``mount(2)`` through ``/proc/self/fd``.
    Returns False, having done nothing, when the kernel has no ``open_tree`` (before 5.2,
    or a seccomp filter refusing it); the caller then takes the ``mount(2)`` route.
    Other errors raise ``OSError``.
    """
    global _new_api_bind
    if _new_api_bind is False:
        return False
    try:
        tree = call(
            libc.syscall,
            ctypes.c_long(syscall_number("open_tree")),
            ctypes.c_int(fd),
            b"",
            ctypes.c_uint(_OPEN_TREE_CLONE | _OPEN_TREE_CLOEXEC | _AT_EMPTY_PATH),
        )
    except OSError as exc:
        if exc.errno in (errno.ENOSYS, errno.EPERM) and _new_api_bind is None:
            _new_api_bind = False  # never answered: take mount(2) from now on
            return False
        assert exc.errno is not None
        raise_errno(exc.errno, "open_tree", target)
    _new_api_bind = True
    try:
        move_mount(tree, target)
    finally:
        os.close(tree)
    return True
