"""The request events handed to automounter handlers, and the engine's statistics."""

from __future__ import annotations

import os

import attrs

from .._sys._mount import AutofsMode

__all__ = ["MountRequest", "ExpireRequest", "AutomounterStatistics", "Requester"]


@attrs.frozen
class Requester:
    """The process whose path walk triggered the request (as the kernel reported it)."""

    pid: int
    """The requesting thread."""
    tgid: int
    """The requesting process."""
    uid: int
    gid: int

    def cmdline(self) -> tuple[str, ...] | None:
        """The requester's command line, read from /proc now; None if it is gone or hidden."""
        try:
            with open(f"/proc/{self.tgid}/cmdline", "rb") as f:
                raw = f.read()
        except OSError:
            return None
        return tuple(os.fsdecode(arg) for arg in raw.split(b"\0") if arg) or None


@attrs.frozen
class MountRequest:
    """The kernel asks for something to be mounted at :attr:`path`.

    For an indirect mount the engine has already created the key's directory; the handler
    mounts on it. For a direct or offset mount, :attr:`path` is the autofs mount point and
    the handler mounts on top of it. Returning from the handler answers READY; raising
    ``OSError`` answers FAIL with its errno; any other exception answers FAIL/ENOENT.
    """

    mount_point: str
    """The autofs mount this request belongs to."""
    mode: AutofsMode
    key: str
    """The key looked up in an indirect mount; ``""`` for direct and offset mounts."""
    path: str
    """Where to mount: ``mount_point/key`` (indirect) or ``mount_point`` (direct, offset)."""
    requester: Requester
    token: int
    """The kernel's wait-queue token (answered by the engine, exactly once)."""


@attrs.frozen
class ExpireRequest:
    """The kernel picked :attr:`path` to expire; the handler unmounts it.

    Returning answers READY (expired); raising ``OSError`` answers FAIL with its errno
    (``EBUSY`` for a key in use), which tells the kernel the key stays.
    """

    mount_point: str
    mode: AutofsMode
    key: str
    path: str
    requester: Requester
    token: int


@attrs.frozen
class AutomounterStatistics:
    """A snapshot of an :class:`Automounter`'s counters (from ``statistics()``)."""

    requests: int
    """Missing-mount requests read from the kernel."""
    ready: int
    failed: int
    negative_hits: int
    """Requests failed at once from the negative cache."""
    expired: int
    expire_refused: int
    in_flight: int
    mounted_keys: int
    mounts: int
    """autofs mounts served."""
    latency_p50_us: float | None
    latency_p90_us: float | None
    latency_p99_us: float | None
    """Handler-plus-answer latency of recent requests, from packet read to answer."""
