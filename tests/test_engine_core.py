"""The engine's centre on the real kernel: inline answers, scale, device changes, locks,
negative-cache bounds, expiry pause, restored pipes, the request log.

Clients are real processes in their own sessions; every test runs under a deadline.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import resource
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio
from test_engine_paths import engine, lookups

import pyautofs
from pyautofs._engine._lock import mount_namespace
from pyautofs._proto._ledger import MountLedger, NegativeCache, Verdict
from pyautofs.lowlevel import autofs_mounts, read_mountinfo

pytestmark = pytest.mark.kernel


@pytest.fixture
def src(tmp_path: Path) -> Path:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "f").write_text("hello")
    return tmp_path / "src"


class SpawnCounter(trio.abc.Instrument):
    def __init__(self) -> None:
        self.spawned: list[str] = []

    def task_spawned(self, task: trio.lowlevel.Task) -> None:
        self.spawned.append(task.name)


async def test_a_handler_that_never_awaits_is_answered_without_a_task(
    tmp_path: Path, src: Path
) -> None:
    async def handler(request: pyautofs.MountRequest) -> None:
        pyautofs.bind_mount(src, request.path)

    counter = SpawnCounter()
    with trio.fail_after(30):
        async with engine(tmp_path, handler) as am:
            # The client process itself costs trio tasks (run_process): count them apart.
            proc = await trio.lowlevel.open_process(
                [
                    sys.executable,
                    "-c",
                    "import os,sys; os.read(0,1); os.stat(sys.argv[1])",
                    str(tmp_path / "mnt" / "k1"),
                ],
                stdin=subprocess.PIPE,
                start_new_session=True,
            )
            assert proc.stdin is not None
            trio.lowlevel.add_instrument(counter)
            try:
                await proc.stdin.send_all(b"x")
                with trio.fail_after(10):
                    while am.statistics().ready < 1:
                        await trio.sleep(0.001)
            finally:
                trio.lowlevel.remove_instrument(counter)
            assert await proc.wait() == 0
            await proc.stdin.aclose()
            assert am.statistics().ready == 1
    engine_tasks = [n for n in counter.spawned if "pyautofs" in n]
    assert engine_tasks == [], counter.spawned


async def test_a_handler_that_awaits_gets_a_task_and_slow_ones_run_concurrently(
    tmp_path: Path, src: Path
) -> None:
    async def handler(request: pyautofs.MountRequest) -> None:
        if request.key.startswith("hang"):
            await trio.sleep_forever()
        await trio.sleep(1.0)
        pyautofs.bind_mount(src, request.path)

    with trio.fail_after(30):
        async with engine(tmp_path, handler, request_timeout=2.0):
            t0 = trio.current_time()
            results: list[list[int]] = []

            async def client(name: str) -> None:
                results.append(await lookups(tmp_path / "mnt" / name))

            async with trio.open_nursery() as nursery:
                for i in range(10):
                    nursery.start_soon(client, f"slow{i}")
                nursery.start_soon(client, "hang")
            # Ten 1 s handlers in parallel, and the hung one cut at its 2 s deadline.
            assert trio.current_time() - t0 < 4.5
    assert sorted(results) == sorted([[0]] * 10 + [[errno.ETIMEDOUT]])


def _fds_under(paths: set[str]) -> list[str]:
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if any(target == p or target.startswith(p + "/") for p in paths):
            found.append(f"{fd} -> {target}")
    return found


async def test_two_thousand_direct_mounts_share_one_pipe_and_each_is_served(
    tmp_path: Path, src: Path
) -> None:
    n = 2000
    points = [tmp_path / "d" / f"m{i}" for i in range(n)]

    async def handler(request: pyautofs.MountRequest) -> None:
        pyautofs.bind_mount(src, request.path)

    fds_before = len(os.listdir("/proc/self/fd"))
    am = pyautofs.Automounter(lock_dir=str(tmp_path / "locks"))
    for p in points:
        am.add_mount(p, handler, mode="direct", timeout=60)
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            await nursery.start(am.run)
            # One pipe (two ends), the control device, the lock: not 3 fds per mount.
            assert len(os.listdir("/proc/self/fd")) - fds_before < 10
            pipes = {m.pipe.read_fd for m in am._mounts.values() if m.pipe is not None}
            assert len(pipes) == 1
            result = await lookups(*(p / "f" for p in points))
            assert result == [0] * n
            assert am.statistics().ready == n
            # Nothing of ours lies under a mount point that a key now covers (CRIU refuses
            # "open files on overmounted mounts", and a pinned mount never expires).
            assert _fds_under({str(p) for p in points}) == []
            nursery.cancel_scope.cancel()
    assert not [m for m in autofs_mounts() if m.mount_point.startswith(str(tmp_path))]


async def test_a_new_superblock_at_the_same_path_is_followed(tmp_path: Path, src: Path) -> None:
    """A restore makes a fresh autofs superblock at the path: the device number changes."""
    point = tmp_path / "direct"

    async def handler(request: pyautofs.MountRequest) -> None:
        pyautofs.bind_mount(src, request.path)

    am = pyautofs.Automounter(lock_dir=str(tmp_path / "locks"))
    am.add_mount(point, handler, mode="direct")
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(am.run)
            (m,) = am._mounts.values()
            old_dev = m.dev
            assert await lookups(point / "f") == [0]
            # What a restore leaves: the old mounts gone, a new autofs superblock at the
            # same path writing into the same (restored) pipe.
            pyautofs.unmount(point)
            pyautofs.unmount(point)
            # (an autofs mount elsewhere takes the freed device number, as other mounts
            # on a restored machine would)
            (tmp_path / "other").mkdir()
            r, w = os.pipe()
            other = pyautofs.lowlevel.AutofsOptions(fd=w, pgrp=os.getpgrp())
            pyautofs.lowlevel.mount_autofs(str(tmp_path / "other"), other)
            os.close(w)
            assert am._shared is not None
            options = pyautofs.lowlevel.AutofsOptions(
                fd=am._shared.write_fd, pgrp=os.getpgrp(), mode=pyautofs.AutofsMode.DIRECT
            )
            new_dev = pyautofs.lowlevel.mount_autofs(str(point), options)
            assert new_dev != old_dev
            assert await lookups(point / "f") == [0]
            assert m.dev == new_dev
            pyautofs.unmount(tmp_path / "other")
            os.close(r)
            nursery.cancel_scope.cancel()
    assert not [i for i in read_mountinfo() if i.mount_point.startswith(str(tmp_path))]


async def test_a_restored_pipe_is_served_as_is_with_its_queued_packets(
    tmp_path: Path, src: Path
) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r, w = os.pipe2(os.O_CLOEXEC)
    options = pyautofs.lowlevel.AutofsOptions(
        fd=w, pgrp=os.getpgrp(), mode=pyautofs.AutofsMode.INDIRECT
    )
    pyautofs.lowlevel.mount_autofs(str(mnt), options)
    os.close(w)
    (before,) = [a for a in autofs_mounts() if a.mount_point == str(mnt)]
    # A lookup waits in the kernel; its packet waits in the pipe nobody reads yet.
    client = subprocess.Popen(
        [sys.executable, "-c", f"print(open({str(mnt / 'k' / 'f')!r}).read())"],
        start_new_session=True,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        with trio.fail_after(10):
            while not pyautofs.lowlevel.bytes_queued(r):
                await trio.sleep(0.01)

        async def handler(request: pyautofs.MountRequest) -> None:
            pyautofs.bind_mount(src, request.path)

        am = pyautofs.Automounter(lock_dir=str(tmp_path / "locks"))
        am.add_mount(mnt, handler, pipe_fd=r)
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                await nursery.start(am.run)
                out, _ = await trio.to_thread.run_sync(lambda: client.communicate(timeout=20))
                assert (client.returncode, out) == (0, "hello\n")
                (after,) = [a for a in autofs_mounts() if a.mount_point == str(mnt)]
                # No CATATONIC, no new pipe: the same superblock, the same pipe.
                assert (after.dev, after.pipe_ino) == (before.dev, before.pipe_ino)
                assert not after.catatonic
                nursery.cancel_scope.cancel()
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    assert not [a for a in autofs_mounts() if a.mount_point == str(mnt)]


async def test_expiry_pauses_with_nothing_in_flight_and_resumes(tmp_path: Path, src: Path) -> None:
    in_handler = trio.Event()
    handler_done = trio.Event()

    async def handler(request: pyautofs.MountRequest) -> None:
        pyautofs.bind_mount(src, request.path)

    async def on_expire(request: pyautofs.ExpireRequest) -> None:
        in_handler.set()
        await trio.sleep(0.5)
        pyautofs.unmount(request.path)
        handler_done.set()

    am = pyautofs.Automounter(lock_dir=str(tmp_path / "locks"))
    am.add_mount(tmp_path / "mnt", handler, on_expire=on_expire, timeout=1)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(am.run)
            assert await lookups(tmp_path / "mnt" / "a", tmp_path / "mnt" / "b") == [0, 0]
            await in_handler.wait()  # the loop's EXPIRE ioctl is in flight now
            await am.pause_expiry()
            assert handler_done.is_set()  # pause returned only once it was answered
            assert am.expiry_paused
            expired = am.statistics().expired
            await trio.sleep(3.0)  # several check intervals: nothing is issued
            assert am.statistics().expired == expired
            assert await am.expire(immediate=True) == 0
            assert am.mounted_keys(tmp_path / "mnt")
            am.resume_expiry()
            with trio.fail_after(10):
                while am.mounted_keys(tmp_path / "mnt"):
                    await trio.sleep(0.1)
            nursery.cancel_scope.cancel()


async def test_negative_cache_is_bounded_and_clear_negative_forgets(tmp_path: Path) -> None:
    async def handler(request: pyautofs.MountRequest) -> None:
        raise OSError(errno.ENOENT, "no such key")

    with trio.fail_after(60):
        async with engine(tmp_path, handler, negative_timeout=300, negative_max=50) as am:
            names = [tmp_path / "mnt" / f"ghost{i}" for i in range(300)]
            assert await lookups(*names) == [errno.ENOENT] * 300
            (m,) = am._mounts.values()
            assert len(m.ledger.negative) == 50
            assert m.ledger.negative.evicted == 250
            # The newest are the ones kept: they fail from the cache, no handler run.
            hits = am.statistics().negative_hits
            assert await lookups(names[-1]) == [errno.ENOENT]
            assert am.statistics().negative_hits == hits + 1
            assert am.clear_negative() == 50
            assert len(m.ledger.negative) == 0


def test_negative_cache_ages_out_with_an_injected_clock() -> None:
    cache = NegativeCache(ttl=10, max_entries=3)
    cache.put("a", errno.ENOENT, now=0)
    cache.put("b", errno.EIO, now=5)
    assert cache.get("a", now=9.9) == errno.ENOENT
    assert cache.get("a", now=10) is None  # aged out, and dropped
    assert len(cache) == 1
    for i, key in enumerate("cdef"):
        cache.put(key, errno.ENOENT, now=6 + i)
    assert len(cache) == 3 and cache.evicted == 2 and "b" not in cache
    cache.restore([("x", 100.0, errno.EACCES)], now=20)  # capped at the ttl
    assert cache.get("x", now=29) == errno.EACCES and cache.get("x", now=31) is None
    ledger = MountLedger(negative_ttl=10)
    ledger.finished("k", errno.ENOENT, now=0)
    assert ledger.on_missing("k", now=1) == (Verdict.FAIL, errno.ENOENT)
    assert ledger.on_missing("k", now=11) == (Verdict.SERVE, 0)
    ledger.finished("k", 0, now=12)
    assert "k" in ledger.mounted


async def test_lock_is_private_per_namespace_and_removed_on_exit(tmp_path: Path, src: Path) -> None:
    locks = tmp_path / "locks"
    locks.mkdir(mode=0o755)  # too open: the engine makes it 0700

    async def handler(request: pyautofs.MountRequest) -> None:
        pyautofs.bind_mount(src, request.path)

    # A lock left by a dead engine (its pid is gone, its flock free) never refuses.
    stale = locks / f"{mount_namespace()}-stale.lock"
    stale.write_text(json.dumps({"pid": 999999, "mounts": [str(tmp_path / "mnt")]}))
    with trio.fail_after(30):
        async with engine(tmp_path, handler, timeout=0) as am:
            assert stat.S_IMODE(locks.stat().st_mode) == 0o700
            (lock,) = [p for p in locks.iterdir() if p.suffix == ".lock"]
            assert lock.name.startswith(f"{mount_namespace()}-")
            assert "%2Fmnt" in lock.name  # a person can map it back to the mount point
            assert stat.S_IMODE(lock.stat().st_mode) == 0o600
            info = json.loads(lock.read_text())
            assert info["pid"] == os.getpid() and info["mounts"] == [str(tmp_path / "mnt")]
            assert not stale.exists()
            # An unprivileged user can neither read nor hold it.
            done = subprocess.run(
                [
                    "setpriv",
                    "--reuid",
                    "65534",
                    "--regid",
                    "65534",
                    "--clear-groups",
                    sys.executable,
                    "-c",
                    f"open({str(lock)!r})",
                ],
                check=False,
                capture_output=True,
                text=True,
                timeout=20,
            )
            assert done.returncode != 0 and "PermissionError" in done.stderr
            assert am.statistics().mounts == 1
    assert list(locks.iterdir()) == []


def test_a_lock_of_another_mount_namespace_never_refuses(tmp_path: Path, src: Path) -> None:
    """Another engine serves the same path in its own mount namespace, holding its lock."""
    locks = tmp_path / "locks"
    script = f"""
