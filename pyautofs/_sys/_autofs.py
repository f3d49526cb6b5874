"""The ``/dev/autofs`` control device and the legacy per-mount ioctls.

Every ``AUTOFS_DEV_IOCTL_*`` command is one method of :class:`AutofsControl`. The kernel's
rules that matter to a caller (see ``reference/autofs-kernel.md`` §2):

- Everything but VERSION and ISMOUNTPOINT needs CAP_SYS_ADMIN (else EPERM).
- With an ioctl fd, the caller must be in the mount's owner process group (``pgrp=``) or the
  mount must be catatonic (else EACCES), except CATATONIC itself.
- A path argument must *contain* a ``/`` (the kernel uses ``strchr``), except for the per-key
  TIMEOUT, whose argument is a bare key name.
- FAIL takes a negative errno; a non-negative status is turned into ENOENT by the kernel, and
  kernels before 4.12 froze on a positive one, so :meth:`AutofsControl.fail` refuses it.
- EXPIRE blocks until the daemon answers the expire packet it sends: never call it from the
  thread that reads the pipe.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import os

import attrs

from ._fdobject import FdObject
from ._ioctl import DevIoctl, LegacyIoctl
from ._libc import call, libc, raise_errno
from ._uapi import AutofsDevIoctl, AutofsPacketExpire, dev_ioctl_buffer

__all__ = [
    "AUTOFS_DEVICE",
    "AUTOFS_SUPER_MAGIC",
    "AutofsType",
    "ExpireFlags",
    "MountPointStatus",
    "AutofsControl",
    "LegacyMountRoot",
]

AUTOFS_DEVICE = "/dev/autofs"
AUTOFS_SUPER_MAGIC = 0x0187


class AutofsType(enum.IntFlag):
    """``AUTOFS_TYPE_*``: which kind of autofs mount ISMOUNTPOINT should require."""

    ANY = 0
    INDIRECT = 1
    DIRECT = 2
    OFFSET = 4


class ExpireFlags(enum.IntFlag):
    """``AUTOFS_EXP_*``: how EXPIRE picks its candidate."""

    NORMAL = 0
    IMMEDIATE = 1
    """Ignore the timeout and last-use time."""
    LEAVES = 2
    """v4-style: expire leaves first (deprecated by the kernel)."""
    FORCED = 4
    """Ignore busy mounts; the daemon deals with the busy unmount."""


@attrs.frozen
class MountPointStatus:
    """What ISMOUNTPOINT answered.

    ``mounted`` is the ioctl's return value: for a path lookup (no ioctl fd), whether the path
    is a mount root; for a query on an autofs mount's own fd, whether anything is mounted on
    or below it. ``devid`` is the top mount's device (``st_dev`` encoding) and ``magic`` its
    superblock magic (:data:`AUTOFS_SUPER_MAGIC` for autofs itself, 0 when nothing covers an
    autofs root).
    """

    mounted: bool
    devid: int
    magic: int


def _path_bytes(path: str | bytes | os.PathLike[str]) -> bytes:
    return os.fsencode(path)


class AutofsControl(FdObject):
    """An open ``/dev/autofs``: one method per ``AUTOFS_DEV_IOCTL_*`` command.

    Open it with :meth:`open`; it is a context manager. Methods that act on a mount take the
    ``ioctlfd`` of that mount: an fd from :meth:`openmount` or a plain ``os.open`` of the
    autofs root (both work; OPENMOUNT exists because direct and offset roots are usually
    covered by the mount they trigger).
    """

    __slots__ = ("_ready_buf", "_ready_hdr")

    def __init__(self, fd: int) -> None:
        super().__init__(fd)
        # READY is the hot path: keep one preallocated request for it.
        self._ready_buf = dev_ioctl_buffer()
        self._ready_hdr = AutofsDevIoctl.from_buffer(self._ready_buf)

    @classmethod
    def open(cls, device: str = AUTOFS_DEVICE) -> AutofsControl:
        """Open the control device (close-on-exec)."""
        try:
            fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError as exc:
            raise FileNotFoundError(
                exc.errno,
                f"{device} is missing: this kernel lacks autofs (CONFIG_AUTOFS_FS=y, or load "
                "the module with 'modprobe autofs4'); if it has autofs, only the device node "
                f"is missing: 'mknod {device} c 10 235'",
                device,
            ) from None
        except PermissionError as exc:
            raise PermissionError(
                exc.errno,
                f"{device} cannot be opened: {exc.strerror}; the autofs control device needs "
                "root (CAP_SYS_ADMIN)",
                device,
            ) from None
        except OSError as exc:
            if exc.errno not in (errno.ENODEV, errno.ENXIO):
                raise
            raise OSError(
                exc.errno,
                f"{device} has no driver behind it ({exc.strerror}): load the autofs module "
                "with 'modprobe autofs4', or build the kernel with CONFIG_AUTOFS_FS=y",
                device,
            ) from None
        return cls(fd)

    def __repr__(self) -> str:
        return f"<AutofsControl fd={self._fd}>"

    # -- the raw call --------------------------------------------------------------------

    @staticmethod
    def _request(
        ioctlfd: int = -1, path: str | bytes | os.PathLike[str] | None = None
    ) -> tuple[AutofsDevIoctl, ctypes.Array[ctypes.c_char]]:
        """A fresh request buffer and a view of its header."""
        buf = dev_ioctl_buffer(ioctlfd, None if path is None else _path_bytes(path))
        return AutofsDevIoctl.from_buffer(buf), buf

    def _do(
        self,
        cmd: DevIoctl,
        buf: ctypes.Array[ctypes.c_char],
        path: str | bytes | os.PathLike[str] | None = None,
    ) -> int:
        try:
            return call(libc.ioctl, self._fd, cmd.value, buf)
        except OSError as exc:
            assert exc.errno is not None
            raise_errno(exc.errno, f"ioctl(AUTOFS_DEV_IOCTL_{cmd.name})", path)

    # -- commands ------------------------------------------------------------------------

    def version(self) -> tuple[int, int]:
        """AUTOFS_DEV_IOCTL_VERSION: the control interface version, (1, 1) on current kernels."""
        hdr, buf = self._request()
        self._do(DevIoctl.VERSION, buf)
        return hdr.ver_major, hdr.ver_minor

    def protover(self, ioctlfd: int) -> int:
        """PROTOVER: the protocol version the mount speaks (5 unless ``maxproto`` lowered it)."""
        hdr, buf = self._request(ioctlfd)
        self._do(DevIoctl.PROTOVER, buf)
        return int(hdr.arg.protover.version)

    def protosubver(self, ioctlfd: int) -> int:
        """PROTOSUBVER: the protocol sub-version (6 since Linux 6.12's per-key timeouts)."""
        hdr, buf = self._request(ioctlfd)
        self._do(DevIoctl.PROTOSUBVER, buf)
        return int(hdr.arg.protosubver.sub_version)

    def openmount(self, path: str | bytes | os.PathLike[str], devid: int) -> int:
        """OPENMOUNT: an fd (O_CLOEXEC) on the root of the autofs mount at ``path``.

        ``devid`` selects the autofs superblock among the mounts stacked at ``path``: use
        ``os.stat(path).st_dev`` taken right after mounting, or the devid ISMOUNTPOINT gives.
        The kernel answers EINVAL for devid 0 and ENOENT when no autofs mount there has it.
        """
        hdr, buf = self._request(-1, path)
        hdr.arg.openmount.devid = devid
        self._do(DevIoctl.OPENMOUNT, buf, path)
        return int(hdr.ioctlfd)

    def ready(self, ioctlfd: int, token: int) -> None:
        """READY: the request ``token`` succeeded; every process waiting on it continues.

        EINVAL means the kernel knows no such token (already answered, or another mount's).
        """
        hdr = self._ready_hdr
        hdr.ioctlfd = ioctlfd
        hdr.arg.ready.token = token
        try:
            libc.ioctl(self._fd, DevIoctl.READY.value, self._ready_buf)
        except OSError as exc:
            if exc.errno == errno.EINTR:
                return self.ready(ioctlfd, token)
            assert exc.errno is not None
            raise_errno(exc.errno, f"ioctl(AUTOFS_DEV_IOCTL_READY, token={token})")

    def fail(self, ioctlfd: int, token: int, status: int) -> None:
        """FAIL: the request ``token`` failed; its waiters see ``-status`` as their errno.

        ``status`` must be a negative errno such as ``-errno.ENOENT``: a positive status is a
        programming error and raises ``ValueError`` before reaching the kernel.
        """
        if status >= 0:
            raise ValueError(f"FAIL status must be a negative errno, not {status}")
        hdr, buf = self._request(ioctlfd)
        hdr.arg.fail.token = token
        hdr.arg.fail.status = status
        self._do(DevIoctl.FAIL, buf)

    def setpipefd(self, ioctlfd: int, pipefd: int) -> None:
        """SETPIPEFD: give a catatonic mount a new pipe (its write end) and take ownership.

        The caller's process group becomes the mount's owner group and catatonic mode ends.
        A mount that is not catatonic answers EBUSY: send :meth:`catatonic` first.
        """
        hdr, buf = self._request(ioctlfd)
        hdr.arg.setpipefd.pipefd = pipefd
        self._do(DevIoctl.SETPIPEFD, buf)

    def catatonic(self, ioctlfd: int) -> None:
        """CATATONIC: fail every pending request with ENOENT and drop the kernel's pipe.

        Afterwards missing names fail with ENOENT and mounts already made keep working, until
        :meth:`setpipefd`. Any CAP_SYS_ADMIN process may send it, owner or not.
        """
        _, buf = self._request(ioctlfd)
        self._do(DevIoctl.CATATONIC, buf)

    def set_timeout(self, ioctlfd: int, seconds: int) -> int:
        """TIMEOUT: set the mount's expire timeout (0 = never) and return the old one."""
        if seconds < 0:
            raise ValueError(f"timeout must be >= 0 seconds, not {seconds}")
        hdr, buf = self._request(ioctlfd)
        hdr.arg.timeout.timeout = seconds
        self._do(DevIoctl.TIMEOUT, buf)
        return int(hdr.arg.timeout.timeout)

    def set_key_timeout(self, ioctlfd: int, key: str | bytes, seconds: int | None) -> int:
        """TIMEOUT with a key (Linux >= 6.12, indirect mounts): a per-key expire timeout.

        ``seconds=None`` clears the key's own timeout, 0 means "never expire this key".
        Returns the previous effective timeout. Unknown key: ENOENT; not indirect: EINVAL.
        """
        raw = key.encode() if isinstance(key, str) else key
        if b"/" in raw or not raw:
            raise ValueError(f"per-key timeout needs a bare key name, not {key!r}")
        hdr, buf = self._request(ioctlfd, raw)
        hdr.arg.timeout.timeout = (1 << 64) - 1 if seconds is None else seconds
        self._do(DevIoctl.TIMEOUT, buf, raw)
        return int(hdr.arg.timeout.timeout)

    def requester(self, ioctlfd: int, path: str | bytes | os.PathLike[str]) -> tuple[int, int]:
        """REQUESTER: (uid, gid) of the last process that triggered the mount at ``path``.

        ``path`` must be a direct or offset mount point of this superblock; an indirect key
        answers ENOENT.
        """
        hdr, buf = self._request(ioctlfd, path)
        self._do(DevIoctl.REQUESTER, buf, path)
        return int(hdr.arg.requester.uid), int(hdr.arg.requester.gid)

    def expire(self, ioctlfd: int, how: ExpireFlags = ExpireFlags.NORMAL) -> bool:
        """EXPIRE: ask the kernel to expire one candidate; blocks until the daemon answers.

        Returns True when a candidate was expired (call again), False when nothing was
        eligible (the kernel's EAGAIN). Must not run on the thread that reads the pipe.
        """
        hdr, buf = self._request(ioctlfd)
        hdr.arg.expire.how = int(how)
        try:
            self._do(DevIoctl.EXPIRE, buf)
        except BlockingIOError:
            return False
        return True

    def askumount(self, ioctlfd: int) -> bool:
        """ASKUMOUNT: True when the autofs mount itself may be unmounted (nothing busy inside).

        The kernel documentation says 1 means busy; the kernel really answers 1 = may unmount.
        """
        hdr, buf = self._request(ioctlfd)
        self._do(DevIoctl.ASKUMOUNT, buf)
        return bool(hdr.arg.askumount.may_umount)

    def ismountpoint(
        self,
        path: str | bytes | os.PathLike[str],
        type: AutofsType = AutofsType.ANY,
        ioctlfd: int = -1,
    ) -> MountPointStatus:
        """ISMOUNTPOINT, in either mode.

        Without ``ioctlfd``: is ``path`` a mount root (of an autofs mount of ``type``, unless
        ANY)? ``devid``/``magic`` describe the top mount there. With the ``ioctlfd`` of an
        autofs mount whose root is ``path``: is anything mounted on or below it? ``magic`` is
        then the covering mount's (0 if none).
        """
        hdr, buf = self._request(ioctlfd, path)
        hdr.arg.ismountpoint.in_.type = int(type)
        result = self._do(DevIoctl.ISMOUNTPOINT, buf, path)
        out = hdr.arg.ismountpoint.out
        return MountPointStatus(mounted=bool(result), devid=int(out.devid), magic=int(out.magic))


class LegacyMountRoot:
    """The legacy ``AUTOFS_IOC_*`` ioctls, issued on an fd of an autofs mount's root.

    Allowed to the owner process group or CAP_SYS_ADMIN. Prefer :class:`AutofsControl`: these
    exist for old daemons and for tools that hold only a root fd. ``fd`` is not owned.
    """

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd: int = fd

    def _int_out(self, cmd: LegacyIoctl) -> int:
        value = ctypes.c_int(0)
        call(libc.ioctl, self.fd, int(cmd), ctypes.byref(value))
        return value.value

    def ready(self, token: int) -> None:
        """AUTOFS_IOC_READY: the token is passed by value."""
        call(libc.ioctl, self.fd, int(LegacyIoctl.READY), ctypes.c_void_p(token))

    def fail(self, token: int) -> None:
        """AUTOFS_IOC_FAIL: always fails the waiters with ENOENT."""
        call(libc.ioctl, self.fd, int(LegacyIoctl.FAIL), ctypes.c_void_p(token))

    def catatonic(self) -> None:
        """AUTOFS_IOC_CATATONIC."""
        call(libc.ioctl, self.fd, int(LegacyIoctl.CATATONIC), None)

    def protover(self) -> int:
        """AUTOFS_IOC_PROTOVER."""
        return self._int_out(LegacyIoctl.PROTOVER)

    def protosubver(self) -> int:
        """AUTOFS_IOC_PROTOSUBVER."""
        return self._int_out(LegacyIoctl.PROTOSUBVER)

    def askumount(self) -> bool:
        """AUTOFS_IOC_ASKUMOUNT: True when the mount may be unmounted."""
        return bool(self._int_out(LegacyIoctl.ASKUMOUNT))

    def set_timeout(self, seconds: int) -> int:
        """AUTOFS_IOC_SETTIMEOUT: set the timeout, return the old one."""
        value = ctypes.c_ulong(seconds)
        call(libc.ioctl, self.fd, int(LegacyIoctl.SETTIMEOUT), ctypes.byref(value))
        return value.value

    def expire(self) -> bytes | None:
        """AUTOFS_IOC_EXPIRE (v3): the name of a key to expire, or None (EAGAIN).

        No wait queue and no acknowledgement: the caller unmounts the key itself.
        """
        pkt = AutofsPacketExpire()
        try:
            call(libc.ioctl, self.fd, int(LegacyIoctl.EXPIRE), ctypes.byref(pkt))
        except BlockingIOError:
            return None
        return bytes(pkt.name[: pkt.len])

    def expire_multi(self, how: ExpireFlags = ExpireFlags.NORMAL) -> bool:
        """AUTOFS_IOC_EXPIRE_MULTI: as :meth:`AutofsControl.expire`, blocking."""
        value = ctypes.c_int(int(how))
        try:
            call(libc.ioctl, self.fd, int(LegacyIoctl.EXPIRE_MULTI), ctypes.byref(value))
        except BlockingIOError:
            return False
        return True
