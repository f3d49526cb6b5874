"""The restore coordinator and its worker processes, against the real kernel.

Workers are ``python -m pyautofs._restore._workers`` processes in their own sessions. The
test reads their fd tables through /proc and the mounts through mountinfo; every mount is
made catatonic and removed at the end, and every worker is reaped.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
from _harness import DEADLINE, remove_mounts_under
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyautofs._proto._packets import MissingIndirect, decode_packet
from pyautofs._restore._handover import HandoverFailed, wait_confirmation
from pyautofs._restore._pipeimage import PipeImage, snapshot_pipe
from pyautofs._restore._workers import (
    MountJob,
    PipeJob,
    WorkerProcess,
    restore_to_workers,
    start_worker,
)
from pyautofs._sys._mount import AutofsMode
from pyautofs._sys._mountinfo import autofs_mounts
from pyautofs.restore import (
    AutofsMountImage,
    AutofsOwner,
    dump_autofs_mount,
    dump_autofs_mounts,
)

pytestmark = pytest.mark.kernel


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
    bad = mount_image(area / "bad", 60, None)  # the same target twice
    with pytest.raises(HandoverFailed, match="target fd 60 twice") as exc:
        restore_to_workers([(w.sock, [MountJob(good), MountJob(bad)])], timeout=DEADLINE)
    assert exc.value.errno == errno.EINVAL
    assert not [m for m in autofs_mounts() if m.mount_point.startswith(str(area))]
    assert w.proc.wait(DEADLINE) != 0


def worker_fds(pid: int) -> dict[int, str]:
    return {int(fd): link(pid, int(fd)) for fd in os.listdir(f"/proc/{pid}/fd")}


# A worker whose own fds sit where the test says: its socket at SOCK_AT, /dev/autofs at
# CONTROL_AT (both 3..1023), RLIMIT_NOFILE's soft limit at 1024 as on most machines, so a
# target of 1023 leaves it no room above unless it raises the limit.
_WORKER_AT = """
import os, resource, socket, sys
from pyautofs._restore._handover import send_confirmation
from pyautofs._restore._workers import run_worker
from pyautofs._sys._autofs import AutofsControl
src, sock_at, control_at = map(int, sys.argv[1:4])
resource.setrlimit(resource.RLIMIT_NOFILE, (1024, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
if src != sock_at:
    os.dup2(src, sock_at, inheritable=False)
    os.close(src)
dev = os.open("/dev/autofs", os.O_RDONLY | os.O_CLOEXEC)
if dev != control_at:
    os.dup2(dev, control_at, inheritable=False)
    os.close(dev)
sock = socket.socket(fileno=sock_at)
send_confirmation(sock, [])
run_worker(sock, stdio=True, control=AutofsControl(control_at))
"""


def start_worker_at(sock_at: int, control_at: int) -> WorkerProcess:
    """A worker process (own session) with its own fds at the given numbers."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    proc = subprocess.Popen(
        [sys.executable, "-c", _WORKER_AT, str(theirs.fileno()), str(sock_at), str(control_at)],
        pass_fds=(theirs.fileno(),),
        start_new_session=True,
    )
    theirs.close()
    w = WorkerProcess(proc, ours)
    try:
        wait_confirmation(ours, DEADLINE)
    except BaseException:
        proc.kill()
        w.close(DEADLINE)
        raise
    return w


def test_worker_restores_a_pipe_at_fds_3_and_4(area: Path, workers: list[WorkerProcess]) -> None:
    """The usual daemon layout: its pipe at 3 and 4, where a fresh worker keeps its own fds.

    The worker moves its socket and /dev/autofs out of the way first, and stays usable: a
    second handover after the first still works, onto its stdio this time.
    """
    w = start_worker_at(3, 4)
    workers.append(w)
    before = worker_fds(w.pid)
    assert before[3].startswith("socket:") and before[4] == "/dev/autofs"
    image = mount_image(area / "m", 3, 4)  # automount style: read end 3, write end 4
    report = restore_to_workers([(w.sock, [MountJob(image)])], timeout=DEADLINE)
    m = {m.mount_point: m for m in autofs_mounts()}[image.mount_point]
    after = worker_fds(w.pid)
    assert after[3] == after[4] == f"pipe:[{m.pipe_ino}]" == f"pipe:[{report.mounts[0].pipe_ino}]"
    assert (m.pgrp, m.fd, m.catatonic) == (w.pid, 4, False)
    assert "/dev/autofs" in after.values() and any(t.startswith("socket:") for t in after.values())
    # Still usable: a plain pipe at 0, 1 and 2, over its stdio.
    data = PipeImage(size=1 << 16, data=b"payload")
    jobs: list[MountJob | PipeJob] = [PipeJob(data, 0, 1), PipeJob(data, 2)]
    report = restore_to_workers([(w.sock, jobs)], timeout=DEADLINE)
    after = worker_fds(w.pid)
    a, b = report.pipe_inodes
    assert (after[0], after[1], after[2]) == (f"pipe:[{a}]", f"pipe:[{a}]", f"pipe:[{b}]")
    remove_mounts_under(area)
    assert w.close(DEADLINE) == 0


# A worker that receives a handover and then stops half way through its reply: a reply
# that spans several records (a large one, as 10,000 mounts make) whose first record went
# out. The coordinator has seen "something arrived" and must still not wait forever.
_STOPS_MID_REPLY = """
import os, signal, socket, sys, json
from pyautofs._restore._handover import receive_handover
from pyautofs._sys._scm import send_protocol
sock = socket.socket(fileno=int(sys.argv[1]))
items, fds = receive_handover(sock)
reply = json.dumps({"ok": True, "pid": os.getpid(), "items": [{"pipe_ino": 1}] * 2000}).encode()
steps = send_protocol(sock, [], reply)
next(steps)()  # the header record only
os.kill(os.getpid(), signal.SIGSTOP)
"""


def test_timeout_bounds_a_reply_that_stops_half_way(
    area: Path, workers: list[WorkerProcess]
) -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    proc = subprocess.Popen(
        [sys.executable, "-c", _STOPS_MID_REPLY, str(theirs.fileno())],
        pass_fds=(theirs.fileno(),),
        start_new_session=True,
    )
    theirs.close()
    workers.append(WorkerProcess(proc, ours))
    image = mount_image(area / "t", 60, None)
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="confirmation"):
        restore_to_workers([(ours, [MountJob(image)])], timeout=1.0)
    took = time.monotonic() - start
    with open(f"/proc/{proc.pid}/stat") as f:
        assert f.read().rsplit(")", 1)[1].split()[0] == "T"  # it did stop mid-reply
    assert took < DEADLINE / 2
    assert not [m for m in autofs_mounts() if m.mount_point.startswith(str(area))]


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


