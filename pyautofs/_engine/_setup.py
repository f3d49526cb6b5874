"""Setting mounts up (create or adopt), following device changes, and taking them down.

Set-up costs O(1) per mount: one read of mountinfo serves a whole batch of mounts. An
indirect mount gets a pipe of its own, whose write end is closed once the kernel has it
(systemd's way: EOF on the read end then means the mount went catatonic or away). Direct
and offset mounts share the engine's one pipe, whose write end the engine keeps for the
next one (see :mod:`._served`).

A restore (CRIU) makes a new autofs superblock at the same path, with a new device number.
A packet whose device number no routing entry knows makes the engine look again
(:func:`reroute`): the mount gets its new number, and what was in flight on the old
superblock is dropped cleanly (its key directories removed, its tokens never answered: the
new superblock does not know them).
"""

from __future__ import annotations

import errno
import logging
import os
import resource
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from .._proto._escape import printable
from .._proto._packets import (
    ExpireDirect,
    ExpireIndirect,
    ExpireMultiV4,
    PacketError,
    decode_packet,
)
from .._sys._mount import AutofsMode, UmountFlags, umount2
from .._sys._mountinfo import (
    AutofsMount,
    MountInfo,
    autofs_mounts,
    find_pipe_holders,
    read_mountinfo,
)
from .._sys._owned import adopt_owned, mount_owned, request_pipe
from ._served import RequestPipe, ServedMount, Token

if TYPE_CHECKING:
    from ._automounter import Automounter

__all__ = [
    "MountPointBusyError",
    "new_pipe",
    "start_mounts",
    "reroute",
    "teardown",
    "release",
    "drain",
]

log = logging.getLogger("pyautofs")

_PACKET_BUFSIZE = 512


class MountPointBusyError(OSError):
    """The mount point is already served by a live automounter (and takeover was not asked)."""


def raise_fd_limit() -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError):
            return soft
        return hard
    return soft


def new_pipe(pipe_size: int) -> tuple[int, int]:
    """A request pipe: (non-blocking read end, write end), enlarged if allowed."""
    return request_pipe(pipe_size, nonblocking=True)


def shared_pipe(eng: Automounter) -> RequestPipe:
    """The engine's pipe for direct and offset mounts (made, and read, on first use)."""
    pipe = eng._shared
    if pipe is None or pipe.read_fd < 0:
        r, w = new_pipe(eng.pipe_size)
        pipe = eng._shared = RequestPipe(r, w, shared=True)
        start_reader(eng, pipe)
    return pipe


def start_reader(eng: Automounter, pipe: RequestPipe) -> None:
    from ._reader import read_pipe

    assert eng._nursery is not None
    eng._nursery.start_soon(read_pipe, eng, pipe)


def refuse_if_live(am: AutofsMount) -> None:
    """Refuse to steal a mount whose pipe is read by a live process other than us."""
    if am.catatonic or am.pipe_ino is None:
        return
    readers = [
        h
        for h in find_pipe_holders(am.pipe_ino)
        if h.end in ("read", "both") and h.pid != os.getpid()
    ]
    if readers:
        who = ", ".join(f"pid {h.pid} ({printable(h.comm)})" for h in readers)
        raise MountPointBusyError(
            errno.EBUSY,
            f"{am.mount_point} is already served by a live automounter: {who}; stop it "
            "first, or take the mount over explicitly (takeover=True, "
            "'pyautofs serve --takeover')",
            am.mount_point,
        )


def start_mounts(eng: Automounter, mounts: Sequence[ServedMount]) -> None:
    """Mount (or adopt) each of ``mounts``; one mountinfo read for the whole batch."""
    if not mounts:
        return
    existing: dict[str, AutofsMount] = {}
    for am in autofs_mounts():
        existing[am.mount_point] = am  # the last one is the topmost
    table: MountTable | None = None

    def get_table() -> MountTable:
        nonlocal table
        if table is None:
            table = MountTable.read()
        return table

    for m in mounts:
        start_mount(eng, m, existing.get(m.path), get_table)


