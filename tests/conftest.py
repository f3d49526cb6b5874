"""Test harness: a private mount namespace for the whole session, and leak checks.

Kernel tests (marked ``kernel``) need root and ``/dev/autofs``. When both are present the
session moves itself into a private mount namespace before any test runs, so no mount made
by a test can leak onto the machine. When either is missing, kernel tests skip with the
reason, unless ``PYAUTOFS_REQUIRE_KERNEL=1`` is set (``scripts/test`` sets it on machines
that have both), in which case they fail instead: a skipped kernel test must never pass CI.

Every test is checked for leaked fds and leaked mounts: the autouse ``no_leaks`` fixture
compares ``/proc/self/fd`` and ``/proc/self/mountinfo`` before and after.
"""

from __future__ import annotations

import ctypes
import os
import time
from collections.abc import Iterator

import pytest

HAVE_KERNEL = os.geteuid() == 0 and os.path.exists("/dev/autofs")
KERNEL_REASON = "needs root and /dev/autofs (CONFIG_AUTOFS_FS)" if not HAVE_KERNEL else ""
REQUIRE_KERNEL = os.environ.get("PYAUTOFS_REQUIRE_KERNEL") == "1"

_CLONE_NEWNS = 0x00020000
_MS_REC = 16384
_MS_PRIVATE = 1 << 18


def _enter_private_mount_namespace() -> None:
    # The test harness itself may use ctypes: the layering rule is for the package.
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(_CLONE_NEWNS) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare(CLONE_NEWNS): {os.strerror(err)}")
    if libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount --make-rprivate /: {os.strerror(err)}")


def pytest_configure(config: pytest.Config) -> None:
    if HAVE_KERNEL and os.environ.get("PYAUTOFS_IN_TEST_NS") != str(os.getpid()):
        _enter_private_mount_namespace()
        # Children (servers, clients) inherit the namespace; mark it so a nested pytest
        # does not try again.
        os.environ["PYAUTOFS_IN_TEST_NS"] = str(os.getpid())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAVE_KERNEL:
        return
    for item in items:
        if item.get_closest_marker("kernel") is None:
            continue
        if REQUIRE_KERNEL:
            item.add_marker(pytest.mark.usefixtures("_kernel_required_but_missing"))
        else:
            item.add_marker(pytest.mark.skip(reason=KERNEL_REASON))


@pytest.fixture
def _kernel_required_but_missing() -> None:
    pytest.fail(f"PYAUTOFS_REQUIRE_KERNEL=1 but this machine lacks it: {KERNEL_REASON}")


def open_fds() -> set[int]:
    """The fds this process holds now, as numbers."""
    return {int(name) for name in os.listdir("/proc/self/fd")}


def fd_targets(fds: set[int]) -> dict[int, str]:
    out = {}
    for fd in sorted(fds):
        try:
            out[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            out[fd] = "?"
    return out


def mount_points() -> list[str]:
    """Mount points of this process's namespace, in mountinfo order."""
    with open("/proc/self/mountinfo", "rb") as f:
        return [line.split(b" ")[4].decode("unicode_escape") for line in f]


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Fail a test that leaves an fd open or a mount behind."""
    fds_before = open_fds()
    mounts_before = mount_points()
    yield
    # Threads from trio's thread cache or a just-exited child may still be closing fds.
    deadline = time.monotonic() + 2.0
    while True:
        leaked_fds = open_fds() - fds_before
        leaked_mounts = [m for m in mount_points() if m not in mounts_before]
        if not leaked_fds and not leaked_mounts:
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.02)
    parts = []
    libc = ctypes.CDLL(None, use_errno=True)
    for mp in reversed(leaked_mounts):  # clean up so one leak does not fail every later test
        libc.umount2(os.fsencode(mp), 2)  # MNT_DETACH
    if leaked_fds:
        parts.append(f"leaked fds: {fd_targets(leaked_fds)}")
    if leaked_mounts:
        parts.append(f"leaked mounts: {leaked_mounts}")
    pytest.fail("; ".join(parts))
