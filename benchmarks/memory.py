"""Memory: resident set size of the server, idle and with N mounted keys.

Each server serves a wildcard map (``* -fstype=bind :EXPORT``) on its own mount, one after
the other. ``idle`` is ``VmRSS`` once the mount is in place; then clients in another session
(10 at once) mount N new keys and ``rss`` is ``VmRSS`` again, ``peak`` is ``VmHWM``.
``kib_per_key`` = (rss - idle) / N.

Variants: ``pyautofs`` (``pyautofs serve``), ``automount`` (5.1.8; one process whose threads
share its memory, so its RSS is the daemon's whole footprint) and ``floor``, the minimal
synchronous Python responder, which keeps no state per key: the interpreter's own cost.
automount is stopped with SIGKILL (its SIGTERM shutdown of N keys would take N x ~110 ms).
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable

from ._autofs_common import (
    Server,
    Workspace,
    check_environment,
    detach_under,
    enter_private_mount_namespace,
    make_catatonic_under,
    mounts_under,
    run_clients,
    start_automount,
    start_floor,
    start_serve,
    tidy,
)

TITLE = (
    "server RSS in MiB, idle and with N mounted keys: pyautofs serve, automount(8), a minimal "
    "Python responder (floor); vs_pyautofs = rss / pyautofs's rss"
)

VARIANTS = ("floor", "pyautofs", "automount")
CLIENTS = 10


def _measure(
    ws: Workspace, variant: str, n: int, progress: Callable[[str], None]
) -> dict[str, object]:
    mountpoint = ws.mountpoint(f"mnt-{variant}")
    mapfile = ws.write_map(f"auto.map.{variant}", None)
    progress(f"{variant}: starting")
    server: Server
    if variant == "floor":
        server = start_floor(ws, mountpoint)
    elif variant == "pyautofs":
        server = start_serve(ws, mountpoint, mapfile)
    else:
        server = start_automount(ws, mountpoint, mapfile, progress=progress)
    try:
        time.sleep(0.2)  # let start-up finish (automount's threads, trio's first tasks)
        idle = server.status()
        progress(f"{variant}: mounting {n} keys from {CLIENTS} clients")
        per = n // CLIENTS
        runs = run_clients(ws, mountpoint, "k", [(i * per, per) for i in range(CLIENTS)])
        loaded = server.status()
        mounted = len(mounts_under(mountpoint)) - 1
    finally:
        server.stop(signal.SIGKILL if variant == "automount" else signal.SIGTERM, deadline=120)
        make_catatonic_under(mountpoint)
        detach_under(mountpoint)
    return {
        "variant": variant,
        "n": n,
        "mounted": mounted,
        "idle_mib": idle["VmRSS"] / 1024,
        "rss_mib": loaded["VmRSS"] / 1024,
        "peak_mib": loaded["VmHWM"] / 1024,
        "kib_per_key": (loaded["VmRSS"] - idle["VmRSS"]) / max(1, mounted),
        "failed": sum(len(c.errors[0]) for c in runs),
    }


def run(quick: bool, progress: Callable[[str], None]) -> list[dict[str, object]]:
    """Run the benchmark and return its result rows."""
    problem = check_environment(automount=True)
    if problem:
        raise RuntimeError(f"the memory benchmark {problem}")
    n = 500 if quick else 10_000
    enter_private_mount_namespace()
    with Workspace() as ws:
        rows = [_measure(ws, variant, n, progress) for variant in VARIANTS]
    base = next(r["rss_mib"] for r in rows if r["variant"] == "pyautofs")
    for row in rows:
        rss = row["rss_mib"]
        assert isinstance(rss, float) and isinstance(base, float)
        row["vs_pyautofs"] = rss / base if base else math.nan
    return [tidy(row) for row in rows]
