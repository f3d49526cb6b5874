"""A coordinator that rebuilds many pipes and autofs mounts, and the workers that own them.

The coordinator (:func:`restore_to_workers`) works in three phases, each timed separately
in the :class:`RestoreReport` so that a benchmark can see where the time goes:

1. **prepare**: for each job, rebuild the pipe (:func:`~pyautofs.restore.restore_pipe`) and, for an
   autofs mount, recreate the mount catatonic (:func:`recreate_autofs_mount`);
2. **send**: one message per 512 jobs carries their items and fds to their worker (see
   :mod:`pyautofs._restore._handover`); the coordinator then closes its copies, so at most
   about 1,024 fds are in flight whatever the number of jobs;
3. **confirm**: each worker installs its fds at their exact numbers with one
   ``install_fds``, issues SETPIPEFD for its mounts, and confirms.

Workers (:func:`run_worker`, or ``python -m pyautofs._restore._workers SOCK_FD``) take
handovers until the coordinator closes the socket. SETPIPEFD makes the worker's *process
group* the owner of its mounts, so a worker meant to own mounts usually runs in its own
session (:func:`start_worker` does that by default); lookups from that group never trigger.

**A worker's own fds.** A worker holds fds of its own: its socket, ``/dev/autofs`` and its
stdio, usually at 0 to 4, exactly where a restored daemon's pipe usually was. Before it
installs a handover, the worker moves every one of them above the handover's highest target
(:class:`WorkerFds`), as CRIU's restorer does, so targets may be any numbers. Overwriting
them instead (``replace=True``) would cut the worker off from its own socket or device.

**Deadlines.** A message may span several records (more than 253 fds, or a reply listing
thousands of mounts). ``timeout`` bounds the coordinator's whole exchange, every record of
every send and reply, so a worker that stops half way cannot hang the coordinator.

Cost per autofs mount is a handful of syscalls on each side: pipe2 + F_SETPIPE_SZ, mount,
stat, OPENMOUNT, TIMEOUT, CATATONIC and closes in the coordinator; dup3 x2, OPENMOUNT and
SETPIPEFD in the worker; the fds travel 253 to a message.
"""

from __future__ import annotations

import errno
import fcntl
import os
import resource
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import attrs

from .._sys._autofs import AutofsControl
from .._sys._mount import UmountFlags, umount2
from ._autofs import recreate_autofs_mount
from ._handover import (
    Adopted,
    HandoverItem,
    PipeHandover,
    adopt_handover,
    handover_targets,
    receive_handover,
    send_confirmation,
    send_handover,
    wait_confirmation,
)
from ._image import AutofsMountImage
from ._pipeimage import PipeImage, restore_pipe
from ._rebuild import RestoredAutofsMount, autofs_pipe_image, handover_for

__all__ = [
    "PipeJob",
    "MountJob",
    "RestoreReport",
    "restore_to_workers",
    "run_worker",
    "start_worker",
    "WorkerProcess",
    "WorkerFds",
]


@attrs.frozen
class PipeJob:
    """Rebuild ``image`` and give the worker its read end at ``read_target`` and/or its write
    end at ``write_target`` (an end with no target is not sent, and is closed)."""

    image: PipeImage
    read_target: int | None
    write_target: int | None = None


@attrs.frozen
class MountJob:
    """Rebuild the autofs mount ``image`` (at ``mount_point``, default its own) for a worker,
    which receives its pipe at the dumped owner's fd numbers."""

    image: AutofsMountImage
    mount_point: str | None = None
    keep_pending: bool = False


Job = PipeJob | MountJob

_CHUNK_JOBS = 512
"""Jobs per handover message: at most about 1,024 fds in flight in the coordinator (and
received at once by a worker) however many jobs there are, and a worker installs one
message while the coordinator builds the next."""


@attrs.frozen
class RestoreReport:
    """What :func:`restore_to_workers` did, and how long each phase took (seconds)."""

    mounts: list[RestoredAutofsMount]
    """One per :class:`MountJob`, in the order given (workers in order, jobs in order)."""
    pipe_inodes: list[int]
    """One per :class:`PipeJob`, in the same order: the new pipe's inode."""
    prepare_seconds: float
    send_seconds: float
    confirm_seconds: float


