"""``pyautofs serve``: an Automounter driven by autofs maps.

Maps come from ``_maps``. ``pyautofs serve`` is split by job: what it serves
(``_serve_config``), the :class:`MapServer` that turns a lookup into mounts
(``_mapserver``), the mounting itself (``_serve_mounts``: bind and tmpfs through mount(2),
anything else through mount(8) in the engine's process group), the lookup's variables and
map programs (``_serve_lookup``), and, here, the running of it all and the signals:
SIGTERM/SIGINT shut down gracefully (a second one forces the exit, after saying what is
left), SIGHUP re-reads the maps and forgets failed lookups, SIGUSR2 hands every
mount to a successor started from the code on disk now (zero-downtime upgrade; another
SIGUSR2 meanwhile is logged and ignored), and SIGUSR1 (sent by ``pyautofs serve
--takeover`` in another session) lets another engine take the mounts it asked for, after
the requests in flight are answered. A :class:`~._notify.Notifier` tells the supervisor.

Two rules from the security model shape the request path:

- Any local user chooses the keys, so every key, program output and path reaches the log
  only through :func:`printable`, and failure lines are rate-limited.
- A bind mount's source can be on a file system that hangs (an autofs mount nobody answers,
  a dead NFS server). When the kernel can resolve the source from its caches alone
  (openat2 with RESOLVE_CACHED, which never blocks), it is bind-mounted inline; otherwise
  its ``exists()`` and mount(2) run in a worker thread, at most :data:`FOREIGN_THREADS` at
  once, under the request's deadline: at the deadline the thread is abandoned (the engine
  answers the requester) and a mount it makes later is undone.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Mapping, Sequence

import trio

from .._proto._escape import printable
from .._sys._autofs import AutofsControl
from .._sys._mountinfo import autofs_mounts
from ._automounter import Automounter
from ._control import ControlServer, control_socket_path
from ._mapserver import FAILURE_LOG_BURST as FAILURE_LOG_BURST
from ._mapserver import FAILURE_LOG_RATE as FAILURE_LOG_RATE
from ._mapserver import MapServer as MapServer
from ._notify import Notifier
from ._serve_config import MountConfig as MountConfig
from ._serve_config import ServeConfig as ServeConfig
from ._serve_config import config_for_map as config_for_map
from ._serve_config import config_from_master as config_from_master
from ._serve_lookup import MAX_PROGRAM_STDERR as MAX_PROGRAM_STDERR
from ._serve_mounts import FOREIGN_THREADS as FOREIGN_THREADS

__all__ = ["ServeConfig", "MountConfig", "serve", "config_from_master", "config_for_map"]

log = logging.getLogger("pyautofs")


_CONTROL_SIGNALS = (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
_STATUS_EVERY = 5.0


def _status(server: MapServer) -> str:
    st = server.automounter.statistics()
    return (
        f"serving {st.mounts} autofs mount(s); {st.mounted_keys} key(s) mounted; "
        f"{st.requests} lookup(s), {st.failed} failed, {st.in_flight} in flight"
    )


def _make_catatonic(paths: Sequence[str]) -> int:
    """CATATONIC on each autofs mount at ``paths``: every process waiting on it is woken
    with ENOENT (a forced exit answers nothing else). Returns how many went catatonic."""
    wanted = set(paths)
    done = 0
    try:
        with AutofsControl.open() as ctl:
            for m in autofs_mounts():
                if m.mount_point not in wanted or m.catatonic:
                    continue
                try:
                    fd = ctl.openmount(m.mount_point, m.dev)
                    try:
                        ctl.catatonic(fd)
                    finally:
                        os.close(fd)
                except OSError as exc:
                    log.warning("%s: not made catatonic: %s", printable(m.mount_point), exc)
                    continue
                done += 1
    except OSError as exc:
        log.warning("mounts not made catatonic: %s", exc)
    return done


def successor_env(environ: Mapping[str, str], pid: int) -> dict[str, str]:
    """The environment of an upgrade's successor.

    systemd's watchdog names its process in WATCHDOG_PID; once this process has sent
    MAINPID= for its successor, the successor is the one to feed it, so a WATCHDOG_PID that
    names this process is dropped (unset, it means "whoever reads it"). The rest, with
    NOTIFY_SOCKET and WATCHDOG_USEC, passes on as it is.
    """
    env = dict(environ)
    if env.get("WATCHDOG_PID") == str(pid):
        del env["WATCHDOG_PID"]
    return env


class _Serving:
    """The signal loop of one :func:`serve` run, and what it knows about the run's phase."""

    def __init__(
        self,
        server: MapServer,
        argv: Sequence[str],
        env: Mapping[str, str] | None,
        notifier: Notifier,
    ) -> None:
        self.server = server
        self.argv = argv
        self.env = env
        self.notifier = notifier
        self.stopping = False
        self.upgrading = False
        self.handed_over = False

    async def heartbeat(self) -> None:
        """WATCHDOG=1 at half the watchdog timeout, and STATUS= when the counts change."""
        interval = self.notifier.watchdog_interval
        last = ""
        while True:
            await trio.sleep(min(interval or _STATUS_EVERY, _STATUS_EVERY))
            if interval is not None:
                self.notifier.watchdog()
            if not self.stopping:
                status = _status(self.server)
                if status != last:
                    self.notifier.status(status)
                    last = status

    def left_behind(self) -> str:
        """What a forced exit leaves, in words."""
        am = self.server.automounter
        st = am.statistics()
        stuck = self.server.foreign.abandoned_running
        parts = [
            f"{st.in_flight} request(s) in flight",
            f"{st.mounted_keys} key(s) mounted",
            f"{len(am.mount_points)} autofs mount(s): "
            + (" ".join(printable(p) for p in am.mount_points[:10]) or "none")
            + (" ..." if len(am.mount_points) > 10 else ""),
        ]
        if stuck:
            parts.append(f"{stuck} mount call(s) blocked in the kernel")
        return "; ".join(parts)

    async def _upgrade(self) -> None:
        am = self.server.automounter
        try:
            env = successor_env(os.environ if self.env is None else self.env, os.getpid())
            pid = await am.hand_over([sys.executable, "-m", "pyautofs", *self.argv], env=env)
        except RuntimeError as exc:  # the engine refuses (shutting down, or already handing over)
            log.warning("SIGUSR2: no upgrade: %s", exc)
            pid = None
        finally:
            self.upgrading = False
        if pid is not None:
            self.handed_over = True
            self.notifier.main_pid(pid)
            log.info("handed over to pid %d; exiting", pid)
            if self.stopping:
                # The shutdown asked for during the upgrade is the successor's to do now.
                log.info("passing the shutdown asked for during the upgrade on to pid %d", pid)
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        elif self.stopping:
            am.stop()

    async def handle_signals(self, signals: AsyncIterator[int], nursery: trio.Nursery) -> None:
        am = self.server.automounter
        async for signum in signals:
            name = signal.Signals(signum).name
            if signum in (signal.SIGTERM, signal.SIGINT):
                if self.stopping:
                    log.warning(
                        "second %s: forcing the exit; left behind: %s", name, self.left_behind()
                    )
                    released = _make_catatonic(am.mount_points)
                    log.warning(
                        "%d autofs mount(s) made catatonic: waiting lookups fail with ENOENT "
                        "now, and the next pyautofs serve adopts the mounts and their keys",
                        released,
                    )
                    for handler in logging.getLogger("pyautofs").handlers:
                        handler.flush()
                    os._exit(128 + signum)
                self.stopping = True
                self.notifier.stopping()
                if self.upgrading:
                    log.info("%s: shutting down once the upgrade in progress has ended", name)
                    continue
                log.info("%s: shutting down (send %s again to force the exit)", name, name)
                am.stop()
            elif self.stopping:
                log.info("%s ignored: shutting down", name)
            elif signum == signal.SIGHUP:
                if self.upgrading:
                    log.info("SIGHUP ignored: an upgrade is in progress")
                    continue
                self.notifier.reloading()
                await self.server.reload_master()
                self.notifier.ready(_status(self.server))
            elif signum == signal.SIGUSR1:
                # Another engine (``serve --takeover``) asks for some of our mounts.
                for path in await self.server.release_requested():
                    self.server.forget(path)
                if not am.mount_points:
                    log.info("every mount was taken over by another engine; exiting")
                    self.handed_over = True
                    am.stop()
            elif signum == signal.SIGUSR2:
                if self.upgrading:
                    log.warning("SIGUSR2 ignored: an upgrade is already in progress")
                    continue
                self.upgrading = True
                log.info("SIGUSR2: upgrading (handing every mount to a new process)")
                nursery.start_soon(self._upgrade)


