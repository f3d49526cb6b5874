"""The restore coordinator and its worker processes, against the real kernel.

Workers are ``python -m pyautofs._restore._workers`` processes in their own sessions. The
test reads their fd tables through /proc and the mounts through mountinfo; every mount is
made catatonic and removed at the end, and every worker is reaped.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

from pyautofs._proto._packets import MissingIndirect, decode_packet
from pyautofs._restore._autofs import AutofsMountImage, AutofsOwner, dump_autofs_mount
from pyautofs._restore._handover import HandoverFailed
from pyautofs._restore._pipeimage import PipeImage, snapshot_pipe
from pyautofs._restore._workers import (
    MountJob,
    PipeJob,
    WorkerProcess,
    restore_to_workers,
    start_worker,
)
from pyautofs._sys._autofs import AutofsControl
from pyautofs._sys._mount import AutofsMode, UmountFlags, umount2
from pyautofs._sys._mountinfo import autofs_mounts, read_mountinfo

pytestmark = pytest.mark.kernel

DEADLINE = 20.0


def remove_mounts_under(path: Path) -> None:
    base = str(path)
    infos = [
        i for i in read_mountinfo() if i.mount_point == base or i.mount_point.startswith(base + "/")
    ]
    with AutofsControl.open() as ctl:
        for info in infos:
            if info.fstype != "autofs":
                continue
            try:
                fd = ctl.openmount(info.mount_point, info.dev)
            except OSError:
                continue
            try:
                ctl.catatonic(fd)
            finally:
                os.close(fd)
    for info in reversed(infos):
        umount2(info.mount_point, UmountFlags.DETACH)


@pytest.fixture
def area(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
    remove_mounts_under(tmp_path)


@pytest.fixture
def workers() -> Iterator[list[WorkerProcess]]:
    started: list[WorkerProcess] = []
    yield started
    for w in started:
        if w.proc.poll() is None:
            os.kill(w.pid, signal.SIGCONT)
        w.close(DEADLINE)


def mount_image(mp: Path, read_fd: int, write_fd: int | None) -> AutofsMountImage:
    mp.mkdir()
    return AutofsMountImage(
        mount_point=str(mp),
        mode=AutofsMode.INDIRECT,
        source="pyautofs-test",
        timeout=60,
        owner=AutofsOwner(pid=1, pgrp=1, comm="x", read_fd=read_fd, write_fd=write_fd),
    )


def link(pid: int, fd: int) -> str:
    return os.readlink(f"/proc/{pid}/fd/{fd}")


def test_mounts_and_pipes_to_two_workers(area: Path, workers: list[WorkerProcess]) -> None:
    w1, w2 = start_worker(), start_worker()
    workers += [w1, w2]
    jobs1: list[MountJob | PipeJob] = []
    jobs2: list[MountJob | PipeJob] = []
    for i in range(10):  # systemd style to worker 1, automount style to worker 2
        jobs1.append(MountJob(mount_image(area / f"s{i}", 100 + i, None)))
        jobs2.append(MountJob(mount_image(area / f"a{i}", 100 + 2 * i, 101 + 2 * i)))
    catatonic = attrs_evolve_catatonic(mount_image(area / "cat", 300, None))
    jobs1.append(MountJob(catatonic))
    data = os.urandom(100_000)
    pipe = PipeImage(size=1 << 17, data=data)
    packets = PipeImage(size=1 << 16, packet_mode=True, packets=(b"one", b"two"))
    jobs1.append(PipeJob(pipe, read_target=200))
    jobs2.append(PipeJob(packets, read_target=200, write_target=201))

    report = restore_to_workers([(w1.sock, jobs1), (w2.sock, jobs2)], timeout=DEADLINE)

    assert len(report.mounts) == 21 and len(report.pipe_inodes) == 2
    assert report.prepare_seconds >= 0 and report.confirm_seconds >= 0
    by_path = {m.mount_point: m for m in autofs_mounts()}
    for i, job in enumerate(jobs1[:10]):
        assert isinstance(job, MountJob)
        m = by_path[job.image.mount_point]
        r = report.mounts[i]
        assert (r.owner_pid, m.pgrp, m.dev, m.pipe_ino) == (w1.pid, w1.pid, r.dev, r.pipe_ino)
        assert link(w1.pid, 100 + i) == f"pipe:[{m.pipe_ino}]"
        assert not m.catatonic and m.timeout == 60
    for i, job in enumerate(jobs2[:10]):
        assert isinstance(job, MountJob)
        m = by_path[job.image.mount_point]
        assert m.pgrp == w2.pid and m.fd == 101 + 2 * i
        assert link(w2.pid, 100 + 2 * i) == link(w2.pid, 101 + 2 * i) == f"pipe:[{m.pipe_ino}]"
    assert by_path[str(area / "cat")].catatonic and report.mounts[10].catatonic
    assert not os.path.exists(f"/proc/{w1.pid}/fd/300")
    # The pipes, captured through the workers' fds without consuming anything.
    assert link(w1.pid, 200) == f"pipe:[{report.pipe_inodes[0]}]"
    fd = os.open(f"/proc/{w1.pid}/fd/200", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        assert snapshot_pipe(fd).data == data
    finally:
        os.close(fd)
    fd = os.open(f"/proc/{w2.pid}/fd/201", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        got = snapshot_pipe(fd)
        assert got.packets == (b"one", b"two") and got.packet_mode
    finally:
        os.close(fd)


def attrs_evolve_catatonic(image: AutofsMountImage) -> AutofsMountImage:
    return attrs.evolve(image, catatonic=True, owner=None)


def test_the_worker_owns_the_live_pipe(area: Path, workers: list[WorkerProcess]) -> None:
    """A lookup's packet lands in the pipe the worker holds; catatonic releases the client."""
    w = start_worker()
    workers.append(w)
    image = mount_image(area / "live", 60, None)
    restore_to_workers([(w.sock, [MountJob(image)])], timeout=DEADLINE)
    client = subprocess.Popen(
        [sys.executable, "-c", "import os, sys; os.stat(sys.argv[1])", str(area / "live" / "k")],
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + DEADLINE
        while True:
            dumped = dump_autofs_mount(area / "live")
            if dumped.pending_requests or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        assert dumped.owner is not None
        assert (dumped.owner.pid, dumped.owner.read_fd) == (w.pid, 60)
        assert dumped.pipe is not None
        pkt = decode_packet(dumped.pipe.packets[0])
        assert isinstance(pkt, MissingIndirect) and pkt.name == b"k"
    finally:
        remove_mounts_under(area)  # CATATONIC fails the pending request with ENOENT
        assert client.wait(DEADLINE) == 1  # os.stat raised


def test_worker_error_detaches_every_mount(area: Path, workers: list[WorkerProcess]) -> None:
    w = start_worker()
    workers.append(w)
    good = mount_image(area / "good", 60, None)
    bad = mount_image(area / "bad", 1, None)  # fd 1 is the worker's stdout: busy
    with pytest.raises(HandoverFailed, match="already open") as exc:
        restore_to_workers([(w.sock, [MountJob(good), MountJob(bad)])], timeout=DEADLINE)
    assert exc.value.errno == errno.EBUSY
    assert not [m for m in autofs_mounts() if m.mount_point.startswith(str(area))]
    assert w.proc.wait(DEADLINE) != 0


def test_unresponsive_worker_times_out(area: Path, workers: list[WorkerProcess]) -> None:
    w = start_worker()
    workers.append(w)
    os.kill(w.pid, signal.SIGSTOP)
    with pytest.raises(TimeoutError):
        restore_to_workers([(w.sock, [MountJob(mount_image(area / "t", 60, None))])], timeout=0.3)
    assert not [m for m in autofs_mounts() if m.mount_point.startswith(str(area))]


def test_start_worker_reports_its_pid(workers: list[WorkerProcess]) -> None:
    w = start_worker()
    workers.append(w)
    assert w.proc.poll() is None
    with open(f"/proc/{w.pid}/stat") as f:
        pgrp = int(f.read().rsplit(")", 1)[1].split()[2])
    assert pgrp == w.pid  # its own session, so its own process group
    assert w.close(DEADLINE) == 0
