"""Upgrading a running automounter: Automounter.hand_over passes every mount to a fresh
process started from the code on disk, and no lookup fails, not even one in flight."""

import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

import pyautofs
import pyautofs.restore
from pyautofs.lowlevel import unshare_mount_namespace

# -- the automounter: `python upgrade.py serve ROOT` ------------------------------------


def note(root: str, *words: object) -> None:
    """One line in ROOT/events, for main() to follow: our pid, then what happened."""
    with open(f"{root}/events", "a") as events:
        print(os.getpid(), *words, file=events)


async def serve(root: str) -> None:
    """Bind ROOT/exports/<key> on ROOT/mnt/<key>; SIGUSR2 upgrades, SIGTERM stops."""

    async def on_missing(request: pyautofs.MountRequest) -> None:
        if request.key == "slow":  # a slow mount, still running during the upgrade
            note(root, "started slow")
            await trio.sleep(2)
        pyautofs.bind_mount(f"{root}/exports/{request.key}", request.path)
        note(root, "mounted", request.key)

    automounter = pyautofs.Automounter(lock_dir=f"{root}/locks")
    automounter.add_mount(f"{root}/mnt", on_missing)
    with trio.open_signal_receiver(signal.SIGUSR2, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            # A successor finds PYAUTOFS_HANDOVER_FD here and takes the live mounts over.
            await nursery.start(
                functools.partial(
                    automounter.run,
                    handover_fd=pyautofs.Automounter.upgrade_fd_from_environment(),
                )
            )
            note(root, "serving")
            async for signum in signals:
                if signum == signal.SIGTERM:
                    automounter.stop()  # graceful: unmount the keys and the autofs mount
                    break
                # SIGUSR2: start this file as it is on disk now, in our process group.
                successor = await automounter.hand_over([sys.executable, __file__, "serve", root])
                if successor is not None:  # None: it failed, and we go on serving
                    note(root, "handed over to", successor)
                    break  # run() returns without touching the mounts


# -- the operator: start it, use it, upgrade it, use it again ----------------------------


def wait_for(root: str, line: str) -> None:
    deadline = time.monotonic() + 20
    while line not in Path(f"{root}/events").read_text().splitlines():
        assert time.monotonic() < deadline, f"no {line!r} in the events"
        time.sleep(0.02)


def readers(root: str) -> list[int]:
    """The pids that read the mount's request pipe (found through pipe_ino)."""
    for report in pyautofs.restore.list_autofs_mounts():
        if report.mount.mount_point == f"{root}/mnt":
            return [h.pid for h in report.readers]
    return []


def cat(root: str, key: str) -> subprocess.Popen[str]:
    """Read ROOT/mnt/<key>/f from another session (lookups from the owner's group never
    trigger)."""
    return subprocess.Popen(
        ["cat", f"{root}/mnt/{key}/f"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def main() -> None:
    root = tempfile.mkdtemp(prefix="upgrade-")
    for key in ("before", "slow", "after"):
        os.makedirs(f"{root}/exports/{key}")
        with open(f"{root}/exports/{key}/f", "w") as f:
            f.write(f"{key}: read through the automount")
    Path(f"{root}/events").touch()
    old = subprocess.Popen([sys.executable, __file__, "serve", root], start_new_session=True)
    slow: subprocess.Popen[str] | None = None
    try:
        wait_for(root, f"{old.pid} serving")
        print(cat(root, "before").communicate(timeout=30)[0])
        slow = cat(root, "slow")  # its handler sleeps 2 s in the old process
        wait_for(root, f"{old.pid} started slow")
        old.send_signal(signal.SIGUSR2)  # upgrade now, with a request in flight
        print("old process exited with", old.wait(timeout=30))
        print(slow.communicate(timeout=30)[0], f"(exit status {slow.returncode})")
        print(cat(root, "after").communicate(timeout=30)[0])
        (new,) = readers(root)
        print("the pipe is now read by the successor:", new not in (old.pid, os.getpid()))
    finally:
        for proc in (old, slow):  # only left running if something went wrong
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
        for pid in readers(root):
            os.kill(pid, signal.SIGTERM)  # the successor shuts down gracefully
        deadline = time.monotonic() + 30
        while readers(root) and time.monotonic() < deadline:
            time.sleep(0.02)
    names = {old.pid: "old", new: "new"}
    print("events:")
    for line in Path(f"{root}/events").read_text().splitlines():
        words = [names.get(int(w), w) if w.isdigit() else w for w in line.split()]
        print("  " + " ".join(words))
    mounts = [r.mount.mount_point for r in pyautofs.restore.list_autofs_mounts()]
    print("autofs mounts left:", mounts)
    shutil.rmtree(root)


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        trio.run(serve, sys.argv[2])
    else:
        unshare_mount_namespace()  # nothing this example mounts can reach the host
        main()
