"""Mounting a map's mount specs: bind and tmpfs through mount(2), anything else through
mount(8); a bind source that may hang is walked in a worker thread under the request's
deadline (:class:`ForeignCalls`), one the kernel has cached is bound inline.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Callable
from typing import TypeVar

import trio

from .._maps._types import MountSpec
from .._proto._escape import printable
from .._sys._mount import UmountFlags, bind_fd, umount2
from .._sys._resolve import open_dir_cached
from ._helpers import bind_mount, mount_tmpfs, run_mount

__all__ = ["FOREIGN_THREADS", "ForeignCalls", "mount_spec", "unmount_if_mounted"]

log = logging.getLogger("pyautofs")


FOREIGN_THREADS = 8
"""Worker threads that may block on a foreign file system at once (bind sources)."""

_T = TypeVar("_T")


class ForeignCalls:
    """Runs calls that may block on a foreign file system in a bounded set of threads.

    A call still running when the caller's deadline passes is abandoned: the caller gets
    ``trio.Cancelled`` at once, the thread finishes (or stays stuck) on its own, and the
    call sees ``abandoned`` set so that it can undo what it does after that.
    """

    def __init__(self, threads: int = FOREIGN_THREADS) -> None:
        self.limiter: trio.CapacityLimiter = trio.CapacityLimiter(threads)
        self._lock = threading.Lock()
        self.abandoned_running: int = 0
        """Abandoned calls whose thread has not returned yet (stuck in the kernel)."""

    async def run(self, fn: Callable[[threading.Event], _T], what: str) -> _T:
        """Run ``fn`` in a bounded worker thread; on cancellation, abandon it (not wait).

        ``fn`` gets an event that is set once it has been abandoned, so what it does after
        its blocking call (a mount that finally went through) can be undone. ``what`` names
        the call in the log.
        """
        abandoned = threading.Event()

        def call() -> _T:
            try:
                return fn(abandoned)
            finally:
                if abandoned.is_set():
                    with self._lock:
                        self.abandoned_running -= 1
                    log.info("an abandoned %s returned", what)

        try:
            return await trio.to_thread.run_sync(call, abandon_on_cancel=True, limiter=self.limiter)
        except trio.Cancelled:
            with self._lock:
                abandoned.set()
                self.abandoned_running += 1
            log.warning(
                "%s did not return before the request's deadline; abandoned "
                "(%d abandoned call(s) still blocked)",
                what,
                self.abandoned_running,
            )
            raise


def unmount_if_mounted(path: str) -> None:
    """Unmount what covers ``path`` (EINVAL, nothing mounted there, is not an error)."""
    try:
        umount2(path, UmountFlags.NOFOLLOW)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise


def _bind_blocking(abandoned: threading.Event, source: str, target: str, readonly: bool) -> None:
    if not os.path.exists(source):
        raise OSError(errno.ENOENT, f"{source} (from the map) does not exist", target)
    if abandoned.is_set():
        return
    bind_mount(source, target, readonly=readonly)
    if abandoned.is_set():
        # The requester was answered (ETIMEDOUT) while the source hung: undo, or the mount
        # would sit on a key the engine believes failed.
        umount2(target, UmountFlags.DETACH)


_PROC_FD = os.path.isdir("/proc/self/fd")


def _bind_from_cache(source: str, target: str, readonly: bool) -> bool:
    """Bind-mount ``source`` inline if the kernel resolves it from its caches alone.

    The O_PATH fd is what was resolved; the bind reaches it without walking the source's
    file system again: ``open_tree`` + ``move_mount`` on the fd (:func:`bind_fd`, the
    cheaper route), or mount(2) through /proc/self/fd, a magic link that jumps to it (for
    ``ro``, which needs a remount, and on kernels without ``open_tree``). False when the
    source is not all cached (or not a directory): the caller takes the thread path.
    """
    fd = open_dir_cached(source)
    if fd is None:
        return False
    try:
        if readonly or not bind_fd(fd, target):
            if not _PROC_FD:
                return False
            bind_mount(f"/proc/self/fd/{fd}", target, readonly=readonly)
    finally:
        os.close(fd)
    return True


async def mount_spec(spec: MountSpec, target: str, foreign: ForeignCalls) -> None:
    if spec.fstype == "bind":
        readonly = "ro" in spec.options
        source = spec.source
        if _bind_from_cache(source, target, readonly):
            return  # no walk could block: done inline, on the engine's fast path
        await foreign.run(
            lambda abandoned: _bind_blocking(abandoned, source, target, readonly),
            f"bind mount of {printable(source)}",
        )
    elif spec.fstype == "tmpfs":
        # No foreign path is walked: the target is a directory of our own autofs mount,
        # which the engine itself just made on its own thread.
        mount_tmpfs(target, ",".join(spec.options), source=spec.source or "tmpfs")
    else:
        await run_mount(target, spec.source, spec.fstype, spec.options)
