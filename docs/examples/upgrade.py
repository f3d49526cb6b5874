"""Upgrading a running automounter: SIGUSR2 hands every mount to a fresh process."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pyautofs
from pyautofs.lowlevel import unshare_mount_namespace

ROOT = tempfile.mkdtemp(prefix="upgrade-")
MNT = os.path.join(ROOT, "mnt")
# Lock files in the scratch directory, not in /run/pyautofs on the host.
SERVE = [sys.executable, "-m", "pyautofs", "serve", "--lock-dir", f"{ROOT}/locks"]


def reader_of_the_pipe() -> tuple[int, ...]:
    """Which processes read the mount's request pipe now (found through pipe_ino)."""
    for report in pyautofs.list_autofs_mounts():
        if report.mount.mount_point == MNT:
            return tuple(h.pid for h in report.readers)
    return ()


def cat(key: str) -> str:
    done = subprocess.run(
        ["cat", f"{MNT}/{key}/f"],
        capture_output=True,
        text=True,
        start_new_session=True,
        timeout=30,
        check=False,
    )
    return done.stdout if done.returncode == 0 else "failed"


def main() -> None:
    for key in ("before", "after"):
        os.makedirs(f"{ROOT}/exports/{key}")
        with open(f"{ROOT}/exports/{key}/f", "w") as f:
            f.write(f"{key} the upgrade")
    with open(f"{ROOT}/auto.map", "w") as f:
        f.write(f"* :{ROOT}/exports/&\n")
    old = subprocess.Popen(
        [*SERVE, MNT, f"{ROOT}/auto.map"],
        start_new_session=True,  # its own process group: the successor joins it
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while reader_of_the_pipe() != (old.pid,):
            assert time.monotonic() < deadline and old.poll() is None
            time.sleep(0.05)
        print("serving, pid", old.pid, "|", cat("before"))
        old.send_signal(signal.SIGUSR2)  # start the code on disk now; hand everything over
        print("old process exited with", old.wait(timeout=30))
        (new,) = reader_of_the_pipe()
        print("the pipe is read by the successor:", new != old.pid)
        print(cat("before"), "(mounted before, still there) |", cat("after"), "(new key)")
        os.kill(new, signal.SIGTERM)
        while reader_of_the_pipe():
            time.sleep(0.05)
    finally:
        if old.poll() is None:
            old.kill()
            old.wait()
        for pid in reader_of_the_pipe():
            os.kill(pid, signal.SIGTERM)
    time.sleep(0.2)
    print("autofs mounts left:", [r.mount.mount_point for r in pyautofs.list_autofs_mounts()])
    shutil.rmtree(ROOT)


if __name__ == "__main__":
    unshare_mount_namespace()
    main()
