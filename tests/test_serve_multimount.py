"""Multi-mount entries through `pyautofs serve`: offsets are autofs triggers of their own."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from _harness import Server, lookup

from pyautofs._sys._mountinfo import autofs_mounts, read_mountinfo

pytestmark = pytest.mark.kernel


def mounts_under(path: Path) -> dict[str, list[str]]:
    """mount point -> fstypes stacked on it, for everything at or below ``path``."""
    out: dict[str, list[str]] = {}
    for info in read_mountinfo():
        if info.mount_point == str(path) or info.mount_point.startswith(f"{path}/"):
            out.setdefault(info.mount_point, []).append(info.fstype)
    return out


def wait_for(predicate: object, timeout: float = 20.0) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


@pytest.fixture
def multimap(tmp_path: Path) -> Path:
    exports = tmp_path / "exports"
    for name in ("alpha", "beta", "gamma", "delta"):
        (exports / name).mkdir(parents=True)
        (exports / name / "f").write_text(name)
    amap = tmp_path / "auto.multi"
    amap.write_text(
        f"multi / :{exports}/alpha \\\n"
        f"      /sub :{exports}/beta \\\n"
        f"      /sub/deep -fstype=bind :{exports}/gamma\n"
        f"noroot /a :{exports}/alpha /b/c :{exports}/delta\n"
        f"plain :{exports}/beta\n"
    )
    return amap


def test_offsets_mount_lazily_and_nest(tmp_path: Path, multimap: Path) -> None:
    mnt = tmp_path / "mnt"
    server = Server(tmp_path, str(mnt), str(multimap), "--timeout", "0")
    try:
        assert lookup(mnt / "multi" / "f") == (0, "alpha")
        # The offset is a trigger with nothing on it until something walks into it.
        assert mounts_under(mnt / "multi" / "sub") == {str(mnt / "multi" / "sub"): ["autofs"]}
        modes = {m.mount_point: m.mode.value for m in autofs_mounts()}
        assert modes[str(mnt / "multi" / "sub")] == "offset"
        assert lookup(mnt / "multi" / "sub" / "f") == (0, "beta")
        # The nested offset's trigger went up when its enclosing offset was mounted.
        assert lookup(mnt / "multi" / "sub" / "deep" / "f") == (0, "gamma")
        # Without a root mount, the key is a directory holding the offsets.
        assert lookup(mnt / "noroot" / "a" / "f") == (0, "alpha")
        assert lookup(mnt / "noroot" / "b" / "c" / "f") == (0, "delta")
        assert sorted(os.listdir(mnt / "noroot")) == ["a", "b"]
        assert lookup(mnt / "plain" / "f") == (0, "beta")
        assert "not served" not in server.log()
    finally:
        assert server.stop() == 0
    assert mounts_under(mnt) == {}


def test_a_multimount_key_expires_with_its_offsets(tmp_path: Path, multimap: Path) -> None:
    mnt = tmp_path / "mnt"
    server = Server(tmp_path, str(mnt), str(multimap), "--timeout", "1")
    try:
        assert lookup(mnt / "multi" / "sub" / "deep" / "f") == (0, "gamma")
        assert lookup(mnt / "noroot" / "b" / "c" / "f") == (0, "delta")
        assert len(mounts_under(mnt)) > 5
        # Idle for timeout (1 s) plus at most one check interval: everything goes.
        # The key directories go too, each just after its key's last unmount.
        wait_for(
            lambda: mounts_under(mnt) == {str(mnt): ["autofs"]} and os.listdir(mnt) == [],
            timeout=15,
        )
        # And the keys mount again, offsets and all.
        assert lookup(mnt / "multi" / "sub" / "f") == (0, "beta")
        assert lookup(mnt / "noroot" / "a" / "f") == (0, "alpha")
    finally:
        assert server.stop() == 0
    assert mounts_under(mnt) == {}


def test_a_busy_offset_keeps_its_key_mounted(tmp_path: Path, multimap: Path) -> None:
    mnt = tmp_path / "mnt"
    server = Server(tmp_path, str(mnt), str(multimap), "--timeout", "1")
    try:
        assert lookup(mnt / "multi" / "sub" / "f") == (0, "beta")
        holder = os.open(mnt / "multi" / "sub" / "f", os.O_RDONLY)  # keeps the offset busy
        try:
            time.sleep(3)
            assert str(mnt / "multi" / "sub") in mounts_under(mnt)
            assert lookup(mnt / "multi" / "f") == (0, "alpha")
        finally:
            os.close(holder)
        wait_for(lambda: mounts_under(mnt) == {str(mnt): ["autofs"]}, timeout=15)
    finally:
        assert server.stop() == 0


def test_offsets_survive_sigkill_and_sigusr2(tmp_path: Path, multimap: Path) -> None:
    mnt = tmp_path / "mnt"
    first = Server(tmp_path, str(mnt), str(multimap), "--timeout", "0")
    assert lookup(mnt / "multi" / "f") == (0, "alpha")  # offset trigger up, not mounted
    first.stop(signal.SIGKILL)
    second = Server(tmp_path, str(mnt), str(multimap), "--timeout", "0")
    try:
        # The dead server's trigger is adopted and mounts on demand.
        assert lookup(mnt / "multi" / "sub" / "f") == (0, "beta")
        assert lookup(mnt / "multi" / "sub" / "deep" / "f") == (0, "gamma")
        assert lookup(mnt / "noroot" / "a" / "f") == (0, "alpha")
        # A zero-downtime handover passes the offset triggers on.
        second.proc.send_signal(signal.SIGUSR2)
        assert second.proc.wait(timeout=30) == 0
        log = second.log()
        assert "handed" in log, log
        assert lookup(mnt / "noroot" / "b" / "c" / "f") == (0, "delta")
    finally:
        if second.proc.poll() is None:
            second.stop()
        # The successor runs on in the background: find it by the mount's pipe and stop it.
        for am in autofs_mounts():
            if am.mount_point == str(mnt) and am.pgrp is not None:
                try:
                    os.killpg(am.pgrp, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        wait_for(lambda: mounts_under(mnt) == {}, timeout=30)
