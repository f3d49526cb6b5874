"""Inspect and capture autofs mounts, and the two kernel steps of rebuilding one.

**Finding the owner.** mountinfo's ``fd=`` is the write-end number the owner passed at mount
time, in the owner's fd table at that moment: systemd closes that fd right after mounting
and automount may reuse numbers, so it proves nothing. ``pipe_ino=`` (kernels with
CONFIG_CHECKPOINT_RESTORE) is the pipe's inode, and every process holding an end of that
pipe shows ``pipe:[<ino>]`` in ``/proc/<pid>/fd``; whether it is a read or a write end comes
from the access mode in ``/proc/<pid>/fdinfo``. The owner is the reader in the mount's
process group (``pgrp=``), preferring the group leader, then the lowest pid and fd.
The kernel's own reference to the write end (the superblock's) is not an fd and never
shows, so a write end found in the owner means it *kept* one (automount); none means it
*closed* it after mounting (systemd), and then the read end sees EOF when the mount goes
catatonic.

**Capturing the pipe.** The owner's read end is reopened through ``/proc/<pid>/fd/<n>``
(opening a pipe that way makes a new reader of the same pipe) and captured with
:func:`~pyautofs.restore.snapshot_pipe`, which consumes nothing. Queued packets are pending requests
whose processes are still waiting on the *old* superblock.

**Rebuilding** happens in two kernel steps, so that the second can run in another process:

1. :func:`recreate_autofs_mount`: mount autofs with a throwaway pipe and the saved options,
   set the timeout with the TIMEOUT ioctl (it is not a mount option), then make the mount
   catatonic and drop the throwaway pipe. Until step 2 every lookup of a missing name fails
   at once with ENOENT; nothing blocks.
2. :func:`take_over_autofs_mount`, run by the new owner: OPENMOUNT + SETPIPEFD with the write
   end of the owner's pipe. The kernel puts the pipe in packet mode, makes the *caller's*
   process group the owner (``pgrp=``) and leaves catatonic mode. A closed-style owner then
   closes its write end.

What cannot be carried over: the mount is a new superblock, whose anonymous ``st_dev`` (the
OPENMOUNT devid and the ``dev`` in packets) is allocated afresh (the kernel may hand out the
number the old mount freed, or another one) and whose root is a new inode, so an owner that
cached them (systemd, or automount for direct mounts) must re-learn them; request tokens
belong to the superblock that issued them, so queued requests from the old mount cannot be
answered on the new one (their processes are released with ENOENT when the old mount goes
away); what was mounted beneath the old mount is recorded for information only; the owner's
process group is the new owner's, not the old one.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable, Sequence

import attrs

from .._sys._autofs import AutofsControl
from .._sys._mount import UmountFlags, mount, umount2
from .._sys._mountinfo import (
    AutofsMount,
    MountInfo,
    PipeHolder,
    fd_status_flags,
    read_mountinfo,
    scan_pipe_holders,
    topmost,
)
from .._sys._pipes import pipe2
from ._image import AutofsMountImage, AutofsOwner, BeneathMount
from ._pipeimage import snapshot_pipe

__all__ = [
    "AutofsMountReport",
    "list_autofs_mounts",
    "dump_autofs_mount",
    "dump_autofs_mounts",
    "recreate_autofs_mount",
    "take_over_autofs_mount",
]


@attrs.frozen
class AutofsMountReport:
    """An autofs mount as :func:`list_autofs_mounts` sees it: mountinfo plus its pipe."""

    mount: AutofsMount
    readers: tuple[PipeHolder, ...]
    """Processes holding the pipe's read end."""
    writers: tuple[PipeHolder, ...]
    """Processes holding a write end (besides the kernel)."""
    beneath: tuple[BeneathMount, ...]

    @property
    def state(self) -> str:
        """``"active"`` or ``"catatonic"``."""
        return "catatonic" if self.mount.catatonic else "active"

    @property
    def write_end_held(self) -> bool:
        """Whether any process outside the kernel still holds a write end."""
        return bool(self.writers)


# -- inspecting ------------------------------------------------------------------------


class _Tree:
    """Mountinfo read once, indexed for any number of lookups."""

    def __init__(self, infos: Sequence[MountInfo]) -> None:
        self.children: dict[int, list[MountInfo]] = {}
        for info in infos:
            self.children.setdefault(info.parent_id, []).append(info)
        self.autofs = [AutofsMount.from_mountinfo(i) for i in infos if i.fstype == "autofs"]
        self.top = topmost(self.autofs)

    def beneath(self, mount_id: int) -> tuple[BeneathMount, ...]:
        """Every mount stacked on or below ``mount_id``, by walking parent ids."""
        out: list[BeneathMount] = []
        stack = [mount_id]
        seen = {mount_id}
        while stack:
            for child in self.children.get(stack.pop(), ()):
                if child.mount_id in seen:
                    continue
                seen.add(child.mount_id)
                out.append(BeneathMount(child.mount_point, child.fstype, child.source))
                stack.append(child.mount_id)
        return tuple(out)


