"""Where ``pyautofs serve`` logs: stderr, syslog or the systemd journal.

- ``stderr``: one line per record, ``2026-11-29T03:41:53.123+0000 pyautofs[PID] LEVEL msg``.
- ``syslog``: RFC 3164 lines to ``/dev/log``, facility daemon, ident ``pyautofs``.
- ``journal``: systemd-journald's native protocol: one datagram per record on
  ``/run/systemd/journal/socket``, made of fields. A value without a newline is
  ``KEY=value\\n``; one with a newline is ``KEY\\n``, its length as a 64-bit little-endian
  integer, the bytes, and ``\\n``. The fields are MESSAGE, PRIORITY (the syslog level),
  SYSLOG_IDENTIFIER, SYSLOG_FACILITY, CODE_FILE/CODE_LINE/CODE_FUNC and, for an exception,
  the traceback in MESSAGE. A message is cut at :data:`MAX_JOURNAL_MESSAGE` bytes, so a
  record always fits in one datagram.

Without ``--log-target``, the journal is chosen when stderr is the journal's own stream:
systemd then sets ``JOURNAL_STREAM=DEV:INODE`` to the device and inode of that stream, and
stderr still being that file (not redirected by a script) is the test.

Messages carry untrusted text (keys, program output, paths) only through
:func:`pyautofs._proto._escape.printable`, at the call sites; nothing here escapes again.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import socket
import struct
import sys
import time
from collections.abc import Mapping

__all__ = [
    "JournalHandler",
    "LOG_TARGETS",
    "MAX_JOURNAL_MESSAGE",
    "StderrFormatter",
    "choose_target",
    "setup_logging",
]

LOG_TARGETS = ("stderr", "syslog", "journal")
JOURNAL_SOCKET = "/run/systemd/journal/socket"
SYSLOG_SOCKET = "/dev/log"
MAX_JOURNAL_MESSAGE = 60_000
"""Bytes of MESSAGE kept; the rest is cut (a unix datagram must fit the socket buffer)."""

_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6}
_LOG_DAEMON = 3


def _syslog_priority(levelno: int) -> int:
    for level, priority in sorted(_PRIORITY.items(), reverse=True):
        if levelno >= level:
            return priority
    return 7  # debug


class StderrFormatter(logging.Formatter):
    """``TIMESTAMP pyautofs[PID] LEVEL message``, the timestamp ISO 8601 with milliseconds."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s pyautofs[%(process)d] %(levelname)s %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        t = time.localtime(record.created)
        millis = int(record.msecs)
        return time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{millis:03d}" + time.strftime("%z", t)


def _field(name: str, value: str | int) -> bytes:
    data = str(value).encode("utf-8", "replace")
    if b"\n" in data:
        return name.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
    return name.encode() + b"=" + data + b"\n"


class JournalHandler(logging.Handler):
    """A handler that writes records to journald with its native protocol.

    ``path`` is the journal's socket; tests bind their own. A journal that is gone (or
    refuses a record) costs one line on stderr, once; logging never raises.
    """

    def __init__(self, path: str = JOURNAL_SOCKET, identifier: str = "pyautofs") -> None:
        super().__init__()
        self.path = path
        self.identifier = identifier
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._failed = False

    def encode(self, record: logging.LogRecord) -> bytes:
        """The datagram for ``record``."""
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + logging.Formatter().formatException(record.exc_info)
        raw = message.encode("utf-8", "replace")
        if len(raw) > MAX_JOURNAL_MESSAGE:
            message = raw[:MAX_JOURNAL_MESSAGE].decode("utf-8", "ignore") + "..."
        return b"".join(
            (
                _field("MESSAGE", message),
                _field("PRIORITY", _syslog_priority(record.levelno)),
                _field("SYSLOG_IDENTIFIER", self.identifier),
                _field("SYSLOG_FACILITY", _LOG_DAEMON),
                _field("SYSLOG_PID", record.process or os.getpid()),
                _field("CODE_FILE", record.pathname),
                _field("CODE_LINE", record.lineno),
                _field("CODE_FUNC", record.funcName),
                _field("PYAUTOFS_LEVEL", record.levelname),
            )
        )

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._sock.sendto(self.encode(record), self.path)
        except OSError as exc:
            if not self._failed:
                self._failed = True
                print(
                    f"pyautofs: cannot log to the journal at {self.path}: {exc.strerror}; "
                    "journal records are lost (use --log-target stderr)",
                    file=sys.stderr,
                )

    def close(self) -> None:
        self._sock.close()
        super().close()


def choose_target(environ: Mapping[str, str], stderr_fd: int = 2) -> str:
    """The target without ``--log-target``: the journal when stderr is its stream."""
    stream = environ.get("JOURNAL_STREAM", "")
    dev, _, ino = stream.partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return "stderr"
    try:
        st = os.fstat(stderr_fd)
    except OSError:
        return "stderr"
    if (st.st_dev, st.st_ino) == (int(dev), int(ino)):
        return "journal"
    return "stderr"


def _probe_syslog(path: str = SYSLOG_SOCKET) -> None:
    """Raise ``OSError`` unless a syslog daemon listens at ``path`` (the handler would not)."""
    error: OSError | None = None
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        with socket.socket(socket.AF_UNIX, kind | socket.SOCK_CLOEXEC) as probe:
            try:
                probe.connect(path)
            except OSError as exc:
                error = error or exc
                continue
            return
    assert error is not None
    raise error


def setup_logging(target: str | None, *, verbose: bool = False) -> str:
    """Send the ``pyautofs`` logger to ``target`` (None: choose); returns the target used.

    Raises ``OSError`` when the chosen socket (``/dev/log``) cannot be used.
    """
    chosen = target or choose_target(os.environ)
    handler: logging.Handler
    if chosen == "journal":
        handler = JournalHandler()
    elif chosen == "syslog":
        _probe_syslog()
        handler = logging.handlers.SysLogHandler(
            address=SYSLOG_SOCKET, facility=logging.handlers.SysLogHandler.LOG_DAEMON
        )
        handler.setFormatter(logging.Formatter("pyautofs[%(process)d]: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(StderrFormatter())
    logger = logging.getLogger("pyautofs")
    for old in list(logger.handlers):
        logger.removeHandler(old)
        old.close()
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False
    return chosen
