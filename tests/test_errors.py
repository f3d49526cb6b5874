"""What ``pyautofs`` tells a user when it cannot do the job: each condition made real.

Every command runs as a user runs it (``python -m pyautofs ...``, stderr captured, with a
deadline). A message must say what is wrong, with the path or pid involved, and what to do;
it must never be a Python traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from _harness import Server, lookup

from pyautofs._sys._mountinfo import autofs_mounts

pytestmark = pytest.mark.kernel

DEADLINE = 30.0
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
PYAUTOFS = [sys.executable, "-m", "pyautofs"]


def run(
    args: Sequence[str], *, prefix: Sequence[str] = (), shell_setup: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``pyautofs ARGS``; with ``shell_setup``, in a fresh private mount namespace after it."""
    argv = [*prefix, *PYAUTOFS, *args]
    if shell_setup is not None:
        script = f'set -e\n{shell_setup}\nexec "$@"'
        argv = ["unshare", "--mount", "--propagation", "private", "bash", "-c", script, "-", *argv]
    return subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        check=False,
        start_new_session=True,
        stdin=subprocess.DEVNULL,
    )


def assert_failed_cleanly(r: subprocess.CompletedProcess[str], *needles: str) -> None:
    """Non-zero status, no traceback, and every needle in stderr."""
    assert r.returncode != 0, r
    assert "Traceback" not in r.stderr and "Error:" not in r.stderr, r.stderr
    for needle in needles:
        assert needle in r.stderr, (needle, r.stderr)


@pytest.fixture
def exports(tmp_path: Path) -> Path:
    for name in ("alpha", "beta"):
        (tmp_path / "exports" / name).mkdir(parents=True)
        (tmp_path / "exports" / name / "f").write_text(name)
    return tmp_path / "exports"


@pytest.fixture
def good_map(tmp_path: Path, exports: Path) -> Path:
    amap = tmp_path / "auto.good"
    amap.write_text(f"alpha -fstype=bind :{exports}/alpha\n")
    return amap


@pytest.fixture
def server(tmp_path: Path, good_map: Path) -> Iterator[Server]:
    s = Server(tmp_path, str(tmp_path / "mnt"), str(good_map), "--timeout", "0")
    try:
        yield s
    finally:
        assert s.stop() == 0, s.log()
    assert not [m for m in autofs_mounts() if m.mount_point.startswith(str(tmp_path))]


# -- not root -----------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["serve", "/mnt/auto", "/etc/auto.data"], ["demo"]])
def test_not_root(command: list[str]) -> None:
    r = run(command, prefix=NOBODY)
    assert_failed_cleanly(r, "needs root", "CAP_SYS_ADMIN", "uid 65534", "sudo")


# -- no /dev/autofs -----------------------------------------------------------------------


@pytest.mark.parametrize("command", [["serve", "/mnt/auto", "/etc/auto.data"], ["demo"]])
def test_no_dev_autofs_but_autofs_in_the_kernel(command: list[str]) -> None:
    # A minimal /dev, as in some containers: the kernel has autofs, the node is missing.
    r = run(command, shell_setup="mount -t tmpfs pyautofs-test-dev /dev")
    assert_failed_cleanly(
        r, "/dev/autofs", "missing", "CONFIG_AUTOFS_FS", "modprobe autofs4", "mknod /dev/autofs"
    )


@pytest.mark.parametrize("command", [["serve", "/mnt/auto", "/etc/auto.data"], ["demo"]])
def test_no_autofs_in_the_kernel(command: list[str], tmp_path: Path) -> None:
    # What a kernel without CONFIG_AUTOFS_FS shows: no /dev/autofs, no autofs filesystem.
    filesystems = tmp_path / "filesystems"
    filesystems.write_text(
        "".join(
            x for x in Path("/proc/filesystems").read_text().splitlines(True) if "autofs" not in x
        )
    )
    setup = f"mount -t tmpfs pyautofs-test-dev /dev\nmount --bind {filesystems} /proc/filesystems"
    r = run(command, shell_setup=setup)
    assert_failed_cleanly(r, "/dev/autofs", "has no autofs", "CONFIG_AUTOFS_FS", "modprobe autofs4")


def test_version_without_dev_autofs() -> None:
    r = run(["version"], shell_setup="mount -t tmpfs pyautofs-test-dev /dev")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r
    assert "CONFIG_AUTOFS_FS" in r.stdout and "modprobe autofs4" in r.stdout, r


# -- a mount point another engine serves ------------------------------------------------


