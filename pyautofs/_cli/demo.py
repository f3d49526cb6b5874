"""``pyautofs demo``: an automounter on a temporary mount point, watched as it works.

Everything happens in a private mount namespace, so nothing can leak onto the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap

from .._engine._demo import DemoEvent, Lookup, run_demo
from .._proto._stats import percentile
from .._sys._mount import unshare_mount_namespace
from ._errors import environment_problem
from ._options import positive_int

DESCRIPTION = """\
Start an automounter on a temporary mount point with an embedded map (bind mounts, a tmpfs,
a wildcard and a missing key), trigger lookups from another process group, show what the
kernel asked and what was answered, print the latency of new and mounted keys, and shut
down leaving nothing behind. Needs root and /dev/autofs, nothing else: it runs in a private
mount namespace, so no mount of it is ever visible on the machine."""

EXAMPLES = """\
examples:
  pyautofs demo            run the demo (as root)
  pyautofs demo -n 1000    measure latency over 1000 new keys
  pyautofs demo --keys 50  a quicker latency run

exit status: 0 when every lookup was answered as expected and nothing was left mounted.
"""

# The client runs in its own session: lookups from the automounter's process group never
# trigger mounts. It stats keys and prints one JSON line per lookup.
_CLIENT = textwrap.dedent(
    """
    import json, os, sys, time
    root = sys.argv[1]
    for key in sys.argv[2:]:
        t0 = time.perf_counter_ns()
        try:
            os.stat(os.path.join(root, key, "hello.txt") if not key.startswith("=") else
                    os.path.join(root, key[1:]))
            err = 0
        except OSError as exc:
            err = exc.errno
        dt = time.perf_counter_ns() - t0
        print(json.dumps([key.lstrip("="), err, dt / 1000]), flush=True)
    """
)


HELP = "run an automounter on a temporary mount point and show it working"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``pyautofs demo``."""
    p.add_argument(
        "-n",
        "--keys",
        type=positive_int,
        default=200,
        metavar="N",
        help="new keys for the latency run (default 200)",
    )


def _client(mountpoint: str, keys: list[str]) -> list[Lookup]:
    out = subprocess.run(
        [sys.executable, "-c", _CLIENT, mountpoint, *keys],
        capture_output=True,
        check=True,
        start_new_session=True,
        timeout=120,
        text=True,
    ).stdout
    return [tuple(json.loads(line)) for line in out.splitlines()]


def main(args: argparse.Namespace) -> int:
    """Run the demo; returns the exit status."""
    problem = environment_problem("demo")
    if problem:
        print(problem, file=sys.stderr)
        return 1
    unshare_mount_namespace()  # before any thread exists
    workdir = tempfile.mkdtemp(prefix="pyautofs-demo-")
    try:
        return _run(workdir, args.keys)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _run(workdir: str, nkeys: int) -> int:
    exports = os.path.join(workdir, "exports")
    mountpoint = os.path.join(workdir, "mnt")
    for name in ("alpha", "beta", "shared"):
        os.makedirs(os.path.join(exports, name))
        with open(os.path.join(exports, name, "hello.txt"), "w") as f:
            f.write(f"hello from {name}\n")
    print("pyautofs demo: an automounter in a private mount namespace\n")
    print(f"  mount point  {mountpoint} (indirect autofs)")
    print("  map          alpha  -fstype=bind :" + exports + "/alpha")
    print("               beta   -fstype=bind :" + exports + "/beta")
    print("               scratch -fstype=tmpfs,size=4m")
    print("               *      -fstype=bind :" + exports + "/shared   (wildcard)")
    print("               nosuch (no entry: fails with ENOENT)\n")
    print(f"  {'lookup':<9} {'request from':<24} {'answer':<7} {'handler':>8}   client saw")

    def on_event(event: DemoEvent) -> None:
        requester = f"pid {event.pid} ({event.command})"
        print(f"  {event.key:<9} {requester:<24} {event.answer:<7} {event.micros:>6.0f}us", end="")

    def on_lookup(lookup: Lookup, requested: bool) -> None:
        key, err, micros = lookup
        if not requested:
            why = "(answered from the negative cache)" if err else "(already mounted: no request)"
            print(f"  {key:<9} {why:<41}", end="")
        seen = "ok" if err == 0 else os.strerror(err)
        print(f"   {seen}, {micros:.0f}us")

    def client(keys: list[str]) -> list[Lookup]:
        return _client(mountpoint, keys)

    result = run_demo(
        mountpoint, exports, nkeys, on_event=on_event, on_lookup=on_lookup, client=client
    )
    new = [m for _, err, m in result.latency if err == 0]
    again = [m for _, err, m in result.again if err == 0]
    failed = sum(1 for _, err, _ in result.latency if err)
    print(f"\nlatency of a stat() from another session ({len(new)} new keys, {failed} failed):")
    if new:
        print(
            f"  new key (trigger, bind mount, READY)   median {statistics.median(new):7.1f}us"
            f"   p90 {percentile(new, 0.9):7.1f}us   p99 {percentile(new, 0.99):7.1f}us"
        )
    if again:
        print(
            f"  already mounted                        median {statistics.median(again):7.1f}us"
            f"   p90 {percentile(again, 0.9):7.1f}us   p99 {percentile(again, 0.99):7.1f}us"
        )
    st = result.stats
    print(
        f"\nengine: {st.requests} requests, {st.ready} ready, {st.failed} failed, "
        f"{st.negative_hits} answered from the negative cache"
    )
    print(f"expire: {result.expired} idle keys unmounted by an immediate expire pass")
    print(f"shutdown: {result.shutdown_ms:.1f} ms; autofs mounts left behind: {result.leftover}")
    return 0 if result.leftover == 0 and failed == 0 else 1
