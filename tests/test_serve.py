"""`pyautofs serve`, end to end through the command, against the real kernel."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from _harness import Server, lookup

from pyautofs._sys._mountinfo import autofs_mounts

pytestmark = pytest.mark.kernel


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    for name in ("alpha", "beta", "gamma"):
        (tmp_path / "exports" / name).mkdir(parents=True)
        (tmp_path / "exports" / name / "f").write_text(name)
    return tmp_path


@pytest.fixture
def served(tree: Path) -> Iterator[tuple[Server, Path]]:
    exports = tree / "exports"
    amap = tree / "auto.test"
    amap.write_text(
        "# comment line\n"
        f"alpha -fstype=bind :{exports}/alpha\n"
        f"beta  :{exports}/beta\n"
        "scratch -fstype=tmpfs,size=1m :tmpfs\n"
        "broken line with junk\n"
        f"cont -fstype=bind \\\n    :{exports}/gamma\n"
        f"*     -fstype=bind :{exports}/&\n"
    )
    server = Server(tree, str(tree / "mnt"), str(amap), "--timeout", "0")
    try:
        yield server, tree / "mnt"
    finally:
        server.stop()


def test_bind_tmpfs_wildcard_continuation_and_missing(served: tuple[Server, Path]) -> None:
    server, mnt = served
    assert lookup(mnt / "alpha" / "f") == (0, "alpha")
    assert lookup(mnt / "beta" / "f") == (0, "beta")
    assert lookup(mnt / "cont" / "f") == (0, "gamma")
    assert lookup(mnt / "gamma" / "f") == (0, "gamma")  # wildcard with &
    err, _ = lookup(mnt / "scratch", read=False)
    assert err == 0
    assert lookup(mnt / "nosuch" / "f")[0] == 2  # ENOENT
    # A bad line is a warning with file:line, and the server keeps serving.
    assert "auto.test:5: bad entry for 'broken'" in server.log()


def test_missing_key_fails_fast_from_the_negative_cache(served: tuple[Server, Path]) -> None:
    server, mnt = served
    assert lookup(mnt / "ghost" / "f")[0] == 2
    assert lookup(mnt / "ghost" / "f")[0] == 2
    assert server.log().count("key='ghost'") == 1  # the second lookup never reached the map


def test_sigterm_with_hundreds_of_keys_is_clean(served: tuple[Server, Path]) -> None:
    server, mnt = served
    # 300 distinct keys through the wildcard: each needs exports/<key>.
    exports = mnt.parent / "exports"
    for i in range(300):
        (exports / f"k{i}").mkdir()
    stat_all = (
        "import os,sys\n"
        f"bad=[i for i in range(300) if not os.path.ismount({str(mnt)!r} + f'/k{{i}}')]\n"
        "sys.exit(len(bad))"
    )
    r = subprocess.run(
        [sys.executable, "-c", stat_all], start_new_session=True, timeout=60, check=False
    )
    assert r.returncode == 0
    assert server.stop() == 0
    assert not [m for m in autofs_mounts() if m.mount_point.startswith(str(mnt))]
    with open("/proc/self/mountinfo") as f:
        assert str(mnt) not in f.read()


def test_program_map(tree: Path) -> None:
    prog = tree / "auto.prog"
    prog.write_text(
        f'#!/bin/sh\ncase "$1" in alpha) echo "-fstype=bind :{tree}/exports/alpha" ;; esac\n'
    )
    prog.chmod(0o755)
    server = Server(tree, str(tree / "pmnt"), str(prog))
    try:
        assert lookup(tree / "pmnt" / "alpha" / "f") == (0, "alpha")
        assert lookup(tree / "pmnt" / "other" / "f")[0] == 2
        assert lookup(tree / "pmnt" / "$(touch x)" / "f")[0] == 2  # never a shell
        assert not (tree / "x").exists()
    finally:
        assert server.stop() == 0


def test_master_map_with_direct_and_indirect(tree: Path) -> None:
    exports = tree / "exports"
    indirect = tree / "auto.ind"
    indirect.write_text(f"alpha :{exports}/alpha\n")
    direct_mp = tree / "direct" / "beta"
    direct_mp.mkdir(parents=True)
    direct = tree / "auto.direct"
    direct.write_text(f"{direct_mp} -fstype=bind :{exports}/beta\n")
    master = tree / "auto.master"
    master.write_text(f"{tree}/ind {indirect} --timeout=30\n/- {direct}\n")
    server = Server(tree, "--master", str(master))
    try:
        assert lookup(tree / "ind" / "alpha" / "f") == (0, "alpha")
        assert lookup(direct_mp / "f") == (0, "beta")
        modes = {m.mount_point: m.mode.value for m in autofs_mounts()}
        assert modes[str(tree / "ind")] == "indirect"
        assert modes[str(direct_mp)] == "direct"
    finally:
        assert server.stop() == 0
    assert not [m for m in autofs_mounts() if m.mount_point.startswith(str(tree))]


def test_sigkill_then_restart_adopts(tree: Path) -> None:
    exports = tree / "exports"
    amap = tree / "auto.test"
    amap.write_text(f"* :{exports}/&\n")
    first = Server(tree, str(tree / "mnt"), str(amap))
    assert lookup(tree / "mnt" / "alpha" / "f") == (0, "alpha")
    first.stop(signal.SIGKILL)
    second = Server(tree, str(tree / "mnt"), str(amap))
    try:
        assert "adopted" in second.log()
        assert lookup(tree / "mnt" / "alpha" / "f") == (0, "alpha")  # mounted before the crash
        assert lookup(tree / "mnt" / "beta" / "f") == (0, "beta")  # new
    finally:
        assert second.stop() == 0
    assert not [m for m in autofs_mounts() if m.mount_point.startswith(str(tree))]


def test_serve_refuses_a_mount_point_another_engine_serves(served: tuple[Server, Path]) -> None:
    server, mnt = served
    amap = mnt.parent / "auto.test"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pyautofs",
            "serve",
            "--lock-dir",
            str(mnt.parent / "locks"),
            str(mnt),
            str(amap),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        start_new_session=True,
    )
    assert r.returncode == 1
    assert "already served by another pyautofs engine" in r.stderr
    assert f"pid {server.proc.pid}" in r.stderr
    assert os.path.exists(mnt)


def test_sigusr2_hands_over_without_failing_a_lookup(tree: Path) -> None:
    exports = tree / "exports"
    (exports / "alpha" / "marker").write_text("x")
    amap = tree / "auto.test"
    amap.write_text(f"* :{exports}/alpha\n")
    loader = str(Path(__file__).parent / "programs" / "lookup_load.py")
    server = Server(tree, str(tree / "mnt"), str(amap))
    load = [
        subprocess.Popen(
            [sys.executable, loader, str(tree / "mnt"), f"c{i}", "2.5"],
            stdout=subprocess.PIPE,
            start_new_session=True,
        )
        for i in range(3)
    ]
    try:
        time.sleep(0.5)
        server.proc.send_signal(signal.SIGUSR2)
        assert server.proc.wait(timeout=20) == 0  # the old process exits 0
        results = [json.loads(p.communicate(timeout=30)[0]) for p in load]
        log = server.log()
        assert "took over 1 mount(s)" in log
        assert "handover failed" not in log
        assert [r["failures"] for r in results] == [[], [], []]
        assert sum(r["ok"] for r in results) > 50
        assert max(r["worst_s"] for r in results) < 1.0
    finally:
        for p in load:
            if p.poll() is None:
                p.kill()
            p.wait()
            if p.stdout is not None:
                p.stdout.close()
        successors = [
            int(line.split("[")[1].split("]")[0])
            for line in server.log().splitlines()
            if "took over" in line
        ]
        for pid in successors:
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while (
            any(os.path.exists(f"/proc/{pid}") for pid in successors)
            and time.monotonic() < deadline
        ):
            time.sleep(0.05)
    assert not [m for m in autofs_mounts() if m.mount_point.startswith(str(tree))]


def test_sighup_rereads_the_map(tree: Path) -> None:
    exports = tree / "exports"
    amap = tree / "auto.test"
    amap.write_text(f"alpha :{exports}/alpha\n")
    server = Server(tree, str(tree / "mnt"), str(amap), "--negative-timeout", "0")
    try:
        assert lookup(tree / "mnt" / "beta" / "f")[0] == 2
        amap.write_text(f"alpha :{exports}/alpha\nbeta :{exports}/beta\n")
        os.utime(amap, (time.time() + 5, time.time() + 5))  # a new mtime even within a tick
        server.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while "maps re-read" not in server.log():
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.02)
        assert lookup(tree / "mnt" / "beta" / "f") == (0, "beta")
    finally:
        assert server.stop() == 0
