"""Your first automounter: bind-mount /exports/<key> on /mnt/<key> when someone looks."""

import errno
import os
import shutil
import subprocess
import sys
import tempfile

import trio

import pyautofs
from pyautofs.lowlevel import unshare_mount_namespace

ROOT = tempfile.mkdtemp(prefix="first-automounter-")
EXPORTS = os.path.join(ROOT, "exports")
MNT = os.path.join(ROOT, "mnt")


async def on_missing(request: pyautofs.MountRequest) -> None:
    """The kernel asks for request.key; returning means READY, OSError means FAIL."""
    source = os.path.join(EXPORTS, request.key)
    if not os.path.isdir(source):
        raise OSError(errno.ENOENT, "no such export", source)
    pyautofs.bind_mount(source, request.path)
    print(f"mounted {source} for pid {request.requester.pid}")


async def look(path: str) -> str:
    """Read a file from another session: lookups from our own process group never trigger."""
    done = await trio.run_process(
        [sys.executable, "-c", f"print(open({path!r}).read(), end='')"],
        capture_stdout=True,
        check=False,
        start_new_session=True,
        stderr=subprocess.DEVNULL,
    )
    return done.stdout.decode() if done.returncode == 0 else f"failed ({done.returncode})"


async def main() -> None:
    os.makedirs(os.path.join(EXPORTS, "hello"))
    with open(os.path.join(EXPORTS, "hello", "greeting"), "w") as f:
        f.write("hello from an automounted directory")
    automounter = pyautofs.Automounter(lock_dir=os.path.join(ROOT, "locks"))
    automounter.add_mount(MNT, on_missing, timeout=60)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(automounter.run)  # returns once the mount is live
            print("hello:", await look(os.path.join(MNT, "hello", "greeting")))
            print("nosuch:", await look(os.path.join(MNT, "nosuch", "greeting")))
            stats = automounter.statistics()
            print(f"requests={stats.requests} ready={stats.ready} failed={stats.failed}")
            nursery.cancel_scope.cancel()  # graceful shutdown: unmounts what it mounted
    print("mounted after shutdown:", os.path.ismount(os.path.join(MNT, "hello")))
    shutil.rmtree(ROOT)


if __name__ == "__main__":
    unshare_mount_namespace()  # a private mount namespace: nothing can leak onto the host
    trio.run(main)