@attrs.define
class _Batch:
    sock: socket.socket
    items: list[HandoverItem] = attrs.Factory(list)
    fds: list[int] = attrs.Factory(list)
    mounts: list[tuple[int, str, int]] = attrs.Factory(list)  # (item index, path, dev)
    pipes: list[int] = attrs.Factory(list)  # item index of each PipeJob
    made: list[str] = attrs.Factory(list)  # mount points recreated, for cleanup


def _prepare(
    batch: _Batch, jobs: Sequence[Job], control: AutofsControl
) -> list[RestoredAutofsMount]:
    results = []
    for job in jobs:
        if isinstance(job, PipeJob):
            r, w = restore_pipe(job.image)
            send = []
            for end, end_target in ((r, job.read_target), (w, job.write_target)):
                if end_target is None:
                    os.close(end)
                else:
                    send.append(end)
            batch.pipes.append(len(batch.items))
            batch.items.append(PipeHandover(job.read_target, job.write_target))
            batch.fds += send
            continue
        target = os.path.abspath(job.mount_point or job.image.mount_point)
        dev = recreate_autofs_mount(job.image, mount_point=target, control=control)
        batch.made.append(target)
        if job.image.catatonic or job.image.owner is None:
            results.append(RestoredAutofsMount(mount_point=target, dev=dev, catatonic=True))
            continue
        r, w = restore_pipe(autofs_pipe_image(job.image, keep_pending=job.keep_pending))
        batch.mounts.append((len(batch.items), target, dev))
        batch.items.append(handover_for(job.image, target, dev))
        batch.fds += [r, w]
        results.append(RestoredAutofsMount(mount_point=target, dev=dev, catatonic=False))
    return results