async def serve(
    config: ServeConfig,
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    notifier: Notifier | None = None,
) -> int:
    """Serve until SIGTERM/SIGINT (or an upgrade, or a takeover); returns the exit status.

    ``notifier`` hears READY=1 once every mount is live, STATUS= as the counts change,
    RELOADING=1 on SIGHUP and STOPPING=1 at shutdown; its watchdog is fed while the event
    loop runs.
    """
    notifier = notifier or Notifier()
    # A signal that arrives after the receiver below is closed is re-raised by trio; for
    # these, whose default action is to die, ignoring it then is what is meant.
    saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in _CONTROL_SIGNALS}
    server: MapServer | None = None
    serving: _Serving | None = None
    try:
        server = MapServer(config)
        if not server.mounts:
            log.error("nothing to serve")
            return 1
        am = server.automounter
        serving = _Serving(server, argv, env, notifier)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, *_CONTROL_SIGNALS) as sigs:
            async with trio.open_nursery() as nursery:

                async def engine(task_status: trio.TaskStatus[Automounter]) -> None:
                    try:
                        await am.run(
                            handover_fd=Automounter.upgrade_fd_from_environment(),
                            task_status=task_status,
                        )
                    finally:
                        nursery.cancel_scope.cancel()

                nursery.start_soon(serving.handle_signals, sigs, nursery)
                await nursery.start(engine)
                await _start_control(nursery, am, config.lock_dir)
                await server.adopt_offsets()
                log.info("serving %d autofs mount(s); pid %d", len(server.mounts), os.getpid())
                notifier.ready(_status(server))
                nursery.start_soon(serving.heartbeat)
    finally:
        if server is not None and not (serving is not None and serving.handed_over):
            server.remove_created_parents()
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    return 0


async def _start_control(nursery: trio.Nursery, am: Automounter, lock_dir: str) -> None:
    """The control socket (pause/resume expiry for a checkpoint); serving goes on without."""
    try:
        await nursery.start(ControlServer(am, control_socket_path(lock_dir)).run)
    except OSError as exc:
        log.warning("no control socket (criu-hook cannot pause expiry): %s", exc)


def run_serve(config: ServeConfig, argv: Sequence[str], *, notifier: Notifier | None = None) -> int:
    """Run :func:`serve` in a fresh trio event loop (for the command line)."""
    notifier = notifier or Notifier()
    try:
        return trio.run(lambda: serve(config, argv, notifier=notifier))
    finally:
        notifier.close()
