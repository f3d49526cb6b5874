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

import base64
import errno
import json
import os
import stat
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs

from .._proto._errors import FormatError
from .._sys._autofs import AutofsControl
from .._sys._mount import AutofsMode, AutofsOptions, MountFlags, UmountFlags, mount, umount2
from .._sys._mountinfo import AutofsMount, MountInfo, PipeHolder, read_mountinfo
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
    "dump_autofs_mounts",
    "autofs_images_to_bytes",
    "autofs_images_from_bytes",
    "write_autofs_images",
    "read_autofs_images",
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


class AutofsImageError(FormatError):
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


_DUMP_FORMAT = "pyautofs.autofs-dump"
_DUMP_VERSION = 1
_MAX_IMAGE_FILE = 1 << 30


def autofs_images_to_bytes(images: Sequence[AutofsMountImage]) -> bytes:
    """One document holding several mount images (what ``pyautofs dump -o`` writes)."""
    doc = {
        "format": _DUMP_FORMAT,
        "version": _DUMP_VERSION,
        "mounts": [image.to_json() for image in images],
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def autofs_images_from_bytes(raw: bytes | bytearray | memoryview) -> list[AutofsMountImage]:
    """Parse :func:`autofs_images_to_bytes` output, or one :meth:`AutofsMountImage.to_bytes`.

    Anything else raises :class:`AutofsImageError`.
    """
    try:
        obj = json.loads(bytes(raw))
    except ValueError as exc:
        raise AutofsImageError(f"autofs image file is not JSON: {exc}") from None
    if isinstance(obj, dict) and obj.get("format") == _FORMAT:
        return [AutofsMountImage.from_json(obj)]
    if not isinstance(obj, dict) or obj.get("format") != _DUMP_FORMAT:
        raise AutofsImageError("not a pyautofs autofs image file")
    if obj.get("version") != _DUMP_VERSION:
        raise AutofsImageError(
            f"autofs image file version {obj.get('version')!r} is not supported "
            f"(this reads {_DUMP_VERSION})"
        )
    mounts = obj.get("mounts")
    if not isinstance(mounts, list):
        raise AutofsImageError("autofs image file: mounts must be a list")
    return [AutofsMountImage.from_json(m) for m in mounts]


def write_autofs_images(path: str | os.PathLike[str], images: Sequence[AutofsMountImage]) -> None:
    """Write ``images`` to ``path``: mode 0600 (the pipe holds the names users looked up),
    through a temporary file in the same directory renamed into place, so a reader never
    sees half a file and a failed write leaves the old file as it was."""
    target = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(target))
    tmp = os.path.join(directory, f".{os.path.basename(target)}.{os.getpid()}.tmp")
    data = autofs_images_to_bytes(images)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def read_autofs_images(path: str | os.PathLike[str]) -> list[AutofsMountImage]:
    """Read what :func:`write_autofs_images` wrote (or one mount image's bytes).

    Refuses anything that is not a regular file (a FIFO would block) with an ``OSError``,
    and a file that is not an image with :class:`AutofsImageError`.
    """
    target = os.fspath(path)
    fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file, so not an image", target)
        if st.st_size > _MAX_IMAGE_FILE:
            raise OSError(errno.EFBIG, f"larger than {_MAX_IMAGE_FILE} bytes", target)
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return autofs_images_from_bytes(b"".join(chunks))


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


def _scan_pipe_holders(inos: set[int]) -> dict[int, list[PipeHolder]]:
    """One pass over ``/proc/*/fd``: every (process, fd) holding one of the pipes ``inos``.

    One ``readlink`` per fd on the machine, whatever the number of pipes asked for. Which
    end an fd holds comes from the link's own mode (``lstat``: the owner's r/w bits mirror
    the open file's access mode), one syscall instead of opening and parsing fdinfo.
    Processes that vanish or deny access during the scan are skipped.
    """
    links = {f"pipe:[{ino}]": ino for ino in inos}
    found: dict[int, list[PipeHolder]] = {}
    readlink = os.readlink
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        fd_dir = f"/proc/{name}/fd/"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        pid = int(name)
        comm: str | None = None
        pgrp = -1
        for fd in fds:
            try:
                ino = links.get(readlink(fd_dir + fd))
                if ino is None:
                    continue
                mode = os.lstat(fd_dir + fd).st_mode
            except OSError:
                continue
            if comm is None:
                comm, pgrp = _comm_and_pgrp(pid)
            end = _END.get(mode & (stat.S_IRUSR | stat.S_IWUSR), "unknown")
            found.setdefault(ino, []).append(PipeHolder(pid, int(fd), end, comm, pgrp))
    for holders in found.values():
        holders.sort(key=lambda h: (h.pid, h.fd))
    return found