def restore_to_workers(
    assignments: Sequence[tuple[socket.socket, Sequence[Job]]],
    *,
    control: AutofsControl | None = None,
    timeout: float | None = 30.0,
) -> RestoreReport:
    """Rebuild every job and hand it to its worker; return once every worker confirmed.

    ``assignments`` pairs each worker's socket (the coordinator's end of a SOCK_SEQPACKET
    unix socket) with its jobs. Targets may be any fd numbers (0 to 1023 and beyond, up to
    the worker's hard RLIMIT_NOFILE): a worker moves its own fds out of their way first.

    ``timeout`` bounds the whole call, every worker's send and confirmation included, even
    a worker that stops reading, or stops half way through its reply. On any failure, every
    mount this call recreated is detached again, every fd it made is closed, and the error
    (``HandoverFailed`` for a worker's error, ``TimeoutError`` once ``timeout`` seconds have
    passed) is raised; a worker that timed out may be in the middle of a message, so close
    it (:meth:`WorkerProcess.close`) rather than reuse its socket.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    own = control if control is not None else AutofsControl.open()
    chunks: list[tuple[_Batch, list[RestoredAutofsMount]]] = []
    replies: dict[int, dict[str, Any]] = {}
    prepare = send = confirm = 0.0
    ok = False

    def collect(sock: socket.socket, index: int) -> None:
        nonlocal confirm
        t = time.perf_counter()
        replies[index] = wait_confirmation(sock, timeout, deadline=deadline)
        confirm += time.perf_counter() - t

    try:
        for sock, jobs in assignments:
            in_flight: deque[int] = deque()
            for start in range(0, max(1, len(jobs)), _CHUNK_JOBS):
                batch = _Batch(sock)
                t = time.perf_counter()
                chunks.append((batch, _prepare(batch, jobs[start : start + _CHUNK_JOBS], own)))
                t1 = time.perf_counter()
                try:
                    send_handover(sock, batch.items, batch.fds, timeout=timeout, deadline=deadline)
                finally:
                    for fd in batch.fds:
                        os.close(fd)
                    batch.fds.clear()
                prepare += t1 - t
                send += time.perf_counter() - t1
                in_flight.append(len(chunks) - 1)
                if len(in_flight) > 1:  # the worker installs one while we build the next
                    collect(sock, in_flight.popleft())
            while in_flight:
                collect(sock, in_flight.popleft())
        mounts: list[RestoredAutofsMount] = []
        pipe_inodes: list[int] = []
        for index, (batch, results) in enumerate(chunks):
            reply = replies[index]
            inos = [entry.get("pipe_ino") for entry in reply["items"]]
            live = iter(batch.mounts)
            for res in results:
                if res.catatonic:
                    mounts.append(res)
                    continue
                idx, _, _ = next(live)
                mounts.append(attrs.evolve(res, owner_pid=reply.get("pid"), pipe_ino=inos[idx]))
            pipe_inodes += [inos[idx] for idx in batch.pipes]
        ok = True
    finally:
        if not ok:
            for batch, _ in chunks:
                for fd in batch.fds:
                    os.close(fd)
                for path in reversed(batch.made):
                    umount2(path, UmountFlags.DETACH)
        if control is None:
            own.close()
    return RestoreReport(
        mounts=mounts,
        pipe_inodes=pipe_inodes,
        prepare_seconds=prepare,
        send_seconds=send,
        confirm_seconds=confirm,
    )


# -- workers ---------------------------------------------------------------------------


def _dup_above(fd: int, floor: int) -> int:
    """A close-on-exec copy of ``fd`` at a number >= ``floor``, raising RLIMIT_NOFILE's soft
    limit toward the hard one when there is no room up there."""
    try:
        return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, floor)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EMFILE):
            raise
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > floor + 64:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        if soft != hard:
            return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, floor)
    raise OSError(
        errno.EMFILE,
        f"no free fd above {floor - 1} to move this worker's own fd {fd} to "
        f"(RLIMIT_NOFILE {soft}/{hard})",
    )


_STDIO = (("stdin", "r"), ("stdout", "w"), ("stderr", "w"))


@attrs.define
class WorkerFds:
    """The fds a worker holds for itself: its socket, ``/dev/autofs`` and (for a worker
    process of its own) its stdio.

    :meth:`make_room` moves every one of them above the highest target of a handover
    before anything is installed, as CRIU's restorer does with its own fds, so a handover
    may name any fd number (0, 1, 2, 3 and 4 included) without colliding with the worker.
    The objects are replaced by ones on the new numbers; the old numbers are closed.
    """

    sock: socket.socket
    control: AutofsControl
    stdio: bool = False
    """Move ``sys.stdin``/``stdout``/``stderr`` too (and rebind them to the new fds). Only
    for a process that does nothing but work for its coordinator."""

    def numbers(self) -> list[int]:
        """The fd numbers the worker holds now."""
        out = [self.sock.fileno(), self.control.fd]
        if self.stdio:
            out += [fd for fd in map(_stream_fd, (sys.stdin, sys.stdout, sys.stderr)) if fd >= 0]
        return out

    def make_room(self, highest: int) -> None:
        """Move every fd of the worker that is at or below ``highest`` above it."""
        floor = highest + 1
        if self.sock.fileno() <= highest:
            old_sock = self.sock
            self.sock = socket.socket(fileno=_dup_above(old_sock.fileno(), floor))
            old_sock.close()
        if self.control.fd <= highest:
            old_control = self.control
            self.control = AutofsControl(_dup_above(old_control.fd, floor))
            old_control.close()
        if not self.stdio:
            return
        for name, mode in _STDIO:
            stream = getattr(sys, name)
            fd = _stream_fd(stream)
            if fd < 0 or fd > highest:
                continue
            if mode == "w":
                stream.flush()
            moved = _dup_above(fd, floor)
            # Line-buffered text on the moved fd, as the interpreter makes stderr.
            replacement = open(  # noqa: SIM115 - lives on as sys.<name>
                moved,
                mode,
                buffering=1 if mode == "w" else -1,
                encoding=stream.encoding,
                errors=stream.errors,
                closefd=True,
            )
            setattr(sys, name, replacement)
            setattr(sys, f"__{name}__", replacement)
            os.close(fd)

    def close(self) -> None:
        """Close the socket and ``/dev/autofs`` (stdio is left alone)."""
        self.sock.close()
        self.control.close()


def _stream_fd(stream: Any) -> int:
    try:
        fd: int = stream.fileno()
    except (AttributeError, OSError, ValueError):
        return -1
    return fd


def run_worker(
    sock: socket.socket,
    *,
    replace: bool = False,
    stdio: bool = False,
    control: AutofsControl | None = None,
) -> list[Adopted]:
    """Take handovers on ``sock`` until the coordinator closes it; return what was adopted.

    For each handover the worker first moves its own fds (``sock``, the ``/dev/autofs`` fd
    it opens, and its stdio with ``stdio=True``) above the highest target
    (:meth:`WorkerFds.make_room`), then installs, takes over and confirms
    (:func:`adopt_handover`); an error is confirmed to the coordinator and then raised here.
    ``sock`` is detached (its fd number may move), and ``control`` (default: a fresh open of
    ``/dev/autofs``) is the worker's from then on: both are closed before this returns.
    """
    adopted: list[Adopted] = []
    own = WorkerFds(
        socket.socket(fileno=sock.detach()),
        AutofsControl.open() if control is None else control,
        stdio,
    )
    try:
        while True:
            try:
                items, fds = receive_handover(own.sock)
            except EOFError:
                return adopted
            try:
                targets = handover_targets(items)
                if targets:
                    own.make_room(max(targets))
                got = adopt_handover(items, fds, replace=replace, control=own.control)
            except Exception as exc:
                send_confirmation(own.sock, None, exc)
                raise
            send_confirmation(own.sock, got)
            adopted += got
    finally:
        own.close()


@attrs.define
class WorkerProcess:
    """A worker started by :func:`start_worker`: the process and the coordinator's socket."""

    proc: subprocess.Popen[bytes]
    sock: socket.socket

    @property
    def pid(self) -> int:
        """The worker's pid (and process group, when started in its own session)."""
        return self.proc.pid

    def close(self, timeout: float = 10.0) -> int:
        """Close the socket (the worker exits once it sees EOF) and reap it.

        A worker that does not exit within ``timeout`` seconds is killed. Returns its exit
        status.
        """
        self.sock.close()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout)


