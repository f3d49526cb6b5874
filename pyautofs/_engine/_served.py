"""What the engine holds for each autofs mount it serves: the mount, its pipe, its tokens.

- :class:`ServedMount`: one autofs mount (its configuration, its :class:`MountLedger`, its
  device number) and the fds it owns. Closing an fd sets it to -1, so a closed fd is
  never closed twice or used after close.
- :class:`RequestPipe`: one kernel pipe and the mounts whose packets arrive on it, by
  device number. An indirect mount has a pipe of its own; every direct and offset mount of
  an engine shares one, as automount(8) does, so N direct mounts cost two fds, not 3N.
- :class:`Token`: a request the kernel waits on. It is answered exactly once: the first
  :meth:`Token.answer` sends READY or FAIL, any later one does nothing.

Only an indirect mount keeps an ioctl fd. A direct or offset mount point gets covered by the
key mounted on it, and an open fd there would pin it (the kernel's ``may_umount_tree`` counts
it, so it never expires) and stop CRIU ("open files on overmounted mounts"); those mounts
open one with OPENMOUNT for each use and close it at once.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Awaitable, Callable

import attrs
import trio

from .._proto._ledger import MountLedger
from .._sys._autofs import AutofsControl
from .._sys._mount import AutofsMode
from ._requests import ExpireRequest, MountRequest

__all__ = ["ServedMount", "RequestPipe", "Token", "MountHandler", "ExpireHandler"]

log = logging.getLogger("pyautofs")

MountHandler = Callable[[MountRequest], Awaitable[object]]
"""An async function that mounts what a :class:`MountRequest` asks for."""
ExpireHandler = Callable[[ExpireRequest], Awaitable[object]]
"""An async function that unmounts what an :class:`ExpireRequest` names."""


@attrs.define(eq=False)
class ServedMount:
    """One autofs mount an engine serves."""

    path: str
    mode: AutofsMode
    on_missing: MountHandler
    on_expire: ExpireHandler | None
    timeout: int
    strictexpire: bool
    key_timeouts: dict[str, int]
    ledger: MountLedger
    dev: int = 0
    """The autofs superblock's device number (0: not mounted or adopted yet)."""
    pipe: RequestPipe | None = None
    ioctlfd: int = -1
    """Kept for indirect mounts only (see the module docstring)."""
    created_dir: bool = False
    adopted: bool = False
    lost: bool = False
    restored_fd: int = -1
    """A restored pipe's read end to serve as is (``add_mount(pipe_fd=...)``), until set up."""
    prefix: str = ""

    def __attrs_post_init__(self) -> None:
        self.prefix = self.path.rstrip("/") + "/"

    @property
    def indirect(self) -> bool:
        return self.mode is AutofsMode.INDIRECT

    def key_path(self, key: str) -> str:
        return self.prefix + key if key else self.path

    def open_ioctlfd(self, ctl: AutofsControl) -> tuple[int, bool]:
        """``(fd, opened)``: the kept ioctl fd, or one opened for this use (close it)."""
        if self.ioctlfd >= 0:
            return self.ioctlfd, False
        return ctl.openmount(self.path, self.dev), True

    def attach_control(self, ctl: AutofsControl, timeout_now: int) -> None:
        """Open the ioctl fd an indirect mount keeps, and set our timeout if the mount's
        (``timeout_now``) differs: what serving a mount someone else set up begins with."""
        if self.indirect:
            self.ioctlfd = ctl.openmount(self.path, self.dev)
        if self.timeout != timeout_now:
            fd, opened = self.open_ioctlfd(ctl)
            try:
                ctl.set_timeout(fd, self.timeout)
            finally:
                if opened:
                    os.close(fd)

    def close_ioctlfd(self) -> None:
        if self.ioctlfd >= 0:
            fd, self.ioctlfd = self.ioctlfd, -1
            os.close(fd)


@attrs.define(eq=False)
class RequestPipe:
    """A kernel request pipe and the mounts that write to it, routed by device number."""

    read_fd: int
    write_fd: int = -1
    """Kept open only on the shared pipe, for the next direct mount (then EOF never comes)."""
    shared: bool = False
    routes: dict[int, ServedMount] = attrs.Factory(dict)
    reader_scope: trio.CancelScope | None = None
    stop_reading: bool = False

    def route(self, m: ServedMount) -> None:
        self.routes[m.dev] = m
        m.pipe = self

    def unroute(self, m: ServedMount) -> None:
        if self.routes.get(m.dev) is m:
            del self.routes[m.dev]
        m.pipe = None

    def stop(self) -> None:
        """Stop its reader (it finishes no packet it has not read)."""
        self.stop_reading = True
        if self.reader_scope is not None:
            self.reader_scope.cancel()

    def close(self) -> None:
        """Stop reading and close both ends. Idempotent."""
        self.stop()
        if self.read_fd >= 0:
            fd, self.read_fd = self.read_fd, -1
            trio.lowlevel.notify_closing(fd)
            os.close(fd)
        if self.write_fd >= 0:
            fd, self.write_fd = self.write_fd, -1
            os.close(fd)


class Token:
    """A kernel request to answer exactly once (READY or FAIL with a negative errno)."""

    __slots__ = ("_ctl", "answered", "dev", "mount", "token")

    def __init__(self, ctl: AutofsControl, mount: ServedMount, token: int) -> None:
        self._ctl = ctl
        self.mount = mount
        self.token = token
        self.dev = mount.dev
        self.answered = False

    def answer(self, status: int) -> bool:
        """Send READY (``status`` 0) or FAIL (a negative errno) once; True if it was sent.

        Never raises: a token the kernel no longer knows (a restore made a new superblock,
        or someone made the mount catatonic) is logged. A token of a superblock the mount
        no longer has is dropped without an ioctl.
        """
        if self.answered:
            return False
        self.answered = True
        m = self.mount
        if self.dev != m.dev or m.lost:
            log.debug(
                "%s: token %d of a superblock gone (dev %d) dropped", m.path, self.token, self.dev
            )
            return False
        ctl = self._ctl
        try:
            fd = m.ioctlfd
            if fd >= 0:
                if status == 0:
                    ctl.ready(fd, self.token)
                else:
                    ctl.fail(fd, self.token, status)
                return True
            fd = ctl.openmount(m.path, m.dev)
            try:
                if status == 0:
                    ctl.ready(fd, self.token)
                else:
                    ctl.fail(fd, self.token, status)
            finally:
                os.close(fd)
            return True
        except OSError as exc:
            log.warning(
                "%s: answering token %d failed: %s",
                m.path,
                self.token,
                os.strerror(exc.errno or errno.EIO),
            )
            return False
