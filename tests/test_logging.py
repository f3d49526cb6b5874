"""Logging: timestamps and levels, the journal's native protocol, the automatic choice, and
what ``pyautofs serve`` logs (one escaped INFO line per mount, unmount and failure)."""

from __future__ import annotations

import logging
import os
import re
import select
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from _harness import lookup, start_serve

from pyautofs._cli._logging import (
    MAX_JOURNAL_MESSAGE,
    JournalHandler,
    StderrFormatter,
    choose_target,
    setup_logging,
)
from pyautofs._sys._mountinfo import autofs_mounts

STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d{4}"


def parse_journal(data: bytes) -> dict[str, str]:
    """Decode one native-protocol datagram (both field forms), strictly."""
    fields: dict[str, str] = {}
    while data:
        line, sep, rest = data.partition(b"\n")
        assert sep, data
        if b"=" in line:
            name, _, value = line.partition(b"=")
            data = rest
        else:
            name = line
            (size,) = struct.unpack("<Q", rest[:8])
            value = rest[8 : 8 + size]
            assert rest[8 + size : 9 + size] == b"\n"
            data = rest[9 + size :]
        assert re.fullmatch(rb"[A-Z0-9][A-Z0-9_]*", name), name
        fields[name.decode()] = value.decode()
    return fields


