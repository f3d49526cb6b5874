"""An autofs mount this process owns, driven synchronously: the building block of a responder.

:class:`OwnedAutofsMount` creates a mount (or adopts one left by a dead owner) with a fresh
request pipe, reads its packets, answers them, drains what is queued, makes it catatonic and
takes it down. It follows the kernel's rules (``reference/autofs-kernel.md``):

- the pipe is in packet mode: one ``read`` of at least 304 bytes is one packet;
- only the kernel keeps the write end, so an empty read (EOF) means the mount went
  catatonic or away;
- an indirect mount keeps an ioctl fd; a direct or offset mount opens one per use (OPENMOUNT),
  because an open fd under the mount that covers it would pin it;
- every token it reads must be answered once: :meth:`drain` fails what is left queued.

Packets come back as bytes: decode them with :func:`pyautofs.lowlevel.decode_packet`. The
token is the u32 at offset 8 in every packet version, so :meth:`drain` needs no decoding.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

from ._autofs import AutofsControl
from ._mount import AutofsMode, AutofsOptions, UmountFlags, mount_autofs, umount2
from ._mountinfo import find_autofs_mount

__all__ = ["OwnedAutofsMount", "adopt_owned", "mount_owned", "request_pipe"]

_READ_SIZE = 512
_HEAD = struct.Struct("=iiI")  # proto version, packet type, token
_EXPIRE_TYPES = (1, 2, 4, 6)


def request_pipe(pipe_size: int = 1 << 20, *, nonblocking: bool = False) -> tuple[int, int]:
    """A request pipe for an autofs mount: ``(read end, write end)``, both close-on-exec.

    The pipe is enlarged to ``pipe_size`` bytes where allowed, so a burst of requests queues
    instead of blocking the kernel's writer (which holds the superblock's pipe mutex).
    """
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        fcntl.fcntl(r, fcntl.F_SETPIPE_SZ, pipe_size)
    except OSError:
        pass  # above pipe-max-size without CAP_SYS_RESOURCE: keep the default
    if nonblocking:
        os.set_blocking(r, False)
    return r, w


def mount_owned(
    control: AutofsControl,
    path: str,
    write_fd: int,
    *,
    mode: AutofsMode,
    timeout: int,
    strictexpire: bool = False,
    source: str = "pyautofs",
) -> tuple[int, int]:
    """Mount autofs at ``path`` on the pipe ``write_fd``, owned by this process group.

    Sets the timeout (an ioctl: ``timeout=`` is no mount option). Returns ``(dev, ioctlfd)``:
    an indirect mount keeps its ioctl fd; a direct or offset mount gets ``-1``, since an
    open fd under the mount that will cover it would pin it. On failure nothing is left
    mounted.
    """
    options = AutofsOptions(fd=write_fd, pgrp=os.getpgrp(), mode=mode, strictexpire=strictexpire)
    dev = mount_autofs(path, options, source=source)
    try:
        if mode is not AutofsMode.INDIRECT and not timeout:
            return dev, -1  # nothing to set: no OPENMOUNT at all
        fd = control.openmount(path, dev)
        try:
            control.set_timeout(fd, timeout)
        except BaseException:
            os.close(fd)
            raise
    except BaseException:
        umount2(path, UmountFlags.DETACH)
        raise
    if mode is AutofsMode.INDIRECT:
        return dev, fd
    os.close(fd)
    return dev, -1


def adopt_owned(
    control: AutofsControl, path: str, write_fd: int, *, dev: int, mode: AutofsMode, timeout: int
) -> int:
    """Make the autofs mount ``dev`` at ``path`` ours: CATATONIC, SETPIPEFD, TIMEOUT.

    automount(8)'s restart recipe. CATATONIC is needed because we are not in the old owner's
    process group (and SETPIPEFD requires it); SETPIPEFD makes our process group the owner.
    Mounts already made keep working throughout; lookups of new keys fail with ENOENT only
    between CATATONIC and SETPIPEFD. Returns the ioctl fd of an indirect mount, else ``-1``.
    """
    fd = control.openmount(path, dev)
    try:
        control.catatonic(fd)
        control.setpipefd(fd, write_fd)
        control.set_timeout(fd, timeout)
    except BaseException:
        os.close(fd)
        raise
    if mode is AutofsMode.INDIRECT:
        return fd
    os.close(fd)
    return -1


class OwnedAutofsMount:
    """An autofs mount and its request pipe, owned by this process (see the module docs).

    Closing sets each fd to -1; every method after :meth:`close` raises ``ValueError``.
    """

    __slots__ = ("_ctl", "_own_ctl", "created_dir", "dev", "ioctlfd", "mode", "path", "read_fd")

    def __init__(  # noqa: PLR0917
        self,
        path: str,
        mode: AutofsMode,
        dev: int,
        read_fd: int,
        ioctlfd: int,
        control: AutofsControl,
        *,
        own_control: bool = False,
        created_dir: bool = False,
    ) -> None:
        self.path: str = path
        """The mount point (absolute)."""
        self.mode: AutofsMode = mode
        self.dev: int = dev
        """The autofs superblock's device number (``st_dev``; the ``dev`` in packets)."""
        self.read_fd: int = read_fd
        """The request pipe's read end; -1 once closed."""
        self.ioctlfd: int = ioctlfd
        """The kept ioctl fd of an indirect mount; -1 for direct and offset mounts."""
        self._ctl = control
        self._own_ctl = own_control
        self.created_dir: bool = created_dir
        """Whether :meth:`create` made the mount point (then :meth:`close` removes it)."""

    # -- making one --------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        *,
        mode: AutofsMode | str = AutofsMode.INDIRECT,
        timeout: int = 0,
        strictexpire: bool = False,
        pipe_size: int = 1 << 20,
        nonblocking: bool = False,
        control: AutofsControl | None = None,
        source: str = "pyautofs",
    ) -> OwnedAutofsMount:
        """Mount autofs at ``path`` (made if missing), owned by this process group."""
        target = os.path.abspath(os.fspath(path))
        mode = AutofsMode(mode)
        created = False
        if not os.path.isdir(target):
            os.makedirs(target)
            created = True
        own = control is None
        ctl = control or AutofsControl.open()
        r, w = request_pipe(pipe_size, nonblocking=nonblocking)
        try:
            dev, ioctlfd = mount_owned(
                ctl, target, w, mode=mode, timeout=timeout, strictexpire=strictexpire, source=source
            )
        except BaseException:
            os.close(r)
            if own:
                ctl.close()
            if created:
                os.rmdir(target)
            raise
        finally:
            os.close(w)  # only the kernel keeps the write end: EOF means catatonic or gone
        return cls(target, mode, dev, r, ioctlfd, ctl, own_control=own, created_dir=created)

    @classmethod
    def adopt(
        cls,
        path: str | os.PathLike[str],
        *,
        timeout: int | None = None,
        pipe_size: int = 1 << 20,
        nonblocking: bool = False,
        control: AutofsControl | None = None,
    ) -> OwnedAutofsMount:
        """Take over the autofs mount at ``path``: CATATONIC, then SETPIPEFD with a new pipe.

        Requests pending at that moment fail with ENOENT (the catatonic window); mounts
        already made keep working. ``timeout`` (seconds) replaces the mount's, if given.
        """
        target = os.path.abspath(os.fspath(path))
        am = find_autofs_mount(target)
        own = control is None
        ctl = control or AutofsControl.open()
        r, w = request_pipe(pipe_size, nonblocking=nonblocking)
        try:
            fd = adopt_owned(
                ctl,
                target,
                w,
                dev=am.dev,
                mode=am.mode,
                timeout=am.timeout if timeout is None else timeout,
            )
        except BaseException:
            os.close(r)
            if own:
                ctl.close()
            raise
        finally:
            os.close(w)
        return cls(target, am.mode, am.dev, r, fd, ctl, own_control=own)

    # -- serving -----------------------------------------------------------------------

    def _check(self) -> None:
        if self.read_fd < 0:
            raise ValueError(f"the owned autofs mount at {self.path} is closed")

    def read_packet(self) -> bytes | None:
        """One packet's bytes; ``b""`` at EOF (catatonic or gone); None if none is queued
        (non-blocking pipes only)."""
        self._check()
        try:
            return os.read(self.read_fd, _READ_SIZE)
        except BlockingIOError:
            return None

    def _ioctl_fd(self) -> tuple[int, bool]:
        """``(fd, opened)``: the kept ioctl fd, or one opened for this use (close it)."""
        self._check()
        if self.ioctlfd >= 0:
            return self.ioctlfd, False
        return self._ctl.openmount(self.path, self.dev), True

    def _answer(self, token: int, status: int) -> None:
        fd, opened = self._ioctl_fd()
        try:
            if status == 0:
                self._ctl.ready(fd, token)
            else:
                self._ctl.fail(fd, token, status)
        finally:
            if opened:
                os.close(fd)

    def ready(self, token: int) -> None:
        """READY: the request ``token`` succeeded."""
        self._answer(token, 0)

    def fail(self, token: int, status: int = -errno.ENOENT) -> None:
        """FAIL with ``status`` (a negative errno)."""
        self._answer(token, status)

    def drain(self, status: int = -errno.ENOENT) -> int:
        """Fail every packet queued now (expire packets with EAGAIN); how many there were."""
        self._check()
        blocking = os.get_blocking(self.read_fd)
        os.set_blocking(self.read_fd, False)
        n = 0
        try:
            while True:
                try:
                    data = os.read(self.read_fd, _READ_SIZE)
                except BlockingIOError:
                    return n
                if len(data) < _HEAD.size:
                    return n
                _, ptype, token = _HEAD.unpack_from(data)
                try:
                    self._answer(token, -errno.EAGAIN if ptype in _EXPIRE_TYPES else status)
                except OSError:
                    pass  # the kernel forgot it (someone made the mount catatonic)
                n += 1
        finally:
            os.set_blocking(self.read_fd, blocking)

    def catatonic(self) -> None:
        """Fail every pending request and stop sending any (the pipe then reads EOF)."""
        fd, opened = self._ioctl_fd()
        try:
            self._ctl.catatonic(fd)
        finally:
            if opened:
                os.close(fd)

    def close(self, *, unmount: bool = True) -> None:
        """Drain, go catatonic, unmount (detaching what is busy) and close every fd.

        ``unmount=False`` leaves the mount in place, catatonic (a successor may adopt it).
        Idempotent.
        """
        if self.read_fd < 0:
            return
        try:
            self.drain()
            try:
                self.catatonic()
            except OSError:
                pass
            if unmount:
                try:
                    umount2(self.path, UmountFlags.NOFOLLOW)
                except OSError:
                    umount2(self.path, UmountFlags.DETACH | UmountFlags.NOFOLLOW)
                if self.created_dir:
                    try:
                        os.rmdir(self.path)
                    except OSError:
                        pass
        finally:
            if self.ioctlfd >= 0:
                fd, self.ioctlfd = self.ioctlfd, -1
                os.close(fd)
            fd, self.read_fd = self.read_fd, -1
            os.close(fd)
            if self._own_ctl:
                self._ctl.close()

    def __enter__(self) -> OwnedAutofsMount:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<OwnedAutofsMount {self.mode.value} {self.path} dev={self.dev} fd={self.read_fd}>"