def start_mount(
    eng: Automounter,
    m: ServedMount,
    am: AutofsMount | None,
    get_table: Callable[[], MountTable],
) -> None:
    """Mount or adopt ``m`` (``am``: the autofs mount already at its path, if any)."""
    assert eng._ctl is not None
    ctl = eng._ctl
    if not os.path.isdir(m.path):
        if os.path.lexists(m.path):
            raise NotADirectoryError(
                errno.ENOTDIR, "the mount point is not a directory; choose another", m.path
            )
        os.makedirs(m.path, exist_ok=True)
        m.created_dir = True
    pipe: RequestPipe
    r = w = -1
    try:
        if m.restored_fd >= 0:
            adopt_restored(eng, m, am, get_table)
            return
        if am is not None and not eng.takeover:
            refuse_if_live(am)
        if m.indirect:
            r, w = new_pipe(eng.pipe_size)
            pipe = RequestPipe(r)
        else:
            pipe = shared_pipe(eng)
        write_fd = w if m.indirect else pipe.write_fd
        if am is not None:
            adopt(eng, m, am, write_fd, get_table())
        else:
            m.dev, m.ioctlfd = mount_owned(
                ctl, m.path, write_fd, mode=m.mode, timeout=m.timeout, strictexpire=m.strictexpire
            )
    except BaseException:
        if r >= 0:
            os.close(r)
        release(eng, m)
        raise
    finally:
        if w >= 0:
            # systemd style: only the kernel keeps the write end, so EOF on the read end
            # tells us the mount went catatonic or was unmounted behind our back.
            os.close(w)
    pipe.route(m)
    eng._gone_devs.discard(m.dev)
    if m.indirect:
        start_reader(eng, pipe)
    eng._mounts_changed()
    log.log(
        logging.DEBUG if m.mode is not AutofsMode.INDIRECT else logging.INFO,
        "%s %s autofs mount at %s (timeout %ss)",
        "adopted" if m.adopted else "serving",
        m.mode.value,
        m.path,
        m.timeout,
    )


class MountTable:
    """One read of mountinfo, indexed: autofs mounts by path, mounts by parent."""

    def __init__(self, infos: list[MountInfo]) -> None:
        self.autofs_ids: dict[str, list[int]] = {}
        self.children: dict[int, list[MountInfo]] = {}
        for info in infos:
            if info.fstype == "autofs":
                self.autofs_ids.setdefault(info.mount_point, []).append(info.mount_id)
            self.children.setdefault(info.parent_id, []).append(info)

    @classmethod
    def read(cls) -> MountTable:
        return cls(read_mountinfo())


def rediscover(m: ServedMount, table: MountTable) -> None:
    """Note in ``m``'s ledger what is mounted in (or on) the autofs mount at ``m.path``."""
    found: set[str] = set()
    for info in (c for i in table.autofs_ids.get(m.path, ()) for c in table.children.get(i, ())):
        if m.indirect:
            key = info.mount_point[len(m.prefix) :]
            if info.mount_point.startswith(m.prefix) and key and "/" not in key:
                found.add(key)
        elif info.mount_point == m.path:
            found.add("")
    if m.indirect:
        # Directories in an indirect root are made only by a daemon; they are ours now.
        try:
            made = [e.name for e in os.scandir(m.path) if e.is_dir(follow_symlinks=False)]
        except OSError:
            made = []
        m.ledger.adopt(found, made)
    else:
        m.ledger.adopt(found, ())


def adopt(
    eng: Automounter, m: ServedMount, am: AutofsMount, write_fd: int, table: MountTable
) -> None:
    """Adopt an autofs mount left by a dead (or, with takeover, live) daemon.

    The restart recipe of automount(8): OPENMOUNT by devid, CATATONIC (we are not in the
    old owner's process group, so nothing else is allowed, and SETPIPEFD requires it),
    SETPIPEFD with our pipe, which makes our process group the owner, then TIMEOUT.
    Keys mounted before keep working throughout; lookups of new keys fail with ENOENT
    only between CATATONIC and SETPIPEFD.
    """
    assert eng._ctl is not None
    ctl = eng._ctl
    if am.mode is not m.mode:
        log.warning("%s: adopting a %s mount registered as %s", m.path, am.mode.value, m.mode.value)
        m.mode = am.mode
    m.dev = am.dev
    m.ioctlfd = adopt_owned(ctl, m.path, write_fd, dev=am.dev, mode=m.mode, timeout=m.timeout)
    m.adopted = True
    rediscover(m, table)
    log.info("%s: adopted, %d mounted key(s) rediscovered", m.path, len(m.ledger.mounted))


