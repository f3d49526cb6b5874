"""Whether a file may be executed or trusted by a privileged process.

A root process that runs a program, imports code or reads a configuration file must know
that no other user could have put it there or changed it. Checking the file alone is not
enough: whoever can write to any directory above it can rename it away and put their own in
its place. So the rule, as sudo and sshd's ``StrictModes`` apply it:

- the file and every directory on its resolved path belong to root or to the calling
  process's effective user;
- none of them is writable by group or others, except a root-owned directory with the
  sticky bit (``/tmp``): there only an entry's owner may rename or remove it, so an entry we
  own cannot be swapped under us.

Symlinks are resolved first and the *target's* path is checked; callers then use the
resolved path, so what was checked is what runs. A fixed, root-owned search path replaces
``$PATH`` for looking programs up: ``$PATH`` is the caller's environment, not the machine's.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat

__all__ = ["SAFE_PATH", "UntrustedPathError", "check_trusted", "trusted_program"]

SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
"""Where :func:`trusted_program` looks programs up: root-owned system directories only."""


class UntrustedPathError(PermissionError):
    """A file or one of its directories could be changed by a user other than root or us."""


def _check_one(path: str, st: os.stat_result, *, final: bool, euid: int) -> None:
    if st.st_uid not in (0, euid):
        raise UntrustedPathError(
            errno.EPERM, f"refusing {path}: owned by uid {st.st_uid}, not by root or uid {euid}"
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        sticky_root_dir = (
            not final and stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX and st.st_uid == 0
        )
        if not sticky_root_dir:
            raise UntrustedPathError(
                errno.EPERM,
                f"refusing {path}: mode {stat.S_IMODE(st.st_mode):04o} lets other users change it",
            )


def check_trusted(path: str | os.PathLike[str]) -> str:
    """Check ``path`` and every directory above it (see the module notes); return the
    resolved absolute path, which is what the caller should then use.

    Raises :class:`UntrustedPathError` naming the first component that fails, and
    ``FileNotFoundError`` when the path does not exist.
    """
    euid = os.geteuid()
    real = os.path.realpath(path, strict=True)  # FileNotFoundError if anything is missing
    _check_one(real, os.stat(real), final=True, euid=euid)
    parent = os.path.dirname(real)
    while True:
        _check_one(parent, os.stat(parent), final=False, euid=euid)
        if parent == "/":
            break
        parent = os.path.dirname(parent)
    return real


def trusted_program(name: str) -> str | None:
    """The resolved path of program ``name`` found in :data:`SAFE_PATH`, if it passes
    :func:`check_trusted`; None when there is none. An untrusted one raises
    :class:`UntrustedPathError`."""
    found = shutil.which(name, path=SAFE_PATH)
    if found is None:
        return None
    return check_trusted(found)
