"""The engine lock: one file per engine per mount namespace, saying which mounts it serves.

Rules (hardening issue, item 4):

- The directory is root-only (0700, owned by us, not a symlink) and the files are 0600, so
  no other user can hold, plant or read a lock.
- An engine holds one lock, an exclusive ``flock`` on
  ``<mount-namespace inode>-<first mount point, %-quoted>.lock``; the name maps back to the
  namespace (``stat -L -c %i /proc/PID/ns/mnt``) and the mount point. The file holds JSON:
  ``{"pid", "mntns", "mounts"}``, the mount points it serves (offset triggers excepted:
  they live under a mount it lists).
- A lock whose ``flock`` is free belongs to a dead engine: it is removed, never a reason to
  refuse. Locks of other mount namespaces are never looked at.
- A clean exit removes the file.

Takeover requests are files next to the locks: ``<ns>-<quoted mount point>.takeover``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import urllib.parse

__all__ = ["EngineLock", "mount_namespace", "prepare_lock_dir"]

_NAME_MAX = 200


def mount_namespace() -> int:
    """The inode of this process's mount namespace."""
    return os.stat("/proc/self/ns/mnt").st_ino


def prepare_lock_dir(lock_dir: str) -> None:
    """Create ``lock_dir`` 0700, or check an existing one is ours and make it 0700."""
    os.makedirs(lock_dir, mode=0o700, exist_ok=True)
    st = os.lstat(lock_dir)
    if not os.path.isdir(lock_dir) or os.path.islink(lock_dir):
        raise NotADirectoryError(errno.ENOTDIR, "the lock directory is not a directory", lock_dir)
    if st.st_uid != os.geteuid():
        raise PermissionError(
            errno.EPERM,
            f"the lock directory belongs to uid {st.st_uid}, not to us; remove it or choose "
            "another (--lock-dir)",
            lock_dir,
        )
    if st.st_mode & 0o077:
        os.chmod(lock_dir, 0o700)


def _quote(path: str) -> str:
    name = urllib.parse.quote(path, safe="")
    return name if len(name) <= _NAME_MAX else name[:_NAME_MAX] + "..."


def _open_private(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)


class EngineLock:
    """The lock of one engine (see the module docstring)."""

    def __init__(self, lock_dir: str) -> None:
        self.lock_dir = lock_dir
        self.ns = mount_namespace()
        self.fd = -1
        self.path = ""

    # -- other engines ---------------------------------------------------------------------

    def _files(self, suffix: str) -> list[str]:
        prefix = f"{self.ns}-"
        try:
            names = os.listdir(self.lock_dir)
        except FileNotFoundError:
            return []
        return [
            os.path.join(self.lock_dir, n)
            for n in names
            if n.startswith(prefix) and n.endswith(suffix)
        ]

    def holders(self) -> dict[str, int]:
        """Mount point -> pid of every live engine of this namespace but us; stale locks go."""
        held: dict[str, int] = {}
        for file in self._files(".lock"):
            if file == self.path:
                continue
            try:
                fd = _open_private(file, os.O_RDONLY)
            except OSError:
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                except BlockingIOError:
                    data = os.pread(fd, 1 << 24, 0)
                    try:
                        info = json.loads(data)
                        pid = int(info["pid"])
                        for mp in info.get("mounts", ()):
                            held[str(mp)] = pid
                    except (ValueError, KeyError, TypeError):
                        pass
                else:
                    # Nobody holds it: its engine died. Never a reason to refuse.
                    with contextlib.suppress(OSError):
                        os.unlink(file)
            finally:
                os.close(fd)
        return held

    def holder(self, mount_point: str) -> int | None:
        """The pid of the live engine of this namespace that serves ``mount_point``."""
        return self.holders().get(mount_point)

    # -- our own -----------------------------------------------------------------------

    def acquire(self, name_path: str, mounts: list[str]) -> None:
        """Take our lock, named after ``name_path``, listing ``mounts``."""
        prepare_lock_dir(self.lock_dir)
        base = os.path.join(self.lock_dir, f"{self.ns}-{_quote(name_path)}")
        for path in (base + ".lock", base + f".{os.getpid()}.lock"):
            for _ in range(10):
                fd = _open_private(path, os.O_RDWR | os.O_CREAT)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    break  # another engine is named after the same mount point: next name
                # Another engine may have found the file unlocked (between our open and our
                # flock) and removed it as stale: then lock a fresh one.
                try:
                    same = os.stat(path).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    same = False
                if same:
                    self.fd, self.path = fd, path
                    self.write(mounts)
                    return
                os.close(fd)
        raise OSError(errno.EBUSY, "no engine lock could be taken", base + ".lock")

    def adopt(self, fd: int, mounts: list[str]) -> None:
        """Take over a predecessor's lock fd (an upgrade) and say we hold it now."""
        self.fd = fd
        self.path = os.readlink(f"/proc/self/fd/{fd}")
        self.write(mounts)

    def write(self, mounts: list[str]) -> None:
        """Rewrite the list of mount points we serve."""
        if self.fd < 0:
            return
        data = json.dumps({"pid": os.getpid(), "mntns": self.ns, "mounts": mounts}).encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)

    def release(self, *, remove: bool = True) -> None:
        """Drop the lock; ``remove`` (a clean exit) deletes its file too."""
        if self.fd < 0:
            return
        if remove:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        fd, self.fd = self.fd, -1
        os.close(fd)

    # -- takeover requests -------------------------------------------------------------

    def request_path(self, mount_point: str) -> str:
        return os.path.join(self.lock_dir, f"{self.ns}-{_quote(mount_point)}.takeover")

    def ask(self, mount_point: str) -> str:
        """Leave a takeover request for ``mount_point``; returns its file."""
        prepare_lock_dir(self.lock_dir)
        path = self.request_path(mount_point)
        fd = _open_private(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            os.write(fd, f"{os.getpid()}\n".encode())
        finally:
            os.close(fd)
        return path

    def requested(self, mount_points: list[str]) -> list[str]:
        """Those of ``mount_points`` another engine asked to take over."""
        if not self._files(".takeover"):
            return []
        return [p for p in mount_points if os.path.exists(self.request_path(p))]
