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

__all__ = ["OwnedAutofsMount"]

_READ_SIZE = 512
_HEAD = struct.Struct("=iiI")  # proto version, packet type, token
_EXPIRE_TYPES = (1, 2, 4, 6)


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
        self.path = path
        self.mode = mode
        self.dev = dev
        self.read_fd = read_fd
        self.ioctlfd = ioctlfd
        self._ctl = control
        self._own_ctl = own_control
        self.created_dir = created_dir

    # -- making one --------------------------------------------------------------------

    @staticmethod
    def _pipe(pipe_size: int, nonblocking: bool) -> tuple[int, int]:
        r, w = os.pipe2(os.O_CLOEXEC)
        try:
            fcntl.fcntl(r, fcntl.F_SETPIPE_SZ, pipe_size)
        except OSError:
            pass  # above pipe-max-size without CAP_SYS_RESOURCE: keep the default
        if nonblocking:
            os.set_blocking(r, False)
        return r, w

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
        r, w = cls._pipe(pipe_size, nonblocking)
        ioctlfd = -1
        try:
            options = AutofsOptions(fd=w, pgrp=os.getpgrp(), mode=mode, strictexpire=strictexpire)
            dev = mount_autofs(target, options, source=source)
            try:
                fd = ctl.openmount(target, dev)
                try:
                    ctl.set_timeout(fd, timeout)
                finally:
                    if mode is AutofsMode.INDIRECT:
                        ioctlfd = fd
                    else:
                        os.close(fd)
            except BaseException:
                umount2(target, UmountFlags.DETACH)
                raise
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
        r, w = cls._pipe(pipe_size, nonblocking)
        fd = -1
        try:
            fd = ctl.openmount(target, am.dev)
            ctl.catatonic(fd)
            ctl.setpipefd(fd, w)
            ctl.set_timeout(fd, am.timeout if timeout is None else timeout)
        except BaseException:
            os.close(r)
            if fd >= 0:
                os.close(fd)
            if own:
                ctl.close()
            raise
        finally:
            os.close(w)
        if am.mode is not AutofsMode.INDIRECT:
            os.close(fd)
            fd = -1
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

    def _answer(self, token: int, status: int) -> None:
        self._check()
        fd = self.ioctlfd
        opened = fd < 0
        if opened:
            fd = self._ctl.openmount(self.path, self.dev)
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
        self._check()
        fd = self.ioctlfd
        opened = fd < 0
        if opened:
            fd = self._ctl.openmount(self.path, self.dev)
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
