"""Trigger latency: how long a ``stat()`` of a new key takes, client side.

Three servers run side by side on one map of ``key -fstype=bind :EXPORT`` lines, each on its
own indirect autofs mount:

- ``floor``: a minimal synchronous Python responder (blocking read, mkdir, bind mount,
  READY), the least that answering the kernel from Python costs;
- ``pyautofs``: ``pyautofs serve MOUNTPOINT MAPFILE``, the trio engine;
- ``automount``: automount 5.1.8 on a master map naming the same map.

A client in another session stats new keys one after another and times each call with
``perf_counter_ns``; the same client then stats them again (already mounted). Rounds
alternate the order of the servers so that drift on a noisy machine hits them alike. Then
a concurrent phase: many clients at once, each with its own new keys, behind a common gate;
throughput is keys over the time from the first client's start to the last one's end.

Each server is warmed up with a few keys first (not counted). automount is stopped with
SIGKILL (its SIGTERM shutdown, ~110 ms per mounted key, is the ``shutdown`` benchmark's);
the workspace then releases and detaches what it left.
"""

from __future__ import annotations

import math
import signal
from collections.abc import Callable

from ._autofs_common import (
    Server,
    Workspace,
    check_environment,
    enter_private_mount_namespace,
    key_names,
    run_clients,
    start_automount,
    start_floor,
    start_serve,
    summarize_us,
    tidy,
)

TITLE = (
    "stat() of a new key from another session, in us: pyautofs serve, automount(8), a minimal "
    "responder (floor); vs_X = median / X's median"
)

VARIANTS = ("floor", "pyautofs", "automount")
WARMUP = 20


def _params(quick: bool) -> dict[str, int]:
    if quick:
        return {"rounds": 1, "keys": 50, "concurrent": 100, "clients": 10}
    return {"rounds": 3, "keys": 300, "concurrent": 1000, "clients": 50}


def _start(ws: Workspace, variant: str, mapfile: str, progress: Callable[[str], None]) -> Server:
    mountpoint = ws.mountpoint(f"mnt-{variant}")
    if variant == "floor":
        return start_floor(ws, mountpoint)
    if variant == "pyautofs":
        return start_serve(ws, mountpoint, mapfile)
    return start_automount(ws, mountpoint, mapfile, progress=progress)


def _with_ratios(rows: list[dict[str, object]]) -> list[dict[str, object]]:
    """Add ``vs_pyautofs`` and ``vs_floor``: this row's median over theirs."""
    medians = {row["variant"]: row["median_us"] for row in rows}
    for row in rows:
        for ref in ("pyautofs", "floor"):
            mine, base = row["median_us"], medians.get(ref)
            assert isinstance(mine, float)
            row[f"vs_{ref}"] = mine / base if isinstance(base, float) and base else math.nan
    return rows


def run(quick: bool, progress: Callable[[str], None]) -> list[dict[str, object]]:
    """Run the benchmark and return its result rows."""
    problem = check_environment(automount=True)
    if problem:
        raise RuntimeError(f"the trigger benchmark {problem}")
    p = _params(quick)
    enter_private_mount_namespace()
    sequential = p["rounds"] * p["keys"]
    new: dict[str, list[int]] = {v: [] for v in VARIANTS}
    again: dict[str, list[int]] = {v: [] for v in VARIANTS}
    failed: dict[str, int] = dict.fromkeys(VARIANTS, 0)
    failed_again: dict[str, int] = dict.fromkeys(VARIANTS, 0)
    rows: list[dict[str, object]] = []
    with Workspace() as ws:
        total = WARMUP + sequential + p["concurrent"]
        mapfile = ws.write_map("auto.map", key_names("k", 0, total))
        servers = {}
        for variant in VARIANTS:
            progress(f"starting {variant}")
            servers[variant] = _start(ws, variant, mapfile, progress)
            run_clients(ws, servers[variant].mountpoint, "k", [(0, WARMUP)])
        for r in range(p["rounds"]):
            order = VARIANTS[r % 3 :] + VARIANTS[: r % 3]
            start = WARMUP + r * p["keys"]
            for variant in order:
                progress(f"round {r + 1}/{p['rounds']}: {variant}, {p['keys']} new keys")
                (c,) = run_clients(
                    ws, servers[variant].mountpoint, "k", [(start, p["keys"])], passes=2
                )
                new[variant] += c.passes[0]
                again[variant] += c.passes[1]
                failed[variant] += len(c.errors[0])
                failed_again[variant] += len(c.errors[1])
        for phase, samples, bad in (
            ("new key", new, failed),
            ("already mounted", again, failed_again),
        ):
            rows += _with_ratios(
                [
                    {
                        "variant": v,
                        "phase": phase,
                        "n": len(samples[v]),
                        **summarize_us(samples[v]),
                        "failed": bad[v],
                    }
                    for v in VARIANTS
                ]
            )

        per = p["concurrent"] // p["clients"]
        start = WARMUP + sequential
        concurrent = []
        for variant in VARIANTS:
            progress(f"concurrent: {variant}, {p['concurrent']} keys from {p['clients']} clients")
            ranges = [(start + i * per, per) for i in range(p["clients"])]
            runs = run_clients(ws, servers[variant].mountpoint, "k", ranges)
            ns = [v for c in runs for v in c.passes[0]]
            wall = (max(c.t1_ns for c in runs) - min(c.t0_ns for c in runs)) / 1e9
            concurrent.append(
                {
                    "variant": variant,
                    "phase": f"concurrent x{p['clients']}",
                    "n": len(ns),
                    **summarize_us(ns),
                    "failed": sum(len(c.errors[0]) for c in runs),
                    "keys_per_s": len(ns) / wall,
                }
            )
        rows += _with_ratios(concurrent)
        for variant, server in servers.items():
            # automount's graceful shutdown takes ~110 ms per mounted key: that is the
            # shutdown benchmark's subject, so here it is killed and the workspace cleans up.
            sig = signal.SIGKILL if variant == "automount" else signal.SIGTERM
            server.stop(sig, deadline=60.0)
    return [tidy(row) for row in rows]
