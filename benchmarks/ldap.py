"""LDAP maps: a new key's lookup from an LDAP map, a file map and automount(8) with LDAP.

One OpenLDAP slapd, started for the run with a temporary config and database
(``_slapd.py``, which the tests use too), holds one RFC 2307bis map of
``kN -fstype=bind :EXPORT`` entries; the file map holds the same lines. Variants, all on
the same keys:

- ``pyautofs ldapi``: ``pyautofs serve`` on ``ldap:DN`` over ldapi://, SASL EXTERNAL;
- ``pyautofs ldap``: the same over ldap://127.0.0.1 (TCP), anonymous, as automount here;
- ``pyautofs file``: ``pyautofs serve`` on the file map (no directory at all);
- ``automount ldap``: automount(8) 5.1.8 with Debian's autofs-ldap on
  ``ldap://127.0.0.1:PORT/DN`` (it connects, binds and unbinds for every lookup).

- ``pyautofs ldap 1ms`` and ``automount ldap 1ms``: the same over TCP through a delay line
  on this machine that holds every chunk 1 ms in each direction, as a directory a network
  away would (no netem here). It delays, it does not serialize: a chunk is due 1 ms after
  it arrived, whatever else is in flight.

Rounds interleave the variants in a rotating order; each measurement gets a fresh server
and mount point. ``new key``: one client in another session stats new keys one after
another (the LDAP round trip is inside each lookup). Then ``single client`` and
``concurrent x100``: the same number of new keys from one client, and from 100 clients at
once behind a gate; keys/s is keys over the wall time from the first start to the last end,
and ``x_single`` the concurrent keys/s over the single client's (above 1: lookups overlap).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

from . import _slapd
from ._autofs_common import (
    Server,
    Workspace,
    _wait_mounted,
    check_environment,
    detach_under,
    enter_private_mount_namespace,
    key_names,
    make_catatonic_under,
    run_clients,
    start_automount,
    start_serve,
    summarize_us,
    tidy,
)

TITLE = (
    "stat() of a new key from an LDAP map (slapd on this machine), in us: pyautofs serve over "
    "ldapi and ldap, a file map, automount(8) with LDAP; vs_X = median / X's median"
)

VARIANTS = (
    "pyautofs ldapi",
    "pyautofs ldap",
    "pyautofs file",
    "automount ldap",
    "pyautofs ldap 1ms",
    "automount ldap 1ms",
)
DELAY = 0.001

# A delay line for TCP: every chunk goes on DELAY seconds after it arrived, in order, each
# direction on its own; many requests in flight are delayed, not serialized.
_DELAY_LINE = r"""
import math, sys, trio
listen, target, delay = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])

async def pump(src, dst):
    send, recv = trio.open_memory_channel(math.inf)
    async def writer():
        async for due, data in recv:
            wait = due - trio.current_time()
            if wait > 0:
                await trio.sleep(wait)
            await dst.send_all(data)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer)
        while data := await src.receive_some(65536):
            send.send_nowait((trio.current_time() + delay, data))
        send.close()

async def handle(client):
    try:
        server = await trio.open_tcp_stream("127.0.0.1", target)
        async with client, server, trio.open_nursery() as nursery:
            async def one_way(a, b):
                try:
                    await pump(a, b)
                finally:
                    nursery.cancel_scope.cancel()
            nursery.start_soon(one_way, client, server)
            nursery.start_soon(one_way, server, client)
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
        pass