def adopt_restored(
    eng: Automounter,
    m: ServedMount,
    am: AutofsMount | None,
    get_table: Callable[[], MountTable],
) -> None:
    """Serve a restored mount through its restored pipe, as it is (see ``add_mount``)."""
    assert eng._ctl is not None
    if am is None:
        raise FileNotFoundError(
            errno.ENOENT, "no autofs mount to serve a restored pipe for", m.path
        )
    fd, m.restored_fd = m.restored_fd, -1
    if am.mode is not m.mode:
        m.mode = am.mode
    m.dev = am.dev
    os.set_blocking(fd, False)
    pipe = RequestPipe(fd)
    try:
        m.attach_control(eng._ctl, am.timeout)
    except BaseException:
        pipe.close()
        raise
    m.adopted = True
    rediscover(m, get_table())
    pipe.route(m)
    eng._gone_devs.discard(m.dev)
    start_reader(eng, pipe)
    eng._mounts_changed()
    log.info(
        "%s: serving a restored %s mount through its restored pipe (fd %d), %d key(s) mounted",
        m.path,
        m.mode.value,
        fd,
        len(m.ledger.mounted),
    )


def reroute(eng: Automounter, pipe: RequestPipe, dev: int, name: bytes) -> ServedMount | None:
    """The mount a packet of an unknown device belongs to, after looking again; or None."""
    if dev in eng._gone_devs:
        return None  # a mount we took down; the kernel failed its waiters
    by_path = {m.path: m for m in pipe.routes.values()}
    found = None
    for am in autofs_mounts():
        if am.dev == dev and am.mount_point in by_path:
            found = by_path[am.mount_point]
    if found is None and not pipe.shared and len(by_path) == 1:
        (found,) = by_path.values()
    if found is None:
        log.warning("a packet for unknown autofs device %d (%s) dropped", dev, printable(name))
        eng._gone_devs.add(dev)
        return None
    change_dev(eng, found, dev)
    return found


def follow_devices(eng: Automounter) -> int:
    """Re-read every served mount's device number from mountinfo; follow those that changed.

    All changed mounts leave their pipe's routing table before any is routed again, since
    after a restore one mount's new number may be another's old one. Returns how many
    changed.
    """
    tops = {am.mount_point: am for am in autofs_mounts()}  # the last one is the topmost
    changed = []
    for m in list(eng._mounts.values()):
        am = tops.get(m.path)
        if am is not None and am.dev and am.dev != m.dev:
            changed.append((m, am.dev))
    for m, _ in changed:
        pipe = m.pipe
        if pipe is not None:
            pipe.unroute(m)
            m.pipe = pipe  # change_dev unroutes it again (a no-op now) and routes it anew
    for m, dev in changed:
        change_dev(eng, m, dev)
    for m in eng._mounts.values():
        eng._gone_devs.discard(m.dev)
    return len(changed)


def change_dev(eng: Automounter, m: ServedMount, dev: int) -> None:
    """``m``'s superblock is a new one (a restore): follow it, drop what was in flight."""
    assert eng._ctl is not None
    old = m.dev
    pipe = m.pipe
    if pipe is not None:
        pipe.unroute(m)
    m.dev = dev
    if pipe is not None:
        pipe.route(m)
    eng._gone_devs.add(old)
    eng._gone_devs.discard(dev)
    if m.ioctlfd >= 0:
        m.close_ioctlfd()
        try:
            m.ioctlfd = eng._ctl.openmount(m.path, dev)
        except OSError as exc:
            log.warning("%s: no ioctl fd on the new superblock: %s", m.path, exc)
    ledger = m.ledger
    dropped = list(ledger.in_flight)
    ledger.in_flight.clear()
    for key in dropped:
        if key and key in ledger.created and key not in ledger.mounted:
            eng._rmdir_key(m, key)
    if m.strictexpire:
        # The kernel has no call to set it on a live mount; a restore that dropped it
        # leaves the mount without it until it is mounted again.
        log.warning("%s: strictexpire cannot be applied again to a restored mount", m.path)
    log.info(
        "%s: the autofs superblock changed (device %d -> %d; a restore?): %d request(s) in "
        "flight dropped",
        m.path,
        old,
        dev,
        len(dropped),
    )


