"""The engine side of ``pyautofs demo``: an automounter with an embedded map, exercised.

The command-line layer prints; this module runs the automounter and the lookups and
reports what happened through callbacks.
"""

from __future__ import annotations

import errno
import functools
import os
import tempfile
import time
from collections.abc import Callable

import attrs
import trio

from .._sys._mountinfo import autofs_mounts
from ._automounter import Automounter
from ._helpers import bind_mount, mount_tmpfs
from ._requests import AutomounterStatistics, MountRequest

__all__ = ["DemoEvent", "DemoResult", "Lookup", "run_demo", "WALKTHROUGH"]

Lookup = tuple[str, int, float]
"""(key, errno or 0, microseconds) as a client saw it."""

WALKTHROUGH = ("alpha", "beta", "=scratch", "gamma", "nosuch", "alpha", "nosuch")
"""Keys looked up one by one; ``=`` means stat the key itself (a tmpfs has no hello.txt)."""


@attrs.frozen
class DemoEvent:
    """One request the kernel sent, and how the handler answered it."""

    key: str
    pid: int
    command: str
    answer: str
    micros: float


@attrs.frozen
class DemoResult:
    """Everything the demo measured."""

    latency: list[Lookup]
    again: list[Lookup]
    expired: int
    stats: AutomounterStatistics
    shutdown_ms: float
    leftover: int


async def _demo(
    mountpoint: str,
    exports: str,
    nkeys: int,
    *,
    on_event: Callable[[DemoEvent], None],
    on_lookup: Callable[[Lookup, bool], None],
    client: Callable[[list[str]], list[Lookup]],
) -> DemoResult:
    events: list[str] = []
    quiet = False

    async def on_missing(request: MountRequest) -> None:
        t0 = time.perf_counter()
        answer = "ready"
        try:
            if request.key in ("alpha", "beta"):
                bind_mount(os.path.join(exports, request.key), request.path)
            elif request.key == "scratch":
                mount_tmpfs(request.path, "size=4m")
            elif request.key == "nosuch":
                answer = "ENOENT"
                raise OSError(errno.ENOENT, "no such key in the map", request.path)
            else:
                bind_mount(os.path.join(exports, "shared"), request.path)
        finally:
            if not quiet:
                events.append(request.key)
                command = " ".join((request.requester.cmdline() or ("?",))[:1])
                on_event(
                    DemoEvent(
                        request.key,
                        request.requester.tgid,
                        os.path.basename(command),
                        answer,
                        (time.perf_counter() - t0) * 1e6,
                    )
                )

    with tempfile.TemporaryDirectory(prefix="pyautofs-demo-locks-") as locks:
        automounter = Automounter(lock_dir=locks, negative_timeout=5)
        automounter.add_mount(mountpoint, on_missing, timeout=1)
        async with trio.open_nursery() as nursery:
            await nursery.start(automounter.run)
            for key in WALKTHROUGH:
                before = len(events)
                (lookup,) = await trio.to_thread.run_sync(client, [key])
                on_lookup(lookup, len(events) > before)
            quiet = True
            keys = [f"key{i:05d}" for i in range(nkeys)]
            latency = await trio.to_thread.run_sync(client, keys)
            again = await trio.to_thread.run_sync(client, keys)
            expired = await automounter.expire(immediate=True)
            stats = automounter.statistics()
            t0 = time.perf_counter()
            automounter.stop()
        shutdown_ms = (time.perf_counter() - t0) * 1e3
    leftover = sum(1 for m in autofs_mounts() if m.mount_point == mountpoint)
    return DemoResult(latency, again, expired, stats, shutdown_ms, leftover)


def run_demo(
    mountpoint: str,
    exports: str,
    nkeys: int,
    *,
    on_event: Callable[[DemoEvent], None],
    on_lookup: Callable[[Lookup, bool], None],
    client: Callable[[list[str]], list[Lookup]],
) -> DemoResult:
    """Serve ``mountpoint`` from an embedded map over ``exports`` and exercise it.

    ``client`` runs lookups in another process group and returns what it saw. The
    walkthrough keys are looked up one at a time, reporting each request through
    ``on_event`` and each lookup through ``on_lookup`` (with whether it caused a request);
    then ``nkeys`` new keys measure latency, an immediate expire pass unmounts them, and
    the automounter shuts down.
    """
    return trio.run(
        functools.partial(
            _demo, mountpoint, exports, nkeys, on_event=on_event, on_lookup=on_lookup, client=client
        )
    )
