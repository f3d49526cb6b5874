"""``pyautofs serve`` as an operator meets it: bad options, program maps that fail, signals
sent twice, a bind source that hangs, and what it leaves behind. Real kernel throughout."""

from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from _harness import hung_autofs as _hung_autofs
from _harness import lookup, start_serve
from test_notify import NotifySocket

from pyautofs import __version__
from pyautofs._sys._mountinfo import autofs_mounts

PYAUTOFS = [sys.executable, "-m", "pyautofs"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PYAUTOFS, *args], capture_output=True, text=True, timeout=30, check=False
    )


def wait_for(predicate: object, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"
    except FileNotFoundError:
        return True


# -- options ------------------------------------------------------------------------------


def test_version() -> None:
    r = run("--version")
    assert (r.returncode, r.stdout, r.stderr) == (0, f"pyautofs {__version__}\n", "")


@pytest.mark.parametrize(
    ("option", "value", "needle"),
    [
        ("--timeout", "-1", "must be a whole number of seconds >= 0 (0: off), not -1"),
        ("--timeout", "1.5", "'1.5' is not a whole number of seconds"),
        ("--timeout", "99999999999", "more than the kernel accepts"),
        ("--request-timeout", "-1", "must be a number of seconds >= 0 (0: off), not -1"),
        ("--request-timeout", "nan", "must be a number of seconds >= 0 (0: off), not nan"),
        ("--negative-timeout", "-1", "must be a number of seconds >= 0 (0: off), not -1"),
        ("--negative-timeout", "inf", "not inf"),
        ("--negative-timeout", "soon", "'soon' is not a number of seconds"),
        ("--ready-fd", "-3", "must be an fd number >= 0, not -3"),
        ("--log-target", "file", "invalid choice: 'file'"),
    ],
)
def test_bad_option_is_one_line(option: str, value: str, needle: str) -> None:
    r = run("serve", option, value, "/mnt/x", "/etc/auto.x")
    assert r.returncode == 2, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"pyautofs serve: argument {option}: "), lines
    assert needle in lines[0], lines
    assert lines[0].endswith("(see 'pyautofs serve --help')")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("demo", "-n", "0"), "argument -n/--keys: must be at least 1, not 0"),
        (("inspect", "--pid", "-4"), "argument --pid: must be 'self' or a process id, not '-4'"),
        (("nosuch",), "invalid choice: 'nosuch'"),
    ],
)
def test_other_bad_input_is_one_line(args: tuple[str, ...], needle: str) -> None:
    r = run(*args)
    assert r.returncode == 2, r
    assert len(r.stderr.strip().splitlines()) == 1 and needle in r.stderr, r.stderr


def test_zero_means_off_in_every_duration_option() -> None:
    text = run("serve", "--help").stdout
    flat = " ".join(text.split())
    for option in ("--timeout", "--negative-timeout", "--request-timeout"):
        assert re.search(
            rf"{option} SECONDS [^-]*\(0: (never expire|no negative cache|no deadline)", flat
        ), option
    assert "0 turns the limit off" in flat


# -- serving ------------------------------------------------------------------------------


@pytest.fixture
def exports(tmp_path: Path) -> Path:
    for name in ("alpha", "beta"):
        (tmp_path / "exports" / name).mkdir(parents=True)
        (tmp_path / "exports" / name / "f").write_text(name)
    return tmp_path / "exports"


