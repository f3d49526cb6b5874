"""`pyautofs inspect` names the right owner for pyautofs's, systemd-style and automount's mounts."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.kernel

PROGRAMS = Path(__file__).parent / "programs"


def inspect_json() -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "pyautofs", "inspect", "--json"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    result: dict[str, Any] = dict(json.loads(out))
    return result


def entry(mountpoint: Path) -> dict[str, Any]:
    found: list[dict[str, Any]] = [
        m for m in inspect_json()["mounts"] if m["mount_point"] == str(mountpoint)
    ]
    assert len(found) == 1, found
    return found[0]


def stat_from_other_session(path: Path) -> int:
    code = f"import os,sys\ntry: os.stat({str(path)!r})\nexcept OSError as e: sys.exit(e.errno)"
    return subprocess.run(
        [sys.executable, "-c", code], start_new_session=True, timeout=20, check=False
    ).returncode


def stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def pyautofs_server(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "marker").write_text("x")
    log = tmp_path / "events.log"
    log.touch()
    mnt = tmp_path / "mnt"
    proc = subprocess.Popen(
        [
            sys.executable,
            str(PROGRAMS / "handover_server.py"),
            str(mnt),
            str(tmp_path / "src"),
            str(log),
        ],
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 15
        while "serving" not in log.read_text():
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        yield proc, mnt
    finally:
        stop(proc)


def test_inspect_names_a_pyautofs_engine(
    pyautofs_server: tuple[subprocess.Popen[bytes], Path],
) -> None:
    proc, mnt = pyautofs_server
    assert stat_from_other_session(mnt / "k1" / "marker") == 0
    e = entry(mnt)
    assert e["type"] == "indirect" and e["state"] == "active"
    assert isinstance(e["pipe_ino"], int) and e["pipe_ino"] > 0
    assert [r["pid"] for r in e["readers"]] == [proc.pid]
    assert e["write_end_held"] is False  # pyautofs closes its write end
    assert [b["mount_point"] for b in e["beneath"]] == [str(mnt / "k1")]


def test_inspect_names_a_systemd_style_owner(tmp_path: Path) -> None:
    mnt = tmp_path / "direct"
    mnt.mkdir()
    src = tmp_path / "src"
    src.mkdir()
    cfg = {
        "mode": "mount",
        "mount_point": str(mnt),
        "kind": "direct",
        "bind_source": str(src),
        "read_fd": 40,
        "write_fd": None,
        "nonblock": True,
    }
    proc = subprocess.Popen(
        [sys.executable, str(PROGRAMS / "restore_owner.py"), json.dumps(cfg)],
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        assert json.loads(proc.stdout.readline())["ready"] is True
        e = entry(mnt)
        assert e["type"] == "direct" and e["state"] == "active"
        assert [(r["pid"], r["fd"]) for r in e["readers"]] == [(proc.pid, 40)]
        assert e["write_end_held"] is False
    finally:
        stop(proc)
        assert proc.stdout is not None
        proc.stdout.close()
        subprocess.run(["umount", "-l", str(mnt)], check=False, capture_output=True)


@pytest.mark.skipif(shutil.which("automount") is None, reason="needs Debian's autofs (automount)")
def test_inspect_names_automount(tmp_path: Path) -> None:
    mnt = tmp_path / "amnt"
    src = tmp_path / "src"
    src.mkdir()
    (src / "marker").write_text("x")
    amap = tmp_path / "auto.test"
    amap.write_text(f"data -fstype=bind :{src}\n")
    master = tmp_path / "auto.master"
    master.write_text(f"{mnt} {amap}\n")
    pidfile = tmp_path / "automount.pid"
    # automount(8) runs once per machine: wait for any other instance (a benchmark's) to go.
    deadline = time.monotonic() + 60
    while (
        subprocess.run(["pgrep", "-x", "automount"], capture_output=True, check=False).returncode
        == 0
    ):
        assert time.monotonic() < deadline, "another automount(8) keeps running"
        time.sleep(0.1)
    # automount -f does not setsid; setsid keeps the test out of its process group.
    proc = subprocess.Popen(
        ["setsid", "automount", "-f", "-t", "0", "-p", str(pidfile), str(master)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not any(m["mount_point"] == str(mnt) for m in inspect_json()["mounts"]):
            assert time.monotonic() < deadline, "automount did not mount"
            time.sleep(0.05)
        assert stat_from_other_session(mnt / "data" / "marker") == 0
        e = entry(mnt)
        pid = int(pidfile.read_text())
        assert [r["pid"] for r in e["readers"]] == [pid]
        assert {r["command"] for r in e["readers"]} == {"automount"}
        assert e["write_end_held"] is True  # automount keeps its write end
        assert [w["pid"] for w in e["writers"]] == [pid]
    finally:
        stop(proc)
        for _ in range(3):
            subprocess.run(["umount", "-l", str(mnt / "data")], check=False, capture_output=True)
            subprocess.run(["umount", "-l", str(mnt)], check=False, capture_output=True)
    assert os.path.exists(tmp_path)


NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def test_inspect_as_a_user_says_what_it_cannot_see(
    pyautofs_server: tuple[subprocess.Popen[bytes], Path],
) -> None:
    """Not root: the server's fds are hidden, so inspect must not call the mount orphaned."""
    proc, mnt = pyautofs_server
    run = [*NOBODY, sys.executable, "-m", "pyautofs", "inspect"]
    text = subprocess.run(
        run, capture_output=True, text=True, timeout=30, check=True, cwd="/"
    ).stdout
    block = text.split(f"{mnt}  (", 1)[1].split("\n\n", 1)[0]
    assert "served by nobody" not in block and "catatonic" not in block, block
    assert "cannot tell as uid 65534" in block, block
    assert f"owner process group {proc.pid}: " in block, block
    assert text.startswith("note: running as uid 65534, the fds of "), text
    data = json.loads(
        subprocess.run(
            [*run, "--json"], capture_output=True, text=True, timeout=30, check=True, cwd="/"
        ).stdout
    )
    (e,) = [m for m in data["mounts"] if m["mount_point"] == str(mnt)]
    assert e["state"] == "active" and e["readers"] == [] and e["readers_complete"] is False
    assert entry(mnt)["readers_complete"] is True  # as root
