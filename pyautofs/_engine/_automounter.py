"""The trio automount engine.

One :class:`Automounter` serves any number of autofs mounts. For each mount it holds the
read end of the request pipe (non-blocking; the write end is closed after mounting, as
systemd does, so only the kernel holds it and EOF on the read end means the mount went
catatonic or away) and an ioctl fd from OPENMOUNT.

The kernel's rules shape the design (``reference/autofs-kernel.md``):

- The reader tries ``read`` first and waits for readiness only on ``EAGAIN``. One read is
  one packet (packet-mode pipe). The pipe is enlarged so a burst queues instead of blocking
  the kernel, which would hold the superblock's pipe mutex and stall every other trigger.
- Each request runs in its own task, so a slow mount never stalls the reader.
- Every token is answered exactly once, READY or FAIL with a negative errno, on every
  path. The answer is a synchronous ioctl in a ``finally`` block, so neither cancellation
  nor an exception can skip it. Handlers run in a shielded cancel scope whose deadline is
  the request deadline; at shutdown the deadline is pulled in to the grace period.
- EXPIRE blocks until the expire packet is answered, so it runs in a worker thread while
  the reader (in the trio thread) serves the packet it causes.
- Processes in the owner process group never trigger mounts. Handlers and mount(8) run in
  the engine's process group, so their path walks cannot deadlock on their own requests.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import hashlib
import logging
import math
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence

import attrs
import trio

from .._proto._packets import (
    ExpireDirect,
    ExpireIndirect,
    ExpireMultiV4,
    MissingDirect,
    MissingIndirect,
    MissingV4,
    PacketError,
    decode_packet,
)
from .._sys._autofs import AutofsControl, ExpireFlags
from .._sys._mount import AutofsMode, AutofsOptions, UmountFlags, mount_autofs, umount2
from .._sys._mountinfo import AutofsMount, autofs_mounts, find_pipe_holders, read_mountinfo
from ._handover import (
    HANDOVER_ENV,
    HandoverError,
    MountState,
    decode_state,
    encode_state,
    receive_state,
    send_state,
)
from ._requests import AutomounterStatistics, ExpireRequest, MountRequest, Requester

__all__ = [
    "Automounter",
    "MountHandler",
    "ExpireHandler",
    "MountPointBusyError",
    "UnregisteredHandler",
]

log = logging.getLogger("pyautofs")

MountHandler = Callable[[MountRequest], Awaitable[object]]
"""An async function that mounts what a :class:`MountRequest` asks for."""
ExpireHandler = Callable[[ExpireRequest], Awaitable[object]]
"""An async function that unmounts what an :class:`ExpireRequest` names."""
UnregisteredHandler = Callable[[str, AutofsMode], MountHandler | None]
"""Given the path and mode of an autofs mount nobody registered, its handler (or None)."""

_PACKET_BUFSIZE = 512  # > 304: one read returns one whole packet
_PIPE_SIZE = 1 << 20  # 256 one-page slots: 256 queued requests before the kernel blocks
_LATENCY_WINDOW = 10_000
_BURST = 32  # packets read before the reader yields to the handlers it spawned


async def _no_such_key(request: MountRequest) -> None:
    raise OSError(errno.ENOENT, "no longer served", request.path)


class MountPointBusyError(OSError):
    """The mount point is already served by a live automounter (and takeover was not asked)."""


@attrs.define(eq=False)
class _Mount:
    """A registered autofs mount and its live state."""

    path: str
    mode: AutofsMode
    on_missing: MountHandler
    on_expire: ExpireHandler | None
    timeout: int
    strictexpire: bool
    key_timeouts: dict[str, int]
    # live state
    dev: int = 0
    read_fd: int = -1
    ioctlfd: int = -1
    lock_fd: int = -1
    created_dir: bool = False
    adopted: bool = False
    lost: bool = False
    mounted: set[str] = attrs.Factory(set)
    """Keys (indirect) known to be mounted; ``""`` for a covered direct/offset mount."""
    created_keys: set[str] = attrs.Factory(set)
    in_flight: dict[str, int] = attrs.Factory(dict)
    negative: dict[str, tuple[float, int]] = attrs.Factory(dict)
    reader_scope: trio.CancelScope | None = None
    stop_reading: bool = False
    expire_scope: trio.CancelScope | None = None

    def key_path(self, key: str) -> str:
        return f"{self.path}/{key}" if key else self.path

    @property
    def keeps_ioctlfd(self) -> bool:
        # An open fd on an offset mount pins it: the kernel would then never find the
        # key above it idle (may_umount_tree counts the reference). Offsets open one per use.
        return self.mode is not AutofsMode.OFFSET


class Automounter:
    """A trio automounter: register mounts with async handlers, then ``run`` it.

    Example::

        async def on_missing(request: pyautofs.MountRequest) -> None:
            pyautofs.bind_mount(f"/srv/exports/{request.key}", request.path)

        automounter = pyautofs.Automounter()
        automounter.add_mount("/mnt/auto", on_missing, timeout=300)
        async with trio.open_nursery() as nursery:
            await nursery.start(automounter.run)
            ...  # the mounts are live here
            nursery.cancel_scope.cancel()  # graceful shutdown

    ``run`` returns (or is cancelled) only after a graceful shutdown: new requests fail at
    once with ENOENT, in-flight handlers get ``shutdown_grace`` seconds, what remains is
    failed with EHOSTDOWN, every idle key it mounted is unmounted, and each autofs mount is
    made catatonic and unmounted. Keys still in use stay mounted under a catatonic autofs
    mount (logged); the next engine on that mount point adopts them.

    Args:
        request_timeout: seconds a handler may take; then FAIL with ETIMEDOUT.
        max_concurrent: handlers running at once; further requests wait their turn.
        negative_timeout: seconds a key whose handler failed keeps failing at once (0: off).
        shutdown_grace: seconds in-flight handlers get at shutdown.
        takeover: take over a mount point served by a live automounter (its pipe goes
            catatonic for an instant, then to this engine). Without it, that is an error.
            A pyautofs owner is first asked to drain (see :meth:`release`) and given
            ``drain_timeout`` seconds to do so; other owners (automount(8), systemd) are
            not asked.
        lock_dir: where the per-mount-point lock files live.
        pipe_size: request pipe size in bytes (each queued request takes one page).
        unregistered_handler: called with the path and mode of an autofs mount that a
            predecessor hands over but nobody registered here (say, an offset mount a map
            server made on demand); the handler it returns keeps it served. Without one,
            or when it returns None, such a mount fails its lookups and is removed once
            the handover ends.
    """

    def __init__(
        self,
        *,
        request_timeout: float = 60.0,
        max_concurrent: int = 256,
        negative_timeout: float = 10.0,
        shutdown_grace: float = 5.0,
        takeover: bool = False,
        lock_dir: str = "/run/pyautofs",
        pipe_size: int = _PIPE_SIZE,
        unregistered_handler: UnregisteredHandler | None = None,
        drain_timeout: float = 5.0,
    ) -> None:
        self.request_timeout = request_timeout
        self.negative_timeout = negative_timeout
        self.shutdown_grace = shutdown_grace
        self.takeover = takeover
        self.lock_dir = lock_dir
        self.pipe_size = pipe_size
        self.unregistered_handler = unregistered_handler
        self.drain_timeout = drain_timeout
        self._limiter = trio.Semaphore(max_concurrent)
        self._mounts: dict[str, _Mount] = {}
        self._ctl: AutofsControl | None = None
        self._nursery: trio.Nursery | None = None
        self._closing = False
        self._stop = trio.Event()
        self._handler_scopes: set[trio.CancelScope] = set()
        self._idle = trio.Event()
        self._idle.set()
        self._in_flight = 0
        self._handed_over = False
        # counters
        self._requests = self._ready = self._failed = self._negative_hits = 0
        self._expired = self._expire_refused = 0
        self._latencies: collections.deque[float] = collections.deque(maxlen=_LATENCY_WINDOW)

    # -- registration ------------------------------------------------------------------

    def add_mount(
        self,
        path: str | os.PathLike[str],
        on_missing: MountHandler,
        *,
        on_expire: ExpireHandler | None = None,
        mode: AutofsMode | str = AutofsMode.INDIRECT,
        timeout: int = 0,
        strictexpire: bool = False,
        key_timeouts: Mapping[str, int] | None = None,
    ) -> None:
        """Serve an autofs mount at ``path``.

        ``mode`` is ``"indirect"`` (keys are names in ``path``), ``"direct"`` or
        ``"offset"`` (``path`` itself is the trigger). ``timeout`` is the expire timeout in
        seconds (0: keys never expire on their own). ``key_timeouts`` sets per-key timeouts
        on an indirect mount (Linux >= 6.12) once a key is mounted. ``on_expire`` replaces
        the default expire handler, which unmounts the key and removes its directory.

        Before :meth:`run` this registers the mount; while running, it mounts it at once.
        """
        abspath = os.path.abspath(os.fspath(path))
        if abspath in self._mounts:
            raise ValueError(f"{abspath} is already registered")
        if timeout < 0:
            raise ValueError(f"timeout must be >= 0, not {timeout}")
        m = _Mount(
            path=abspath,
            mode=AutofsMode(mode),
            on_missing=on_missing,
            on_expire=on_expire,
            timeout=timeout,
            strictexpire=strictexpire,
            key_timeouts=dict(key_timeouts or {}),
        )
        if self._nursery is not None:
            if self._closing:
                raise RuntimeError("the automounter is shutting down")
            self._start_mount(m)
        self._mounts[abspath] = m

    async def remove_mount(self, path: str | os.PathLike[str]) -> bool:
        """Stop serving ``path``: unmount its idle keys and the autofs mount.

        Returns False when busy keys kept the autofs mount in place (it is left catatonic).
        """
        await trio.lowlevel.checkpoint()
        m = self._mounts.pop(os.path.abspath(os.fspath(path)))
        if m.expire_scope is not None:
            m.expire_scope.cancel()
        return self._teardown(m)

    @property
    def mount_points(self) -> list[str]:
        """The autofs mount points this engine serves."""
        return list(self._mounts)

    def mounted_keys(self, path: str | os.PathLike[str]) -> frozenset[str]:
        """Keys currently mounted under the indirect mount at ``path``."""
        return frozenset(self._mounts[os.path.abspath(os.fspath(path))].mounted)

    # -- running -----------------------------------------------------------------------

    async def run(
        self,
        *,
        handover_fd: int | None = None,
        task_status: trio.TaskStatus[Automounter] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Mount (or adopt) every registered mount, serve them, and shut down gracefully.

        Use ``await nursery.start(automounter.run)``: it returns once every mount is live.
        Cancel the surrounding scope, or call :meth:`stop`, to shut down.
        """
        if self._nursery is not None:
            raise RuntimeError("the automounter is already running")
        self._ctl = AutofsControl.open()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                try:
                    if handover_fd is None and HANDOVER_ENV in os.environ:
                        handover_fd = int(os.environ.pop(HANDOVER_ENV))
                    if handover_fd is not None:
                        await self._take_over_from_predecessor(handover_fd, task_status)
                    else:
                        for m in list(self._mounts.values()):
                            holder = self._lock_holder(m.path) if self.takeover else None
                            if holder is not None:
                                await self._take_over_from(m, holder)
                            else:
                                self._start_mount(m)
                        task_status.started(self)
                    await self._stop.wait()
                finally:
                    with trio.CancelScope(shield=True):
                        if self._handed_over:
                            for m in self._mounts.values():
                                self._release(m, keep_dir=True)
                        else:
                            await self._shutdown()
                    nursery.cancel_scope.cancel()
        finally:
            self._nursery = None
            self._ctl.close()
            self._ctl = None

    def stop(self) -> None:
        """Ask :meth:`run` to shut down gracefully and return."""
        self._stop.set()

    async def expire(
        self, path: str | os.PathLike[str] | None = None, *, immediate: bool = False
    ) -> int:
        """Run an expire pass now on one mount (or all); returns how many keys expired.

        Each EXPIRE ioctl blocks until this engine answers the expire packet it causes, so
        it runs in a worker thread; the pass loops until the kernel finds nothing eligible.
        """
        mounts = (
            list(self._mounts.values())
            if path is None
            else [self._mounts[os.path.abspath(os.fspath(path))]]
        )
        how = ExpireFlags.IMMEDIATE if immediate else ExpireFlags.NORMAL
        count = 0
        for m in mounts:
            count += await self._expire_pass(m, how)
        return count

    def statistics(self) -> AutomounterStatistics:
        """A snapshot of the engine's counters and recent latency percentiles."""
        lat = sorted(self._latencies)

        def pct(p: float) -> float | None:
            if not lat:
                return None
            return lat[min(len(lat) - 1, math.ceil(p * len(lat)) - 1)]

        return AutomounterStatistics(
            requests=self._requests,
            ready=self._ready,
            failed=self._failed,
            negative_hits=self._negative_hits,
            expired=self._expired,
            expire_refused=self._expire_refused,
            in_flight=self._in_flight,
            mounted_keys=sum(len(m.mounted) for m in self._mounts.values()),
            mounts=len(self._mounts),
            latency_p50_us=pct(0.50),
            latency_p90_us=pct(0.90),
            latency_p99_us=pct(0.99),
        )

    def set_key_timeout(self, path: str | os.PathLike[str], key: str, seconds: int | None) -> None:
        """Set (or with None clear) the expire timeout of one key of an indirect mount."""
        m = self._mounts[os.path.abspath(os.fspath(path))]
        if seconds is None:
            m.key_timeouts.pop(key, None)
        else:
            m.key_timeouts[key] = seconds
        if key in m.mounted and self._ctl is not None:
            self._ctl.set_key_timeout(m.ioctlfd, key, seconds)
        if seconds and m.read_fd >= 0 and self._nursery is not None and not self._closing:
            # (Re)start the expire loop, so a shorter timeout sets the pace from now on.
            if m.expire_scope is not None:
                m.expire_scope.cancel()
            self._nursery.start_soon(self._expire_loop, m)

    # -- zero-downtime handover (see _handover.py) ---------------------------------------

    async def hand_over(
        self, argv: Sequence[str], *, timeout: float = 10.0, env: Mapping[str, str] | None = None
    ) -> int | None:
        """Hand every mount to a successor process started from ``argv``; no lookup fails.

        The successor must be a program that builds an :class:`Automounter` with the same
        mounts registered and calls :meth:`run` (``pyautofs serve`` with the same arguments
        is one); it finds its handover socket through the ``PYAUTOFS_HANDOVER_FD``
        environment variable. It runs in this process's process group, which is what lets
        it answer the kernel without going through catatonic mode.

        On success this engine stops reading, finishes and answers the requests it had
        already read, hands over its final state and makes :meth:`run` return without
        touching the mounts; the successor's pid is returned. If the successor fails to
        start or to confirm within ``timeout`` seconds, it is killed, this engine goes on
        serving, and None is returned.
        """
        if self._nursery is None or self._closing:
            raise RuntimeError("hand_over needs a running automounter")
        mounts = list(self._mounts.values())
        parent, child = socket.socketpair(
            socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC
        )
        proc: trio.Process | None = None
        tsock = trio.socket.from_stdlib_socket(parent)
        try:
            child_env = dict(os.environ if env is None else env)
            child_env[HANDOVER_ENV] = str(child.fileno())
            try:
                proc = await trio.lowlevel.open_process(
                    list(argv), pass_fds=(child.fileno(),), env=child_env
                )
            finally:
                child.close()
            with contextlib.ExitStack() as stack:
                fds = [
                    fd
                    for m in mounts
                    for fd in (m.read_fd, stack.enter_context(self._ioctl_fd(m)), m.lock_fd)
                ]
                send_state(parent, [self._mount_state(m) for m in mounts], fds)
            reply = b""
            with trio.move_on_after(timeout):
                reply = await tsock.recv(65536)
            if not reply:
                raise HandoverError(
                    f"the successor (pid {proc.pid}) did not confirm within {timeout} s"
                )
            decode_state(reply, "ready")
        except (OSError, HandoverError, ValueError) as exc:
            log.error("handover failed, this engine goes on serving: %s", exc)
            if proc is not None:
                with trio.CancelScope(shield=True):
                    proc.kill()
                    await proc.wait()
            tsock.close()
            return None
        # The successor reads the pipes now. Stop reading, finish what we read, hand over.
        for m in mounts:
            m.stop_reading = True
            if m.reader_scope is not None:
                m.reader_scope.cancel()
            if m.expire_scope is not None:
                m.expire_scope.cancel()
        with trio.CancelScope(shield=True):
            await self._idle.wait()
            try:
                await tsock.send(encode_state("final", [self._mount_state(m) for m in mounts]))
            except OSError as exc:
                log.warning("handover: final state not delivered: %s", exc)
        tsock.close()
        log.info("handed %d mount(s) over to pid %d", len(mounts), proc.pid)
        self._handed_over = True
        self.stop()
        return proc.pid

    def _mount_state(self, m: _Mount) -> MountState:
        now = time.perf_counter()
        return MountState(
            path=m.path,
            mode=m.mode.value,
            dev=m.dev,
            timeout=m.timeout,
            strictexpire=m.strictexpire,
            created_dir=m.created_dir,
            mounted=tuple(sorted(m.mounted)),
            created_keys=tuple(sorted(m.created_keys)),
            key_timeouts=dict(m.key_timeouts),
            negative={k: (v[0] - now, v[1]) for k, v in m.negative.items() if v[0] > now},
        )

    async def _take_over_from_predecessor(
        self, fd: int, task_status: trio.TaskStatus[Automounter]
    ) -> None:
        """The successor's side: serve the inherited pipes, confirm, then merge final state."""
        assert self._nursery is not None
        sock = socket.socket(fileno=fd)
        try:
            header, inherited = receive_state(sock)
        except BaseException:
            sock.close()
            raise
        orphans = []
        for st, read_fd, ioctlfd, lock_fd in inherited:
            m = self._mounts.get(st.path)
            if m is None:
                # Mounted by the predecessor but not registered here: the owner of this
                # engine may still want it (an on-demand offset mount); otherwise (the map
                # dropped it) serve it with a handler that fails, and remove it at the end.
                handler = None
                if self.unregistered_handler is not None:
                    handler = self.unregistered_handler(st.path, AutofsMode(st.mode))
                m = _Mount(
                    st.path,
                    AutofsMode(st.mode),
                    handler or _no_such_key,
                    None,
                    st.timeout,
                    st.strictexpire,
                    {},
                )
                self._mounts[st.path] = m
                if handler is None:
                    orphans.append(st.path)
            self._inherit(m, st, read_fd, ioctlfd, lock_fd)
        for m in list(self._mounts.values()):
            if m.read_fd < 0:
                self._start_mount(m)
        task_status.started(self)
        tsock = trio.socket.from_stdlib_socket(sock)
        with tsock:
            await tsock.send(encode_state("ready", []))
            log.info("took over %d mount(s) from pid %s", len(inherited), header.get("pid"))
            with trio.move_on_after(max(30.0, self.shutdown_grace * 2)):
                data = await tsock.recv(1 << 22)
                if data:
                    _, finals = decode_state(data, "final")
                    now = time.perf_counter()
                    for st in finals:
                        m = self._mounts.get(st.path)
                        if m is not None:
                            m.mounted.update(st.mounted)
                            m.created_keys.update(st.created_keys)
                            for key, (left, err) in st.negative.items():
                                m.negative.setdefault(key, (now + left, err))
        for path in orphans:
            await self.remove_mount(path)

    def _inherit(self, m: _Mount, st: MountState, read_fd: int, ioctlfd: int, lock_fd: int) -> None:
        assert self._ctl is not None
        now = time.perf_counter()
        m.mode = AutofsMode(st.mode)
        m.dev = st.dev
        m.read_fd, m.ioctlfd, m.lock_fd = read_fd, ioctlfd, lock_fd
        m.created_dir = st.created_dir
        m.mounted.update(st.mounted)
        m.created_keys.update(st.created_keys)
        for key, seconds in st.key_timeouts.items():
            m.key_timeouts.setdefault(key, seconds)
        for key, (left, err) in st.negative.items():
            m.negative[key] = (now + left, err)
        if m.timeout != st.timeout:
            self._ctl.set_timeout(m.ioctlfd, m.timeout)
        self._drop_ioctlfd_if_pinning(m)
        os.set_blocking(read_fd, False)
        m.adopted = True
        self._serve(m)

    # -- takeover between unrelated engines ------------------------------------------
    #
    # An engine that takes over (``takeover=True``) a mount a live pyautofs engine serves
    # writes LOCKNAME.takeover next to that engine's lock file and sends it SIGUSR1. The
    # owner (``pyautofs serve`` calls :meth:`release_requested` on SIGUSR1) waits for an
    # idle moment, stops reading, lets its handlers finish and answers them, then lets go
    # of the mount without unmounting anything and drops its lock: the unlock is the
    # answer. Only then does the new engine go through CATATONIC + SETPIPEFD, so no request
    # the old engine had started fails, and the keys it mounted are all seen as mounted.

    async def _take_over_from(self, m: _Mount, holder: int) -> None:
        """Take ``m`` from the live pyautofs engine ``holder``, which drains first.

        Everything slow (reading mountinfo, the pipe, OPENMOUNT) is done before asking, so
        the lookups that queue between the owner's last read and our CATATONIC, the ones
        a takeover loses, are only those of a few hundred microseconds.
        """
        assert self._ctl is not None
        existing = [a for a in autofs_mounts() if a.mount_point == m.path]
        if not existing:
            self._start_mount(m)
            return
        am = existing[-1]
        r, w = self._new_pipe()
        ioctlfd = -1
        try:
            ioctlfd = self._ctl.openmount(m.path, am.dev)
            request = self._lock_path(m.path, ".takeover")
            with open(request, "w") as f:
                f.write(f"{os.getpid()}\n")
            try:
                os.kill(holder, signal.SIGUSR1)
                log.info("%s: asked pyautofs pid %d to drain and let go", m.path, holder)
                with trio.move_on_after(self.drain_timeout) as scope:
                    while self._lock_holder(m.path) is not None:
                        await trio.sleep(0.0001)
                if scope.cancelled_caught:
                    log.warning(
                        "%s: pid %d did not let go within %s s; taking the mount anyway",
                        m.path,
                        holder,
                        self.drain_timeout,
                    )
            except ProcessLookupError:
                pass  # it died meanwhile: plain adoption
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(request)
            self._lock(m)
            try:
                self._adopt(m, am, w, ioctlfd=ioctlfd)
            except BaseException:
                ioctlfd = -1  # _adopt closed it
                raise
            self._drop_ioctlfd_if_pinning(m)
        except BaseException:
            os.close(r)
            if ioctlfd >= 0 and m.ioctlfd != ioctlfd:
                os.close(ioctlfd)
            self._release(m)
            raise
        finally:
            os.close(w)
        m.read_fd = r
        self._serve(m)
        log.info("%s: taken over from pid %d", m.path, holder)

    def _lock_holder(self, path: str) -> int | None:
        """The pid in ``path``'s lock file while another process holds the lock."""
        try:
            fd = os.open(self._lock_path(path), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 64, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else None
        finally:
            os.close(fd)
        return None

    def takeover_requests(self) -> list[str]:
        """Mount points this engine serves that another engine asked to take over."""
        return [p for p in self._mounts if os.path.exists(self._lock_path(p, ".takeover"))]

    async def release_requested(self) -> list[str]:
        """Let go of every mount another engine asked for (see :meth:`release`)."""
        released = []
        for path in self.takeover_requests():
            await self.release(path)
            released.append(path)
        return released

    async def release(self, path: str | os.PathLike[str], *, idle_wait: float = 1.0) -> None:
        """Stop serving ``path`` and leave the autofs mount and its keys as they are.

        For a handover to an unrelated engine: waits up to ``idle_wait`` seconds for a
        moment with no request of this mount in flight, stops reading its pipe, lets the
        handlers already running finish and answers them, then closes its fds and lock.
        The mount keeps its pipe until the new owner's CATATONIC + SETPIPEFD; requests
        that arrive in between wait in the pipe and fail with ENOENT at CATATONIC, the
        only lookups a takeover loses.
        """
        m = self._mounts[os.path.abspath(os.fspath(path))]
        deadline = trio.current_time() + idle_wait
        while m.in_flight and trio.current_time() < deadline:
            await trio.sleep(0.0002)
        m.stop_reading = True
        if m.reader_scope is not None:
            m.reader_scope.cancel()
        if m.expire_scope is not None:
            m.expire_scope.cancel()
        with trio.move_on_after(self.request_timeout):
            while m.in_flight:
                await trio.sleep(0.001)
        del self._mounts[m.path]
        # What queued after the last read would fail at the new owner's CATATONIC anyway;
        # failing it here means no token waits on a new owner that might never come.
        self._drain(m)
        self._release(m, keep_dir=True)
        log.info("%s: released to another engine", m.path)
        if not self._mounts:
            self._handed_over = True
            self.stop()

    # -- mount set-up and adoption -----------------------------------------------------

    def _lock_path(self, path: str, suffix: str = ".lock") -> str:
        name = hashlib.sha256(path.encode()).hexdigest()[:32]
        return os.path.join(self.lock_dir, name + suffix)

    def _lock(self, m: _Mount) -> None:
        os.makedirs(self.lock_dir, mode=0o755, exist_ok=True)
        lock_path = self._lock_path(m.path)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            if not self.takeover:
                os.close(fd)
                raise MountPointBusyError(
                    errno.EBUSY,
                    f"{m.path} is already served by another pyautofs engine (pid {holder}); "
                    "stop it first, or take the mount over explicitly (takeover=True, "
                    "'pyautofs serve --takeover')",
                    m.path,
                ) from None
            # It did not drain in time: take the mount anyway, without its lock.
            log.warning("%s: taking over from pyautofs pid %s without its lock", m.path, holder)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        m.lock_fd = fd

    def _start_mount(self, m: _Mount) -> None:
        assert self._ctl is not None and self._nursery is not None
        if not os.path.isdir(m.path):
            if os.path.lexists(m.path):
                raise NotADirectoryError(
                    errno.ENOTDIR, "the mount point is not a directory; choose another", m.path
                )
            os.makedirs(m.path, exist_ok=True)
            m.created_dir = True
        self._lock(m)
        try:
            existing = [a for a in autofs_mounts() if a.mount_point == m.path]
            if existing and not self.takeover:
                self._refuse_if_live(existing[-1])
            r, w = self._new_pipe()
            try:
                if existing:
                    self._adopt(m, existing[-1], w)
                else:
                    options = AutofsOptions(
                        fd=w, pgrp=os.getpgrp(), mode=m.mode, strictexpire=m.strictexpire
                    )
                    m.dev = mount_autofs(m.path, options)
                    m.ioctlfd = self._ctl.openmount(m.path, m.dev)
                    self._ctl.set_timeout(m.ioctlfd, m.timeout)
                self._drop_ioctlfd_if_pinning(m)
            except BaseException:
                os.close(r)
                raise
            finally:
                # systemd style: only the kernel keeps the write end, so EOF on the read end
                # tells us the mount went catatonic or was unmounted behind our back.
                os.close(w)
        except BaseException:
            self._release(m)
            raise
        m.read_fd = r
        self._serve(m)
        log.log(
            logging.DEBUG if m.mode is AutofsMode.OFFSET else logging.INFO,
            "%s %s autofs mount at %s (timeout %ss)",
            "adopted" if m.adopted else "serving",
            m.mode.value,
            m.path,
            m.timeout,
        )

    def _new_pipe(self) -> tuple[int, int]:
        """A request pipe: (non-blocking read end, write end), enlarged if allowed."""
        r, w = os.pipe2(os.O_CLOEXEC)
        try:
            fcntl.fcntl(r, fcntl.F_SETPIPE_SZ, self.pipe_size)
        except OSError:
            pass  # above /proc/sys/fs/pipe-max-size without CAP_SYS_RESOURCE
        os.set_blocking(r, False)
        return r, w

    def _drop_ioctlfd_if_pinning(self, m: _Mount) -> None:
        if not m.keeps_ioctlfd and m.ioctlfd >= 0:
            os.close(m.ioctlfd)
            m.ioctlfd = -1

    def _serve(self, m: _Mount) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(self._reader, m)
        if m.timeout > 0 or any(t > 0 for t in m.key_timeouts.values()):
            self._nursery.start_soon(self._expire_loop, m)

    def _refuse_if_live(self, am: AutofsMount) -> None:
        """Refuse to steal a mount whose pipe is read by a live process other than us."""
        if am.catatonic or am.pipe_ino is None:
            return
        readers = [
            h
            for h in find_pipe_holders(am.pipe_ino)
            if h.end in ("read", "both") and h.pid != os.getpid()
        ]
        if readers:
            who = ", ".join(f"pid {h.pid} ({h.comm})" for h in readers)
            raise MountPointBusyError(
                errno.EBUSY,
                f"{am.mount_point} is already served by a live automounter: {who}; stop it "
                "first, or take the mount over explicitly (takeover=True, "
                "'pyautofs serve --takeover')",
                am.mount_point,
            )

    def _adopt(self, m: _Mount, am: AutofsMount, write_fd: int, *, ioctlfd: int = -1) -> None:
        """Take over an autofs mount left by a dead (or, with takeover, live) daemon.

        The restart recipe of automount(8): OPENMOUNT by devid, CATATONIC (we are not in the
        old owner's process group, so nothing else is allowed, and SETPIPEFD requires it),
        SETPIPEFD with our pipe, which makes our process group the owner, then TIMEOUT.
        Keys mounted before keep working throughout; lookups of new keys fail with ENOENT
        only between CATATONIC and SETPIPEFD.
        """
        assert self._ctl is not None
        if am.mode is not m.mode:
            log.warning(
                "%s: adopting a %s mount registered as %s", m.path, am.mode.value, m.mode.value
            )
            m.mode = am.mode
        m.dev = am.dev
        m.ioctlfd = ioctlfd if ioctlfd >= 0 else self._ctl.openmount(m.path, am.dev)
        try:
            self._ctl.catatonic(m.ioctlfd)
            self._ctl.setpipefd(m.ioctlfd, write_fd)
            self._ctl.set_timeout(m.ioctlfd, m.timeout)
        except BaseException:
            os.close(m.ioctlfd)
            m.ioctlfd = -1
            raise
        m.adopted = True
        # Rediscover what the old daemon mounted: every mount whose parent is this root.
        infos = read_mountinfo()
        autofs_ids = {i.mount_id for i in infos if i.fstype == "autofs" and i.mount_point == m.path}
        for info in infos:
            if m.mode is AutofsMode.INDIRECT and info.parent_id in autofs_ids:
                key = info.mount_point[len(m.path) + 1 :]
                if key and "/" not in key:
                    m.mounted.add(key)
            elif (
                m.mode is not AutofsMode.INDIRECT
                and info.parent_id in autofs_ids
                and info.mount_point == m.path
            ):
                m.mounted.add("")
        if m.mode is AutofsMode.INDIRECT:
            # Directories in an indirect root are made only by a daemon; they are ours now.
            try:
                m.created_keys.update(
                    e.name for e in os.scandir(m.path) if e.is_dir(follow_symlinks=False)
                )
            except OSError:
                pass
        log.info("%s: adopted, %d mounted key(s) rediscovered", m.path, len(m.mounted))

    def _release(self, m: _Mount, *, keep_dir: bool = False) -> None:
        if m.read_fd >= 0:
            trio.lowlevel.notify_closing(m.read_fd)
        for attr in ("read_fd", "ioctlfd", "lock_fd"):
            fd = getattr(m, attr)
            if fd >= 0:
                os.close(fd)
                setattr(m, attr, -1)
        if m.created_dir and not keep_dir:
            try:
                os.rmdir(m.path)
            except OSError:
                pass
            m.created_dir = False

    # -- the reader --------------------------------------------------------------------

    async def _reader(self, m: _Mount) -> None:
        """Read packets until one needs a handler; then hand reading on and serve it.

        Leader/follower: the task that reads a missing-mount request starts a fresh reader
        and runs the handler itself, at once. Spawning a task costs a trip through trio's
        scheduler; this way that trip is off the request's path, and the pipe is still
        never left unread while a handler works.
        """
        fd = m.read_fd
        if fd < 0 or m.stop_reading:
            return
        read = os.read
        burst = 0
        request: MountRequest | None = None
        t0 = 0.0
        with trio.CancelScope(shield=True) as m.reader_scope:
            while not m.stop_reading:
                try:
                    data = read(fd, _PACKET_BUFSIZE)
                except BlockingIOError:
                    burst = 0
                    try:
                        await trio.lowlevel.wait_readable(fd)
                    except trio.ClosedResourceError:
                        return  # teardown closed the pipe
                    continue
                except OSError:
                    if m.read_fd < 0:
                        return  # closed under us
                    raise
                if not data:
                    if not self._closing:
                        m.lost = True
                        log.warning(
                            "%s: the kernel dropped the pipe (mount catatonic or unmounted)", m.path
                        )
                    return
                t0 = time.perf_counter()
                try:
                    pkt = decode_packet(data)
                except PacketError as exc:
                    log.error("%s: malformed packet ignored: %s", m.path, exc)
                    continue
                request = self._dispatch(m, pkt, t0)
                if request is not None:
                    break
                # Fast answers (negative cache, shutdown) and expire packets don't hand
                # reading on; in a long burst of them, yield now and then.
                burst += 1
                if burst >= _BURST:
                    burst = 0
                    await trio.lowlevel.cancel_shielded_checkpoint()
        if request is not None:
            assert self._nursery is not None
            self._nursery.start_soon(self._reader, m)
            await self._serve_missing(m, request, t0)

    def _dispatch(
        self,
        m: _Mount,
        pkt: MissingIndirect
        | MissingDirect
        | ExpireIndirect
        | ExpireDirect
        | MissingV4
        | ExpireMultiV4,
        t0: float,
    ) -> MountRequest | None:
        """Answer what needs no handler; return a request that needs one."""
        assert self._nursery is not None
        if isinstance(pkt, (MissingV4, ExpireMultiV4)):
            # We mount with minproto=maxproto=5, so these come only from an adopted v4 mount.
            log.error("%s: protocol v%d packet; only v5 is served", m.path, pkt.proto_version)
            self._answer(m, pkt.token, -errno.EPROTO, "", t0, count=False)
            return None
        key = os.fsdecode(pkt.name) if m.mode is AutofsMode.INDIRECT else ""
        requester = Requester(pid=pkt.pid, tgid=pkt.tgid, uid=pkt.uid, gid=pkt.gid)
        if isinstance(pkt, (ExpireIndirect, ExpireDirect)):
            req = ExpireRequest(m.path, m.mode, key, m.key_path(key), requester, pkt.token)
            self._nursery.start_soon(self._serve_expire, m, req)
            return None
        self._requests += 1
        if self._closing:
            self._answer(m, pkt.token, -errno.ENOENT, key, t0)
            return None
        neg = m.negative.get(key)
        if neg is not None:
            if neg[0] > t0:
                self._negative_hits += 1
                self._answer(m, pkt.token, -neg[1], key, t0)
                return None
            del m.negative[key]
        self._in_flight += 1
        if self._idle.is_set():
            self._idle = trio.Event()
        return MountRequest(m.path, m.mode, key, m.key_path(key), requester, pkt.token)

    # -- answering ---------------------------------------------------------------------

    @contextlib.contextmanager
    def _ioctl_fd(self, m: _Mount) -> Iterator[int]:
        """The mount's ioctl fd: the one it keeps, or (offset mounts) one opened for this use."""
        assert self._ctl is not None
        if m.ioctlfd >= 0:
            yield m.ioctlfd
            return
        fd = self._ctl.openmount(m.path, m.dev)
        try:
            yield fd
        finally:
            os.close(fd)

    def _answer(
        self, m: _Mount, token: int, status: int, key: str, t0: float, *, count: bool = True
    ) -> None:
        """Answer ``token``; never raises (a token the kernel no longer knows is logged)."""
        assert self._ctl is not None
        ctl = self._ctl
        fd = m.ioctlfd
        opened = fd < 0  # offset mounts keep no fd: one for this answer (the hot path has one)
        try:
            if opened:
                fd = ctl.openmount(m.path, m.dev)
            try:
                if status == 0:
                    ctl.ready(fd, token)
                else:
                    ctl.fail(fd, token, status)
            finally:
                if opened:
                    os.close(fd)
        except OSError as exc:
            log.warning("%s: answering token %d for %r failed: %s", m.path, token, key, exc)
        if count:
            if status == 0:
                self._ready += 1
            else:
                self._failed += 1
            self._latencies.append((time.perf_counter() - t0) * 1e6)

    async def _serve_missing(self, m: _Mount, req: MountRequest, t0: float) -> None:
        status = -errno.ENOENT
        created = False
        cut_short = False
        key = req.key
        try:
            with trio.CancelScope(
                shield=True, deadline=trio.current_time() + self.request_timeout
            ) as scope:
                self._handler_scopes.add(scope)
                if self._closing:
                    scope.deadline = min(scope.deadline, trio.current_time() + self.shutdown_grace)
                try:
                    # Take a handler slot without a checkpoint when one is free.
                    if self._limiter.value:
                        self._limiter.acquire_nowait()
                    else:
                        await self._limiter.acquire()
                    try:
                        if m.mode is AutofsMode.INDIRECT:
                            if key in m.mounted and os.path.ismount(req.path):
                                status = 0  # already mounted (e.g. rediscovered): never mount twice
                                return
                            try:
                                os.mkdir(req.path, 0o755)
                                created = True
                                m.created_keys.add(key)
                            except FileExistsError:
                                pass
                        elif os.stat(m.path).st_dev != m.dev:
                            status = 0  # something already covers the direct mount point
                            return
                        m.in_flight[key] = req.token
                        await m.on_missing(req)
                        status = 0
                    finally:
                        self._limiter.release()
                finally:
                    self._handler_scopes.discard(scope)
            if scope.cancelled_caught:
                cut_short = True
                status = -errno.EHOSTDOWN if self._closing else -errno.ETIMEDOUT
                log.warning(
                    "%s: handler for %r %s",
                    m.path,
                    key,
                    "cut short by shutdown"
                    if self._closing
                    else f"timed out after {self.request_timeout} s",
                )
        except OSError as exc:
            status = -(exc.errno or errno.EIO)
            log.info("%s: %r failed: %s", m.path, key, exc)
        except Exception:
            status = -errno.ENOENT
            log.exception("%s: handler for %r raised", m.path, key)
        finally:
            m.in_flight.pop(key, None)
            if status == 0:
                m.mounted.add(key)
                if key in m.key_timeouts:
                    self._apply_key_timeout(m, key)
            else:
                if created:
                    self._rmdir_key(m, key)
                if self.negative_timeout > 0 and not cut_short:
                    m.negative[key] = (time.perf_counter() + self.negative_timeout, -status)
            self._answer(m, req.token, status, key, t0)
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "mount %s key=%r pid=%d cmd=%s result=%s %.0fus",
                    m.path,
                    key,
                    req.requester.tgid,
                    " ".join(req.requester.cmdline() or ("?",)),
                    "ready" if status == 0 else errno.errorcode.get(-status, str(-status)),
                    (time.perf_counter() - t0) * 1e6,
                )
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    def _apply_key_timeout(self, m: _Mount, key: str) -> None:
        assert self._ctl is not None
        try:
            self._ctl.set_key_timeout(m.ioctlfd, key, m.key_timeouts[key])
        except OSError as exc:
            log.warning("%s: per-key timeout for %r not set: %s", m.path, key, exc)

    def _rmdir_key(self, m: _Mount, key: str) -> None:
        try:
            os.rmdir(m.key_path(key))
        except OSError:
            pass
        m.created_keys.discard(key)

    async def _serve_expire(self, m: _Mount, req: ExpireRequest) -> None:
        status = -errno.EBUSY
        try:
            with trio.CancelScope(
                shield=True, deadline=trio.current_time() + self.request_timeout
            ) as scope:
                if m.on_expire is not None:
                    await m.on_expire(req)
                else:
                    self._default_expire(m, req)
                status = 0
            if scope.cancelled_caught:
                status = -errno.ETIMEDOUT
        except OSError as exc:
            status = -(exc.errno or errno.EIO)
        except Exception:
            log.exception("%s: expire handler for %r raised", m.path, req.key)
        finally:
            if status == 0:
                m.mounted.discard(req.key)
                self._expired += 1
                if (
                    m.mode is AutofsMode.INDIRECT
                    and req.key in m.created_keys
                    and not os.path.ismount(req.path)
                ):
                    self._rmdir_key(m, req.key)
            else:
                self._expire_refused += 1
            self._answer(m, req.token, status, req.key, 0.0, count=False)
            log.debug(
                "expire %s key=%r result=%s", m.path, req.key, "ready" if status == 0 else -status
            )

    def _default_expire(self, m: _Mount, req: ExpireRequest) -> None:
        """Unmount the key (EBUSY if in use); the directory goes after READY is decided."""
        if m.mode is not AutofsMode.INDIRECT and os.stat(m.path).st_dev == m.dev:
            return  # nothing covers the direct mount point: never unmount autofs itself
        try:
            umount2(req.path, UmountFlags.NOFOLLOW)
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # EINVAL: not mounted (a bare directory)
                raise

    async def _expire_loop(self, m: _Mount) -> None:
        # automount checks every timeout/4; a key thus lives between timeout and 1.25x.
        # The shortest timeout sets the pace, per-key ones included (read on every turn:
        # set_key_timeout may change them).
        with trio.CancelScope() as m.expire_scope:
            while True:
                timeouts = [t for t in (m.timeout, *m.key_timeouts.values()) if t > 0]
                await trio.sleep(max(1.0, min(timeouts, default=4) / 4))
                try:
                    await self._expire_pass(m, ExpireFlags.NORMAL)
                except OSError as exc:
                    log.warning("%s: expire pass failed: %s", m.path, exc)

    async def _expire_pass(self, m: _Mount, how: ExpireFlags) -> int:
        ctl = self._ctl
        if ctl is None or m.ioctlfd < 0 or m.lost:
            return 0
        count = 0
        while await trio.to_thread.run_sync(ctl.expire, m.ioctlfd, how):
            count += 1
        return count

    # -- shutdown ----------------------------------------------------------------------

    async def _shutdown(self) -> None:
        self._closing = True
        t_start = time.perf_counter()
        for m in self._mounts.values():
            if m.expire_scope is not None:
                m.expire_scope.cancel()
        deadline = trio.current_time() + self.shutdown_grace
        for scope in list(self._handler_scopes):
            scope.deadline = min(scope.deadline, deadline)
        await self._idle.wait()
        # Deepest mount points first, so offset mounts go before the keys that hold them.
        left = 0
        for m in sorted(self._mounts.values(), key=lambda m: m.path.count("/"), reverse=True):
            if not self._teardown(m):
                left += 1
        log.info(
            "shut down in %.1f ms%s",
            (time.perf_counter() - t_start) * 1e3,
            f"; {left} autofs mount(s) left catatonic because keys are busy" if left else "",
        )

    def _teardown(self, m: _Mount) -> bool:
        """Unmount idle keys, make the mount catatonic and unmount it. False if busy keys remain."""
        assert self._ctl is not None
        if not m.dev:
            # Never mounted or adopted (its start failed): whatever is at m.path is not ours.
            self._release(m)
            return True
        busy: list[str] = []
        for key in sorted(m.mounted | m.created_keys):
            path = m.key_path(key)
            if key in m.mounted and not (
                m.mode is not AutofsMode.INDIRECT and os.stat(path).st_dev == m.dev
            ):
                try:
                    umount2(path, UmountFlags.NOFOLLOW)
                except OSError as exc:
                    if exc.errno == errno.EBUSY:
                        busy.append(key)
                        continue
                    if exc.errno != errno.EINVAL:
                        log.warning("%s: %s", m.path, exc)
                m.mounted.discard(key)
            if key and key in m.created_keys:
                self._rmdir_key(m, key)
        m.stop_reading = True
        if m.reader_scope is not None:
            m.reader_scope.cancel()
        self._drain(m)
        if m.dev and not m.lost:
            try:
                with self._ioctl_fd(m) as fd:
                    self._ctl.catatonic(fd)
            except OSError as exc:
                log.warning("%s: CATATONIC failed: %s", m.path, exc)
        if busy:
            log.warning(
                "%s: %d key(s) still in use, left mounted under a catatonic autofs mount "
                "(a new engine on this mount point adopts them): %s",
                m.path,
                len(busy),
                " ".join(busy[:10]) + (" ..." if len(busy) > 10 else ""),
            )
            m.created_dir = False
            self._release(m)
            return False
        try:
            umount2(m.path, UmountFlags.NOFOLLOW)
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                log.warning("%s: autofs mount not removed: %s", m.path, exc)
                m.created_dir = False
            else:
                # Nothing is mounted beneath any more; what holds the root is a process's
                # cwd or a walk that CATATONIC just released. Detach it lazily.
                umount2(m.path, UmountFlags.DETACH | UmountFlags.NOFOLLOW)
        self._release(m)
        return True

    def _drain(self, m: _Mount) -> None:
        """Fail every request still queued in the pipe: no token is left unanswered."""
        if m.read_fd < 0 or not m.dev:
            return
        while True:
            try:
                data = os.read(m.read_fd, _PACKET_BUFSIZE)
            except OSError:
                return  # BlockingIOError: empty
            if not data:
                return
            try:
                pkt = decode_packet(data)
            except PacketError:
                continue
            status = (
                -errno.EAGAIN
                if isinstance(pkt, (ExpireIndirect, ExpireDirect, ExpireMultiV4))
                else -errno.ENOENT
            )
            self._answer(m, pkt.token, status, "", time.perf_counter(), count=False)
