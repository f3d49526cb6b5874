"""Expiry: one loop per engine asks the kernel which idle keys to unmount.

The EXPIRE ioctl picks at most one idle key, sends an expire packet and blocks until it is
answered, so each pass runs in a worker thread while the reader (on the trio thread) serves
the packet it causes. A pass runs only on a mount whose ledger says something is mounted:
expiry never reads mountinfo. The check interval is a quarter of the shortest timeout in
use, per-key ones included (automount(8) checks every timeout/4; a key thus lives between
its timeout and 1.25 times it), and at least one second.

Expiry can be paused, for a checkpoint: :meth:`Expiry.pause` waits until no EXPIRE ioctl
is in flight, and none is issued until :meth:`Expiry.resume` (a thread in an EXPIRE ioctl
sits in D state, which CRIU cannot freeze).
"""

from __future__ import annotations

import logging
import math
import os
from typing import TYPE_CHECKING

import trio

from .._sys._autofs import AutofsControl, ExpireFlags
from ._served import ServedMount

if TYPE_CHECKING:
    from ._automounter import Automounter

__all__ = ["Expiry"]

log = logging.getLogger("pyautofs")


def _run_pass(ctl: AutofsControl, m: ServedMount, how: ExpireFlags, expiry: Expiry) -> int:
    """Blocking: expire keys of ``m`` until the kernel finds none eligible, or a pause."""
    fd, opened = m.open_ioctlfd(ctl)
    try:
        count = 0
        while not expiry._paused and ctl.expire(fd, how):
            count += 1
        return count
    finally:
        if opened:
            os.close(fd)


class Expiry:
    """The engine's expire loop, its passes, and the pause that quiesces them."""

    def __init__(self, eng: Automounter) -> None:
        self._eng = eng
        self._paused = 0
        self._in_flight = 0
        self._quiet = trio.Event()
        self._quiet.set()
        self._resumed = trio.Event()
        self._resumed.set()
        self._wake = trio.Event()

    @property
    def paused(self) -> bool:
        """True between :meth:`pause` and the matching :meth:`resume`."""
        return self._paused > 0

    def wake(self) -> None:
        """Recompute the interval now (a timeout changed, a mount came or went)."""
        self._wake.set()

    async def pause(self) -> None:
        """Issue no more EXPIRE ioctls, and return once none is in flight. Nests."""
        self._paused += 1
        if self._resumed.is_set():
            self._resumed = trio.Event()
        await self._quiet.wait()

    def resume(self) -> None:
        """Undo one :meth:`pause`; expiry goes on once every pause is undone."""
        if self._paused == 0:
            raise RuntimeError("resume_expiry() without pause_expiry()")
        self._paused -= 1
        if self._paused == 0:
            self._resumed.set()

    def interval(self) -> float | None:
        """Seconds between checks, or None when no mount has a timeout."""
        shortest = math.inf
        for m in self._eng._mounts.values():
            for t in (m.timeout, *m.key_timeouts.values()):
                if 0 < t < shortest:
                    shortest = t
        if shortest == math.inf:
            return None
        return max(1.0, shortest / 4)

    async def loop(self) -> None:
        """Run passes every :meth:`interval` seconds, until cancelled."""
        while True:
            self._wake = trio.Event()
            interval = self.interval()
            if interval is None:
                await self._wake.wait()
                continue
            with trio.move_on_after(interval):
                await self._wake.wait()
                continue  # woken: recompute the interval
            await self._resumed.wait()
            for m in list(self._eng._mounts.values()):
                if m.ledger.mounted and (m.timeout > 0 or m.key_timeouts):
                    try:
                        await self.run_pass(m, ExpireFlags.NORMAL)
                    except OSError as exc:
                        log.warning("%s: expire pass failed: %s", m.path, exc)

    async def run_pass(self, m: ServedMount, how: ExpireFlags) -> int:
        """Expire what the kernel finds eligible on ``m``; how many keys went (0 if paused)."""
        ctl = self._eng._ctl
        if ctl is None or self._paused or m.lost or not m.dev or m.pipe is None:
            return 0
        self._in_flight += 1
        if self._quiet.is_set():
            self._quiet = trio.Event()
        try:
            return await trio.to_thread.run_sync(_run_pass, ctl, m, how, self)
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._quiet.set()
