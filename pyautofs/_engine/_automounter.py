"""The trio automount engine's public face: :class:`Automounter`.

The work is split by job (``docs/design`` has the request flow):

- :mod:`pyautofs._proto._ledger`: which keys are mounted, made, in flight, failing (sans-IO);
- :mod:`._served`: a served mount, its request pipe, and the single-use request token;
- :mod:`._reader`: read a pipe, decide each packet, drive the handler inline;
- :mod:`._setup`: create or adopt mounts, follow a changed device number, take them down;
- :mod:`._expire`: the expire loop, and its pause for a checkpoint;
- :mod:`._upgrade`, :mod:`._takeover`, :mod:`._lock`: handing mounts between engines.

The kernel's rules shape the design (``reference/autofs-kernel.md``):

- The reader tries ``read`` first and waits for readiness only on ``EAGAIN``. One read is
  one packet (packet-mode pipe). The pipe is enlarged so a burst queues instead of blocking
  the kernel, which would hold the superblock's pipe mutex and stall every other trigger.
- Every token is answered exactly once, READY or FAIL with a negative errno, on every
  path, by a single-use token object from a ``finally`` block.
- EXPIRE blocks until the expire packet is answered, so it runs in a worker thread while
  the reader (in the trio thread) serves the packet it causes.
- Processes in the owner process group never trigger mounts. Handlers and mount(8) run in
  the engine's process group, so their path walks cannot deadlock on their own requests.
"""

from __future__ import annotations

import collections
import logging
import os
import warnings
from collections.abc import Callable, Mapping, Sequence

import trio

from .._proto._ledger import NEGATIVE_MAX_ENTRIES, MountLedger
from .._proto._stats import percentile
from .._sys._autofs import AutofsControl, ExpireFlags
from .._sys._mount import AutofsMode
from ._expire import Expiry
from ._handover import HANDOVER_ENV
from ._handover import upgrade_fd_from_environment as _upgrade_fd_from_environment
from ._lock import EngineLock
from ._requestlog import RequestLog
from ._requests import AutomounterStatistics
from ._served import ExpireHandler, MountHandler, RequestPipe, ServedMount
from ._setup import (
    MountPointBusyError,
    close_pipes,
    follow_devices,
    raise_fd_limit,
    shared_pipe,
    start_mounts,
    teardown,
)
from ._setup import release as _release_mount

__all__ = [
    "Automounter",
    "MountHandler",
    "ExpireHandler",
    "MountPointBusyError",
    "UnregisteredHandler",
]

log = logging.getLogger("pyautofs")

_DIRECT_KEY = ""  # the ledger's key of a direct or offset mount's one mount

