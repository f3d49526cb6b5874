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
:func:`~pyautofs.snapshot_pipe`, which consumes nothing. Queued packets are pending requests
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

import base64
import errno
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs

from .._sys._autofs import AutofsControl
from .._sys._mount import AutofsMode, AutofsOptions, MountFlags, UmountFlags, mount, umount2
from .._sys._mountinfo import AutofsMount, MountInfo, PipeHolder, find_pipe_holders, read_mountinfo
from .._sys._pipes import pipe2
from ._pipeimage import PipeImage, PipeImageError, snapshot_pipe

__all__ = [
    "AutofsImageError",
    "AutofsOwner",
    "BeneathMount",
    "AutofsMountReport",
    "AutofsMountImage",
    "list_autofs_mounts",
    "dump_autofs_mount",
    "recreate_autofs_mount",
    "take_over_autofs_mount",
]

_FORMAT = "pyautofs.autofs-mount"
_VERSION = 1

# Per-mount flags that mountinfo shows and mount(2) takes; the rest (rw, relatime as the
# default) need no flag.
_MOUNT_FLAGS = {
    "ro": MountFlags.RDONLY,
    "nosuid": MountFlags.NOSUID,
    "nodev": MountFlags.NODEV,
    "noexec": MountFlags.NOEXEC,
    "noatime": MountFlags.NOATIME,
    "nodiratime": MountFlags.NODIRATIME,
    "strictatime": MountFlags.STRICTATIME,
    "nosymfollow": MountFlags.NOSYMFOLLOW,
}


class AutofsImageError(ValueError):
    """A serialised autofs mount image that this version of pyautofs cannot read."""


@attrs.frozen
class AutofsOwner:
    """The process that owned an autofs mount's pipe when it was dumped."""

    pid: int
    pgrp: int
    comm: str
    read_fd: int
    """Where the owner held the pipe's read end."""
    write_fd: int | None
    """Where it held a write end (automount keeps one), or None (systemd closes it)."""
    read_nonblock: bool = False
    """The read end was O_NONBLOCK (systemd sets it)."""

    @property
    def keeps_write_end(self) -> bool:
        """True for the automount style, False for the systemd style."""
        return self.write_fd is not None


@attrs.frozen
class BeneathMount:
    """A mount on or below an autofs mount (a mounted key, or what covers a direct mount)."""

    mount_point: str
    fstype: str
    source: str


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


