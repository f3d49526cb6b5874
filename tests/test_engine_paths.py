"""The engine answers every token exactly once, on every path, against the real kernel.

The engine runs in the test process (trio); clients are real processes in their own
sessions, so their lookups trigger. Every test runs under a deadline.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

import pyautofs
from pyautofs.lowlevel import autofs_mounts

pytestmark = pytest.mark.kernel

_CLIENT = """
import json, os, sys
out = []
for path in sys.argv[1:]:
    try:
        os.stat(path)
        out.append(0)
    except OSError as exc:
        out.append(exc.errno)
print(json.dumps(out))
"""


async def lookups(*paths: Path) -> list[int]:
    """stat() each path from a process in its own session; the errno of each (0 = ok)."""
    done = await trio.run_process(
        [sys.executable, "-c", _CLIENT, *map(str, paths)],
        capture_stdout=True,
        start_new_session=True,
    )
    result: list[int] = json.loads(done.stdout)
    return result


Handler = Callable[[pyautofs.MountRequest], Awaitable[object]]


@asynccontextmanager
async def engine(
    tmp_path: Path, handler: Handler, **kwargs: object
) -> AsyncIterator[pyautofs.Automounter]:
    timeout = kwargs.pop("timeout", 0)
    am = pyautofs.Automounter(lock_dir=str(tmp_path / "locks"), **kwargs)  # type: ignore[arg-type]
    am.add_mount(tmp_path / "mnt", handler, timeout=timeout)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await nursery.start(am.run)
        yield am
        nursery.cancel_scope.cancel()
    assert not [m for m in autofs_mounts() if m.mount_point.startswith(str(tmp_path))]


@pytest.fixture
def src(tmp_path: Path) -> Path:
    (tmp_path / "src").mkdir()
    return tmp_path / "src"


async def test_handler_exception_is_enoent_and_oserror_keeps_its_errno(tmp_path: Path) -> None:
    async def handler(request: pyautofs.MountRequest) -> None:
        if request.key == "boom":
            raise RuntimeError("a bug in the handler")
        raise OSError(errno.EHOSTDOWN, "down")

    with trio.fail_after(30):
        async with engine(tmp_path, handler, negative_timeout=0) as am:
            assert await lookups(tmp_path / "mnt" / "boom", tmp_path / "mnt" / "down") == [
                errno.ENOENT,
                errno.EHOSTDOWN,
            ]
            st = am.statistics()
            assert (st.requests, st.failed, st.ready, st.in_flight) == (2, 2, 0, 0)


async def test_hanging_handler_fails_at_its_deadline(tmp_path: Path) -> None:
    async def handler(request: pyautofs.MountRequest) -> None:
        await trio.sleep_forever()

    with trio.fail_after(30):
        async with engine(tmp_path, handler, request_timeout=0.5):
            assert await lookups(tmp_path / "mnt" / "slow") == [errno.ETIMEDOUT]


async def test_in_flight_handler_is_answered_at_shutdown(tmp_path: Path) -> None:
    started = trio.Event()

    async def handler(request: pyautofs.MountRequest) -> None:
        started.set()
        await trio.sleep_forever()

    results: list[list[int]] = []

    async def client() -> None:
        results.append(await lookups(tmp_path / "mnt" / "k"))

    with trio.fail_after(30):
        async with trio.open_nursery() as outer, engine(tmp_path, handler, shutdown_grace=0.3):
            outer.start_soon(client)
            await started.wait()
            # leaving the block cancels the engine with the handler in flight
    assert results == [[errno.EHOSTDOWN]]


async def test_a_thousand_keys_from_fifty_clients(tmp_path: Path, src: Path) -> None:
    calls: list[str] = []

    async def handler(request: pyautofs.MountRequest) -> None:
        calls.append(request.key)
        pyautofs.bind_mount(src, request.path)

    results: dict[int, list[int]] = {}
    with trio.fail_after(120):
        async with engine(tmp_path, handler) as am:

            async def client(i: int) -> None:
                results[i] = await lookups(*(tmp_path / "mnt" / f"k{i}-{j}" for j in range(20)))

            async with trio.open_nursery() as nursery:
                for i in range(50):
                    nursery.start_soon(client, i)
            assert am.statistics().ready == 1000
            assert len(am.mounted_keys(tmp_path / "mnt")) == 1000
    assert all(r == [0] * 20 for r in results.values())
    assert len(calls) == len(set(calls)) == 1000


async def test_one_key_from_twenty_processes_mounts_once(tmp_path: Path, src: Path) -> None:
    calls = 0

    async def handler(request: pyautofs.MountRequest) -> None:
        nonlocal calls
        calls += 1
        await trio.sleep(0.3)  # let every client pile onto the same wait queue
        pyautofs.bind_mount(src, request.path)

    results: list[list[int]] = []
    with trio.fail_after(60):
        async with engine(tmp_path, handler):
            async with trio.open_nursery() as nursery:
                for _ in range(20):

                    async def client() -> None:
                        results.append(await lookups(tmp_path / "mnt" / "shared"))

                    nursery.start_soon(client)
            with open("/proc/self/mountinfo") as f:
                assert f.read().count(str(tmp_path / "mnt" / "shared") + " ") == 1
    assert results == [[0]] * 20
    assert calls == 1


async def test_negative_cache_fails_fast_then_retries(tmp_path: Path) -> None:
    calls = 0

    async def handler(request: pyautofs.MountRequest) -> None:
        nonlocal calls
        calls += 1
        raise OSError(errno.ENOENT, "no")

    with trio.fail_after(30):
        async with engine(tmp_path, handler, negative_timeout=0.5) as am:
            key = tmp_path / "mnt" / "ghost"
            assert await lookups(key, key) == [errno.ENOENT, errno.ENOENT]
            assert calls == 1 and am.statistics().negative_hits == 1
            await trio.sleep(0.6)
            assert await lookups(key) == [errno.ENOENT]
            assert calls == 2


async def test_expire_unmounts_idle_keys_and_spares_busy_ones(tmp_path: Path, src: Path) -> None:
    async def handler(request: pyautofs.MountRequest) -> None:
        pyautofs.bind_mount(src, request.path)

    with trio.fail_after(60):
        async with engine(tmp_path, handler, timeout=1) as am:
            mnt = tmp_path / "mnt"
            assert await lookups(mnt / "idle", mnt / "busy") == [0, 0]
            # A process that keeps its cwd inside "busy" makes it busy.
            holder = await trio.lowlevel.open_process(
                [sys.executable, "-c", "import time; time.sleep(60)"],
                cwd=str(mnt / "busy"),
                start_new_session=True,
            )
            try:
                expired = await am.expire(immediate=True)
                assert expired == 1
                assert am.mounted_keys(mnt) == {"busy"}
                assert not (mnt / "idle").exists()
                assert os.path.ismount(mnt / "busy")
            finally:
                holder.kill()
                await holder.wait()


@pytest.mark.skipif(shutil.which("automount") is None, reason="needs Debian's autofs (automount)")
async def test_adopts_a_mount_left_by_a_killed_automount(tmp_path: Path, src: Path) -> None:
    (src / "marker").write_text("x")
    mnt = tmp_path / "mnt"
    amap = tmp_path / "auto.map"
    amap.write_text(f"* -fstype=bind :{src}\n")
    master = tmp_path / "auto.master"
    master.write_text(f"{mnt} {amap}\n")
    with trio.fail_after(120):
        while (await trio.run_process(["pgrep", "-x", "automount"], check=False)).returncode == 0:
            await trio.sleep(0.1)  # automount(8) runs once per machine
        daemon = await trio.lowlevel.open_process(
            ["setsid", "automount", "-f", "-t", "0", str(master)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            while not [m for m in autofs_mounts() if m.mount_point == str(mnt)]:
                await trio.sleep(0.05)
            assert await lookups(mnt / "before" / "marker") == [0]
        finally:
            daemon.kill()
            await daemon.wait()
            # A killed automount(8) leaves its per-mount log-priority fifo behind.
            fifo = Path("/run") / ("autofs.fifo-" + str(mnt).strip("/").replace("/", "-"))
            fifo.unlink(missing_ok=True)

        async def handler(request: pyautofs.MountRequest) -> None:
            pyautofs.bind_mount(src, request.path)

        async with engine(tmp_path, handler) as am:
            assert "before" in am.mounted_keys(mnt)  # rediscovered
            assert await lookups(mnt / "before" / "marker", mnt / "after" / "marker") == [0, 0]


async def test_direct_and_offset_mounts_served(tmp_path: Path, src: Path) -> None:
    (src / "marker").write_text("x")
    seen: list[tuple[str, str]] = []

    async def handler(request: pyautofs.MountRequest) -> None:
        seen.append((request.mode.value, request.key))
        pyautofs.bind_mount(src, request.path)

    am = pyautofs.Automounter(lock_dir=str(tmp_path / "locks"))
    for name, mode in (("direct", "direct"), ("offset", "offset")):
        (tmp_path / name).mkdir()
        am.add_mount(tmp_path / name, handler, mode=mode)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(am.run)
            paths = (tmp_path / "direct" / "marker", tmp_path / "offset" / "marker")
            assert await lookups(*paths) == [0, 0]
            nursery.cancel_scope.cancel()
    assert sorted(seen) == [("direct", ""), ("offset", "")]
    assert not [m for m in autofs_mounts() if m.mount_point.startswith(str(tmp_path))]


async def test_a_malformed_packet_is_logged_and_skipped(
    tmp_path: Path, src: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def handler(request: pyautofs.MountRequest) -> None:
        pyautofs.bind_mount(src, request.path)

    with trio.fail_after(30):
        async with engine(tmp_path, handler) as am:
            (read_fd,) = [m.pipe.read_fd for m in am._mounts.values() if m.pipe is not None]
            # Reopening the read end through /proc gives a write end of the same pipe.
            w = os.open(f"/proc/self/fd/{read_fd}", os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(w, b"\x05\x00\x00\x00\x63\x00\x00\x00" + b"\0" * 296)
            finally:
                os.close(w)
            assert await lookups(tmp_path / "mnt" / "fine") == [0]
    assert "malformed packet ignored: unknown packet type 99" in caplog.text


async def test_a_refused_engine_leaves_the_serving_engines_mount_alone(
    tmp_path: Path, src: Path
) -> None:
    async def handler(request: pyautofs.MountRequest) -> None:
        pyautofs.bind_mount(src, request.path)

    with trio.fail_after(30):
        async with engine(tmp_path, handler) as first:
            second = pyautofs.Automounter(lock_dir=str(tmp_path / "locks"))
            second.add_mount(tmp_path / "mnt", handler)
            with pytest.raises(BaseException) as refused:
                await second.run()
            # trio wraps it in an exception group; unwrap one level either way.
            errors = list(getattr(refused.value, "exceptions", [refused.value]))
            assert [type(e) for e in errors] == [pyautofs.MountPointBusyError]
            assert f"pid {os.getpid()}" in str(errors[0])
            # The first engine's mount is still there, and still serves.
            (live,) = [m for m in autofs_mounts() if m.mount_point == str(tmp_path / "mnt")]
            assert not live.catatonic
            assert await lookups(tmp_path / "mnt" / "k") == [0]
            assert "k" in first.mounted_keys(tmp_path / "mnt")


async def test_a_short_per_key_timeout_sets_the_pace_of_expiry(tmp_path: Path, src: Path) -> None:
    async def handler(request: pyautofs.MountRequest) -> None:
        pyautofs.bind_mount(src, request.path)

    mnt = tmp_path / "mnt"
    with trio.fail_after(30):
        async with engine(tmp_path, handler, timeout=40) as am:
            am.set_key_timeout(mnt, "short", 1)
            assert await lookups(mnt / "short", mnt / "long") == [0, 0]
            t0 = trio.current_time()
            while "short" in am.mounted_keys(mnt):
                await trio.sleep(0.1)
            # Checked every max(1 s, shortest timeout / 4), not every 40 s / 4 = 10 s.
            assert trio.current_time() - t0 < 6
            assert am.mounted_keys(mnt) == {"long"}


async def test_a_v4_request_it_does_not_serve_is_failed_not_left_waiting(
    tmp_path: Path, src: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An adopted protocol-4 mount sends v4 packets; each requester gets EPROTO at once."""
    from pyautofs.lowlevel import AutofsOptions, mount_autofs

    async def handler(request: pyautofs.MountRequest) -> None:
        pyautofs.bind_mount(src, request.path)

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        options = AutofsOptions(fd=w, pgrp=os.getpgrp(), minproto=3, maxproto=4)
        mount_autofs(str(mnt), options)
    finally:
        os.close(w)
        os.close(r)
    with trio.fail_after(30):
        async with engine(tmp_path, handler) as am:
            assert am.mount_points == [str(mnt)]
            assert await lookups(mnt / "key") == [errno.EPROTO]
    assert "only v5 is served" in caplog.text
