"""A small library-level automounter used by the handover tests.

Usage: handover_server.py MOUNTPOINT SOURCE_DIR LOGFILE [--slow KEY] [--crash-on-start]

It bind-mounts SOURCE_DIR on every key. SIGUSR2 hands the mounts to a successor started
from this same script (with the same arguments); SIGTERM shuts down gracefully. It appends
one JSON line per event to LOGFILE.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys

import trio

import pyautofs


def log(path: str, **event: object) -> None:
    with open(path, "a") as f:
        f.write(json.dumps({"pid": os.getpid(), **event}) + "\n")


async def main() -> int:
    mountpoint, source, logfile, *rest = sys.argv[1:]
    slow_key = rest[rest.index("--slow") + 1] if "--slow" in rest else None
    if "--crash-on-start" in rest and os.environ.get("PYAUTOFS_HANDOVER_FD"):
        log(logfile, event="crash")
        return 3

    async def on_missing(request: pyautofs.MountRequest) -> None:
        if request.key == slow_key:
            log(logfile, event="slow-start", key=request.key)
            await trio.sleep(1.5)
        pyautofs.bind_mount(source, request.path)
        log(logfile, event="mounted", key=request.key)

    automounter = pyautofs.Automounter(lock_dir=os.path.join(os.path.dirname(logfile), "locks"))
    automounter.add_mount(mountpoint, on_missing)
    successor = os.environ.get("PYAUTOFS_HANDOVER_FD") is not None
    async with trio.open_nursery() as nursery:
        await nursery.start(
            functools.partial(
                automounter.run,
                handover_fd=pyautofs.Automounter.upgrade_fd_from_environment(),
            )
        )
        log(logfile, event="serving", successor=successor)
        with trio.open_signal_receiver(signal.SIGUSR2, signal.SIGTERM) as signals:
            async for signum in signals:
                if signum == signal.SIGTERM:
                    automounter.stop()
                    break
                argv = [sys.executable, *sys.argv]
                pid = await automounter.hand_over(argv, timeout=5)
                log(logfile, event="handover", successor_pid=pid)
                if pid is not None:
                    break
    log(logfile, event="exit")
    return 0


if __name__ == "__main__":
    sys.exit(trio.run(main))
