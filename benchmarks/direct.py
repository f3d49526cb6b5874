"""Direct mounts at scale: N direct bind mounts from a master map's ``/-`` entry.

For each N and each server (``pyautofs serve --master`` and automount 5.1.8 on the same
master map), one after the other. The mount point directories exist beforehand, as on a
machine whose direct map names existing paths: making (and removing) 10,000 directories on
ext4 costs ~2.5 s of its own, which would hide what the servers do.

- ``up_s``: from the start of the process until all N direct autofs mounts are in the mount
  table, owned by it (seen by polling mountinfo every 10 ms);
- ``lookups_s``: ten clients in their own sessions stat every mount point once, as
  ``d<i>/`` (a stat of the bare mount point does not trigger: it is a positive dentry; N lookups,
  each triggering a bind mount), all at once; ``failed`` counts lookups that did not find
  the export there;
- ``down_s``: SIGTERM until the process has exited (pyautofs only). automount is SIGKILLed
  instead, and its mounts are cleared for it: its SIGTERM shutdown expires and unmounts
  mount by mount with a 100 ms sleep after each, which would take minutes at these sizes
  (the ``shutdown`` benchmark measures that). The rows say so;
- ``rss_mib``: the server's resident memory after the lookups.

A last row per server fits ``up_s`` (and ``down_s``) against N by least squares: the slope
is the cost per mount, and ``r2`` says how linear the growth is.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence

from ._autofs_common import (
    AUTOMOUNT,
    AUTOMOUNT_WAIT,
    Server,
    Workspace,
    automount_running,
    check_environment,
    detach_under,
    enter_private_mount_namespace,
    make_catatonic_under,
    run_clients,
    tidy,
)

TITLE = (
    "N direct mounts: time to come up, N lookups from 10 clients, SIGTERM to exit; "
    "pyautofs serve vs automount(8) (SIGKILLed, not timed)"
)

VARIANTS = ("pyautofs", "automount")
CLIENTS = 10


def _sizes(quick: bool) -> tuple[int, ...]:
    return (100, 1000) if quick else (100, 1000, 10000)


def _count_direct(root: str, pid: int) -> int:
    """Live direct autofs mounts under ``root`` owned by process group ``pid``."""
    prefix = root.rstrip("/") + "/"
    n = 0
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split(b" - ", 1)
            if len(fields) != 2 or not fields[1].startswith(b"autofs "):
                continue
            if f"pgrp={pid},".encode() not in fields[1] or b"direct" not in fields[1]:
                continue
            if line.split(b" ", 5)[4].decode(errors="replace").startswith(prefix):
                n += 1
    return n


def _wait_up(server: Server, root: str, n: int, t0: float, deadline: float) -> float:
    end = t0 + deadline
    while True:
        if _count_direct(root, server.pid) >= n:
            return time.perf_counter() - t0
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.variant} exited before mounting:\n{server.log_tail()}")
        if time.perf_counter() > end:
            raise TimeoutError(f"{server.variant}: not up within {deadline} s")
        time.sleep(0.01)


def _start(ws: Workspace, variant: str, master: str, name: str) -> tuple[Server, float]:
    log = ws.path(f"{variant}-{name}.log")
    if variant == "pyautofs":
        argv = [sys.executable, "-m", "pyautofs", "serve", "--master", master]
    else:
        end = time.monotonic() + AUTOMOUNT_WAIT
        while automount_running() is not None and time.monotonic() < end:
            time.sleep(0.5)
        argv = [AUTOMOUNT, "-f", "-t", "0", master]
    with open(log, "wb") as out:
        t0 = time.perf_counter()
        proc = ws.spawn(argv, stdin=open(os.devnull, "rb"), stdout=out, stderr=out)  # noqa: SIM115
    return Server(variant, proc, ws.root, log), t0


def _measure(
    ws: Workspace, variant: str, n: int, progress: Callable[[str], None]
) -> dict[str, object]:
    name = f"{variant}-{n}"
    root = ws.mountpoint(f"direct-{name}")
    lines = "".join(f"{root}/d{i} -fstype=bind :{ws.export}\n" for i in range(n))
    for i in range(n):
        os.mkdir(f"{root}/d{i}")
    dmap = ws.write(f"auto.direct.{name}", lines)
    master = ws.write(f"auto.master.{name}", f"/- {dmap}\n")
    progress(f"{variant}: {n} direct mounts up")
    server, t0 = _start(ws, variant, master, name)
    if variant == "automount":
        ws.automount_started(server.pid, root)
    row: dict[str, object] = {"variant": variant, "n": n}
    try:
        row["up_s"] = _wait_up(server, root, n, t0, deadline=max(60.0, n * 0.01))
        progress(f"{variant}: {n} lookups from {CLIENTS} clients")
        per = math.ceil(n / CLIENTS)
        ranges = [(i * per, min(per, n - i * per)) for i in range(CLIENTS) if i * per < n]
        t1 = time.perf_counter()
        runs = run_clients(ws, root, "d", ranges, deadline=max(120.0, n * 0.1), suffix="/")
        row["lookups_s"] = time.perf_counter() - t1
        row["failed"] = sum(len(c.errors[0]) for c in runs)
        row["rss_mib"] = server.rss_kib() / 1024
        if variant == "pyautofs":
            progress(f"{variant}: SIGTERM with {n} direct mounts")
            stop = server.stop(signal.SIGTERM, deadline=max(60.0, n * 0.01))
            row["down_s"] = stop.seconds
            row["exit"] = "SIGKILLed" if stop.killed else stop.returncode
        else:
            server.stop(signal.SIGKILL, deadline=30)
            row["down_s"] = math.nan
            row["exit"] = "SIGKILLed (not timed: ~0.1 s per mount)"
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait(10)
        make_catatonic_under(root)
        detach_under(root)
    return row


def _fit(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float, float]:
    """Least squares ``y = a + b x``: (a, b, r^2)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    syy = sum((y - my) ** 2 for y in ys)
    b = sxy / sxx if sxx else math.nan
    a = my - b * mx
    r2 = (sxy * sxy) / (sxx * syy) if sxx and syy else math.nan
    return a, b, r2


def run(quick: bool, progress: Callable[[str], None]) -> list[dict[str, object]]:
    """Run the benchmark and return its result rows."""
    problem = check_environment(automount=True)
    if problem:
        raise RuntimeError(f"the direct benchmark {problem}")
    enter_private_mount_namespace()
    rows: list[dict[str, object]] = []
    with Workspace() as ws:
        for n in _sizes(quick):
            for variant in VARIANTS:
                rows.append(_measure(ws, variant, n, progress))
    for variant in VARIANTS:
        mine = [r for r in rows if r["variant"] == variant]
        if len(mine) < 2:
            continue
        xs = [float(str(r["n"])) for r in mine]
        fit: dict[str, object] = {"variant": variant, "n": "fit"}
        for metric in ("up_s", "down_s"):
            ys = [float(str(r[metric])) for r in mine]
            if any(math.isnan(y) for y in ys):
                continue
            a, b, r2 = _fit(xs, ys)
            fit[f"{metric}_per_1000"] = b * 1000
            fit[f"{metric}_r2"] = r2
            fit[f"{metric}_at_0"] = a
        rows.append(fit)
    return [tidy(row) for row in rows]
