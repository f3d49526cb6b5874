"""What the ``pyautofs`` command prints when it cannot do its job: one actionable line each.

An ``OSError`` (the kernel said no, a path is wrong) is the user's to fix, so it becomes a
message that names the path and what to do, never a traceback. Any other exception is a bug
in pyautofs and keeps its traceback.
"""

from __future__ import annotations

import os

from .._sys._autofs import AUTOFS_DEVICE

_CAP_SYS_ADMIN = 21


def leaf_errors(exc: BaseException) -> list[BaseException]:
    """The exceptions inside ``exc`` once (nested) exception groups are flattened."""
    inner = getattr(exc, "exceptions", None)
    if not isinstance(inner, tuple) or not inner:
        return [exc]
    out: list[BaseException] = []
    for e in inner:
        out += leaf_errors(e) if isinstance(e, BaseException) else []
    return out


def os_errors(exc: BaseException) -> list[OSError] | None:
    """The ``OSError``s ``exc`` is made of, or None if anything else is in it."""
    leaves = leaf_errors(exc)
    found = [e for e in leaves if isinstance(e, OSError)]
    return found if len(found) == len(leaves) else None


def describe(exc: OSError) -> str:
    """One line: the path (once) and what went wrong, without ``[Errno N]`` noise."""
    message = exc.strerror or str(exc)
    if exc.filename is not None:
        path = os.fsdecode(exc.filename)
        if path not in message:
            message = f"{path}: {message}"
    return message


def _has_cap_sys_admin() -> bool:
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> _CAP_SYS_ADMIN & 1)
    except (OSError, ValueError, IndexError):
        pass
    return os.geteuid() == 0


def _kernel_has_autofs() -> bool:
    try:
        with open("/proc/filesystems", encoding="ascii", errors="replace") as f:
            return any(line.split()[-1:] == ["autofs"] for line in f)
    except OSError:
        return False


def environment_problem(command: str) -> str | None:
    """Why ``pyautofs COMMAND`` cannot serve autofs mounts here, or None if it can."""
    if os.geteuid() != 0:
        return (
            f"pyautofs {command} needs root: autofs mounts need CAP_SYS_ADMIN, and this "
            f"process runs as uid {os.geteuid()}. Run it as root (for example with sudo)."
        )
    if not _has_cap_sys_admin():
        return (
            f"pyautofs {command} runs as root but without CAP_SYS_ADMIN, which autofs mounts "
            "need (a container with dropped capabilities?). Run it with CAP_SYS_ADMIN, for "
            "example in a privileged container."
        )
    if not os.path.exists(AUTOFS_DEVICE):
        if _kernel_has_autofs():
            return (
                f"pyautofs {command} needs {AUTOFS_DEVICE}, which is missing, yet this kernel "
                "has autofs ('autofs' is in /proc/filesystems: CONFIG_AUTOFS_FS, or the module "
                "'modprobe autofs4' loads). Only the device node is missing (a minimal /dev, as "
                f"in some containers): create it with 'mknod {AUTOFS_DEVICE} c 10 235'."
            )
        return (
            f"pyautofs {command} needs {AUTOFS_DEVICE}, which is missing: this kernel has no "
            "autofs. Load the module with 'modprobe autofs4', or build the kernel with "
            "CONFIG_AUTOFS_FS=y (or =m)."
        )
    return None
