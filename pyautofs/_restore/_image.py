"""The autofs mount image: what :func:`~pyautofs.restore.dump_autofs_mount` captures, and
its versioned JSON form (one mount, or a file of several as ``pyautofs dump`` writes).

An image is untrusted input when it is read back: every field is type-checked, and anything
that is not an image this version can read raises :class:`AutofsImageError` (a
:class:`~pyautofs.FormatError`), never a bare ``KeyError`` or ``TypeError``. The pipe's
contents (the names users looked up) are inside, so image files are written 0600.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import attrs

from .._proto._errors import FormatError
from .._sys._files import read_regular_file
from .._sys._mount import AutofsMode, AutofsOptions, MountFlags
from .._sys._mountinfo import PipeHolder
from ._pipeimage import PipeImage, PipeImageError

__all__ = [
    "AutofsImageError",
    "AutofsOwner",
    "BeneathMount",
    "AutofsMountImage",
    "autofs_images_to_bytes",
    "autofs_images_from_bytes",
    "write_autofs_images",
    "read_autofs_images",
]

_T = TypeVar("_T")

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
                    h.record(PipeHolder, pid=int, fd=int, end=str, comm=str, pgrp=int)
                    for h in r.objects("holders")
                ),
                pipe=pipe,
                beneath=tuple(
                    b.record(BeneathMount, mount_point=str, fstype=str, source=str)
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
    data, _ = read_regular_file(path, _MAX_IMAGE_FILE)
    return autofs_images_from_bytes(data)


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

    def record(self, cls: Callable[..., _T], **fields: type[Any]) -> _T:
        """``cls(**{name: value})`` for each of ``fields`` (name=type), every one checked."""
        return cls(**{name: self.get(name, type_) for name, type_ in fields.items()})

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
