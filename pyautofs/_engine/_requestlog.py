"""The per-request log line: one INFO line per mount, unmount and failure, cheaply.

See :class:`RequestLog`. The reader hands it each answered request; it owns the format,
the burst queue, the failure rate limit, and the fast path that skips the logging
machinery for a plain stream handler.
"""

from __future__ import annotations

import logging
import os
import re
import time
from typing import Any, cast

import trio

from .._proto._escape import printable

__all__ = ["RequestLog", "comm"]

log = logging.getLogger("pyautofs")

_INFO = logging.INFO


class RequestLog:
    """The INFO line of each mount, unmount and failure, written so it costs the hot path little.

    Lines are written at once while requests are sparse. In a burst (the previous line is
    less than ``quiet`` seconds old) they are queued and written by :meth:`flusher` once the
    engine has been quiet for ``quiet`` seconds, or as soon as ``batch`` are queued; each
    line carries its own latency, so nothing is lost by writing it late. Failure lines are
    rate-limited (``failures_per_second``; a count of the ones held back follows). The
    requester's command name is read from /proc only when INFO is enabled, and cached for
    a second per process.

    When the ``pyautofs`` logger has one plain :class:`logging.StreamHandler` (as
    ``pyautofs serve --log-target stderr`` sets up) whose %-style format uses only fields
    that are the same for every line of a millisecond, the line is formatted here: the
    handler's formatter makes the text around the message once per millisecond, and a
    batch of lines is one ``os.write`` to the stream's fd. Any other set-up (journal,
    syslog, filters, propagation to the root logger) goes through :mod:`logging` as usual.
    The line's text is the same either way.
    """

    def __init__(self, *, quiet: float = 0.002, batch: int = 256, failures_per_second: int = 20):
        self.quiet = quiet
        self.batch = batch
        self.per_second = failures_per_second
        self._queue: list[tuple[str, bytes | None]] = []
        self._last = 0.0
        self._window = 0
        self._count = 0
        self._held = 0
        self._comm: dict[int, str] = {}
        self._comm_window = 0
        self.wake = trio.Event()
        # The fast path's state: the handler it was derived for, and the cached frame.
        self._handler: logging.Handler | None = None
        self._formatter: logging.Formatter | None = None
        self._fd = -1
        self._encoding = "utf-8"
        self._errors = "backslashreplace"
        self._ms = -1
        self._head = ""
        self._tail = ""

    def _comm_of(self, pid: int, now: float) -> str:
        second = int(now)
        if second != self._comm_window:
            self._comm_window = second
            self._comm.clear()
        name = self._comm.get(pid)
        if name is None:
            name = self._comm[pid] = comm(pid)
        return name

    def add(  # noqa: PLR0917
        self, what: str, path: str, key: str, pid: int, latency_us: float, now: float
    ) -> None:
        """Log one outcome (call only when INFO is enabled)."""
        if what not in {"mounted", "unmounted"}:
            second = int(now)
            if second != self._window:
                if self._held:
                    self._line(f"{self._held} more failed lookup(s) not logged in the last second")
                self._window, self._count, self._held = second, 0, 0
            if self._count >= self.per_second:
                self._held += 1
                return
            self._count += 1
        if pid:
            msg = (
                f"{what} {path} key='{printable(key)}' pid={pid} "
                f"cmd={self._comm_of(pid, now)} {latency_us:.0f}us"
            )
        else:
            msg = f"{what} {path} key='{printable(key)}'"
        burst = now - self._last < self.quiet
        self._last = now
        if not burst and not self._queue:
            self._line(msg)
            return
        self._queue.append((msg, self._format(msg)))
        if len(self._queue) >= self.batch:
            self.flush()
        elif not self.wake.is_set():
            self.wake.set()

    def _line(self, msg: str) -> None:
        """Write one line now."""
        self._write([(msg, self._format(msg))])

    def _fast_handler(self) -> bool:
        """Whether the fast path applies (re-derived when the handler or formatter changes)."""
        handlers = log.handlers
        if len(handlers) != 1 or log.propagate or log.filters:
            return False
        h = handlers[0]
        if h is self._handler and h.formatter is self._formatter:
            return self._fd >= 0
        self._handler, self._formatter, self._fd, self._ms = h, h.formatter, -1, -1
        self._fd = _plain_stream_fd(h)
        if self._fd >= 0:
            stream = cast("logging.StreamHandler[Any]", h).stream
            self._encoding = getattr(stream, "encoding", None) or "utf-8"
            self._errors = getattr(stream, "errors", None) or "strict"
        return self._fd >= 0

    def _format(self, msg: str) -> bytes | None:
        """The line as the handler would write it, or None to go through :mod:`logging`."""
        if not self._fast_handler():
            return None
        ms = int(time.time() * 1000)
        if ms != self._ms:
            record = logging.LogRecord(log.name, _INFO, __file__, 0, "\x00", None, None)
            h = cast("logging.Handler", self._handler)
            try:
                framed = h.format(record)
            except Exception:  # an odd formatter: take the ordinary path
                self._fd = -1
                return None
            self._head, _, tail = framed.partition("\x00")
            self._tail = tail + cast("logging.StreamHandler[Any]", h).terminator
            self._ms = int(record.created * 1000)
        try:
            return (self._head + msg + self._tail).encode(self._encoding, self._errors)
        except (UnicodeError, LookupError):
            return None

    def _write(self, lines: list[tuple[str, bytes | None]]) -> None:
        data = b"".join(b for _, b in lines if b is not None)
        if data and self._fd >= 0:
            view = memoryview(data)
            try:
                while view:
                    view = view[os.write(self._fd, view) :]
            except OSError:
                self._fd = -1  # e.g. a closed or non-blocking stream: logging handles it
                sent = len(data) - len(view)
                done = 0
                for msg, b in lines:
                    if b is not None:
                        done += len(b)
                        if done <= sent:
                            continue
                    log.info("%s", msg)
                return
        for msg, b in lines:
            if b is None or self._fd < 0:
                log.info("%s", msg)

    def flush(self) -> None:
        queue, self._queue = self._queue, []
        if queue:
            self._write(queue)

    async def flusher(self) -> None:
        """Write queued lines once the engine has been quiet for a while (run as a task)."""
        try:
            while True:
                await self.wake.wait()
                self.wake = trio.Event()
                while self._queue and time.perf_counter() - self._last < self.quiet:
                    await trio.sleep(self.quiet)
                self.flush()
        finally:
            self.flush()


_FIELD = re.compile(r"%\((\w+)\)")
_SAME_WITHIN_A_MS = frozenset(
    {
        "asctime",
        "msecs",
        "process",
        "processName",
        "levelname",
        "levelno",
        "name",
        "message",
        "thread",
        "threadName",
    }
)


def _plain_stream_fd(h: logging.Handler) -> int:
    """The fd a plain stream handler writes to, or -1 when its lines must go through it."""
    if type(h) is not logging.StreamHandler or h.filters or h.level > _INFO:
        return -1
    f = h.formatter
    if f is None or type(f).format is not logging.Formatter.format:
        return -1
    style = getattr(f, "_style", None)
    if type(style) is not logging.PercentStyle:
        return -1
    if not set(_FIELD.findall(style._fmt)) <= _SAME_WITHIN_A_MS:
        return -1
    stream = h.stream
    try:
        stream.flush()
        return int(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return -1


def comm(pid: int) -> str:
    """The command name of ``pid`` (escaped), or ``?``."""
    try:
        with open(f"/proc/{pid}/comm", "rb") as f:
            return printable(f.read().rstrip(b"\n"), limit=32)
    except OSError:
        return "?"
