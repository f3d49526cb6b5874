"""Mount helpers for handlers.

Handlers run in the engine's process, which is in the autofs mount's owner process group,
so their own path walks never trigger mounts (they would deadlock on their own request).
The same holds for mount(8) and its helpers: :func:`run_mount` starts them in the engine's
process group (the default for a child), never in a new session.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Sequence

import trio

from .._proto._escape import printable
from .._sys._mount import MountFlags, UmountFlags, mount, umount2

__all__ = ["bind_mount", "mount_tmpfs", "run_mount", "unmount", "MOUNT_COMMAND"]

MOUNT_COMMAND = "/bin/mount"


def bind_mount(
    source: str | os.PathLike[str], target: str | os.PathLike[str], *, readonly: bool = False
) -> None:
    """Bind-mount ``source`` on ``target`` (read-only if asked: a bind plus a remount)."""
    mount(source, target, None, MountFlags.BIND)
    if readonly:
        try:
            mount(None, target, None, MountFlags.BIND | MountFlags.REMOUNT | MountFlags.RDONLY)
        except OSError:
            umount2(target, UmountFlags.DETACH)
            raise


def mount_tmpfs(
    target: str | os.PathLike[str], options: str = "", *, source: str = "tmpfs"
) -> None:
    """Mount a tmpfs on ``target``; ``options`` such as ``size=10m,mode=0755`` pass through."""
    flags = MountFlags.NONE
    data = []
    for opt in filter(None, options.split(",")):
        if opt == "ro":
            flags |= MountFlags.RDONLY
        elif opt in ("rw", "defaults"):
            continue
        elif opt == "nosuid":
            flags |= MountFlags.NOSUID
        elif opt == "nodev":
            flags |= MountFlags.NODEV
        elif opt == "noexec":
            flags |= MountFlags.NOEXEC
        else:
            data.append(opt)
    mount(source, target, "tmpfs", flags, ",".join(data) or None)


async def run_mount(
    target: str | os.PathLike[str],
    source: str,
    fstype: str | None = None,
    options: Sequence[str] = (),
    *,
    timeout: float = 60.0,
) -> None:
    """Run mount(8) in the engine's process group; failure raises ``OSError``.

    mount(8) reports failure by exit status and text, not errno. A timeout kills it and
    raises ETIMEDOUT; other failures raise EIO with mount's message (or the exit status).
    """
    argv = [MOUNT_COMMAND]
    if fstype:
        argv += ["-t", fstype]
    if options:
        argv += ["-o", ",".join(options)]
    argv += ["--", source, os.fspath(target)]
    with trio.move_on_after(timeout) as scope:
        result = await trio.run_process(
            argv,
            check=False,
            capture_stdout=True,
            capture_stderr=True,
            stdin=subprocess.DEVNULL,
        )
    if scope.cancelled_caught:
        raise OSError(
            errno.ETIMEDOUT,
            f"mount(8) of {printable(source)} took longer than {timeout} s",
            os.fspath(target),
        )
    if result.returncode != 0:
        # mount(8)'s words echo the map's source and options, which a map (or a key, through
        # '&') chose: escaped, they cannot forge a log line.
        message = printable(result.stderr.strip(), 1024) or f"exit status {result.returncode}"
        raise OSError(errno.EIO, f"mount(8): {message}", os.fspath(target))


def unmount(target: str | os.PathLike[str], *, lazy: bool = False) -> None:
    """Unmount ``target`` (``EBUSY`` if in use and not ``lazy``)."""
    umount2(target, UmountFlags.DETACH if lazy else UmountFlags.NONE)
