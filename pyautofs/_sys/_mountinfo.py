"""``/proc/<pid>/mountinfo`` and the ``/proc/*/fd`` scan that finds a pipe's holders.

A mountinfo line (``proc(5)``)::

    42 27 0:39 / /mnt/auto rw,relatime shared:5 - autofs pyautofs rw,fd=4,pgrp=14862,...
    (1)(2) (3) (4)  (5)      (6)         (7)   (8) (9)    (10)      (11)

Fields 4, 5 and 10 escape space, tab, newline and backslash as three-digit octal
(``\\040``). Optional fields (7) run until the lone ``-``.

For autofs, the kernel prints the super options as ``fd=,[uid=,gid=,]pgrp=,timeout=,
minproto=,maxproto=,<mode>[,strictexpire][,ignore][,pipe_ino=]``. ``pipe_ino`` exists on
CONFIG_CHECKPOINT_RESTORE kernels: the inode of the request pipe, which is how a tool finds
the process holding the pipe's read end. A catatonic mount shows ``fd=-1,pipe_ino=-1``.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable

import attrs

from ._mount import AutofsMode

__all__ = [
    "MountInfo",
    "AutofsMount",
    "PipeHolder",
    "unescape",
    "parse_mountinfo",
    "read_mountinfo",
    "autofs_mounts",
    "topmost",
    "top_autofs_mounts",
    "find_autofs_mount",
    "scan_pipe_holders",
    "find_pipe_holders",
    "hidden_processes",
    "live_readers",
    "fd_status_flags",
]

_OCTAL = re.compile(rb"\\([0-7]{3})")


def unescape(field: bytes) -> str:
    """Undo mountinfo's octal escapes and decode with the filesystem encoding."""
    if b"\\" in field:
        field = _OCTAL.sub(lambda m: bytes([int(m.group(1), 8) & 0xFF]), field)
    return os.fsdecode(field)


@attrs.frozen
class MountInfo:
    """One line of mountinfo."""

    mount_id: int
    parent_id: int
    dev: int
    """The device as ``st_dev`` encodes it (``os.makedev(major, minor)``)."""
    root: str
    mount_point: str
    mount_options: tuple[str, ...]
    optional: tuple[str, ...]
    fstype: str
    source: str
    super_options: tuple[str, ...]

    def super_option(self, name: str) -> str | None:
        """The value of ``name=`` among the super options, ``""`` for a flag, else None."""
        for opt in self.super_options:
            key, eq, value = opt.partition("=")
            if key == name:
                return value if eq else ""
        return None


def _parse_line(line: bytes) -> MountInfo:
    fields = line.split()
    sep = fields.index(b"-", 6)
    major, _, minor = fields[2].partition(b":")
    return MountInfo(
        mount_id=int(fields[0]),
        parent_id=int(fields[1]),
        dev=os.makedev(int(major), int(minor)),
        root=unescape(fields[3]),
        mount_point=unescape(fields[4]),
        mount_options=tuple(unescape(fields[5]).split(",")),
        optional=tuple(f.decode() for f in fields[6:sep]),
        fstype=unescape(fields[sep + 1]),
        source=unescape(fields[sep + 2]) if len(fields) > sep + 2 else "",
        super_options=tuple(unescape(fields[sep + 3]).split(",")) if len(fields) > sep + 3 else (),
    )


def parse_mountinfo(data: bytes) -> list[MountInfo]:
    """Parse the whole text of a mountinfo file. Malformed lines raise ``ValueError``."""
    out = []
    for lineno, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(_parse_line(line))
        except (ValueError, IndexError):
            raise ValueError(f"mountinfo line {lineno} is malformed: {line[:200]!r}") from None
    return out


def read_mountinfo(pid: int | str = "self") -> list[MountInfo]:
    """The mounts visible to process ``pid`` (default: this process)."""
    with open(f"/proc/{pid}/mountinfo", "rb") as f:
        return parse_mountinfo(f.read())


@attrs.frozen
class AutofsMount:
    """An autofs mount, as mountinfo describes it."""

    mount_point: str
    dev: int
    """``st_dev`` of the autofs superblock: the devid for OPENMOUNT, the ``dev`` in packets."""
    mount_id: int
    parent_id: int
    source: str
    fd: int
    """The write-end fd number the owner passed at mount time (-1 when catatonic). It names
    a slot in the *mounter's* fd table at that moment; never trust it to still be there."""
    pgrp: int
    """The owner process group (kept after going catatonic)."""
    timeout: int
    minproto: int
    maxproto: int
    mode: AutofsMode
    strictexpire: bool
    ignore: bool
    uid: int
    gid: int
    pipe_ino: int | None
    """Inode of the request pipe; None on kernels without CONFIG_CHECKPOINT_RESTORE."""
    mount_options: tuple[str, ...]

    @property
    def catatonic(self) -> bool:
        """True when the kernel has dropped the pipe: lookups of missing keys fail ENOENT."""
        return self.fd == -1 or self.pipe_ino == -1

    @classmethod
    def from_mountinfo(cls, info: MountInfo) -> AutofsMount:
        """Type the super options of an autofs mountinfo record."""
        opts: dict[str, str] = {}
        mode = AutofsMode.INDIRECT
        flags = set()
        for opt in info.super_options:
            key, eq, value = opt.partition("=")
            if eq:
                opts[key] = value
            elif key in ("indirect", "direct", "offset"):
                mode = AutofsMode(key)
            else:
                flags.add(key)
        pipe_ino = opts.get("pipe_ino")
        return cls(
            mount_point=info.mount_point,
            dev=info.dev,
            mount_id=info.mount_id,
            parent_id=info.parent_id,
            source=info.source,
            fd=int(opts.get("fd", "-1")),
            pgrp=int(opts.get("pgrp", "0")),
            timeout=int(opts.get("timeout", "0")),
            minproto=int(opts.get("minproto", "0")),
            maxproto=int(opts.get("maxproto", "0")),
            mode=mode,
            strictexpire="strictexpire" in flags,
            ignore="ignore" in flags,
            uid=int(opts.get("uid", "0")),
            gid=int(opts.get("gid", "0")),
            pipe_ino=None if pipe_ino is None else int(pipe_ino),
            mount_options=info.mount_options,
        )


