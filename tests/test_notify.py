"""sd_notify and --ready-fd: the messages a supervisor gets, on a NOTIFY_SOCKET the test binds."""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from _harness import lookup, start_serve

from pyautofs._engine._notify import Notifier
from pyautofs._sys._mountinfo import autofs_mounts


class NotifySocket:
    """A datagram socket bound where NOTIFY_SOCKET points, as systemd binds it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.bind(str(path))
        self.seen: list[dict[str, str]] = []

    def next(self, timeout: float = 20.0) -> dict[str, str]:
        ready, _, _ = select.select([self.sock], [], [], timeout)
        assert ready, f"no notification within {timeout} s; seen: {self.seen}"
        data = self.sock.recv(4096).decode()
        message = dict(line.split("=", 1) for line in data.split("\n"))
        self.seen.append(message)
        return message

    def wait_for(self, key: str, timeout: float = 20.0) -> dict[str, str]:
        """The next message that sets ``key`` (others are kept in :attr:`seen`)."""
        deadline = time.monotonic() + timeout
        while True:
            message = self.next(max(0.01, deadline - time.monotonic()))
            if key in message:
                return message

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    s = NotifySocket(tmp_path / "notify")
    try:
        yield s
    finally:
        s.close()


def test_notifier_sends_each_state(notify_socket: NotifySocket) -> None:
    n = Notifier(str(notify_socket.path), watchdog_usec=2_000_000)
    try:
        n.ready("serving 1 mount")
        assert notify_socket.next() == {"READY": "1", "STATUS": "serving 1 mount"}
        n.reloading()
        m = notify_socket.next()
        assert m["RELOADING"] == "1" and int(m["MONOTONIC_USEC"]) > 0
        assert abs(int(m["MONOTONIC_USEC"]) - time.monotonic_ns() // 1000) < 10_000_000
        n.watchdog()
        assert notify_socket.next() == {"WATCHDOG": "1"}
        n.stopping()
        assert notify_socket.next()["STOPPING"] == "1"
        n.main_pid(1234)
        assert notify_socket.next()["MAINPID"] == "1234"
        assert n.watchdog_interval == 1.0
    finally:
        n.close()


def test_notifier_abstract_socket_and_environment() -> None:
    name = f"pyautofs-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    sock.bind("\0" + name)
    try:
        env = {"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "500000"}
        n = Notifier.from_environment(environ=env)
        try:
            assert n.watchdog_interval == 0.25
            n.status("hello")
            assert sock.recv(100) == b"STATUS=hello"
        finally:
            n.close()
        # A watchdog meant for another process is not ours to feed.
        other = Notifier.from_environment(environ={**env, "WATCHDOG_PID": "1"})
        assert other.watchdog_interval is None
        other.close()
    finally:
        sock.close()


def test_notifier_without_a_supervisor_is_silent() -> None:
    n = Notifier.from_environment(environ={})
    n.ready("x")
    n.stopping()
    assert n.watchdog_interval is None
    n.close()


def test_ready_fd_gets_one_line_then_eof() -> None:
    r, w = os.pipe()
    n = Notifier(ready_fd=w)
    n.ready("x")
    n.ready("again")  # written once only
    assert os.read(r, 100) == b"READY=1\n"
    assert os.read(r, 100) == b""  # closed
    os.close(r)
    n.close()


@pytest.mark.kernel
def test_serve_under_type_notify(tmp_path: Path, notify_socket: NotifySocket) -> None:
    """READY once the mount is live, STATUS with counts, WATCHDOG, RELOADING then READY on
    SIGHUP, STOPPING on SIGTERM: what systemd sees from a Type=notify service."""
    (tmp_path / "exports" / "alpha").mkdir(parents=True)
    (tmp_path / "exports" / "alpha" / "f").write_text("alpha")
    amap = tmp_path / "auto.map"
    amap.write_text(f"alpha -fstype=bind :{tmp_path}/exports/alpha\n")
    env = {**os.environ, "NOTIFY_SOCKET": str(notify_socket.path), "WATCHDOG_USEC": "400000"}
    mnt = tmp_path / "mnt"
    proc = start_serve(
        tmp_path / "serve.log",
        ["--lock-dir", str(tmp_path / "locks"), "--timeout", "0", str(mnt), str(amap)],
        env=env,
    )
    try:
        ready = notify_socket.wait_for("READY")
        # READY=1 came after the mount was live: --ready-fd (which start_serve waited on)
        # and the socket are told at the same moment.
        assert any(m.mount_point == str(mnt) for m in autofs_mounts())
        assert "serving 1 autofs mount(s)" in ready["STATUS"]
        notify_socket.wait_for("WATCHDOG", timeout=5)
        assert lookup(mnt / "alpha" / "f") == (0, "alpha")
        status = notify_socket.wait_for("STATUS", timeout=15)
        while "1 key(s) mounted" not in status["STATUS"]:
            status = notify_socket.wait_for("STATUS", timeout=15)
        proc.send_signal(signal.SIGHUP)
        reloading = notify_socket.wait_for("RELOADING")
        assert int(reloading["MONOTONIC_USEC"]) > 0
        assert "READY" in notify_socket.wait_for("READY")
        proc.send_signal(signal.SIGTERM)
        assert notify_socket.wait_for("STOPPING")["STOPPING"] == "1"
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not [m for m in autofs_mounts() if m.mount_point.startswith(str(tmp_path))]


@pytest.mark.kernel
def test_ready_fd_that_is_not_open_is_one_line(tmp_path: Path) -> None:
    r = subprocess.run(
        [
            *(sys.executable, "-m", "pyautofs", "serve", "--ready-fd", "57"),
            str(tmp_path / "mnt"),
            str(tmp_path / "map"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        cwd=Path(__file__).parent.parent,
    )
    assert r.returncode == 2, r
    assert r.stderr.strip().splitlines() == [
        "pyautofs serve: --ready-fd 57: fd 57 is not open in this process"
    ]


def test_the_upgrade_successor_feeds_the_watchdog() -> None:
    from pyautofs._engine._serve import successor_env

    env = {"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "41"}
    mine = successor_env(env, 41)
    assert "WATCHDOG_PID" not in mine and mine["WATCHDOG_USEC"] == "30000000"
    n = Notifier.from_environment(environ=mine)
    try:
        assert n.watchdog_interval == 15.0
    finally:
        n.close()
    assert successor_env(env, 42) == env  # someone else's watchdog stays theirs