def start_worker(
    *, new_session: bool = True, python: str = sys.executable, timeout: float | None = 30.0
) -> WorkerProcess:
    """Start ``python -m pyautofs._restore._workers`` on a fresh SOCK_SEQPACKET pair.

    Returns once the worker has started and said so (so that timing a restore does not
    time the interpreter's start-up); ``TimeoutError`` if it does not within ``timeout``
    seconds. With ``new_session`` (the default) the worker leads its own process group, so
    the mounts it takes over are owned by it alone.
    """
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        proc = subprocess.Popen(
            [python, "-c", _WORKER_MAIN, str(theirs.fileno())],
            pass_fds=(theirs.fileno(),),
            start_new_session=new_session,
        )
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    worker = WorkerProcess(proc, ours)
    try:
        wait_confirmation(ours, timeout)  # the worker's hello
    except BaseException:
        worker.proc.kill()
        worker.close()
        raise
    return worker


# Not "-m pyautofs._restore._workers": the package imports this module first, and runpy
# warns about running a module that is already imported.
_WORKER_MAIN = (
    "import sys; from pyautofs._restore._workers import _main; sys.exit(_main(sys.argv[1:]))"
)


def _main(argv: Sequence[str]) -> int:
    if len(argv) != 1 or not argv[0].isdigit():
        print("usage: python -m pyautofs._restore._workers SOCK_FD", file=sys.stderr)
        return 2
    sock = socket.socket(fileno=int(argv[0]))
    try:
        send_confirmation(sock, [])  # hello: started and ready for handovers
        # Holds what it adopted until the coordinator closes the socket, then exits (and so
        # drops them). A worker that serves its mounts would read its pipes instead. Nothing
        # but this runs here, so its stdio may move out of the way of targets 0, 1 and 2.
        run_worker(sock, stdio=True)
    except KeyboardInterrupt:
        return 130
    finally:
        sock.close()  # a no-op once run_worker detached it
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
