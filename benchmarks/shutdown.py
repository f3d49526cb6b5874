"""Shutdown: SIGTERM with N mounted keys, until the process has exited.

For each N, a server (``pyautofs serve`` or automount 5.1.8) serves a map of N bind-mount
keys, a client in another session mounts all of them, and the server gets SIGTERM. The time
is from the signal to the process's exit (seen through a pidfd). Afterwards nothing may be
left: no key mount and no autofs mount at the mount point (``left`` counts what is), and
the exit status should be 0.

automount expires its mounts one by one on shutdown and sleeps 100 ms after each expire
ioctl that found something (``lib/dev-ioctl-lib.c``), ~110 ms per key: 400 keys take ~45 s.
``--quick`` therefore runs automount at the smallest N only and says so in its other rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from ._autofs_common import (
    Workspace,
    check_environment,
    enter_private_mount_namespace,
    key_names,
    mounts_under,
    run_clients,
    start_automount,
    start_serve,
    tidy,
)

TITLE = (
    "SIGTERM to exit with N mounted keys, in s: pyautofs serve vs automount(8); "
    "left = mounts still there afterwards"
)

VARIANTS = ("pyautofs", "automount")
DEADLINE = 300.0
"""Seconds a server may take to shut down before it is SIGKILLed (and the row says so)."""


def _sizes(quick: bool) -> dict[str, tuple[int, ...]]:
    if quick:
        return {"pyautofs": (20, 100), "automount": (20,)}
    return {"pyautofs": (100, 400), "automount": (100, 400)}


def _measure(
    ws: Workspace, variant: str, n: int, progress: Callable[[str], None]
) -> dict[str, object]:
    mountpoint = ws.mountpoint(f"mnt-{variant}-{n}")
    mapfile = ws.write_map(f"auto.map.{n}", key_names("k", 0, n))
    if variant == "pyautofs":
        server = start_serve(ws, mountpoint, mapfile)
    else:
        server = start_automount(ws, mountpoint, mapfile, progress=progress)
    clients = min(10, n)
    per = n // clients
    runs = run_clients(ws, mountpoint, "k", [(i * per, per) for i in range(clients)])
    failed = sum(len(c.errors[0]) for c in runs)
    mounted = len(mounts_under(mountpoint)) - 1  # the autofs mount itself
    stop = server.stop(deadline=DEADLINE)
    left = len(mounts_under(mountpoint))
    return {
        "variant": variant,
        "n": n,
        "mounted": mounted,
        "seconds": stop.seconds,
        "ms_per_key": stop.seconds * 1000 / max(1, mounted),
        "exit": "SIGKILLed" if stop.killed else stop.returncode,
        "left": left,
        "failed": failed,
    }


def run(quick: bool, progress: Callable[[str], None]) -> list[dict[str, object]]:
    """Run the benchmark and return its result rows."""
    problem = check_environment(automount=True)
    if problem:
        raise RuntimeError(f"the shutdown benchmark {problem}")
    sizes = _sizes(quick)
    enter_private_mount_namespace()
    rows: list[dict[str, object]] = []
    all_sizes = sorted({n for ns in sizes.values() for n in ns})
    with Workspace() as ws:
        for n in all_sizes:
            for variant in VARIANTS:
                if n not in sizes[variant]:
                    continue
                progress(f"{variant}: mounting {n} keys, then SIGTERM")
                rows.append(_measure(ws, variant, n, progress))
    if quick:
        for n in (100, 400):
            rows.append(
                {
                    "variant": "automount",
                    "n": n,
                    "note": f"skipped in --quick (~{n * 0.11:.0f} s at ~110 ms per key)",
                }
            )
    seconds = {(r["variant"], r["n"]): r.get("seconds") for r in rows}
    for row in rows:
        base = seconds.get(("pyautofs", row["n"]))
        mine = row.get("seconds")
        if isinstance(mine, float):
            row["vs_pyautofs"] = mine / base if isinstance(base, float) and base else math.nan
    rows.sort(key=lambda r: (r["n"], VARIANTS.index(str(r["variant"]))))
    return [tidy(row) for row in rows]
