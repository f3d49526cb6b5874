"""Zero-downtime handover: a live automounter passes its mounts to a successor process.

Everything is real: the server and its successor are separate processes in one process
group, the clients are processes in their own sessions, and the kernel is the judge of
whether a lookup succeeded.
"""

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

from pyautofs._sys._mountinfo import autofs_mounts, find_pipe_holders

pytestmark = pytest.mark.kernel

PROGRAMS = Path(__file__).parent / "programs"


class Server:
    """A handover_server.py process and its log."""

    def __init__(self, tmp_path: Path, *extra: str) -> None:
        self.mountpoint = tmp_path / "mnt"
        self.source = tmp_path / "src"
        self.source.mkdir()
        (self.source / "marker").write_text("x")
        self.logfile = tmp_path / "events.log"
        self.logfile.touch()
        self.argv = [
            sys.executable,
            str(PROGRAMS / "handover_server.py"),
            str(self.mountpoint),
            str(self.source),
            str(self.logfile),
            *extra,
        ]
        # Its own session: the test process must not be in the owner process group.
        self.proc = subprocess.Popen(self.argv, start_new_session=True)
        self.wait_event("serving")

    def events(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.logfile.read_text().splitlines()]

    def wait_event(self, name: str, timeout: float = 10.0, count: int = 1) -> dict[str, object]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [e for e in self.events() if e["event"] == name]
            if len(found) >= count:
                return found[count - 1]
            time.sleep(0.02)
        raise AssertionError(f"no {name!r} event within {timeout} s: {self.events()}")

    def pids(self) -> set[int]:
        return {int(str(e["pid"])) for e in self.events()}

    def stop_all(self) -> None:
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(p) for p in self.pids()):
            time.sleep(0.02)
        for pid in self.pids():
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except OSError:
        return False


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    s = Server(tmp_path)
    try:
        yield s
    finally:
        s.stop_all()


def lookup(mountpoint: Path, key: str) -> int:
    """Stat a key from a process in its own session; 0 or the errno it saw."""
    target = str(mountpoint / key / "marker")
    code = f"import os,sys\ntry: os.stat({target!r})\nexcept OSError as e: sys.exit(e.errno)"
    return subprocess.run(
        [sys.executable, "-c", code], check=False, start_new_session=True, timeout=10
    ).returncode


def start_load(mountpoint: Path, prefix: str, seconds: float) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, str(PROGRAMS / "lookup_load.py"), str(mountpoint), prefix, str(seconds)],
        stdout=subprocess.PIPE,
        start_new_session=True,
    )


def pipe_readers(mountpoint: Path) -> set[int]:
    (am,) = [m for m in autofs_mounts() if m.mount_point == str(mountpoint)]
    assert am.pipe_ino is not None and not am.catatonic
    return {h.pid for h in find_pipe_holders(am.pipe_ino) if h.end == "read"}


def handover(server: Server, count: int = 1) -> int:
    old = server.wait_event("serving", count=count)
    os.kill(int(str(old["pid"])), signal.SIGUSR2)
    event = server.wait_event("handover", count=count)
    successor = event["successor_pid"]
    assert isinstance(successor, int)
    server.wait_event("exit", count=count)
    return successor


def test_handover_under_load_fails_no_lookup(server: Server) -> None:
    assert lookup(server.mountpoint, "before") == 0
    old_pid = server.proc.pid
    loads = [start_load(server.mountpoint, f"c{i}", 3.0) for i in range(4)]
    time.sleep(0.7)
    successor = handover(server)
    assert server.proc.wait(timeout=10) == 0  # the old process exited 0
    results = [json.loads(p.communicate(timeout=30)[0]) for p in loads]
    assert all(r["failures"] == [] for r in results), results
    assert sum(r["ok"] for r in results) > 100
    assert max(r["worst_s"] for r in results) < 1.0
    # The pipe now belongs to the successor, and the key mounted before still works.
    assert pipe_readers(server.mountpoint) == {successor}
    assert successor != old_pid
    assert lookup(server.mountpoint, "before") == 0
    assert lookup(server.mountpoint, "after") == 0
    mounted_by = {e["key"]: e["pid"] for e in server.events() if e["event"] == "mounted"}
    assert mounted_by["after"] == successor


