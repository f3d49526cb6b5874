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
    "find_autofs_mount",
    "find_pipe_holders",
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


def find_autofs_mount(path: str | os.PathLike[str], pid: int | str = "self") -> AutofsMount:
    """The topmost autofs mount whose mount point is ``path``; ``FileNotFoundError`` if none."""
    want = os.path.abspath(os.fspath(path))
    found = [m for m in autofs_mounts(pid) if m.mount_point == want]
    if not found:
        raise FileNotFoundError(2, f"no autofs mount at {want}", want)
    return found[-1]


@attrs.frozen
class PipeHolder:
    """A process that holds an end of a pipe."""

    pid: int
    fd: int
    end: str
    """``"read"``, ``"write"`` or ``"both"`` (an O_RDWR open of a FIFO)."""
    comm: str
    pgrp: int


def _fd_access_mode(pid: int, fd: int) -> int | None:
    try:
        with open(f"/proc/{pid}/fdinfo/{fd}", "rb") as f:
            for line in f:
                if line.startswith(b"flags:"):
                    return int(line.split()[1], 8) & os.O_ACCMODE
    except OSError:
        return None
    return None


def _read_comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm", "rb") as f:
            return f.read().decode(errors="replace").rstrip("\n")
    except OSError:
        return "?"


def _read_pgrp(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return -1
    # The command name (field 2) may contain spaces and parentheses: split after the last ")".
    return int(data[data.rindex(b")") + 2 :].split()[2])


def find_pipe_holders(pipe_ino: int, pids: list[int] | None = None) -> list[PipeHolder]:
    """Every (process, fd) that holds the pipe whose inode is ``pipe_ino``.

    Scans ``/proc/<pid>/fd`` for ``pipe:[<ino>]`` links and reads the access mode from
    fdinfo. Processes that vanish or deny access during the scan are skipped. The kernel's
    own reference to the write end (the autofs superblock's) is not an fd and never shows.
    """
    target = f"pipe:[{pipe_ino}]"
    if pids is None:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    out = []
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        try:
            names = os.listdir(fd_dir)
        except OSError:
            continue
        for name in names:
            try:
                if os.readlink(f"{fd_dir}/{name}") != target:
                    continue
            except OSError:
                continue
            fd = int(name)
            mode = _fd_access_mode(pid, fd)
            end = {os.O_RDONLY: "read", os.O_WRONLY: "write", os.O_RDWR: "both"}.get(
                mode if mode is not None else -1, "unknown"
            )
            out.append(
                PipeHolder(pid=pid, fd=fd, end=end, comm=_read_comm(pid), pgrp=_read_pgrp(pid))
            )
    return out


def is_pipe(fd: int) -> bool:
    """True when ``fd`` is a pipe or FIFO."""
    return stat.S_ISFIFO(os.fstat(fd).st_mode)