class Journal:
    """A unix datagram socket bound by the test, standing in for journald's."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.bind(str(path))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)

    def records(self, timeout: float = 0.0) -> list[dict[str, str]]:
        out = []
        while select.select([self.sock], [], [], timeout)[0]:
            out.append(parse_journal(self.sock.recv(1 << 17)))
            timeout = 0.0
        return out

    def wait_for(self, needle: str, timeout: float = 20.0) -> list[dict[str, str]]:
        seen: list[dict[str, str]] = []
        while not any(needle in r["MESSAGE"] for r in seen):
            got = self.records(timeout)
            assert got, (needle, [r["MESSAGE"] for r in seen])
            seen += got
        return seen

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    j = Journal(tmp_path / "journal.socket")
    try:
        yield j
    finally:
        j.close()


def record(msg: str, level: int = logging.INFO, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            exc_info = sys.exc_info()
    return logging.LogRecord("pyautofs", level, "/x/y.py", 42, msg, None, exc_info, "fn")


def test_stderr_lines_have_timestamp_pid_and_level() -> None:
    line = StderrFormatter().format(record("mounted /mnt/a", logging.WARNING))
    assert re.fullmatch(rf"{STAMP} pyautofs\[\d+\] WARNING mounted /mnt/a", line), line


def test_journal_native_protocol(journal: Journal) -> None:
    handler = JournalHandler(str(journal.path))
    try:
        handler.emit(record("mounted /mnt/a", logging.INFO))
        handler.emit(record("two\nlines", logging.ERROR))
        handler.emit(record("with a traceback", logging.WARNING, exc=True))
        handler.emit(record("x" * (MAX_JOURNAL_MESSAGE + 5000), logging.DEBUG))
    finally:
        handler.close()
    one, two, three, big = journal.records(timeout=5)
    assert one["MESSAGE"] == "mounted /mnt/a"
    assert one["PRIORITY"] == "6"
    assert one["SYSLOG_IDENTIFIER"] == "pyautofs"
    assert one["SYSLOG_PID"] == str(os.getpid())
    assert (one["CODE_FILE"], one["CODE_LINE"], one["CODE_FUNC"]) == ("/x/y.py", "42", "fn")
    assert two["MESSAGE"] == "two\nlines" and two["PRIORITY"] == "3"  # the length form
    assert three["PRIORITY"] == "4" and "ValueError: boom" in three["MESSAGE"]
    assert big["PRIORITY"] == "7" and len(big["MESSAGE"]) == MAX_JOURNAL_MESSAGE + 3


def test_journal_gone_costs_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    handler = JournalHandler(str(tmp_path / "nobody-listens"))
    try:
        handler.emit(record("a"))
        handler.emit(record("b"))
    finally:
        handler.close()
    err = capsys.readouterr().err
    assert err.count("cannot log to the journal") == 1, err


def test_journal_is_chosen_when_stderr_is_the_journal_stream(tmp_path: Path) -> None:
    stream = tmp_path / "stream"
    with stream.open("w") as f:
        st = os.fstat(f.fileno())
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert choose_target(env, f.fileno()) == "journal"
        # stderr redirected elsewhere (a script under systemd): not the journal
        assert choose_target(env, 0 if os.fstat(0).st_ino != st.st_ino else 1) == "stderr"
    assert choose_target({}, 2) == "stderr"
    assert choose_target({"JOURNAL_STREAM": "garbage"}, 2) == "stderr"


def test_setup_logging_replaces_handlers() -> None:
    logger = logging.getLogger("pyautofs")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    try:
        assert setup_logging("stderr", verbose=True) == "stderr"
        assert logger.level == logging.DEBUG
        assert len(logger.handlers) == 1
        assert isinstance(logger.handlers[0].formatter, StderrFormatter)
        setup_logging("stderr")
        assert len(logger.handlers) == 1 and logger.level == logging.INFO
    finally:
        for h in logger.handlers:
            h.close()
        logger.handlers[:] = saved[0]
        logger.setLevel(saved[1])
        logger.propagate = saved[2]


@pytest.mark.kernel
def test_serve_logs_to_the_journal_by_itself_under_systemd(
    tmp_path: Path, journal: Journal
) -> None:
    """JOURNAL_STREAM naming stderr makes ``serve`` speak the native protocol to the journal
    socket (here the test's, bind-mounted over /run/systemd/journal/socket in a private
    namespace). A key with a newline and an escape arrives escaped: no forged record."""
    (tmp_path / "exports" / "alpha").mkdir(parents=True)
    (tmp_path / "exports" / "alpha" / "f").write_text("alpha")
    amap = tmp_path / "auto.map"
    amap.write_text(f"alpha -fstype=bind :{tmp_path}/exports/alpha\n")
    mnt = tmp_path / "mnt"
    log = tmp_path / "stderr.log"
    log.touch()
    st = log.stat()
    setup = (
        "set -e; mount -t tmpfs tmpfs /run/ && mkdir -p /run/systemd/journal && "
        f"touch /run/systemd/journal/socket && mount --bind {journal.path} "
        '/run/systemd/journal/socket && exec "$@"'
    )
    wrapper = ["unshare", "--mount", "--propagation", "private", "sh", "-c", setup, "-"]
    env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
    proc = start_serve(
        log,
        ["--lock-dir", str(tmp_path / "locks"), "--timeout", "0", str(mnt), str(amap)],
        env=env,
        wrapper=wrapper,
    )
    try:
        seen = journal.wait_for("serving 1 autofs mount(s)")
        assert all(r["SYSLOG_IDENTIFIER"] == "pyautofs" for r in seen)
        assert all(r["PRIORITY"] == "6" for r in seen)
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0
    seen += journal.wait_for("shut down")
    assert log.read_text() == ""  # nothing on stderr: all of it went to the journal


@pytest.mark.kernel
def test_serve_logs_each_mount_failure_and_unmount_escaped(tmp_path: Path) -> None:
    (tmp_path / "exports" / "alpha").mkdir(parents=True)
    (tmp_path / "exports" / "alpha" / "f").write_text("alpha")
    amap = tmp_path / "auto.map"
    amap.write_text(f"alpha -fstype=bind :{tmp_path}/exports/alpha\n")
    mnt = tmp_path / "mnt"
    log = tmp_path / "serve.log"
    proc = start_serve(
        log, ["--lock-dir", str(tmp_path / "locks"), "--timeout", "1", str(mnt), str(amap)]
    )
    try:
        assert lookup(mnt / "alpha" / "f") == (0, "alpha")
        forged = "x\n2026-01-01T00:00:00.000+0000 pyautofs[1] ERROR forged\x1b[2J"
        assert lookup(mnt / forged)[0] == 2
        deadline = time.monotonic() + 20
        while "unmounted" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0
    text = log.read_text()
    lines = text.splitlines()
    assert all(re.match(rf"{STAMP} pyautofs\[\d+\] [A-Z]+ ", line) for line in lines), text
    mounted = [line for line in lines if " INFO mounted " in line]
    assert len(mounted) == 1, text
    assert re.search(
        rf"INFO mounted {re.escape(str(mnt))} key='alpha' pid=\d+ cmd=\S+ \d+us$", mounted[0]
    )
    failed = [line for line in lines if "failed (ENOENT)" in line]
    assert len(failed) == 1, text
    assert "key='x\\n2026-01-01T00:00:00.000+0000 pyautofs[1] ERROR forged\\x1b[2J'" in failed[0]
    assert not any(line.endswith("ERROR forged") for line in lines)
    assert "\x1b" not in text
    assert re.search(rf"INFO unmounted {re.escape(str(mnt))} key='alpha'", text), text
    assert not [m for m in autofs_mounts() if m.mount_point.startswith(str(tmp_path))]


@pytest.mark.kernel
def test_log_target_syslog_without_dev_log_is_one_line(tmp_path: Path) -> None:
    setup = 'set -e; mount -t tmpfs tmpfs /dev/ && exec "$@"'
    r = subprocess.run(
        [
            *("unshare", "--mount", "--propagation", "private", "sh", "-c", setup, "-"),
            *(sys.executable, "-m", "pyautofs", "serve", "--log-target", "syslog"),
            *(str(tmp_path / "mnt"), str(tmp_path / "map")),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert r.returncode == 1, r
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "cannot log to syslog" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.kernel
def test_log_target_syslog_sends_daemon_facility_lines(tmp_path: Path, journal: Journal) -> None:
    """--log-target syslog: RFC 3164 datagrams to /dev/log (here the test's socket,
    bind-mounted over it in a private namespace), facility daemon, ident pyautofs[PID]."""
    amap = tmp_path / "auto.map"
    amap.write_text(f"alpha :{tmp_path}\n")
    # /dev/log is made in an overlay over /dev, private to the namespace: never on the host.
    (tmp_path / "upper").mkdir()
    (tmp_path / "work").mkdir()
    setup = (
        "set -e; mount -t overlay test-dev "
        f"-o lowerdir=/dev,upperdir={tmp_path}/upper,workdir={tmp_path}/work /dev; "
        f'rm -f /dev/log; touch /dev/log; mount --bind {journal.path} /dev/log; exec "$@"'
    )
    wrapper = ["unshare", "--mount", "--propagation", "private", "sh", "-c", setup, "-"]
    log = tmp_path / "stderr.log"
    proc = start_serve(
        log,
        [
            "--log-target",
            "syslog",
            "--lock-dir",
            str(tmp_path / "locks"),
            str(tmp_path / "mnt"),
            str(amap),
        ],
        wrapper=wrapper,
    )
    try:
        got = b""
        deadline = time.monotonic() + 20
        while b"serving 1 autofs mount(s)" not in got:
            assert select.select([journal.sock], [], [], max(0.0, deadline - time.monotonic()))[0]
            got += journal.sock.recv(65536) + b"\n"
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0
    line = next(x for x in got.split(b"\n") if b"serving 1 autofs mount(s)" in x)
    # <30> is facility daemon (3) * 8 + info (6).
    assert re.fullmatch(rb"<30>pyautofs\[\d+\]: serving 1 autofs mount\(s\); pid \d+\x00?", line), (
        line
    )
    assert log.read_text() == ""