class Serve:
    def __init__(self, tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> None:
        n = len(list(tmp_path.glob("serve-*.log")))
        self.log = tmp_path / f"serve-{n}.log"
        self.proc = start_serve(self.log, ["--lock-dir", str(tmp_path / "locks"), *args], env=env)

    def text(self) -> str:
        return self.log.read_text()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


@pytest.mark.kernel
def test_program_map_failure_is_not_no_such_key(tmp_path: Path, exports: Path) -> None:
    prog = tmp_path / "auto.prog"
    prog.write_text(
        "#!/bin/sh\n"
        'case "$1" in\n'
        f'  alpha) echo "-fstype=bind :{exports}/alpha" ;;\n'
        '  ldap) echo "cannot reach LDAP server" >&2; exit 3 ;;\n'
        "  noisy) head -c 100000 /dev/zero | tr '\\0' 'e' >&2; exit 1 ;;\n"
        "  killed) kill -9 $$ ;;\n"
        f'  talker) echo "note: from the cache" >&2; echo ":{exports}/beta" ;;\n'
        "esac\n"
    )
    prog.chmod(0o755)
    mnt = tmp_path / "mnt"
    s = Serve(tmp_path, "--timeout", "0", str(mnt), str(prog))
    try:
        assert lookup(mnt / "alpha" / "f") == (0, "alpha")
        assert lookup(mnt / "talker" / "f") == (0, "beta")
        for key in ("ldap", "noisy", "killed", "none"):
            assert lookup(mnt / key / "f")[0] == errno.ENOENT, key
    finally:
        assert s.stop() == 0
    lines = s.text().splitlines()

    def line(key: str) -> str:
        (found,) = [x for x in lines if f"lookup of {key} under" in x]
        return found

    assert " WARNING " in line("ldap")
    assert line("ldap").endswith(
        f"map program {prog} ldap failed: exit status 3; stderr: cannot reach LDAP server"
    )
    assert " WARNING " in line("noisy")
    assert "exit status 1; stderr (of 100000 bytes): eeee" in line("noisy")
    assert len(line("noisy")) < 2000  # bounded
    assert "failed: killed by SIGKILL" in line("killed")
    # No such key: the engine's failure line, and no reason line (there is none to give).
    assert not [x for x in lines if "lookup of none under" in x]
    assert [x for x in lines if "failed (ENOENT)" in x and "key='none'" in x]
    assert any(
        f"map program {prog} talker wrote to stderr: note: from the cache" in x for x in lines
    )


@pytest.mark.kernel
def test_program_map_with_a_missing_interpreter_says_so(tmp_path: Path) -> None:
    prog = tmp_path / "auto.prog"
    prog.write_text("#!/nonexistent/python9 -u\nprint('x')\n")
    prog.chmod(0o755)
    mnt = tmp_path / "mnt"
    s = Serve(tmp_path, str(mnt), str(prog))
    try:
        assert lookup(mnt / "key" / "f")[0] == errno.ENOENT
    finally:
        assert s.stop() == 0
    assert (
        f"map program {prog} key: cannot run: its interpreter /nonexistent/python9 "
        "(from the #! line) does not exist"
    ) in s.text()


@pytest.mark.kernel
def test_created_parent_directories_are_removed_at_exit(tmp_path: Path, exports: Path) -> None:
    amap = tmp_path / "auto.map"
    amap.write_text(f"alpha :{exports}/alpha\n")
    mnt = tmp_path / "new" / "deeper" / "mnt"
    s = Serve(tmp_path, str(mnt), str(amap))
    try:
        assert lookup(mnt / "alpha" / "f") == (0, "alpha")
    finally:
        assert s.stop() == 0
    assert not (tmp_path / "new").exists()
    # A parent that existed before is kept.
    (tmp_path / "kept").mkdir()
    s = Serve(tmp_path, str(tmp_path / "kept" / "mnt"), str(amap))
    assert s.stop() == 0
    assert (tmp_path / "kept").is_dir() and not (tmp_path / "kept" / "mnt").exists()


@pytest.mark.kernel
def test_sighup_forgets_failed_lookups(tmp_path: Path, exports: Path) -> None:
    amap = tmp_path / "auto.map"
    amap.write_text(f"alpha :{exports}/alpha\n")
    notify = NotifySocket(tmp_path / "notify")
    env = {**os.environ, "NOTIFY_SOCKET": str(notify.path)}
    mnt = tmp_path / "mnt"
    s = Serve(tmp_path, "--negative-timeout", "600", str(mnt), str(amap), env=env)
    try:
        notify.wait_for("READY")
        assert lookup(mnt / "beta" / "f")[0] == errno.ENOENT
        amap.write_text(f"alpha :{exports}/alpha\nbeta :{exports}/beta\n")
        os.utime(amap, (time.time() + 5, time.time() + 5))
        assert lookup(mnt / "beta" / "f")[0] == errno.ENOENT  # still remembered
        s.proc.send_signal(signal.SIGHUP)
        notify.wait_for("RELOADING")
        notify.wait_for("READY")
        assert lookup(mnt / "beta" / "f") == (0, "beta")
    finally:
        notify.close()
        assert s.stop() == 0


@pytest.mark.kernel
def test_second_sigterm_forces_the_exit_and_says_what_is_left(tmp_path: Path) -> None:
    prog = tmp_path / "auto.prog"
    prog.write_text("#!/bin/sh\nexec sleep 30\n")
    prog.chmod(0o755)
    mnt = tmp_path / "mnt"
    notify = NotifySocket(tmp_path / "notify")
    s = Serve(tmp_path, str(mnt), str(prog), env={**os.environ, "NOTIFY_SOCKET": str(notify.path)})
    client = subprocess.Popen(
        ["stat", str(mnt / "slow")],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(
            lambda: (
                "sleep"
                in subprocess.run(
                    ["pgrep", "-g", str(s.proc.pid), "-a"],
                    capture_output=True,
                    text=True,
                    check=False,
                ).stdout
            ),
            "the map program did not start",
        )
        s.proc.send_signal(signal.SIGTERM)
        notify.wait_for("STOPPING")  # the first one is being handled: shutdown started
        t0 = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(timeout=10) == 128 + signal.SIGTERM
        assert time.monotonic() - t0 < 3  # at once, not after the grace period
        text = s.text()
        assert "SIGTERM: shutting down (send SIGTERM again to force the exit)" in text
        assert re.search(
            r"WARNING second SIGTERM: forcing the exit; left behind: 1 request\(s\) in flight; "
            rf"0 key\(s\) mounted; 1 autofs mount\(s\): {re.escape(str(mnt))}",
            text,
        ), text
        assert "1 autofs mount(s) made catatonic: waiting lookups fail with ENOENT" in text
        # The stuck client was released at once (CATATONIC), not left in the kernel.
        assert client.wait(timeout=10) == 1  # stat(1): No such file or directory
        (m,) = [m for m in autofs_mounts() if m.mount_point == str(mnt)]
        assert m.catatonic
    finally:
        notify.close()
        os.killpg(s.proc.pid, signal.SIGKILL)  # the map program, orphaned
        if s.proc.poll() is None:
            s.proc.wait()
        # The next serve adopts the mount (CATATONIC releases the stuck client), then exits.
        if any(m.mount_point == str(mnt) for m in autofs_mounts()):
            after = Serve(tmp_path, str(mnt), str(prog))
            assert after.stop() == 0
        assert client.wait(timeout=20) != 0
    assert not [m for m in autofs_mounts() if m.mount_point.startswith(str(tmp_path))]


@pytest.mark.kernel
def test_second_sigusr2_during_an_upgrade_is_logged_and_ignored(
    tmp_path: Path, exports: Path
) -> None:
    amap = tmp_path / "auto.map"
    amap.write_text(f"alpha :{exports}/alpha\n")
    mnt = tmp_path / "mnt"
    s = Serve(tmp_path, str(mnt), str(amap))
    successor = 0
    try:
        s.proc.send_signal(signal.SIGUSR2)
        time.sleep(0.05)
        s.proc.send_signal(signal.SIGUSR2)
        assert s.proc.wait(timeout=30) == 0  # not killed by the second SIGUSR2
        text = s.text()
        assert "SIGUSR2 ignored: an upgrade is already in progress" in text
        found = re.search(r"handed over to pid (\d+); exiting", text)
        assert found, text
        successor = int(found.group(1))
        assert lookup(mnt / "alpha" / "f") == (0, "alpha")  # the successor serves
    finally:
        if successor:
            os.kill(successor, signal.SIGTERM)
            wait_for(lambda: gone(successor), "the successor did not exit")
        elif s.proc.poll() is None:
            s.stop()
    assert not [m for m in autofs_mounts() if m.mount_point.startswith(str(tmp_path))]


@pytest.fixture
def hung_autofs(tmp_path: Path) -> Iterator[Path]:
    """An autofs mount whose requests nobody ever answers (its pipe is never read)."""
    with _hung_autofs(tmp_path / "hung") as path:
        yield path


@pytest.mark.kernel
def test_a_hung_bind_source_freezes_nothing(
    tmp_path: Path, exports: Path, hung_autofs: Path
) -> None:
    """The bind source is on an autofs mount nobody answers: exists() and mount(2) block in
    the kernel. Other lookups go on, the stuck one is answered (ETIMEDOUT) at the request
    deadline, and SIGTERM still shuts down."""
    amap = tmp_path / "auto.map"
    amap.write_text(f"hung :{hung_autofs}/x\nalpha :{exports}/alpha\n")
    mnt = tmp_path / "mnt"
    s = Serve(tmp_path, "--request-timeout", "2", "--timeout", "0", str(mnt), str(amap))
    try:
        stuck = subprocess.Popen(
            [
                sys.executable,
                "-c",
                f"import os\ntry: os.stat({str(mnt / 'hung')!r})\n"
                "except OSError as e: raise SystemExit(e.errno)",
            ],
            start_new_session=True,
        )
        time.sleep(0.3)
        t0 = time.monotonic()
        assert lookup(mnt / "alpha" / "f") == (0, "alpha")
        assert time.monotonic() - t0 < 1.5  # not behind the hung one
        assert stuck.wait(timeout=20) == errno.ETIMEDOUT
        assert "abandoned" in s.text()
        t0 = time.monotonic()
    finally:
        assert s.stop() == 0
    assert time.monotonic() - t0 < 15
    assert not (mnt / "hung").exists()
    assert not [m for m in autofs_mounts() if m.mount_point.startswith(str(mnt))]


@pytest.mark.kernel
def test_a_program_map_another_user_could_change_is_never_run(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # any user may replace what is in here
    prog = shared / "auto.prog"
    marker = tmp_path / "ran"
    prog.write_text(f"#!/bin/sh\ntouch {marker}\n")
    prog.chmod(0o755)
    mnt = tmp_path / "mnt"
    s = Serve(tmp_path, str(mnt), str(prog))
    try:
        assert lookup(mnt / "key" / "f")[0] == errno.ENOENT
    finally:
        assert s.stop() == 0
    assert not marker.exists()
    assert (
        f"map program {prog} key: not run: refusing {shared}: mode 0777 lets other users change it"
    ) in s.text()


@pytest.mark.kernel
def test_sigterm_during_an_upgrade_stops_the_successor_too(tmp_path: Path, exports: Path) -> None:
    amap = tmp_path / "auto.map"
    amap.write_text(f"alpha :{exports}/alpha\n")
    mnt = tmp_path / "mnt"
    s = Serve(tmp_path, str(mnt), str(amap))
    successor = 0
    try:
        s.proc.send_signal(signal.SIGUSR2)
        time.sleep(0.05)
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(timeout=30) == 0
        text = s.text()
        assert "SIGTERM: shutting down once the upgrade in progress has ended" in text
        found = re.search(r"handed over to pid (\d+); exiting", text)
        assert found, text
        successor = int(found.group(1))
        assert f"passing the shutdown asked for during the upgrade on to pid {successor}" in text
        wait_for(lambda: gone(successor), "the successor did not shut down")
    finally:
        if successor and not gone(successor):
            os.kill(successor, signal.SIGKILL)
    assert not [m for m in autofs_mounts() if m.mount_point.startswith(str(tmp_path))]