def test_handover_with_slow_handler_in_flight(tmp_path: Path) -> None:
    server = Server(tmp_path, "--slow", "slowkey")
    try:
        slow = subprocess.Popen(
            [
                sys.executable,
                "-c",
                f"import os; os.stat({str(server.mountpoint / 'slowkey' / 'marker')!r})",
            ],
            start_new_session=True,
        )
        server.wait_event("slow-start")
        successor = handover(server)
        assert slow.wait(timeout=10) == 0  # answered by the old process before it left
        slow_mount = [
            e for e in server.events() if e["event"] == "mounted" and e["key"] == "slowkey"
        ]
        assert slow_mount and slow_mount[0]["pid"] == server.proc.pid
        assert lookup(server.mountpoint, "next") == 0
        assert pipe_readers(server.mountpoint) == {successor}
    finally:
        server.stop_all()


def test_successor_crashing_at_start_leaves_old_serving(tmp_path: Path) -> None:
    server = Server(tmp_path, "--crash-on-start")
    try:
        os.kill(server.proc.pid, signal.SIGUSR2)
        event = server.wait_event("handover")
        assert event["successor_pid"] is None
        assert server.proc.poll() is None
        assert lookup(server.mountpoint, "still") == 0
        assert pipe_readers(server.mountpoint) == {server.proc.pid}
    finally:
        server.stop_all()


def test_two_handovers_in_a_row(server: Server) -> None:
    first = handover(server, count=1)
    assert lookup(server.mountpoint, "one") == 0
    second = handover(server, count=2)
    assert second != first
    assert lookup(server.mountpoint, "one") == 0
    assert lookup(server.mountpoint, "two") == 0
    assert pipe_readers(server.mountpoint) == {second}


def test_shutdown_after_handover_leaves_nothing(server: Server) -> None:
    handover(server)
    assert lookup(server.mountpoint, "k") == 0
    server.stop_all()
    assert not [m for m in autofs_mounts() if m.mount_point == str(server.mountpoint)]
    with open("/proc/self/mountinfo") as f:
        assert str(server.mountpoint) not in f.read()


_SUCCESSOR = """
import sys, trio, pyautofs
mountpoint, source, locks = sys.argv[1:4]
async def handler(request):
    pyautofs.bind_mount(source, request.path)
async def main():
    am = pyautofs.Automounter(lock_dir=locks, negative_timeout=600, negative_max=200_000)
    am.add_mount(mountpoint, handler)
    async with trio.open_nursery() as nursery:
        await nursery.start(am.run)
        (m,) = am._mounts.values()
        with trio.move_on_after(20):
            while len(m.ledger.negative) < 100_000 or "late" not in m.ledger.negative:
                await trio.sleep(0.05)
        print(len(m.ledger.negative), "late" in m.ledger.negative, flush=True)
        await trio.to_thread.run_sync(sys.stdin.read)
        nursery.cancel_scope.cancel()
trio.run(main)
"""


