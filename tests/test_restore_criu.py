"""What a CRIU checkpoint of ``pyautofs serve`` needs, tested without CRIU.

``pyautofs criu-hook`` is what CRIU runs as its ``--action-script``: it finds serve's control
socket from the dumped tree's pid (CRTOOLS_INIT_PID), pauses expiry before a dump and
resumes it after. Everything here is real: serve processes in their own sessions, lookups
from other sessions, the kernel's mountinfo for what is mounted.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from _harness import Server

pytestmark = pytest.mark.kernel

DEADLINE = 20.0


def hook(*args: str, action: str | None = None, pid: int | None = None) -> tuple[int, str]:
    env = dict(os.environ)
    env.pop("CRTOOLS_SCRIPT_ACTION", None)
    if action is not None:
        env["CRTOOLS_SCRIPT_ACTION"] = action
    if pid is not None:
        env["CRTOOLS_INIT_PID"] = str(pid)
    r = subprocess.run(
        [sys.executable, "-m", "pyautofs", "criu-hook", *args],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        env=env,
        check=False,
    )
    return r.returncode, r.stdout + r.stderr


def mounted(path: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path) for line in f)


def look(path: Path) -> None:
    """Read a file under ``path`` from another session (lookups from serve's group never
    trigger)."""
    subprocess.run(
        [sys.executable, "-c", "import sys; open(sys.argv[1]).read()", str(path / "f")],
        start_new_session=True,
        timeout=DEADLINE,
        check=True,
    )


def wait_for(what: str, cond: object, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"not {what} within {timeout} s"
        time.sleep(0.05)


@pytest.fixture
def serving(tmp_path: Path) -> Iterator[tuple[Server, Path]]:
    """serve with a 1-second expire timeout (checked every second)."""
    (tmp_path / "exports" / "k").mkdir(parents=True)
    (tmp_path / "exports" / "k" / "f").write_text("k")
    amap = tmp_path / "auto.map"
    amap.write_text(f"* -fstype=bind :{tmp_path}/exports/&\n")
    server = Server(tmp_path, "--timeout", "1", str(tmp_path / "auto"), str(amap))
    try:
        yield server, tmp_path / "auto"
    finally:
        server.stop()


def test_control_socket_is_private_and_removed_at_exit(
    tmp_path: Path, serving: tuple[Server, Path]
) -> None:
    server, _ = serving
    locks = tmp_path / "locks"
    socks = [p for p in locks.iterdir() if p.name.endswith(".sock")]
    assert len(socks) == 1 and socks[0].name.endswith(f".{server.proc.pid}.sock")
    st = os.stat(socks[0])
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert stat.S_IMODE(os.stat(locks).st_mode) == 0o700
    assert server.stop() == 0
    assert not socks[0].exists()


def test_hook_pauses_expiry_before_a_dump_and_resumes_after(
    serving: tuple[Server, Path],
) -> None:
    server, auto = serving
    pid = server.proc.pid
    look(auto / "k")
    assert mounted(auto / "k")
    code, out = hook(action="pre-dump", pid=pid)
    assert code == 0 and f"serve pid {pid}: paused" in out, out
    code, out = hook("--pid", str(pid), "status")
    assert code == 0 and '"paused": true' in out, out
    time.sleep(3.5)  # three expire checks of a 1 s timeout: the key would have gone
    assert mounted(auto / "k")
    code, out = hook(action="post-resume", pid=pid)
    assert code == 0 and "restored 0" in out, out  # no device changed: not restored
    wait_for("expired", lambda: not mounted(auto / "k"))
    # After a dump that leaves the tree running, post-dump only queues the resume (CRIU
    # runs it while the tree is still frozen); serve reads it once it runs.
    look(auto / "k")
    assert hook(action="pre-dump", pid=pid)[0] == 0
    code, out = hook(action="post-dump", pid=pid)
    assert code == 0 and "queued" in out, out
    wait_for("resumed", lambda: '"paused": false' in hook("--pid", str(pid), "status")[1])
    wait_for("expired", lambda: not mounted(auto / "k"))
    assert "expiry paused for a checkpoint" in server.log()


def test_a_pause_without_resume_ends_by_itself(serving: tuple[Server, Path]) -> None:
    """A dump that fails runs no post-dump action: the pause has a lease."""
    server, auto = serving
    pid = server.proc.pid
    look(auto / "k")
    code, out = hook("--pid", str(pid), "--lease", "1", "pause")
    assert code == 0 and "paused" in out, out
    wait_for("resumed", lambda: '"paused": false' in hook("--pid", str(pid), "status")[1], 5)
    wait_for("expired", lambda: not mounted(auto / "k"))
    assert "no resume-expiry within 1 s" in server.log()


def test_hook_in_a_tree_without_serve_does_nothing() -> None:
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        code, out = hook(action="pre-dump", pid=sleeper.pid)
        assert code == 0 and "no pyautofs serve" in out
        assert hook(action="network-lock", pid=sleeper.pid) == (0, "")
        code, out = hook()
        assert code == 2 and "CRTOOLS_SCRIPT_ACTION" in out
    finally:
        sleeper.kill()
        sleeper.wait()


def test_serve_in_its_own_pid_namespace_leads_its_session(tmp_path: Path) -> None:
    """CRIU dumps a pid namespace's tree only if its session leader is inside: serve, run
    as ``unshare --pid --fork`` from a script, makes a session of its own."""
    from _harness import start_serve

    amap = tmp_path / "auto.map"
    amap.write_text("k -fstype=tmpfs :tmpfs\n")
    wrapper = ["unshare", "--pid", "--fork", "--mount", "--propagation", "private"]
    args = ["--lock-dir", str(tmp_path / "locks"), str(tmp_path / "auto"), str(amap)]
    proc = start_serve(tmp_path / "serve.log", args, wrapper=wrapper)
    try:
        with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
            (serve,) = map(int, f.read().split())
        with open(f"/proc/{serve}/status") as f:
            assert f"NSpid:\t{serve}\t1\n" in f.read()  # pid 1 of its namespace
        with open(f"/proc/{serve}/stat") as f:
            pgrp, session = map(int, f.read().rsplit(")", 1)[1].split()[2:4])
        assert pgrp == session == serve != proc.pid
    finally:
        os.kill(serve, 15)
        assert proc.wait(DEADLINE) == 0


async def test_restored_device_numbers_are_followed_even_when_they_collide(
    tmp_path: Path,
) -> None:
    """After a restore each direct mount may get the device number another one had: the
    packets of one then carry a number the engine knows as the other's. The hook's
    ``restored`` request makes serve read every number again (what CRIU showed with 130
    direct mounts: 174 -> 175, 175 -> 176, ...)."""
    import trio
    from test_engine_paths import lookups

    import pyautofs
    from pyautofs import AutofsMode
    from pyautofs._engine._control import ControlServer
    from pyautofs.lowlevel import AutofsOptions, autofs_mounts, mount_autofs

    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "f").write_text("hello")
    a, b, other = tmp_path / "a", tmp_path / "b", tmp_path / "other"
    asked: list[str] = []

    async def handler(request: pyautofs.MountRequest) -> None:
        asked.append(request.path)
        pyautofs.bind_mount(tmp_path / "src", request.path)

    am = pyautofs.Automounter(lock_dir=str(tmp_path / "locks"))
    am.add_mount(a, handler, mode="direct")
    am.add_mount(b, handler, mode="direct")
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(am.run)
            devs = {m.mount_point: m.dev for m in autofs_mounts()}
            old_a, old_b = devs[str(a)], devs[str(b)]
            # What a restore leaves: the old superblocks gone, new ones at the same paths
            # writing into the same (restored) pipe, numbered afresh: another autofs mount
            # takes a's old number, a gets b's.
            pyautofs.unmount(a)
            pyautofs.unmount(b)
            other.mkdir()
            r, w = os.pipe()
            mount_autofs(str(other), AutofsOptions(fd=w, pgrp=os.getpgrp()))
            os.close(w)
            assert am._shared is not None
            direct = AutofsOptions(
                fd=am._shared.write_fd, pgrp=os.getpgrp(), mode=AutofsMode.DIRECT
            )
            new_a = mount_autofs(str(a), direct)
            new_b = mount_autofs(str(b), direct)
            if new_a != old_b:
                pytest.skip(f"the kernel numbered them otherwise ({old_a}, {old_b} -> {new_a})")
            control = ControlServer(am, str(tmp_path / "unused.sock"))
            assert await control.handle("restored", nursery) == "ok restored 2"
            assert {m.path: m.dev for m in am._mounts.values()} == {str(a): new_a, str(b): new_b}
            assert await lookups(a / "f", b / "f") == [0, 0]
            assert asked == [str(a), str(b)]
            assert await control.handle("restored", nursery) == "ok restored 0"
            pyautofs.unmount(other)
            os.close(r)
            nursery.cancel_scope.cancel()
    assert not [m for m in autofs_mounts() if m.mount_point.startswith(str(tmp_path))]
