"""Telling a supervisor how the daemon is doing: sd_notify(3) and a readiness fd.

systemd's ``Type=notify`` protocol is one datagram per message on the unix socket named by
``NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace), holding
newline-separated ``KEY=value`` assignments: ``READY=1`` once the service is up,
``STATUS=`` free text for ``systemctl status``, ``STOPPING=1``, ``RELOADING=1`` (with
``MONOTONIC_USEC=``, which systemd 253 and later require for ``Type=notify-reload``) then
``READY=1`` again, ``WATCHDOG=1`` at least every ``WATCHDOG_USEC`` microseconds when
``WatchdogSec=`` is set, and ``MAINPID=`` when another process takes over as the service's
main process (a SIGUSR2 upgrade).

Supervisors without that protocol (s6, runit scripts, tests) pass an fd instead
(``--ready-fd N``): one line, ``READY=1``, is written to it once every mount is live, and
it is closed.

Nothing here may stop the daemon: a supervisor that went away costs a warning, once.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

__all__ = ["Notifier"]

log = logging.getLogger("pyautofs")


class Notifier:
    """Sends state changes to systemd (``NOTIFY_SOCKET``) and to a readiness fd.

    Build it with :meth:`from_environment`; every method is a no-op for a channel that is
    not configured, so callers never test for systemd.
    """

    def __init__(
        self,
        notify_socket: str | None = None,
        *,
        ready_fd: int | None = None,
        watchdog_usec: int | None = None,
    ) -> None:
        self._address: str | bytes | None = None
        self._sock: socket.socket | None = None
        if notify_socket:
            self._address = (
                b"\0" + notify_socket[1:].encode()
                if notify_socket.startswith("@")
                else notify_socket
            )
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._ready_fd = ready_fd
        self.watchdog_usec = watchdog_usec
        self._warned = False

    @classmethod
    def from_environment(
        cls, *, ready_fd: int | None = None, environ: Mapping[str, str] | None = None
    ) -> Notifier:
        """The notifier that systemd's environment (and ``ready_fd``) asks for.

        ``WATCHDOG_USEC`` counts only when ``WATCHDOG_PID`` is unset or names this process.
        """
        env = os.environ if environ is None else environ
        watchdog: int | None = None
        pid = env.get("WATCHDOG_PID")
        if pid is None or pid == str(os.getpid()):
            try:
                watchdog = int(env.get("WATCHDOG_USEC", "")) or None
            except ValueError:
                watchdog = None
        return cls(env.get("NOTIFY_SOCKET") or None, ready_fd=ready_fd, watchdog_usec=watchdog)

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between ``WATCHDOG=1`` pings (half the timeout), or None without one."""
        if self.watchdog_usec is None or self._sock is None:
            return None
        return self.watchdog_usec / 2e6

    def notify(self, *assignments: str) -> None:
        """Send ``KEY=value`` assignments in one datagram (nothing without NOTIFY_SOCKET)."""
        if self._sock is None or self._address is None:
            return
        try:
            self._sock.sendto("\n".join(assignments).encode(errors="replace"), self._address)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning(
                    "sd_notify to %r failed: %s (further failures not logged)", self._address, exc
                )

    def ready(self, status: str) -> None:
        """Every mount is live: ``READY=1`` to systemd, and the line to the readiness fd."""
        self.notify("READY=1", f"STATUS={status}")
        if self._ready_fd is not None:
            fd, self._ready_fd = self._ready_fd, None
            try:
                os.write(fd, b"READY=1\n")
            except OSError as exc:
                log.warning("--ready-fd %d: %s", fd, exc.strerror)
            finally:
                os.close(fd)

    def status(self, status: str) -> None:
        """Free text for ``systemctl status``."""
        self.notify(f"STATUS={status}")

    def reloading(self) -> None:
        """A reload (SIGHUP) starts; :meth:`ready` ends it."""
        self.notify(
            "RELOADING=1",
            f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}",
            "STATUS=re-reading the maps",
        )

    def stopping(self, status: str = "shutting down") -> None:
        """The graceful shutdown starts."""
        self.notify("STOPPING=1", f"STATUS={status}")

    def main_pid(self, pid: int) -> None:
        """Another process (the successor of an upgrade) is the service's main process now."""
        self.notify(f"MAINPID={pid}", f"STATUS=handed over to pid {pid}")

    def watchdog(self) -> None:
        """The event loop is alive."""
        self.notify("WATCHDOG=1")

    def close(self) -> None:
        """Close the socket and the readiness fd (if never used)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._ready_fd is not None:
            os.close(self._ready_fd)
            self._ready_fd = None