def autofs_mounts(pid: int | str = "self") -> list[AutofsMount]:
    """Every autofs mount visible to process ``pid``, in mount order."""
    return [AutofsMount.from_mountinfo(m) for m in read_mountinfo(pid) if m.fstype == "autofs"]


def topmost(mounts: Iterable[AutofsMount]) -> dict[str, AutofsMount]:
    """The topmost of ``mounts`` (in mountinfo's order) at each mount point, by mount point.

    Mounts can stack on one path; mountinfo lists them in mount order, so the last one at a
    path is the one a lookup there reaches.
    """
    return {m.mount_point: m for m in mounts}


def top_autofs_mounts(pid: int | str = "self") -> dict[str, AutofsMount]:
    """The topmost autofs mount at each mount point visible to ``pid``, by mount point."""
    return topmost(autofs_mounts(pid))


def find_autofs_mount(path: str | os.PathLike[str], pid: int | str = "self") -> AutofsMount:
    """The topmost autofs mount whose mount point is ``path``; ``FileNotFoundError`` if none."""
    want = os.path.abspath(os.fspath(path))
    found = top_autofs_mounts(pid).get(want)
    if found is None:
        raise FileNotFoundError(2, f"no autofs mount at {want}", want)
    return found


# -- who holds a pipe: the /proc/*/fd scan ---------------------------------------------


@attrs.frozen
class PipeHolder:
    """A process that holds an end of a pipe."""

    pid: int
    fd: int
    end: str
    """``"read"``, ``"write"`` or ``"both"`` (an O_RDWR open of a FIFO)."""
    comm: str
    pgrp: int

    @property
    def reads(self) -> bool:
        """Whether this fd can read the pipe (``"read"`` or ``"both"``)."""
        return self.end in ("read", "both")

    @property
    def writes(self) -> bool:
        """Whether this fd can write the pipe (``"write"`` or ``"both"``)."""
        return self.end in ("write", "both")


# The mode of a /proc/<pid>/fd link mirrors the open file's access mode in its owner bits.
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


def scan_pipe_holders(
    inos: Iterable[int], pids: Iterable[int] | None = None
) -> dict[int, list[PipeHolder]]:
    """One pass over ``/proc/*/fd``: every (process, fd) holding one of the pipes ``inos``.

    One ``readlink`` per fd on the machine (or of ``pids``), whatever the number of pipes
    asked for. Which end an fd holds comes from the link's own mode (``lstat``: the owner's
    r/w bits mirror the open file's access mode), one syscall instead of opening and parsing
    fdinfo. Processes that vanish or deny access during the scan are skipped. The kernel's
    own reference to an autofs pipe's write end (the superblock's) is not an fd and never
    shows. Each pipe's holders come sorted by pid and fd; a pipe nobody holds is absent.
    """
    links = {f"pipe:[{ino}]": ino for ino in inos}
    found: dict[int, list[PipeHolder]] = {}
    if not links:
        return found
    names = [str(p) for p in pids] if pids is not None else os.listdir("/proc")
    readlink = os.readlink
    for name in names:
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


def find_pipe_holders(pipe_ino: int, pids: Iterable[int] | None = None) -> list[PipeHolder]:
    """Every (process, fd) that holds the pipe whose inode is ``pipe_ino``, by pid and fd.

    One pipe's share of :func:`scan_pipe_holders` (``pids``: look only at these processes).
    """
    return scan_pipe_holders([pipe_ino], pids).get(pipe_ino, [])


def hidden_processes() -> list[int]:
    """Processes whose fd table this user cannot read: :func:`scan_pipe_holders` does not
    see their pipes. Empty for root."""
    if os.geteuid() == 0:
        return []
    hidden = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                os.listdir(f"/proc/{name}/fd")
            except PermissionError:
                hidden.append(int(name))
            except OSError:
                pass
    return hidden


def live_readers(mount: AutofsMount, exclude_pid: int | None = None) -> list[PipeHolder]:
    """Who reads a live autofs mount's request pipe: the fds that can read it, by pid and fd.

    Empty for a catatonic mount and on kernels without ``pipe_ino=``. ``exclude_pid``
    leaves one process out (typically this one, when it checks for *another* server).
    """
    if mount.catatonic or mount.pipe_ino is None:
        return []
    return [h for h in find_pipe_holders(mount.pipe_ino) if h.reads and h.pid != exclude_pid]


def fd_status_flags(pid: int, fd: int) -> int:
    """The file status flags (``O_NONBLOCK``...) of ``pid``'s ``fd``, from its fdinfo."""
    with open(f"/proc/{pid}/fdinfo/{fd}", "rb") as f:
        for line in f:
            if line.startswith(b"flags:"):
                return int(line.split()[1], 8)
    return 0