def test_mount_point_served_by_another_engine(
    server: Server, tmp_path: Path, good_map: Path
) -> None:
    mnt = tmp_path / "mnt"
    r = run(["serve", "--lock-dir", str(tmp_path / "locks"), str(mnt), str(good_map)])
    assert_failed_cleanly(
        r, str(mnt), "already served by another pyautofs engine", f"pid {server.proc.pid}"
    )
    assert "--takeover" in r.stderr and f"kill -TERM {server.proc.pid}" in r.stderr, r.stderr
    # The first one never noticed: it still serves, new keys included.
    assert server.proc.poll() is None
    assert lookup(mnt / "alpha" / "f") == (0, "alpha")
    assert "ERROR" not in server.log() and "WARNING" not in server.log(), server.log()


# -- a mount point that cannot be one -----------------------------------------------------


def test_mount_point_is_a_regular_file(tmp_path: Path, good_map: Path) -> None:
    mp = tmp_path / "a-file"
    mp.write_text("")
    r = run(["serve", str(mp), str(good_map)])
    assert_failed_cleanly(r, str(mp), "is a regular file", "needs a directory")
    assert mp.is_file()


def test_mount_point_under_a_regular_file(tmp_path: Path, good_map: Path) -> None:
    (tmp_path / "a-file").write_text("")
    mp = tmp_path / "a-file" / "mnt"
    r = run(["serve", str(mp), str(good_map)])
    assert_failed_cleanly(r, str(mp), f"{tmp_path / 'a-file'} is a regular file")


def test_mount_point_on_a_read_only_file_system(tmp_path: Path, good_map: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    mp = ro / "not" / "there"
    r = run(["serve", str(mp), str(good_map)], shell_setup=f"mount -t tmpfs -o ro none {ro}")
    assert_failed_cleanly(r, str(mp), f"{ro} is on a read-only file system")


def test_mount_point_the_kernel_refuses_to_create(good_map: Path) -> None:
    # /proc takes no new directory: the engine's own error, still one line with the path.
    r = run(["serve", "/proc/pyautofs-nonexistent/mnt", str(good_map)])
    assert_failed_cleanly(r, "pyautofs serve: /proc/pyautofs-nonexistent")


# -- maps -------------------------------------------------------------------------------


def test_bad_map_lines_warn_and_the_good_ones_are_served(tmp_path: Path, exports: Path) -> None:
    amap = tmp_path / "auto.mixed"
    amap.write_text(
        f"alpha -fstype=bind :{exports}/alpha\n"
        "broken -fstype=bind :/x junk\n"
        'quote "unterminated\n'
        f"beta -fstype=bind :{exports}/beta\n"
    )
    s = Server(tmp_path, str(tmp_path / "mnt"), str(amap), "--timeout", "0")
    try:
        log = s.log()
        assert f"{amap}:2: bad entry for 'broken'" in log, log
        assert f"{amap}:3: cannot split the line: an unterminated quote" in log, log
        assert "Traceback" not in log
        assert lookup(tmp_path / "mnt" / "alpha" / "f") == (0, "alpha")
        assert lookup(tmp_path / "mnt" / "beta" / "f") == (0, "beta")
        assert lookup(tmp_path / "mnt" / "broken" / "f")[0] != 0
    finally:
        assert s.stop() == 0, s.log()


def test_map_file_does_not_exist(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-map"
    r = run(["serve", str(tmp_path / "mnt"), str(missing)])
    assert_failed_cleanly(r, f"map {missing} does not exist")
    assert not (tmp_path / "mnt").exists()


def test_master_map_does_not_exist(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-master"
    r = run(["serve", "--master", str(missing)])
    assert_failed_cleanly(r, f"master map {missing} does not exist")


def test_map_file_is_a_directory(tmp_path: Path) -> None:
    r = run(["serve", str(tmp_path / "mnt"), str(tmp_path)])
    assert_failed_cleanly(r, f"map {tmp_path} is a directory")


def test_usage_errors_say_what_is_needed(tmp_path: Path, good_map: Path) -> None:
    r = run(["serve"])
    assert r.returncode == 2 and "MOUNTPOINT MAPFILE or --master FILE" in r.stderr, r
    r = run(["serve", "--master", str(good_map), str(tmp_path / "mnt"), str(good_map)])
    assert r.returncode == 2 and "not both" in r.stderr, r
    assert "Traceback" not in r.stderr
    assert not os.path.exists(tmp_path / "mnt")
