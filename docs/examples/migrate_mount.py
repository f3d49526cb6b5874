"""Migrating an autofs mount: find its owner by pipe_ino, dump it, rebuild it elsewhere,
and hand the new pipe to a restored process over a unix socket."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pyautofs
from pyautofs.lowlevel import AutofsControl, UmountFlags, umount2, unshare_mount_namespace

ROOT = tempfile.mkdtemp(prefix="migrate-")
MNT, NEW = os.path.join(ROOT, "mnt"), os.path.join(ROOT, "new")
# Lock files in the scratch directory, not in /run/pyautofs on the host.
SERVE = [sys.executable, "-m", "pyautofs", "serve", "--lock-dir", f"{ROOT}/locks"]


def start_daemon() -> subprocess.Popen[bytes]:
    """The daemon to migrate: `pyautofs serve` on a one-line map (any autofs daemon would do)."""
    os.makedirs(os.path.join(ROOT, "exports", "data"))
    os.makedirs(NEW)  # a restore recreates mounts on existing directories
    with open(os.path.join(ROOT, "auto.map"), "w") as f:
        f.write(f"* :{ROOT}/exports/&\n")
    daemon = subprocess.Popen(
        [*SERVE, MNT, f"{ROOT}/auto.map"],
        start_new_session=True,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while not any(r.mount.mount_point == MNT for r in pyautofs.list_autofs_mounts()):
        assert time.monotonic() < deadline and daemon.poll() is None, "serve did not start"
        time.sleep(0.05)
    subprocess.run(["ls", f"{MNT}/data"], start_new_session=True, check=True)  # mount a key
    return daemon


def main() -> None:
    daemon = start_daemon()
    try:
        worker = pyautofs.start_worker()  # stands in for the restored daemon process
        # 1. Which process owns the mount? The kernel's pipe_ino= names the pipe.
        (report,) = [r for r in pyautofs.list_autofs_mounts() if r.mount.mount_point == MNT]
        readers = [(h.pid, h.comm, h.fd) for h in report.readers]
        print(f"{MNT}: pipe_ino={report.mount.pipe_ino}, readers (pid, command, fd): {readers}")
        # 2. Dump it: options, owner and its fd numbers, queued requests, what is beneath.
        image = pyautofs.dump_autofs_mount(MNT)
        assert image.owner is not None
        print(
            f"dumped: mode={image.mode.value} timeout={image.timeout}s owner pid="
            f"{image.owner.pid} read_fd={image.owner.read_fd} write_fd={image.owner.write_fd}"
        )
        # 3. Rebuild it at NEW and hand its pipe to the worker at the same fd number.
        done = pyautofs.restore_to_workers(
            [(worker.sock, [pyautofs.MountJob(image, mount_point=NEW)])], timeout=30
        )
        (new,) = [r for r in pyautofs.list_autofs_mounts() if r.mount.mount_point == NEW]
        print(
            f"restored at {NEW}: pipe_ino={new.mount.pipe_ino}, "
            f"readers (pid, fd): {[(h.pid, h.fd) for h in new.readers]}"
        )
        print(
            f"the worker (pid {worker.pid}) holds the read end at fd "
            f"{image.owner.read_fd}: {new.readers[0].pid == worker.pid}"
        )
        print(f"took {done.prepare_seconds * 1e3:.1f} ms + {done.confirm_seconds * 1e3:.1f} ms")
    finally:
        with AutofsControl.open() as ctl:  # the worker serves nothing: retire the copy
            for r in pyautofs.list_autofs_mounts():
                if r.mount.mount_point == NEW:
                    fd = ctl.openmount(NEW, r.mount.dev)
                    ctl.catatonic(fd)
                    os.close(fd)
                    umount2(NEW, UmountFlags.DETACH)
        if "worker" in locals():
            worker.close()
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=30)
        shutil.rmtree(ROOT)


if __name__ == "__main__":
    unshare_mount_namespace()
    main()
