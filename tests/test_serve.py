"""`pyautofs serve`, end to end through the command, against the real kernel."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from pyautofs._sys._mountinfo import autofs_mounts

pytestmark = pytest.mark.kernel


def lookup(path: Path, *, read: bool = True) -> tuple[int, str]:
    """Read (or stat) a path from a process in its own session: (errno or 0, content)."""
    code = (
        "import os,sys\n"
        "try:\n"
        f"    p = {str(path)!r}\n"
        f"    print(open(p).read() if {read} else os.stat(p).st_dev, end='')\n"
        "except OSError as e:\n"
        "    sys.exit(e.errno)"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        start_new_session=True,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return r.returncode, r.stdout


def wait_ready(proc: subprocess.Popen[bytes], ready_r: int, log: Path, timeout: float = 20) -> None:
    """Wait for ``READY=1`` on the read end of a ``--ready-fd`` pipe (then close it).

    EOF before the line means the server exited (or closed the fd) without becoming ready.
    """
    try:
        deadline = time.monotonic() + timeout
        data = b""
        while not data.endswith(b"\n"):
            left = deadline - time.monotonic()
            assert left > 0, f"not ready within {timeout} s:\n{log.read_text()}"
            ready, _, _ = select.select([ready_r], [], [], left)
            if ready:
                chunk = os.read(ready_r, 64)
                assert chunk, f"exited ({proc.wait(timeout=10)}) before READY:\n{log.read_text()}"
                data += chunk
        assert data == b"READY=1\n", data
    finally:
        os.close(ready_r)


def start_serve(
    log: Path,
    args: list[str],
    *,
    env: dict[str, str] | None = None,
    wrapper: Sequence[str] = (),
) -> subprocess.Popen[bytes]:
    """``pyautofs serve ARGS`` in its own session, returned once it is ready (--ready-fd).

    ``wrapper`` is a command that execs its arguments (say, ``unshare ... sh -c``).
    """
    ready_r, ready_w = os.pipe()
    argv = [*wrapper, sys.executable, "-m", "pyautofs", "serve", "--ready-fd", str(ready_w)]
    argv += args
    try:
        with log.open("w") as err:
            proc = subprocess.Popen(
                argv,
                stderr=err,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                pass_fds=(ready_w,),
                env=env,
            )
    finally:
        os.close(ready_w)
    try:
        wait_ready(proc, ready_r, log)
    except BaseException:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        raise
    return proc


class Server:
    def __init__(self, tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.stderr = tmp_path / f"serve-{len(list(tmp_path.glob('serve-*')))}.log"
        self.proc = start_serve(
            self.stderr, ["-v", "--lock-dir", str(tmp_path / "locks"), *args], env=env
        )

    def log(self) -> str:
        return self.stderr.read_text()

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


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