_END = {stat.S_IRUSR: "read", stat.S_IWUSR: "write", stat.S_IRUSR | stat.S_IWUSR: "both"}


def _comm_and_pgrp(pid: int) -> tuple[str, int]:
    """The command name and process group of ``pid``, from one read of its stat file."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return "?", -1
    # The command name (field 2) may hold spaces and parentheses: split at the last ")".
    close = data.rindex(b")")
    comm = data[data.index(b"(") + 1 : close].decode(errors="replace")
    return comm, int(data[close + 2 :].split()[2])


class _Tree:
    """Mountinfo read once, indexed for any number of lookups."""

    def __init__(self, infos: Sequence[MountInfo]) -> None:
        self.infos = infos
        self.children: dict[int, list[MountInfo]] = {}
        self.autofs: dict[str, MountInfo] = {}
        for info in infos:
            self.children.setdefault(info.parent_id, []).append(info)
            if info.fstype == "autofs":
                self.autofs[info.mount_point] = info  # the last one is the topmost

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
    mounts = [(i, AutofsMount.from_mountinfo(i)) for i in tree.infos if i.fstype == "autofs"]
    inos = {m.pipe_ino for _, m in mounts if m.pipe_ino is not None and m.pipe_ino >= 0}
    holders_of = _scan_pipe_holders(inos) if inos else {}
    out = []
    for info, m in mounts:
        holders = holders_of.get(m.pipe_ino, []) if m.pipe_ino is not None else []
        out.append(
            AutofsMountReport(
                mount=m,
                readers=tuple(h for h in holders if h.end in ("read", "both")),
                writers=tuple(h for h in holders if h.end in ("write", "both")),
                beneath=tree.beneath(info.mount_id),
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
    the live mount changes. To dump several mounts, :func:`dump_autofs_mounts` reads
    mountinfo and scans ``/proc`` once for all of them.

    Raises ``FileNotFoundError`` when no autofs mount is at ``path``, ``OSError(ENOTSUP)`` on
    a kernel whose mountinfo lacks ``pipe_ino`` (no CONFIG_CHECKPOINT_RESTORE), and
    ``LookupError`` when ``owner_pid`` holds no read end of the pipe.
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
        infos = list(tree.autofs.values())
    else:
        infos = []
        for path in paths:
            want = os.path.abspath(os.fspath(path))
            info = tree.autofs.get(want)
            if info is None:
                raise FileNotFoundError(errno.ENOENT, f"no autofs mount at {want}", want)
            infos.append(info)
    mounts = [AutofsMount.from_mountinfo(info) for info in infos]
    for m in mounts:
        if not m.catatonic and m.pipe_ino is None:
            raise OSError(
                errno.ENOTSUP,
                f"{m.mount_point}: mountinfo has no pipe_ino= (kernel without "
                "CONFIG_CHECKPOINT_RESTORE), so the pipe's owner cannot be found",
            )
    inos = {m.pipe_ino for m in mounts if not m.catatonic and m.pipe_ino is not None}
    holders_of = _scan_pipe_holders(inos) if inos else {}
    out = []
    for info, m in zip(infos, mounts, strict=True):
        holders = () if m.catatonic else tuple(holders_of.get(m.pipe_ino or -1, ()))
        chosen = None if m.catatonic else _choose_owner(holders, m.pgrp, owner_pid)
        if chosen is None and owner_pid is not None and not m.catatonic:
            if paths is None:
                continue  # not one of owner_pid's mounts
            raise LookupError(f"pid {owner_pid} holds no read end of {m.mount_point}'s pipe")
        if paths is None and owner_pid is not None and m.catatonic:
            continue
        out.append(_image(m, holders, chosen, tree.beneath(info.mount_id)))
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