# The old engine normally exits right after; here it is the test process, and its
# subprocess.Popen of the successor is dropped while the successor still runs.
@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_an_upgrade_streams_a_state_of_100000_keys(tmp_path: Path) -> None:
    import trio

    import pyautofs

    source = tmp_path / "src"
    source.mkdir()
    (source / "marker").write_text("x")
    mnt = tmp_path / "mnt"
    locks = str(tmp_path / "locks")
    out_r, out_w = os.pipe()
    in_r, in_w = os.pipe()

    async def handler(request: pyautofs.MountRequest) -> None:
        pyautofs.bind_mount(source, request.path)

    async def main() -> int | None:
        am = pyautofs.Automounter(lock_dir=locks, negative_timeout=600, negative_max=200_000)
        am.add_mount(mnt, handler)
        async with trio.open_nursery() as nursery:
            await nursery.start(am.run)
            (m,) = am._mounts.values()
            now = time.perf_counter()
            for i in range(100_000):
                m.ledger.negative.put(f"missing-key-number-{i}", 2, now)
            argv = [sys.executable, "-c", _SUCCESSOR, str(mnt), str(source), locks]
            # The state goes in the first message; "late" only in the final one.
            env = dict(os.environ)

            async def add_late() -> None:
                await trio.sleep(0)
                m.ledger.negative.put("late", 2, time.perf_counter())

            nursery.start_soon(add_late)
            first = am.hand_over(argv, timeout=30, env=env)
            # A second request while the first is in progress is ignored at once.
            second_result: list[int | None] = []

            async def second() -> None:
                await trio.sleep(0.01)
                second_result.append(await am.hand_over(argv, timeout=30))

            nursery.start_soon(second)
            pid = await first
            assert second_result == [None]
            return pid

    saved = os.dup(0), os.dup(1)
    os.dup2(in_r, 0)
    os.dup2(out_w, 1)
    try:
        pid = trio.run(main)
    finally:
        os.dup2(saved[0], 0)
        os.dup2(saved[1], 1)
        for fd in (*saved, in_r, out_w):
            os.close(fd)
    try:
        assert pid is not None
        line = b""
        deadline = time.monotonic() + 30
        while not line.endswith(b"\n") and time.monotonic() < deadline:
            line += os.read(out_r, 100)
        assert line.split() == [b"100001", b"True"]
        # The successor serves.
        done = subprocess.run(
            ["cat", str(mnt / "k" / "marker")],
            check=False,
            capture_output=True,
            text=True,
            timeout=20,
            start_new_session=True,
        )
        assert done.stdout == "x"
    finally:
        os.close(in_w)  # the successor shuts down
        os.close(out_r)
        if pid:
            for _ in range(300):
                try:
                    os.waitpid(pid, os.WNOHANG)
                    os.kill(pid, 0)
                except (ChildProcessError, ProcessLookupError):
                    break
                time.sleep(0.05)
    assert not [m for m in autofs_mounts() if m.mount_point == str(mnt)]


def test_state_decode_ignores_unknown_fields_and_defaults_missing_ones() -> None:
    from pyautofs._engine._handover import HandoverError, MountState, decode_state

    data = json.dumps(
        {
            "v": 3,
            "kind": "state",
            "future": {"x": 1},
            "mounts": [{"path": "/mnt/a", "mode": "direct", "new_field": [1, 2]}],
        }
    ).encode()
    msg, (st,) = decode_state(data, "state")
    assert st == MountState(path="/mnt/a", mode="direct")
    assert msg["future"] == {"x": 1}
    with pytest.raises(HandoverError, match="malformed mount state"):
        decode_state(json.dumps({"v": 2, "kind": "state", "mounts": [{}]}).encode(), "state")
    with pytest.raises(HandoverError, match="version"):
        decode_state(json.dumps({"v": 1, "kind": "state"}).encode(), "state")


def test_a_successor_reads_its_handover_fd_explicitly(monkeypatch: pytest.MonkeyPatch) -> None:
    """run() is given the handover socket; the environment is read only when asked to."""
    from pyautofs import Automounter

    monkeypatch.delenv("PYAUTOFS_HANDOVER_FD", raising=False)
    assert Automounter.upgrade_fd_from_environment() is None
    monkeypatch.setenv("PYAUTOFS_HANDOVER_FD", "7")
    assert Automounter.upgrade_fd_from_environment() == 7
    assert "PYAUTOFS_HANDOVER_FD" not in os.environ  # no child inherits it
    monkeypatch.setenv("PYAUTOFS_HANDOVER_FD", "7; rm -rf /")
    with pytest.raises(ValueError, match="not an fd number"):
        Automounter.upgrade_fd_from_environment()