trio.run(lambda: trio.serve_tcp(handle, listen, host="127.0.0.1"))
"""


def _start_delay_line(ws: Workspace, target_port: int, free_port: Callable[[], int]) -> int:
    """A delay line to ``target_port`` on a new port, once it listens; that port."""
    port = free_port()
    argv = [sys.executable, "-c", _DELAY_LINE, str(port), str(target_port), str(DELAY)]
    proc = ws.spawn(argv, stdin=subprocess.DEVNULL)
    end = time.monotonic() + 20
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return port
        except OSError:
            if proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError("the delay line did not start") from None
            time.sleep(0.02)


WARMUP = 10
MAP_DN_NAME = "auto.bench"


def _params(quick: bool) -> dict[str, int]:
    if quick:
        return {"rounds": 1, "keys": 40, "clients": 100, "per_client": 2}
    return {"rounds": 3, "keys": 200, "clients": 100, "per_client": 5}


def _start_serve_ldap(ws: Workspace, mountpoint: str, name: str, config: str) -> Server:
    argv = [sys.executable, "-m", "pyautofs", "serve", "--timeout", "0", mountpoint, name]
    log = ws.path(f"pyautofs-{os.path.basename(mountpoint)}.log")
    env = {**os.environ, "PYAUTOFS_LDAP_CONFIG": config}
    with open(log, "wb") as out:
        proc = ws.spawn(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env
        )
    return _wait_mounted(Server("pyautofs", proc, mountpoint, log))


@contextlib.contextmanager
def _serving(
    ws: Workspace,
    variant: str,
    sources: dict[str, tuple[str, str | None]],
    tag: str,
    progress: Callable[[str], None],
) -> Iterator[Server]:
    """``variant`` serving a fresh mount point, warmed up; stopped and cleared afterwards."""
    mountpoint = ws.mountpoint(f"mnt-{variant.replace(' ', '-')}-{tag}")
    name, config = sources[variant]
    if variant.startswith("automount"):
        server = start_automount(ws, mountpoint, name, progress=progress)
    elif config is None:
        server = start_serve(ws, mountpoint, name)
    else:
        server = _start_serve_ldap(ws, mountpoint, name, config)
    try:
        run_clients(ws, mountpoint, "w", [(0, WARMUP)])
        yield server
    finally:
        server.stop(signal.SIGKILL if variant.startswith("automount") else signal.SIGTERM)
        make_catatonic_under(mountpoint)
        detach_under(mountpoint)


def _with_ratios(rows: list[dict[str, object]]) -> list[dict[str, object]]:
    """``vs_ldapi`` and ``vs_automount`` (automount(8) at the same distance): medians over."""
    medians = {row["variant"]: row["median_us"] for row in rows}
    for row in rows:
        far = str(row["variant"]).endswith("1ms")
        refs = (
            ("pyautofs ldapi", "vs_ldapi"),
            (f"automount ldap{' 1ms' if far else ''}", "vs_automount"),
        )
        for ref, label in refs:
            mine, base = row["median_us"], medians.get(ref)
            assert isinstance(mine, float)
            row[label] = mine / base if isinstance(base, float) and base else math.nan
    return rows


def run(quick: bool, progress: Callable[[str], None]) -> list[dict[str, object]]:
    """Run the benchmark and return its result rows."""
    problem = check_environment(automount=True)
    if problem:
        raise RuntimeError(f"the ldap benchmark {problem}")
    slapd_mod = _slapd
    if slapd_mod.SLAPD is None:
        raise RuntimeError("the ldap benchmark needs OpenLDAP's slapd (Debian package slapd)")
    try:  # not "import ldap": this very file is "ldap" on the benchmarks' sys.path
        importlib.metadata.distribution("python-ldap")
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError(
            "the ldap benchmark needs python-ldap: pip install -e '.[ldap]'"
        ) from None
    p = _params(quick)
    enter_private_mount_namespace()
    rows: list[dict[str, object]] = []
    concurrent_total = p["clients"] * p["per_client"]
    with Workspace() as ws:
        keys = (
            key_names("w", 0, WARMUP)
            + key_names("k", 0, p["keys"])
            + key_names("s", 0, concurrent_total)
            + key_names("c", 0, concurrent_total)
        )
        entries = dict.fromkeys(keys, f"-fstype=bind :{ws.export}")
        slapd = slapd_mod.Slapd(slapd_mod.automount_map_ldif(MAP_DN_NAME, entries), tls=False)
        try:
            dn = f"automountMapName={MAP_DN_NAME},{slapd_mod.SUFFIX}"
            ldapi_conf = ws.write("ldapi.conf", f"LDAP_URI={slapd.ldapi_uri}\nLDAP_AUTH=external\n")
            tcp_conf = ws.write("tcp.conf", "")
            away = f"ldap://127.0.0.1:{_start_delay_line(ws, slapd.port, slapd_mod.free_port)}"
            sources: dict[str, tuple[str, str | None]] = {
                "pyautofs ldapi": (f"ldap:{dn}", ldapi_conf),
                "pyautofs ldap": (f"{slapd.ldap_uri}/{dn}", tcp_conf),
                "pyautofs file": (ws.write_map("auto.bench", keys), None),
                "automount ldap": (f"{slapd.ldap_uri}/{dn}", None),
                "pyautofs ldap 1ms": (f"{away}/{dn}", tcp_conf),
                "automount ldap 1ms": (f"{away}/{dn}", None),
            }
            samples: dict[str, list[int]] = {v: [] for v in VARIANTS}
            failed = dict.fromkeys(VARIANTS, 0)
            for r in range(p["rounds"]):
                order = VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)]
                for variant in order:
                    progress(f"round {r + 1}/{p['rounds']}: {variant}, {p['keys']} new keys")
                    with _serving(ws, variant, sources, f"r{r}", progress) as server:
                        (c,) = run_clients(ws, server.mountpoint, "k", [(0, p["keys"])])
                    samples[variant] += c.passes[0]
                    failed[variant] += len(c.errors[0])
            rows += _with_ratios(
                [
                    {
                        "variant": v,
                        "phase": "new key",
                        "n": len(samples[v]),
                        **summarize_us(samples[v]),
                        "failed": failed[v],
                    }
                    for v in VARIANTS
                ]
            )
            per = p["per_client"]
            single: dict[str, float] = {}
            for variant in VARIANTS:
                for phase, prefix, ranges in (
                    ("single client", "s", [(0, concurrent_total)]),
                    (
                        f"concurrent x{p['clients']}",
                        "c",
                        [(i * per, per) for i in range(p["clients"])],
                    ),
                ):
                    progress(f"{phase}: {variant}, {concurrent_total} new keys")
                    with _serving(ws, variant, sources, prefix, progress) as server:
                        runs = run_clients(ws, server.mountpoint, prefix, ranges)
                    ns = [v for c in runs for v in c.passes[0]]
                    wall = (max(c.t1_ns for c in runs) - min(c.t0_ns for c in runs)) / 1e9
                    keys_per_s = len(ns) / wall
                    single.setdefault(variant, keys_per_s)
                    rows.append(
                        {
                            "variant": variant,
                            "phase": phase,
                            "n": len(ns),
                            **summarize_us(ns),
                            "failed": sum(len(c.errors[0]) for c in runs),
                            "keys_per_s": keys_per_s,
                            "x_single": keys_per_s / single[variant],
                        }
                    )
        finally:
            slapd.remove()
    return [tidy(row) for row in rows]