def list_autofs_mounts(pid: int | str = "self") -> list[AutofsMountReport]:
    """Every autofs mount visible to ``pid``, with the processes holding each one's pipe.

    One scan of ``/proc/*/fd`` serves all mounts. Needs privilege to see other users' fds.
    """
    tree = _Tree(read_mountinfo(pid))
    inos = {m.pipe_ino for m in tree.autofs if m.pipe_ino is not None and m.pipe_ino >= 0}
    holders_of = scan_pipe_holders(inos)
    out = []
    for m in tree.autofs:
        holders = holders_of.get(m.pipe_ino, []) if m.pipe_ino is not None else []
        out.append(
            AutofsMountReport(
                mount=m,
                readers=tuple(h for h in holders if h.reads),
                writers=tuple(h for h in holders if h.writes),
                beneath=tree.beneath(m.mount_id),
            )
        )
    return out


# -- dumping ---------------------------------------------------------------------------


def _choose_owner(
    holders: Sequence[PipeHolder], pgrp: int, owner_pid: int | None
) -> PipeHolder | None:
    readers = [h for h in holders if h.reads]
    if owner_pid is not None:
        readers = [h for h in readers if h.pid == owner_pid]
    if not readers:
        return None
    return min(readers, key=lambda h: (h.pgrp != pgrp, h.pid != pgrp, h.pid, h.fd))


def dump_autofs_mount(
    path: str | os.PathLike[str], *, owner_pid: int | None = None
) -> AutofsMountImage:
    """Capture the autofs mount at ``path`` (the topmost autofs mount there).

    Finds the owner by matching ``pipe_ino`` against ``/proc/*/fd`` (``owner_pid`` picks one
    when several processes hold the read end), records whether it kept a write end, and
    captures the pipe without consuming it. A catatonic mount, or one whose read end no
    process holds, is dumped without an owner and will be restored catatonic. Nothing about
    the live mount changes. To dump several mounts, :func:`dump_autofs_mounts` reads
    mountinfo and scans ``/proc`` once for all of them.

    Raises ``FileNotFoundError`` when no autofs mount is at ``path``, ``OSError(ENOTSUP)`` on
    a kernel whose mountinfo lacks ``pipe_ino`` (no CONFIG_CHECKPOINT_RESTORE), and
    ``ProcessLookupError`` (``ESRCH``) when ``owner_pid`` holds no read end of the pipe.
    """
    return dump_autofs_mounts([path], owner_pid=owner_pid)[0]


def dump_autofs_mounts(
    paths: Iterable[str | os.PathLike[str]] | None = None, *, owner_pid: int | None = None
) -> list[AutofsMountImage]:
    """Capture several autofs mounts (default: every one visible), in the order given.

    Each is captured as :func:`dump_autofs_mount` would, with the same errors, but
    mountinfo is read once and ``/proc/*/fd`` scanned once for the whole batch. With
    ``paths=None`` and ``owner_pid``, only the mounts whose read end ``owner_pid`` holds
    are dumped (all of one daemon's mounts).
    """
    tree = _Tree(read_mountinfo())
    if paths is None:
        mounts = list(tree.top.values())
    else:
        mounts = []
        for path in paths:
            want = os.path.abspath(os.fspath(path))
            found = tree.top.get(want)
            if found is None:
                raise FileNotFoundError(errno.ENOENT, f"no autofs mount at {want}", want)
            mounts.append(found)
    for m in mounts:
        if not m.catatonic and m.pipe_ino is None:
            raise OSError(
                errno.ENOTSUP,
                f"{m.mount_point}: mountinfo has no pipe_ino= (kernel without "
                "CONFIG_CHECKPOINT_RESTORE), so the pipe's owner cannot be found",
            )
    inos = {m.pipe_ino for m in mounts if not m.catatonic and m.pipe_ino is not None}
    holders_of = scan_pipe_holders(inos)
    out = []
    for m in mounts:
        holders = () if m.catatonic else tuple(holders_of.get(m.pipe_ino or -1, ()))
        chosen = None if m.catatonic else _choose_owner(holders, m.pgrp, owner_pid)
        if chosen is None and owner_pid is not None and not m.catatonic:
            if paths is None:
                continue  # not one of owner_pid's mounts
            raise ProcessLookupError(
                errno.ESRCH, f"pid {owner_pid} holds no read end of the pipe", m.mount_point
            )
        if paths is None and owner_pid is not None and m.catatonic:
            continue
        out.append(_image(m, holders, chosen, tree.beneath(m.mount_id)))
    return out