@st.composite
def layouts_and_plans(draw: st.DrawFn) -> tuple[int, int, list[tuple[str, int, int | None]]]:
    """Where the worker's own fds are, and a plan that often lands right on them.

    Jobs are ("pipe" | "mount", read_target, write_target or None); every target is
    distinct, from 0 to 1023, drawn with a bias toward stdio, 3 and 4, the worker's own
    numbers and the last number under a 1024 limit.
    """
    low = st.sampled_from([3, 4, 5, 6])
    sock_at = draw(st.one_of(low, st.integers(3, 1023)))
    control_at = draw(st.one_of(low, st.integers(3, 1023)).filter(lambda n: n != sock_at))
    hot = st.sampled_from([0, 1, 2, 3, 4, 5, sock_at, control_at, 1022, 1023])
    targets = draw(
        st.lists(st.one_of(hot, st.integers(0, 1023)), min_size=1, max_size=12, unique=True)
    )
    jobs: list[tuple[str, int, int | None]] = []
    while targets:
        kind = draw(st.sampled_from(["pipe", "mount"]))
        read = targets.pop()
        pair: bool = draw(st.booleans())
        write = targets.pop() if targets and pair else None
        jobs.append((kind, read, write))
    return sock_at, control_at, jobs


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layouts_and_plans())
def test_any_worker_layout_and_any_plan(
    layout: tuple[int, int, list[tuple[str, int, int | None]]],
) -> None:
    sock_at, control_at, plan = layout
    data = PipeImage(size=1 << 16, data=b"x" * 10)
    with tempfile.TemporaryDirectory() as tmp:
        area = Path(tmp)
        w = start_worker_at(sock_at, control_at)
        try:
            jobs: list[MountJob | PipeJob] = []
            for i, (kind, read, write) in enumerate(plan):
                if kind == "pipe":
                    jobs.append(PipeJob(data, read, write))
                else:
                    jobs.append(MountJob(mount_image(area / f"m{i}", read, write)))
            report = restore_to_workers([(w.sock, jobs)], timeout=DEADLINE)
            fds = worker_fds(w.pid)
            by_path = {m.mount_point: m for m in autofs_mounts()}
            mounts = iter(report.mounts)
            pipes = iter(report.pipe_inodes)
            for job, (_kind, read, write) in zip(jobs, plan, strict=True):
                if isinstance(job, MountJob):
                    m = by_path[job.image.mount_point]
                    assert next(mounts).pipe_ino == m.pipe_ino
                    assert (m.pgrp, m.catatonic) == (w.pid, False)
                    ino = m.pipe_ino
                else:
                    ino = next(pipes)
                assert fds[read] == f"pipe:[{ino}]"
                if write is not None:
                    assert fds[write] == f"pipe:[{ino}]"
            # The worker's own fds moved above every target, and still work: a second
            # handover is taken and confirmed.
            own = [fd for fd, what in fds.items() if what == "/dev/autofs" or "socket:" in what]
            highest = max(t for _, r, wt in plan for t in (r, wt) if t is not None)
            assert len(own) == 2 and min(own) > highest
            spare = PipeJob(data, max(fds) + 1)
            again = restore_to_workers([(w.sock, [spare])], timeout=DEADLINE)
            assert worker_fds(w.pid)[max(fds) + 1] == f"pipe:[{again.pipe_inodes[0]}]"
        finally:
            remove_mounts_under(area)
            status = w.close(DEADLINE)
        assert status == 0


