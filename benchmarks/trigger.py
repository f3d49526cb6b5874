"""Trigger latency: how long a ``stat()`` of a new key takes, client side.

Three servers, on one map of ``key -fstype=bind :EXPORT`` lines:

- ``floor``: a minimal synchronous Python responder (blocking read, mkdir, bind mount,
  READY), the least that answering the kernel from Python costs;
- ``pyautofs``: ``pyautofs serve MOUNTPOINT MAPFILE``, the trio engine;
- ``automount``: automount 5.1.8 on a master map naming the same map.

Each measurement starts its own server on a fresh mount point, warms it up with a few keys
(not counted) and stops it afterwards, so that every server sees a mount table holding only
its own keys (automount runs mount(8), which reads the whole table, for every key). Rounds
interleave the servers in a rotating order, so that drift on a noisy machine hits them
alike. In each round a client in another session:

- ``new key``: stats new keys one after another, each timed with ``perf_counter_ns``,
  wherever the scheduler puts client and server;
- ``already mounted``: stats the same keys again;
- ``new key, same CPU``: stats other new keys with client and server pinned to CPU 0. On a
  virtual machine a wake-up of the other, idle vCPU costs tens of microseconds, twice per
  lookup (the packet wakes the server, READY wakes the client); pinned, that cost is gone
  and what is left is the server's own work, run to run stable.

Then ``concurrent``: many clients at once, each with its own new keys, behind a common gate;
throughput is keys over the time from the first client's start to the last one's end.

automount is stopped with SIGKILL (its SIGTERM shutdown, ~110 ms per mounted key, is the
``shutdown`` benchmark's subject) and its mounts are cleared for it.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
from collections.abc import Callable, Iterator

from ._autofs_common import (
    Server,
    Workspace,
    check_environment,
    detach_under,
    enter_private_mount_namespace,
    key_names,
    make_catatonic_under,
    pin,
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


@contextlib.contextmanager
def _serving(
    ws: Workspace, variant: str, mapfile: str, tag: str, progress: Callable[[str], None]
) -> Iterator[Server]:
    """``variant`` serving a fresh mount point, warmed up; stopped and cleared afterwards.

    Every measurement gets its own server and mount point, so that each sees a mount table
    holding only its own keys: mount(8), which automount runs for every key, reads the whole
    table each time, and grows slower as the table grows.
    """
    mountpoint = ws.mountpoint(f"mnt-{variant}-{tag}")
    if variant == "floor":
        server = start_floor(ws, mountpoint)
    elif variant == "pyautofs":
        server = start_serve(ws, mountpoint, mapfile)
    else:
        server = start_automount(ws, mountpoint, mapfile, progress=progress)
    try:
        run_clients(ws, mountpoint, "w", [(0, WARMUP)])
        yield server
    finally:
        # automount's graceful shutdown takes ~110 ms per mounted key: that is the shutdown
        # benchmark's subject, so here it is killed and its mounts are cleared for it.
        server.stop(signal.SIGKILL if variant == "automount" else signal.SIGTERM, deadline=60.0)
        make_catatonic_under(mountpoint)
        detach_under(mountpoint)


def _with_ratios(rows: list[dict[str, object]]) -> list[dict[str, object]]:
    """Add ``vs_pyautofs`` and ``vs_floor``: this row's median over theirs."""
    medians = {row["variant"]: row["median_us"] for row in rows}
    for row in rows:
        for ref in ("pyautofs", "floor"):
            mine, base = row["median_us"], medians.get(ref)
            assert isinstance(mine, float)
            row[f"vs_{ref}"] = mine / base if isinstance(base, float) and base else math.nan
    return rows


def cpu_ns(pid: int) -> int:
    """CPU time process ``pid`` has used so far, every thread, in ns (``schedstat``)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total


def _phase_rows(
    phase: str,
    samples: dict[str, list[int]],
    failed: dict[str, int],
    variants: tuple[str, ...] = VARIANTS,
) -> list[dict[str, object]]:
    return _with_ratios(
        [
            {
                "variant": v,
                "phase": phase,
                "n": len(samples[v]),
                **summarize_us(samples[v]),
                "failed": failed[v],
            }
            for v in variants
        ]
    )


def run(quick: bool, progress: Callable[..., None]) -> list[dict[str, object]]:
    """Run the benchmark and return its result rows.

    Without automount(8) the floor and pyautofs still run; automount's rows say why not.
    """
    problem = check_environment()
    if problem:
        raise RuntimeError(f"the trigger benchmark {problem}")
    no_automount = check_environment(automount=True)
    variants = VARIANTS if no_automount is None else ("floor", "pyautofs")
    p = _params(quick)
    enter_private_mount_namespace()
    phases = ("new key", "already mounted", "new key, same CPU")
    samples: dict[str, dict[str, list[int]]] = {ph: {v: [] for v in variants} for ph in phases}
    failed: dict[str, dict[str, int]] = {ph: dict.fromkeys(variants, 0) for ph in phases}
    cpu = dict.fromkeys(variants, 0)
    cpu_keys = dict.fromkeys(variants, 0)
    steps = (p["rounds"] + 1) * len(variants)
    done = 0
    rows: list[dict[str, object]] = []
    with Workspace() as ws:
        keys = key_names("w", 0, WARMUP) + key_names("k", 0, max(p["keys"], p["concurrent"]))
        mapfile = ws.write_map("auto.map", keys + key_names("p", 0, p["keys"]))
        for r in range(p["rounds"]):
            turn = r % len(variants)
            for variant in variants[turn:] + variants[:turn]:
                progress(
                    f"round {r + 1}/{p['rounds']}: {variant}, {p['keys']} new keys", done, steps
                )
                done += 1
                with _serving(ws, variant, mapfile, f"r{r}", progress) as server:
                    cpu0 = cpu_ns(server.pid)
                    (c,) = run_clients(ws, server.mountpoint, "k", [(0, p["keys"])], passes=2)
                    cpu[variant] += cpu_ns(server.pid) - cpu0
                    cpu_keys[variant] += p["keys"]
                    pin(server.pid, {0})
                    (same,) = run_clients(ws, server.mountpoint, "p", [(0, p["keys"])], cpus={0})
                for phase, ns, errors in (
                    ("new key", c.passes[0], c.errors[0]),
                    ("already mounted", c.passes[1], c.errors[1]),
                    ("new key, same CPU", same.passes[0], same.errors[0]),
                ):
                    samples[phase][variant] += ns
                    failed[phase][variant] += len(errors)
        for phase in phases:
            rows += _phase_rows(phase, samples[phase], failed[phase], variants)
        # Server CPU (every thread, from schedstat) per new key, over the new-key passes.
        floor_cpu = cpu["floor"] / max(1, cpu_keys["floor"]) / 1e3
        for row in rows:
            if row["phase"] == "new key":
                v = str(row["variant"])
                mine = cpu[v] / max(1, cpu_keys[v]) / 1e3
                row["cpu_us_per_key"] = mine
                row["cpu_vs_floor"] = mine / floor_cpu if floor_cpu else math.nan

        per = p["concurrent"] // p["clients"]
        concurrent = []
        for variant in variants:
            progress(
                f"concurrent: {variant}, {p['concurrent']} keys from {p['clients']} clients",
                done,
                steps,
            )
            done += 1
            ranges = [(i * per, per) for i in range(p["clients"])]
            with _serving(ws, variant, mapfile, "concurrent", progress) as server:
                runs = run_clients(ws, server.mountpoint, "k", ranges)
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
    if no_automount is not None:
        rows.append({"variant": "automount", "missing": no_automount})
    return [tidy(row) for row in rows]