@attrs.frozen
class AutofsMountImage:
    """Everything needed to rebuild an autofs mount, and what it looked like (for humans).

    ``to_bytes``/``from_bytes`` (and ``to_json``/``from_json``) give a versioned JSON form; the
    pipe image inside it is base64 of :meth:`PipeImage.to_bytes`.
    """

    mount_point: str
    mode: AutofsMode
    source: str
    timeout: int
    uid: int = 0
    gid: int = 0
    minproto: int = 5
    maxproto: int = 5
    strictexpire: bool = False
    ignore: bool = False
    mount_options: tuple[str, ...] = ("rw", "relatime")
    dev: int = 0
    """``st_dev`` of the dumped superblock; the restored superblock gets its own."""
    pipe_ino: int | None = None
    fd: int = -1
    """mountinfo's ``fd=``: informational, never trusted."""
    pgrp: int = 0
    catatonic: bool = False
    owner: AutofsOwner | None = None
    """None when catatonic, or when no process held the read end (the kernel would go
    catatonic at the next lookup); either way the mount is restored catatonic."""
    holders: tuple[PipeHolder, ...] = ()
    pipe: PipeImage | None = None
    """What the pipe held, captured without consuming it (None without an owner)."""
    beneath: tuple[BeneathMount, ...] = ()

    @property
    def pending_requests(self) -> int:
        """Packets queued in the pipe at dump time: requests the old mount still owes."""
        return 0 if self.pipe is None else len(self.pipe.packets)

    def autofs_options(self, pipe_fd: int, pgrp: int | None = None) -> AutofsOptions:
        """The mount options to rebuild this mount with ``pipe_fd`` as its pipe."""
        return AutofsOptions(
            fd=pipe_fd,
            pgrp=pgrp,
            uid=self.uid or None,
            gid=self.gid or None,
            minproto=self.minproto,
            maxproto=self.maxproto,
            mode=self.mode,
            strictexpire=self.strictexpire,
            ignore=self.ignore,
        )

    def mount_flags(self) -> MountFlags:
        """The mount(2) flags that reproduce ``mount_options``."""
        flags = MountFlags.NONE
        for opt in self.mount_options:
            flags |= _MOUNT_FLAGS.get(opt, MountFlags.NONE)
        return flags

    # -- serialisation -----------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """A JSON-compatible dict, with a format name and version."""
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "mount_point": self.mount_point,
            "mode": self.mode.value,
            "source": self.source,
            "timeout": self.timeout,
            "uid": self.uid,
            "gid": self.gid,
            "minproto": self.minproto,
            "maxproto": self.maxproto,
            "strictexpire": self.strictexpire,
            "ignore": self.ignore,
            "mount_options": list(self.mount_options),
            "dev": self.dev,
            "pipe_ino": self.pipe_ino,
            "fd": self.fd,
            "pgrp": self.pgrp,
            "catatonic": self.catatonic,
            "owner": None if self.owner is None else attrs.asdict(self.owner),
            "holders": [attrs.asdict(h) for h in self.holders],
            "pipe": None
            if self.pipe is None
            else base64.b64encode(self.pipe.to_bytes()).decode("ascii"),
            "beneath": [attrs.asdict(b) for b in self.beneath],
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> AutofsMountImage:
        """Parse :meth:`to_json` output; anything else raises :class:`AutofsImageError`."""
        if not isinstance(obj, Mapping):
            raise AutofsImageError(f"autofs mount image must be a JSON object, not {obj!r:.60}")
        if obj.get("format") != _FORMAT:
            raise AutofsImageError(f"not an autofs mount image (format {obj.get('format')!r})")
        if obj.get("version") != _VERSION:
            raise AutofsImageError(
                f"autofs mount image version {obj.get('version')!r} is not supported "
                f"(this reads {_VERSION})"
            )
        r = _Reader(obj)
        try:
            mode = AutofsMode(r.get("mode", str))
        except ValueError:
            raise AutofsImageError(f"autofs mount image: bad mode {obj.get('mode')!r}") from None
        owner_obj = r.get("owner", dict, optional=True)
        owner = None
        if owner_obj is not None:
            o = _Reader(owner_obj, "owner.")
            owner = AutofsOwner(
                pid=o.get("pid", int),
                pgrp=o.get("pgrp", int),
                comm=o.get("comm", str),
                read_fd=o.nonneg("read_fd"),
                write_fd=o.nonneg("write_fd", optional=True),
                read_nonblock=o.get("read_nonblock", bool),
            )
        pipe_text = r.get("pipe", str, optional=True)
        pipe = None
        if pipe_text is not None:
            try:
                pipe = PipeImage.from_bytes(base64.b64decode(pipe_text, validate=True))
            except (PipeImageError, ValueError) as exc:
                raise AutofsImageError(f"autofs mount image: bad pipe image: {exc}") from None
        try:
            return cls(
                mount_point=r.get("mount_point", str),
                mode=mode,
                source=r.get("source", str),
                timeout=r.nonneg("timeout"),
                uid=r.nonneg("uid"),
                gid=r.nonneg("gid"),
                minproto=r.get("minproto", int),
                maxproto=r.get("maxproto", int),
                strictexpire=r.get("strictexpire", bool),
                ignore=r.get("ignore", bool),
                mount_options=tuple(r.strings("mount_options")),
                dev=r.nonneg("dev"),
                pipe_ino=r.get("pipe_ino", int, optional=True),
                fd=r.get("fd", int),
                pgrp=r.get("pgrp", int),
                catatonic=r.get("catatonic", bool),
                owner=owner,
                holders=tuple(
                    PipeHolder(
                        pid=h.get("pid", int),
                        fd=h.get("fd", int),
                        end=h.get("end", str),
                        comm=h.get("comm", str),
                        pgrp=h.get("pgrp", int),
                    )
                    for h in r.objects("holders")
                ),
                pipe=pipe,
                beneath=tuple(
                    BeneathMount(
                        mount_point=b.get("mount_point", str),
                        fstype=b.get("fstype", str),
                        source=b.get("source", str),
                    )
                    for b in r.objects("beneath")
                ),
            )
        except (TypeError, ValueError) as exc:
            if isinstance(exc, AutofsImageError):
                raise
            raise AutofsImageError(f"autofs mount image: {exc}") from None

    def to_bytes(self) -> bytes:
        """UTF-8 JSON of :meth:`to_json`."""
        return json.dumps(self.to_json(), separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, raw: bytes | bytearray | memoryview) -> AutofsMountImage:
        """Parse :meth:`to_bytes` output; anything else raises :class:`AutofsImageError`."""
        try:
            obj = json.loads(bytes(raw))
        except ValueError as exc:  # includes UnicodeDecodeError
            raise AutofsImageError(f"autofs mount image is not JSON: {exc}") from None
        return cls.from_json(obj)


class _Reader:
    """Typed, checked access to one JSON object of an image."""

    def __init__(self, obj: Mapping[str, Any], prefix: str = "") -> None:
        self.obj = obj
        self.prefix = prefix

    def get(self, key: str, type_: type[Any], optional: bool = False) -> Any:
        if key not in self.obj:
            raise AutofsImageError(f"autofs mount image: {self.prefix}{key} is missing")
        value = self.obj[key]
        if value is None and optional:
            return None
        # bool is an int subclass: keep them apart both ways.
        ok = isinstance(value, type_) and (type_ is bool or not isinstance(value, bool))
        if not ok:
            raise AutofsImageError(
                f"autofs mount image: {self.prefix}{key} must be {type_.__name__}, "
                f"not {value!r:.60}"
            )
        return value

    def nonneg(self, key: str, optional: bool = False) -> Any:
        value = self.get(key, int, optional)
        if value is not None and value < 0:
            raise AutofsImageError(f"autofs mount image: {self.prefix}{key} is negative")
        return value

    def strings(self, key: str) -> list[str]:
        value: list[Any] = self.get(key, list)
        if not all(isinstance(v, str) for v in value):
            raise AutofsImageError(f"autofs mount image: {self.prefix}{key} must be strings")
        return [str(v) for v in value]

    def objects(self, key: str) -> Iterable[_Reader]:
        value = self.get(key, list)
        for i, item in enumerate(value):
            if not isinstance(item, dict):
                raise AutofsImageError(f"autofs mount image: {self.prefix}{key}[{i}] not an object")
            yield _Reader(item, f"{self.prefix}{key}[{i}].")