def test_batch_dump_equals_single_dumps(area: Path, workers: list[WorkerProcess]) -> None:
    """dump_autofs_mounts reads mountinfo and /proc once and finds what one-by-one finds."""
    w1, w2 = start_worker(), start_worker()
    workers += [w1, w2]
    jobs1 = [MountJob(mount_image(area / f"a{i}", 100 + 2 * i, 101 + 2 * i)) for i in range(5)]
    jobs2 = [MountJob(mount_image(area / f"b{i}", 50 + i, None)) for i in range(3)]
    restore_to_workers([(w1.sock, jobs1), (w2.sock, jobs2)], timeout=DEADLINE)
    paths = [j.image.mount_point for j in jobs1 + jobs2]
    batch = dump_autofs_mounts(paths)
    assert batch == [dump_autofs_mount(p) for p in paths]
    for i, image in enumerate(batch[:5]):
        assert image.owner is not None
        assert (image.owner.pid, image.owner.read_fd, image.owner.write_fd) == (
            w1.pid,
            100 + 2 * i,
            101 + 2 * i,
        )
        ends = {(h.pid, h.fd, h.end) for h in image.holders}
        assert ends == {(w1.pid, 100 + 2 * i, "read"), (w1.pid, 101 + 2 * i, "write")}
    for image in batch[5:]:
        assert image.owner is not None and image.owner.write_fd is None
    # All of one daemon's mounts, and nothing else.
    mine = dump_autofs_mounts(owner_pid=w2.pid)
    assert [m.mount_point for m in mine] == paths[5:]
    with pytest.raises(FileNotFoundError, match="no autofs mount"):
        dump_autofs_mounts([*paths, str(area)])