import trio, pyautofs, sys
async def handler(request):
    pyautofs.bind_mount({str(src)!r}, request.path)
async def main():
    am = pyautofs.Automounter(lock_dir={str(locks)!r})
    am.add_mount({str(tmp_path / "mnt")!r}, handler)
    async with trio.open_nursery() as nursery:
        await nursery.start(am.run)
        print("up", flush=True)
        sys.stdin.read()
        nursery.cancel_scope.cancel()
trio.run(main)
"""
    first = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", sys.executable, "-c", script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert first.stdout is not None and first.stdout.readline() == "up\n"
        assert [p for p in locks.iterdir() if p.suffix == ".lock"]

        async def main() -> None:
            async def handler(request: pyautofs.MountRequest) -> None:
                pyautofs.bind_mount(src, request.path)

            with trio.fail_after(30):
                async with engine(tmp_path, handler):
                    assert await lookups(tmp_path / "mnt" / "f") == [0]

        trio.run(main)
    finally:
        assert first.stdin is not None
        first.stdin.close()
        first.wait(timeout=30)
        assert first.stdout is not None
        first.stdout.close()
    assert first.returncode == 0
    assert list(locks.iterdir()) == []


async def test_each_outcome_is_one_escaped_info_line(
    tmp_path: Path, src: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def handler(request: pyautofs.MountRequest) -> None:
        if request.key == "good":
            pyautofs.bind_mount(src, request.path)
            return
        raise OSError(errno.EACCES, "no")

    caplog.set_level(logging.INFO, logger="pyautofs")
    with trio.fail_after(30):
        async with engine(tmp_path, handler, negative_timeout=0):
            assert await lookups(tmp_path / "mnt" / "good", tmp_path / "mnt" / "evil\nforged") == [
                0,
                errno.EACCES,
            ]
            await trio.sleep(0.05)  # a line queued in a burst is written once quiet
    lines = [r.getMessage() for r in caplog.records if r.name == "pyautofs"]
    mounted = [x for x in lines if x.startswith("mounted ")]
    failed = [x for x in lines if x.startswith("failed (EACCES) ")]
    assert len(mounted) == 1 and "key='good'" in mounted[0] and "cmd=python" in mounted[0]
    assert len(failed) == 1 and "key='evil\\nforged'" in failed[0]
    assert all("\n" not in x for x in lines)
    assert "pid=" in failed[0] and failed[0].endswith("us")


async def test_the_fd_limit_is_raised_to_the_hard_limit(tmp_path: Path) -> None:
    async def handler(request: pyautofs.MountRequest) -> None:
        raise OSError(errno.ENOENT, "none")

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))
    try:
        with trio.fail_after(30):
            async with engine(tmp_path, handler):
                assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == hard
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _running(pid: int) -> bool:
    """``pid`` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def test_serve_from_a_script_leads_its_own_process_group(tmp_path: Path) -> None:
    amap = tmp_path / "auto.map"
    amap.write_text(f"* -fstype=bind :{tmp_path}/exports/&\n")
    (tmp_path / "exports" / "k").mkdir(parents=True)
    log = tmp_path / "serve.log"
    # bash -c has no job control: a background job stays in the script's process group.
    script = (
        f"{sys.executable} -m pyautofs serve --lock-dir {tmp_path}/locks {tmp_path}/mnt "
        f"{amap} 2>{log} & echo $!; wait"
    )
    proc = subprocess.Popen(["bash", "-c", script], stdout=subprocess.PIPE, text=True)
    pid = 0
    try:
        assert proc.stdout is not None
        pid = int(proc.stdout.readline())
        for _ in range(200):
            if log.exists() and "serving 1 autofs mount" in log.read_text():
                break
            trio.run(trio.sleep, 0.05)
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        assert int(fields[2]) == pid  # pgrp
        assert int(fields[2]) != os.getpgrp()
        # Lookups from the script's own group now trigger (before, they could not).
        done = subprocess.run(
            ["stat", "-c", "%F", f"{tmp_path}/mnt/k"],
            check=False,
            capture_output=True,
            text=True,
            timeout=20,
        )
        assert done.stdout.strip() == "directory", (done.stderr, log.read_text())
        os.kill(pid, 15)
        assert proc.wait(timeout=30) == 0
    finally:
        # serve is the script's child, not ours: on a failure above, stop it (gracefully,
        # so it takes its mounts down) before the script, and never leave it running.
        if pid and _running(pid):
            os.kill(pid, signal.SIGTERM)
            for _ in range(200):
                if not _running(pid):
                    break
                time.sleep(0.05)
            else:
                os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        assert proc.stdout is not None
        proc.stdout.close()
    assert not [m for m in autofs_mounts() if m.mount_point.startswith(str(tmp_path))]