UnregisteredHandler = Callable[[str, AutofsMode], MountHandler | None]
"""Given the path and mode of an autofs mount nobody registered, its handler (or None)."""
_PIPE_SIZE = 1 << 20  # 256 one-page slots: 256 queued requests before the kernel blocks
_LATENCY_WINDOW = 10_000


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

    A handler that completes without awaiting anything is run and answered inline by the
    reader, with no task and no cancel scope; one that suspends goes on in a task of its
    own, under the request deadline, while a fresh reader takes over the pipe.

    ``run`` returns (or is cancelled) only after a graceful shutdown: new requests fail at
    once with ENOENT, in-flight handlers get ``shutdown_grace`` seconds, what remains is
    failed with EHOSTDOWN, every idle key it mounted is unmounted, and each autofs mount is
    made catatonic and unmounted. Keys still in use stay mounted under a catatonic autofs
    mount (logged); the next engine on that mount point adopts them.

    Args:
        request_timeout: seconds a handler may take; then FAIL with ETIMEDOUT.
        max_concurrent: handlers suspended at once; further requests wait their turn.
        negative_timeout: seconds a key whose handler failed keeps failing at once (0: off).
        negative_max: the most failed keys remembered per mount (the oldest go first).
        shutdown_grace: seconds in-flight handlers get at shutdown.
        takeover: take over a mount point served by a live automounter (its pipe goes
            catatonic for an instant, then to this engine). Without it, that is an error.
            A pyautofs owner is first asked to drain (see :meth:`release`) and given
            ``drain_timeout`` seconds to do so; other owners (automount(8), systemd) are
            not asked.
        lock_dir: where the engine lock lives (root-only; see ``docs/design``).
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
        negative_max: int = NEGATIVE_MAX_ENTRIES,
    ) -> None:
        self.request_timeout = request_timeout
        self.negative_timeout = negative_timeout
        self.negative_max = negative_max
        self.shutdown_grace = shutdown_grace
        self.takeover = takeover
        self.lock_dir = lock_dir
        self.pipe_size = pipe_size
        self.unregistered_handler = unregistered_handler
        self.drain_timeout = drain_timeout
        self._limiter = trio.Semaphore(max_concurrent)
        self._mounts: dict[str, ServedMount] = {}
        self._shared: RequestPipe | None = None
        self._gone_devs: set[int] = set()
        self._ctl: AutofsControl | None = None
        self._nursery: trio.Nursery | None = None
        self._closing = False
        self._stop = trio.Event()
        self._handler_scopes: set[trio.CancelScope] = set()
        self._idle = trio.Event()
        self._idle.set()
        self._in_flight = 0
        self._handed_over = False
        self._upgraded = False
        self._upgrading = False
        self._lock = EngineLock(lock_dir)
        self._lock_dirty = False
        self._expiry = Expiry(self)
        self._request_log = RequestLog()
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
        pipe_fd: int | None = None,
    ) -> None:
        """Serve an autofs mount at ``path``.

        ``mode`` is ``"indirect"`` (keys are names in ``path``), ``"direct"`` or
        ``"offset"`` (``path`` itself is the trigger). ``timeout`` is the expire timeout in
        seconds (0: keys never expire on their own). ``key_timeouts`` sets per-key timeouts
        on an indirect mount (Linux >= 6.12) once a key is mounted. ``on_expire`` replaces
        the default expire handler, which unmounts the key and removes its directory.

        ``pipe_fd`` serves a restored mount through its restored pipe: the read end of the
        pipe the autofs mount at ``path`` writes to, already at the fd number the restore
        put it (a CRIU restore, or ``pyautofs.restore``). The engine takes the fd over
        (closes it when done), serves it as it is, with no CATATONIC and no new pipe, and
        answers the packets already queued in it. Its process must be in the mount's
        owner process group, as a restored daemon is.

        Before :meth:`run` this registers the mount; while running, it mounts it at once.
        """
        abspath = os.path.abspath(os.fspath(path))
        if abspath in self._mounts:
            raise ValueError(f"{abspath} is already registered")
        if timeout < 0:
            raise ValueError(f"timeout must be >= 0, not {timeout}")
        m = ServedMount(
            path=abspath,
            mode=AutofsMode(mode),
            on_missing=on_missing,
            on_expire=on_expire,
            timeout=timeout,
            strictexpire=strictexpire,
            key_timeouts=dict(key_timeouts or {}),
            ledger=MountLedger(self.negative_timeout, self.negative_max),
        )
        if pipe_fd is not None:
            if pipe_fd < 0:
                raise ValueError(f"pipe_fd must be an open fd, not {pipe_fd}")
            m.restored_fd = pipe_fd
        if self._nursery is not None:
            if self._closing:
                raise RuntimeError("the automounter is shutting down")
            self._mounts[abspath] = m
            try:
                start_mounts(self, [m])
            except BaseException:
                del self._mounts[abspath]
                raise
            self._expiry.wake()
            return
        self._mounts[abspath] = m

    async def remove_mount(self, path: str | os.PathLike[str]) -> bool:
        """Stop serving ``path``: unmount its idle keys and the autofs mount.

        Returns False when busy keys kept the autofs mount in place (it is left catatonic).
        """
        await trio.lowlevel.checkpoint()
        m = self._mounts.pop(os.path.abspath(os.fspath(path)))
        done = teardown(self, m)
        self._mounts_changed()
        return done

    @property
    def mount_points(self) -> list[str]:
        """The autofs mount points this engine serves."""
        return list(self._mounts)

    def mounted_keys(self, path: str | os.PathLike[str]) -> frozenset[str]:
        """Keys currently mounted under the indirect mount at ``path``."""
        return frozenset(self._mounts[os.path.abspath(os.fspath(path))].ledger.mounted)

    def triggers_below(self, path: str | os.PathLike[str]) -> list[tuple[str, bool]]:
        """The served mount points strictly below ``path`` (offset triggers), deepest first.

        Each comes with whether this engine mounted something on it (its key is mounted
        and not expired). Nothing is read from the kernel: this is the engine's own
        record, costing one pass over its mount points.
        """
        prefix = os.path.abspath(os.fspath(path)).rstrip("/") + "/"
        found = [
            (p, _DIRECT_KEY in m.ledger.mounted)
            for p, m in self._mounts.items()
            if p.startswith(prefix)
        ]
        found.sort(key=lambda t: (t[0].count("/"), t[0]), reverse=True)
        return found

    def is_covered(self, path: str | os.PathLike[str]) -> bool:
        """Whether a mount covers ``path``, a served mount point or a key directly below one.

        It compares the device number of what ``path`` resolves to with that of the autofs
        mount (one ``lstat``, which never triggers from the engine's process group). False
        for a path that is neither.
        """
        p = os.path.abspath(os.fspath(path))
        m = self._mounts.get(p) or self._mounts.get(os.path.dirname(p))
        if m is None:
            return False
        try:
            return os.lstat(p).st_dev != m.dev
        except FileNotFoundError:
            return False

    # -- running -----------------------------------------------------------------------

    @staticmethod
    def upgrade_fd_from_environment() -> int | None:
        """The handover socket a predecessor passed (PYAUTOFS_HANDOVER_FD, then unset)."""
        return _upgrade_fd_from_environment()

    async def run(
        self,
        *,
        handover_fd: int | None = None,
        task_status: trio.TaskStatus[Automounter] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Mount (or adopt) every registered mount, serve them, and shut down gracefully.

        Use ``await nursery.start(automounter.run)``: it returns once every mount is live.
        Cancel the surrounding scope, or call :meth:`stop`, to shut down. A successor of
        :meth:`hand_over` passes ``handover_fd=upgrade_fd_from_environment()``.
        """
        if self._nursery is not None:
            raise RuntimeError("the automounter is already running")
        raise_fd_limit()
        self._ctl = AutofsControl.open()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                try:
                    nursery.start_soon(self._expiry.loop)
                    nursery.start_soon(self._request_log.flusher)
                    if handover_fd is None and HANDOVER_ENV in os.environ:
                        msg = f"{HANDOVER_ENV} set: pass handover_fd= (read from the env until 0.2)"
                        warnings.warn(msg, DeprecationWarning, stacklevel=2)
                        handover_fd = _upgrade_fd_from_environment()
                    if handover_fd is not None:
                        from ._upgrade import take_over_from_predecessor

                        await take_over_from_predecessor(self, handover_fd, task_status)
                    else:
                        await self._start_all()
                        task_status.started(self)
                    await self._stop.wait()
                finally:
                    with trio.CancelScope(shield=True):
                        if self._handed_over or self._upgraded:
                            for m in list(self._mounts.values()):
                                _release_mount(self, m, keep_dir=True)
                            close_pipes(self)
                            self._lock.release(remove=not self._upgraded)
                        else:
                            await self._shutdown()
                    nursery.cancel_scope.cancel()
        finally:
            self._nursery = None
            self._ctl.close()
            self._ctl = None

    async def _start_all(self) -> None:
        self._acquire_lock()
        holders = self._lock.holders()
        mine = [m for m in self._mounts.values() if m.path in holders]
        if mine and not self.takeover:
            m = mine[0]
            raise MountPointBusyError(
                16,
                f"{m.path} is already served by another pyautofs engine (pid "
                f"{holders[m.path]}); stop it first, or take the mount over explicitly "
                "(takeover=True, 'pyautofs serve --takeover')",
                m.path,
            )
        from ._takeover import take_over_from

        for m in mine:
            await take_over_from(self, m, holders[m.path])
        start_mounts(self, [m for m in self._mounts.values() if m.pipe is None and not m.dev])

    def _acquire_lock(self) -> None:
        listing = self._lock_listing()
        self._lock.acquire(listing[0] if listing else f"pid{os.getpid()}", listing)

    def _lock_listing(self) -> list[str]:
        return [p for p, m in self._mounts.items() if m.mode is not AutofsMode.OFFSET]

    def _mounts_changed(self, *, flush: bool = False) -> None:
        """The set of mounts changed: rewrite the lock's listing (soon, or now)."""
        if self._lock.fd < 0:
            return
        if flush or self._nursery is None:
            self._lock_dirty = False
            self._lock.write(self._lock_listing())
            return
        if not self._lock_dirty:
            self._lock_dirty = True
            self._nursery.start_soon(self._flush_lock)

    async def _flush_lock(self) -> None:
        await trio.lowlevel.cancel_shielded_checkpoint()
        if self._lock_dirty:
            self._lock_dirty = False
            self._lock.write(self._lock_listing())

    def _shared_pipe(self) -> RequestPipe:
        return shared_pipe(self)

    def stop(self) -> None:
        """Ask :meth:`run` to shut down gracefully and return."""
        self._stop.set()

    async def expire(
        self, path: str | os.PathLike[str] | None = None, *, immediate: bool = False
    ) -> int:
        """Run an expire pass now on one mount (or all); returns how many keys expired.

        Each EXPIRE ioctl blocks until this engine answers the expire packet it causes, so
        it runs in a worker thread; the pass loops until the kernel finds nothing eligible.
        While expiry is paused (:meth:`pause_expiry`) it issues nothing and returns 0.
        """
        mounts = (
            list(self._mounts.values())
            if path is None
            else [self._mounts[os.path.abspath(os.fspath(path))]]
        )
        how = ExpireFlags.IMMEDIATE if immediate else ExpireFlags.NORMAL
        count = 0
        for m in mounts:
            count += await self._expiry.run_pass(m, how)
        return count

    async def pause_expiry(self) -> None:
        """Stop expiry for a checkpoint: returns once no EXPIRE ioctl is in flight.

        Until :meth:`resume_expiry`, no EXPIRE ioctl is issued (a thread inside one sits in
        D state, which CRIU cannot freeze). Pauses nest.
        """
        await self._expiry.pause()

    def resume_expiry(self) -> None:
        """Undo one :meth:`pause_expiry`."""
        self._expiry.resume()

    @property
    def expiry_paused(self) -> bool:
        """True while expiry is paused."""
        return self._expiry.paused

    def refresh_devices(self) -> int:
        """Follow every served mount whose autofs superblock changed; how many changed.

        After a restore (CRIU, or anything that makes a fresh autofs superblock at a
        served path), the kernel's packets carry the new superblock's device number.
        This re-reads mountinfo once, routes each changed mount's packets by its new
        number, re-opens its ioctl fd if it kept one, and fails what was in flight on the
        old superblock (the kernel dropped those waiters). A packet of an unknown device
        triggers the same for its one mount, so this is what a restore hook calls to make
        it all happen at once, before the first lookup. The ``restored`` request of the
        control socket calls it.
        """
        return follow_devices(self)

    def clear_negative(self) -> int:
        """Forget every failed key (a map reload); returns how many were forgotten."""
        return sum(m.ledger.negative.clear() for m in self._mounts.values())

    def statistics(self) -> AutomounterStatistics:
        """A snapshot of the engine's counters and recent latency percentiles."""
        lat = list(self._latencies)

        def pct(q: float) -> float | None:
            return percentile(lat, q) if lat else None

        return AutomounterStatistics(
            requests=self._requests,
            ready=self._ready,
            failed=self._failed,
            negative_hits=self._negative_hits,
            expired=self._expired,
            expire_refused=self._expire_refused,
            in_flight=self._in_flight,
            mounted_keys=sum(len(m.ledger.mounted) for m in self._mounts.values()),
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
        if key in m.ledger.mounted and self._ctl is not None:
            self._ctl.set_key_timeout(m.ioctlfd, key, seconds)
        self._expiry.wake()

    def _apply_key_timeout(self, m: ServedMount, key: str) -> None:
        assert self._ctl is not None
        try:
            self._ctl.set_key_timeout(m.ioctlfd, key, m.key_timeouts[key])
        except OSError as exc:
            log.warning("%s: per-key timeout for %r not set: %s", m.path, key, exc)

    def _rmdir_key(self, m: ServedMount, key: str) -> None:
        try:
            os.rmdir(m.key_path(key))
        except OSError:
            pass
        m.ledger.discard_created(key)

    def _reroute(self, pipe: RequestPipe, dev: int, name: bytes) -> ServedMount | None:
        from ._setup import reroute

        return reroute(self, pipe, dev, name)

    def _pipe_lost(self, pipe: RequestPipe) -> None:
        """EOF on a pipe: its mount went catatonic or was unmounted behind our back."""
        for m in list(pipe.routes.values()):
            if not m.ledger.closing:
                m.lost = True
                log.warning(
                    "%s: the kernel dropped the pipe (mount catatonic or unmounted)", m.path
                )

    # -- handing mounts between engines ------------------------------------------------

    async def hand_over(
        self, argv: Sequence[str], *, timeout: float = 10.0, env: Mapping[str, str] | None = None
    ) -> int | None:
        """Hand every mount to a successor process started from ``argv``; no lookup fails.

        The successor must be a program that builds an :class:`Automounter` with the same
        mounts registered and calls :meth:`run` (``pyautofs serve`` with the same arguments
        is one); it finds its handover socket through the ``PYAUTOFS_HANDOVER_FD``
        environment variable. It runs in this process's process group, which is what lets
        it answer the kernel without going through catatonic mode. The state (mounted keys,
        negative cache, timeouts) is streamed in framed messages, at any size.

        On success this engine stops reading, finishes and answers the requests it had
        already read, hands over its final state and makes :meth:`run` return without
        touching the mounts; the successor's pid is returned. If the successor fails to
        start or to confirm within ``timeout`` seconds, it is killed, this engine goes on
        serving, and None is returned. While a handover is in progress another call is
        logged and ignored: it returns None at once.
        """
        if self._nursery is None or self._closing:
            raise RuntimeError("hand_over needs a running automounter")
        if self._upgrading:
            log.warning("an upgrade is already in progress; this request is ignored")
            return None
        self._upgrading = True
        try:
            from ._upgrade import hand_over

            return await hand_over(self, argv, timeout, env)
        finally:
            self._upgrading = False

    def takeover_requests(self) -> list[str]:
        """Mount points this engine serves that another engine asked to take over."""
        return self._lock.requested(list(self._mounts))

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
        handlers already running finish and answers them, then closes its fds and drops it
        from the engine lock. The mount keeps its pipe until the new owner's CATATONIC +
        SETPIPEFD; requests that arrive in between wait in the pipe and fail with ENOENT at
        CATATONIC, the only lookups a takeover loses.
        """
        from ._takeover import release_mount

        m = self._mounts[os.path.abspath(os.fspath(path))]
        await release_mount(self, m, idle_wait)
        if not self._mounts:
            self._handed_over = True
            self.stop()

    # -- shutdown ----------------------------------------------------------------------

    async def _shutdown(self) -> None:
        import time

        self._closing = True
        t_start = time.perf_counter()
        for m in self._mounts.values():
            m.ledger.closing = True
        deadline = trio.current_time() + self.shutdown_grace
        for scope in list(self._handler_scopes):
            scope.deadline = min(scope.deadline, deadline)
        await self._idle.wait()
        with trio.move_on_after(self.request_timeout):
            await self._expiry.pause()
        # Deepest mount points first, so offset mounts go before the keys that hold them.
        left = 0
        for m in sorted(self._mounts.values(), key=lambda m: m.path.count("/"), reverse=True):
            if not teardown(self, m):
                left += 1
        if self._shared is not None:
            from ._setup import drain

            self._shared.stop()
            drain(self, self._shared)
        close_pipes(self)
        self._lock.release()
        log.info(
            "shut down in %.1f ms%s",
            (time.perf_counter() - t_start) * 1e3,
            f"; {left} autofs mount(s) left catatonic because keys are busy" if left else "",
        )