def _image(
    m: AutofsMount,
    holders: tuple[PipeHolder, ...],
    chosen: PipeHolder | None,
    beneath: tuple[BeneathMount, ...],
) -> AutofsMountImage:
    owner = None
    pipe = None
    if chosen is not None:
        writes = [h.fd for h in holders if h.pid == chosen.pid and h.end == "write"]
        # Reopen the owner's read end: a new reader of the same pipe, for tee.
        fd = os.open(
            f"/proc/{chosen.pid}/fd/{chosen.fd}", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC
        )
        try:
            pipe = snapshot_pipe(fd, packet=True)  # autofs pipes are always packetised
        finally:
            os.close(fd)
        nonblock = bool(fd_status_flags(chosen.pid, chosen.fd) & os.O_NONBLOCK)
        pipe = attrs.evolve(pipe, nonblock=nonblock)
        owner = AutofsOwner(
            pid=chosen.pid,
            pgrp=chosen.pgrp,
            comm=chosen.comm,
            read_fd=chosen.fd,
            write_fd=min(writes) if writes else None,
            read_nonblock=nonblock,
        )
    return AutofsMountImage(
        mount_point=m.mount_point,
        mode=m.mode,
        source=m.source,
        timeout=m.timeout,
        uid=m.uid,
        gid=m.gid,
        minproto=m.minproto,
        maxproto=m.maxproto,
        strictexpire=m.strictexpire,
        ignore=m.ignore,
        mount_options=m.mount_options,
        dev=m.dev,
        pipe_ino=m.pipe_ino,
        fd=m.fd,
        pgrp=m.pgrp,
        catatonic=m.catatonic,
        owner=owner,
        holders=holders,
        pipe=pipe,
        beneath=beneath,
    )


# -- the two kernel steps of a restore -------------------------------------------------


def recreate_autofs_mount(
    image: AutofsMountImage,
    *,
    mount_point: str | os.PathLike[str] | None = None,
    control: AutofsControl | None = None,
) -> int:
    """Mount autofs as ``image`` describes, catatonic, and return the new ``st_dev``.

    The mount is made with a throwaway pipe and this process's group as owner, gets its
    timeout, and is then made catatonic, after which the throwaway pipe is closed: the mount
    waits for an owner to call :func:`take_over_autofs_mount`, and meanwhile fails lookups
    of missing names with ENOENT. The throwaway pipe stays open until then, so a lookup that
    slips in before CATATONIC queues a packet (and is failed by CATATONIC) rather than
    hitting a pipe with no reader, which would kill the looker with SIGPIPE.
    On error nothing stays mounted.
    """
    target = os.fspath(mount_point if mount_point is not None else image.mount_point)
    own = control if control is not None else AutofsControl.open()
    r, w = pipe2()
    mounted = False
    try:
        mount(
            image.source,
            target,
            "autofs",
            image.mount_flags(),
            image.autofs_options(w).to_string(),
        )
        mounted = True
        dev = os.stat(target).st_dev  # we own the mount: no lookup can trigger here
        ioctlfd = own.openmount(target, dev)
        try:
            own.set_timeout(ioctlfd, image.timeout)
            own.catatonic(ioctlfd)
        finally:
            os.close(ioctlfd)
    except BaseException:
        if mounted:
            umount2(target, UmountFlags.DETACH)
        raise
    finally:
        os.close(r)
        os.close(w)
        if control is None:
            own.close()
    return dev


def take_over_autofs_mount(
    mount_point: str | os.PathLike[str],
    dev: int,
    write_fd: int,
    *,
    control: AutofsControl | None = None,
    make_catatonic: bool = False,
) -> None:
    """Become the owner of a catatonic autofs mount: OPENMOUNT + SETPIPEFD(``write_fd``).

    The kernel puts the pipe in packet mode, makes the calling process's group the owner
    and leaves catatonic mode. ``dev`` is the mount's ``st_dev`` (the devid for OPENMOUNT).
    A mount that is not catatonic answers EBUSY; ``make_catatonic=True`` sends CATATONIC
    first (which fails its pending requests with ENOENT: the restart recipe for taking a
    mount away from a live owner). The caller still holds ``write_fd`` afterwards; a
    systemd-style owner closes it.
    """
    own = control if control is not None else AutofsControl.open()
    try:
        ioctlfd = own.openmount(mount_point, dev)
        try:
            if make_catatonic:
                own.catatonic(ioctlfd)
            own.setpipefd(ioctlfd, write_fd)
        finally:
            os.close(ioctlfd)
    finally:
        if control is None:
            own.close()