def test_made_up_names_under_a_multi_mount_map_cost_no_fds() -> None:
    """An unprivileged user looks up 300 made-up names, each getting two offset triggers,
    against a server whose fd limit is 256 (hard): real keys still work afterwards."""
    import shutil
    import tempfile

    from _harness import start_serve

    tmp_path = Path(tempfile.mkdtemp(prefix="pyautofs-fds-"))  # one uid 65534 can walk
    tmp_path.chmod(0o755)
    exports = tmp_path / "exports"
    (exports / "a").mkdir(parents=True)
    (exports / "a" / "f").write_text("a")
    amap = tmp_path / "auto.multi"
    amap.write_text(f"* /x :{exports}/a /y :{exports}/a\n")
    os.chmod(tmp_path, 0o755)
    mnt = tmp_path / "mnt"
    log = tmp_path / "serve.log"
    proc = start_serve(
        log,
        ["--lock-dir", str(tmp_path / "locks"), "--timeout", "0", str(mnt), str(amap)],
        wrapper=["prlimit", "--nofile=256:256", "--"],
    )
    try:
        names = " ".join(f"made-up-{i}" for i in range(300))
        done = subprocess.run(
            [
                "setpriv",
                "--reuid",
                "65534",
                "--regid",
                "65534",
                "--clear-groups",
                "sh",
                "-c",
                f"cd {mnt} && for n in {names}; do stat $n >/dev/null 2>&1; done",
            ],
            check=False,
            timeout=120,
            start_new_session=True,
        )
        assert done.returncode == 0
        triggers = [a for a in autofs_mounts() if a.mount_point.startswith(str(mnt) + "/")]
        assert len(triggers) >= 600  # two offset triggers per made-up key
        fds = len(os.listdir(f"/proc/{proc.pid}/fd"))
        assert fds < 40, fds
        assert (mnt / "real" / "x" / "f").read_text() == "a"  # the test is not in serve's group
    finally:
        proc.send_signal(15)
        proc.wait(timeout=60)
    assert not [a for a in autofs_mounts() if a.mount_point.startswith(str(mnt))]
    shutil.rmtree(tmp_path)
