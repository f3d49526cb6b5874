"""Migrating an autofs mount: find its owner by pipe_ino, dump it, stop the owner, rebuild
the mount, and hand the new pipe to the restored owner at the fd number the old one used."""

import errno
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pyautofs
import pyautofs.restore
from pyautofs.lowlevel import (
    AutofsControl,
    MissingIndirect,
    UmountFlags,
    decode_packet,
    umount2,
    unshare_mount_namespace,
)
from pyautofs.restore import AutofsHandover

# -- the restored owner: `python migrate_mount.py restored SOCK_FD EXPORTS` --------------


def restored_owner(sock: socket.socket, exports: str) -> None:
    """Take the mount over as the coordinator sends it, then serve it until EOF on sock.

    A real restore would put the checkpointed daemon itself here; this one answers each
    request with a bind mount of EXPORTS/<key>, reading the pipe at its old fd number.
    """
    (adopted,) = pyautofs.restore.accept_handover(
        sock
    )  # install at the old numbers, SETPIPEFD, confirm
    item, fd = adopted.item, adopted.read_fd
    assert isinstance(item, AutofsHandover) and fd is not None
    mounted = []
    with AutofsControl.open() as ctl:
        ioctlfd = ctl.openmount(item.mount_point, item.dev)
        sock.send(f"serving {item.mount_point}, reading its pipe on fd {fd}".encode())
        while fd in select.select([fd, sock.fileno()], [], [])[0]:  # sock readable: EOF, stop
            try:
                packet = decode_packet(os.read(fd, 512))  # one read, one packet
            except BlockingIOError:
                continue
            assert isinstance(packet, MissingIndirect)  # we never ask the kernel to expire
            key = os.fsdecode(packet.name)
            target = os.path.join(item.mount_point, key)
            try:
                os.mkdir(target)
                pyautofs.bind_mount(os.path.join(exports, key), target)
            except OSError as exc:
                ctl.fail(ioctlfd, packet.token, -(exc.errno or errno.EIO))
                continue
            mounted.append(target)
            ctl.ready(ioctlfd, packet.token)
            sock.send(f"mounted {key!r} for pid {packet.pid}, read from fd {fd}".encode())
        for target in mounted:  # shut down: unmount what we mounted, then the autofs mount
            pyautofs.unmount(target)
        ctl.catatonic(ioctlfd)
        os.close(ioctlfd)
        umount2(item.mount_point, UmountFlags.DETACH)


# -- the migration ------------------------------------------------------------------------


def cat(path: str) -> str:
    done = subprocess.run(
        ["cat", path],
        capture_output=True,
        text=True,
        start_new_session=True,
        timeout=30,
        check=False,
    )
    return done.stdout if done.returncode == 0 else done.stderr.strip()


def owner_of(mnt: str) -> pyautofs.restore.AutofsMountReport | None:
    """The mount's report if a process reads its pipe (mountinfo's pipe_ino= vs /proc)."""
    for report in pyautofs.restore.list_autofs_mounts():
        if report.mount.mount_point == mnt and report.readers:
            return report
    return None


def main() -> None:
    root = tempfile.mkdtemp(prefix="migrate-")
    mnt, exports = f"{root}/mnt", f"{root}/exports"
    os.makedirs(f"{exports}/data")
    with open(f"{exports}/data/hello", "w") as f:
        f.write("hello through the automount")
    with open(f"{root}/auto.map", "w") as f:
        f.write(f"* :{exports}/&\n")
    # The daemon to migrate: `pyautofs serve` here, but any autofs daemon would do.
    serve = ["serve", "--lock-dir", f"{root}/locks", mnt, f"{root}/auto.map"]
    old = subprocess.Popen(
        [sys.executable, "-m", "pyautofs", *serve],
        start_new_session=True,
        stderr=subprocess.DEVNULL,
    )
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    restored: subprocess.Popen[bytes] | None = None
    try:
        deadline = time.monotonic() + 20
        while (report := owner_of(mnt)) is None:
            assert time.monotonic() < deadline and old.poll() is None, "serve did not start"
            time.sleep(0.02)
        print("before:", cat(f"{mnt}/data/hello"))

        # 1. Who owns the mount? pipe_ino= in mountinfo names the pipe; /proc/*/fd has it.
        (reader,) = report.readers
        print(f"pipe_ino={report.mount.pipe_ino} is read by pid {reader.pid} on fd {reader.fd}")

        # 2. Dump it: options, timeout, owner and its fd numbers, queued requests.
        image = pyautofs.restore.dump_autofs_mount(mnt)
        saved = image.to_bytes()  # what a checkpoint would store
        assert image.owner is not None
        old_fd = image.owner.read_fd
        print(
            f"dumped: {image.mode.value}, timeout {image.timeout} s, owner fd {old_fd}, "
            f"{image.pending_requests} queued request(s), {len(saved)} bytes"
        )

        # 3. The checkpoint ends: the old owner goes, and so does its mount.
        old.kill()
        old.wait(timeout=30)
        umount2(mnt, UmountFlags.DETACH)  # the autofs mount and the key mounted on it
        print("old owner killed, mount removed:", not os.path.ismount(mnt))

        # 4. Restore: start the new owner, rebuild the mount, hand it the new pipe.
        restored = subprocess.Popen(
            [sys.executable, __file__, "restored", str(theirs.fileno()), exports],
            pass_fds=[theirs.fileno()],
            start_new_session=True,  # its process group becomes the mount's owner
        )
        theirs.close()
        image = pyautofs.restore.AutofsMountImage.from_bytes(saved)
        done = pyautofs.restore.restore_autofs_mount(image, owner=ours, timeout=30)
        print(f"rebuilt: pipe_ino={done.pipe_ino}, taken over by the new owner:", end=" ")
        print(done.owner_pid == restored.pid)
        ours.settimeout(30)
        print("restored owner:", ours.recv(4096).decode())

        # 5. The migrated mount serves lookups again.
        print("after:", cat(f"{mnt}/data/hello"))
        print("restored owner:", ours.recv(4096).decode())
        report = owner_of(mnt)
        assert report is not None
        (reader,) = report.readers
        print("same fd as the old owner:", reader.pid == restored.pid and reader.fd == old_fd)
    finally:
        if old.poll() is None:
            old.terminate()
        ours.close()  # the restored owner unmounts everything and exits
        theirs.close()
        for proc in (old, restored):
            if proc is not None and proc.poll() is None:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=30)
    print(
        "autofs mounts left:", [r.mount.mount_point for r in pyautofs.restore.list_autofs_mounts()]
    )
    shutil.rmtree(root)


if __name__ == "__main__":
    if sys.argv[1:2] == ["restored"]:
        restored_owner(socket.socket(fileno=int(sys.argv[2])), sys.argv[3])
    else:
        unshare_mount_namespace()  # nothing this example mounts can reach the host
        main()