def drain(eng: Automounter, pipe: RequestPipe) -> None:
    """Fail every request queued in ``pipe``: no token is left unanswered."""
    if pipe.read_fd < 0 or eng._ctl is None:
        return
    while True:
        try:
            data = os.read(pipe.read_fd, _PACKET_BUFSIZE)
        except OSError:
            return  # BlockingIOError: empty
        if not data:
            return
        try:
            pkt = decode_packet(data)
        except PacketError:
            continue
        m = pipe.routes.get(getattr(pkt, "dev", 0))
        if m is None:
            continue
        status = (
            -errno.EAGAIN
            if isinstance(pkt, (ExpireIndirect, ExpireDirect, ExpireMultiV4))
            else -errno.ENOENT
        )
        Token(eng._ctl, m, pkt.token).answer(status)


def teardown(eng: Automounter, m: ServedMount) -> bool:
    """Unmount idle keys, make the mount catatonic and unmount it. False if busy keys remain."""
    assert eng._ctl is not None
    if not m.dev:
        # Never mounted or adopted (its start failed): whatever is at m.path is not ours.
        release(eng, m)
        return True
    ledger = m.ledger
    busy: list[str] = []
    for key in sorted(ledger.mounted | ledger.created):
        path = m.key_path(key)
        if key in ledger.mounted and not (not m.indirect and os.stat(path).st_dev == m.dev):
            try:
                umount2(path, UmountFlags.NOFOLLOW)
            except OSError as exc:
                if exc.errno == errno.EBUSY:
                    busy.append(key)
                    continue
                if exc.errno != errno.EINVAL:
                    log.warning("%s: %s", m.path, exc)
            ledger.discard_mounted(key)
        if key and key in ledger.created:
            eng._rmdir_key(m, key)
    pipe = m.pipe
    if pipe is not None and not pipe.shared:
        pipe.stop()
        drain(eng, pipe)
    if not m.lost and (m.indirect or busy):
        try:
            fd, opened = m.open_ioctlfd(eng._ctl)
            try:
                eng._ctl.catatonic(fd)
            finally:
                if opened:
                    os.close(fd)
        except OSError as exc:
            log.warning("%s: CATATONIC failed: %s", m.path, exc)
    if busy:
        log.warning(
            "%s: %d key(s) still in use, left mounted under a catatonic autofs mount "
            "(a new engine on this mount point adopts them): %s",
            m.path,
            len(busy),
            " ".join(printable(k) for k in busy[:10]) + (" ..." if len(busy) > 10 else ""),
        )
        m.created_dir = False
        release(eng, m)
        return False
    try:
        umount2(m.path, UmountFlags.NOFOLLOW)
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            log.warning("%s: autofs mount not removed: %s", m.path, exc)
            m.created_dir = False
        else:
            # Nothing is mounted beneath any more; what holds the root is a process's
            # cwd or a walk that CATATONIC just released. Detach it lazily.
            umount2(m.path, UmountFlags.DETACH | UmountFlags.NOFOLLOW)
    release(eng, m)
    return True


def release(eng: Automounter, m: ServedMount, *, keep_dir: bool = False) -> None:
    """Let go of ``m``'s fds (and its pipe, unless shared); remove a directory we made."""
    pipe = m.pipe
    if pipe is not None:
        pipe.unroute(m)
        if not pipe.shared:
            pipe.close()
    if m.dev:
        eng._gone_devs.add(m.dev)
    if m.restored_fd >= 0:
        fd, m.restored_fd = m.restored_fd, -1
        os.close(fd)
    m.close_ioctlfd()
    if m.created_dir and not keep_dir:
        try:
            os.rmdir(m.path)
        except OSError:
            pass
        m.created_dir = False


def close_pipes(eng: Automounter) -> None:
    if eng._shared is not None:
        eng._shared.close()
        eng._shared = None