# -- inspecting ------------------------------------------------------------------------


def _beneath(infos: Sequence[MountInfo], mount_id: int) -> tuple[BeneathMount, ...]:
    """Every mount stacked on or below ``mount_id``, by walking parent ids."""
    children: dict[int, list[MountInfo]] = {}
    for info in infos:
        children.setdefault(info.parent_id, []).append(info)
    out: list[BeneathMount] = []
    stack = [mount_id]
    seen = {mount_id}
    while stack:
        for child in children.get(stack.pop(), ()):
            if child.mount_id in seen:
                continue
            seen.add(child.mount_id)
            out.append(BeneathMount(child.mount_point, child.fstype, child.source))
            stack.append(child.mount_id)
    return tuple(out)


def _pipe_holder_pids(inos: set[int]) -> dict[int, list[int]]:
    """One pass over ``/proc/*/fd``: which pids hold each of the pipes ``inos``."""
    links = {f"pipe:[{ino}]": ino for ino in inos}
    found: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        fd_dir = f"/proc/{name}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        hit: set[int] = set()
        for fd in fds:
            try:
                ino = links.get(os.readlink(f"{fd_dir}/{fd}"))
            except OSError:
                continue
            if ino is not None:
                hit.add(ino)
        for ino in hit:
            found.setdefault(ino, []).append(int(name))
    return found


def list_autofs_mounts(pid: int | str = "self") -> list[AutofsMountReport]:
    """Every autofs mount visible to ``pid``, with the processes holding each one's pipe.

    One scan of ``/proc/*/fd`` serves all mounts. Needs privilege to see other users' fds.
    """
    infos = read_mountinfo(pid)
    mounts = [(i, AutofsMount.from_mountinfo(i)) for i in infos if i.fstype == "autofs"]
    inos = {m.pipe_ino for _, m in mounts if m.pipe_ino is not None and m.pipe_ino >= 0}
    pids = _pipe_holder_pids(inos) if inos else {}
    out = []
    for info, m in mounts:
        holders: list[PipeHolder] = []
        if m.pipe_ino is not None and m.pipe_ino in pids:
            holders = find_pipe_holders(m.pipe_ino, pids[m.pipe_ino])
        out.append(
            AutofsMountReport(
                mount=m,
                readers=tuple(h for h in holders if h.end in ("read", "both")),
                writers=tuple(h for h in holders if h.end in ("write", "both")),
                beneath=_beneath(infos, info.mount_id),
            )
        )
    return out


# -- dumping ---------------------------------------------------------------------------


def _fd_status_flags(pid: int, fd: int) -> int:
    with open(f"/proc/{pid}/fdinfo/{fd}", "rb") as f:
        for line in f:
            if line.startswith(b"flags:"):
                return int(line.split()[1], 8)
    return 0


def _choose_owner(
    holders: Sequence[PipeHolder], pgrp: int, owner_pid: int | None
) -> PipeHolder | None:
    readers = [h for h in holders if h.end in ("read", "both")]
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
    the live mount changes.

    Raises ``FileNotFoundError`` when no autofs mount is at ``path``, ``OSError(ENOTSUP)`` on
    a kernel whose mountinfo lacks ``pipe_ino`` (no CONFIG_CHECKPOINT_RESTORE), and
    ``LookupError`` when ``owner_pid`` holds no read end of the pipe.
    """
    want = os.path.abspath(os.fspath(path))
    infos = read_mountinfo()
    found = [i for i in infos if i.fstype == "autofs" and i.mount_point == want]
    if not found:
        raise FileNotFoundError(errno.ENOENT, f"no autofs mount at {want}", want)
    info = found[-1]
    m = AutofsMount.from_mountinfo(info)
    owner = None
    pipe = None
    holders: tuple[PipeHolder, ...] = ()
    if not m.catatonic:
        if m.pipe_ino is None:
            raise OSError(
                errno.ENOTSUP,
                f"{want}: mountinfo has no pipe_ino= (kernel without "
                "CONFIG_CHECKPOINT_RESTORE), so the pipe's owner cannot be found",
            )
        holders = tuple(find_pipe_holders(m.pipe_ino))
        chosen = _choose_owner(holders, m.pgrp, owner_pid)
        if chosen is None and owner_pid is not None:
            raise LookupError(f"pid {owner_pid} holds no read end of {want}'s pipe")
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
            nonblock = bool(_fd_status_flags(chosen.pid, chosen.fd) & os.O_NONBLOCK)
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
        beneath=_beneath(infos, info.mount_id),
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
