"""Dump an autofs mount, kill its owner, remove the mount, restore it into a new owner.

Everything is real: the owners are ``programs/restore_owner.py`` processes in their own
sessions (so their process group is theirs alone), clients are processes in yet other
sessions, and whether a lookup succeeded is the kernel's answer to the client. Every mount
is made catatonic before it is removed (no request can stay stuck), and every process is
killed and reaped.
"""

from __future__ import annotations

import errno
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _harness import DEADLINE, lookup, remove_mounts_under

from pyautofs._proto._packets import MissingIndirect, decode_packet
from pyautofs._restore._handover import HandoverFailed
from pyautofs._restore._pipeimage import PipeImage, snapshot_pipe
from pyautofs._restore._rebuild import restore_autofs_mount
from pyautofs._sys._autofs import AutofsControl
from pyautofs._sys._mount import AutofsMode, AutofsOptions, mount_autofs
from pyautofs._sys._mountinfo import (
    PipeHolder,
    find_autofs_mount,
    find_pipe_holders,
    read_mountinfo,
)
from pyautofs.restore import (
    AutofsImageError,
    AutofsMountImage,
    AutofsOwner,
    BeneathMount,
    dump_autofs_mount,
    list_autofs_mounts,
)

pytestmark = pytest.mark.kernel

OWNER = Path(__file__).parent / "programs" / "restore_owner.py"


class Owner:
    """A restore_owner.py process in its own session, and its JSON event lines."""

    def __init__(self, cfg: dict[str, Any], pass_fds: tuple[int, ...] = ()) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(OWNER), json.dumps(cfg)],
            stdout=subprocess.PIPE,
            pass_fds=pass_fds,
            start_new_session=True,
        )
        self.pid = self.proc.pid
        self._buf = b""

    def wait(self, key: str) -> dict[str, Any]:
        """The next event that has ``key``; fails after DEADLINE."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while True:
            while b"\n" in self._buf:
                line, self._buf = self._buf.split(b"\n", 1)
                event: dict[str, Any] = json.loads(line)
                if key in event:
                    return event
            ready, _, _ = select.select([fd], [], [], DEADLINE)
            if not ready:
                pytest.fail(f"owner {self.pid}: no {key!r} event within {DEADLINE} s")
            chunk = os.read(fd, 65536)
            if not chunk:
                pytest.fail(f"owner {self.pid} exited ({self.proc.wait(DEADLINE)}) before {key!r}")
            self._buf += chunk

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(DEADLINE)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


@pytest.fixture
def owners() -> Iterator[list[Owner]]:
    started: list[Owner] = []
    yield started
    for owner in started:
        owner.kill()


@pytest.fixture
def area(tmp_path: Path) -> Iterator[Path]:
    """A directory whose mounts are all removed at the end."""
    yield tmp_path
    remove_mounts_under(tmp_path)


def fdinfo_flags(pid: int, fd: int) -> int:
    with open(f"/proc/{pid}/fdinfo/{fd}") as f:
        return next(int(ln.split()[1], 8) for ln in f if ln.startswith("flags:"))


def seqpacket_pair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def start_adopter(
    owners: list[Owner], mp: Path, extra: dict[str, Any]
) -> tuple[Owner, socket.socket]:
    parent, child = seqpacket_pair()
    try:
        owner = Owner(
            {"mode": "adopt", "mount_point": str(mp), "sock_fd": child.fileno(), **extra},
            pass_fds=(child.fileno(),),
        )
    finally:
        child.close()
    owners.append(owner)
    return owner, parent


# -- end to end ------------------------------------------------------------------------


def test_systemd_style_direct_mount_migrates(area: Path, owners: list[Owner]) -> None:
    mp = area / "direct"
    mp.mkdir()
    src = area / "src"
    src.mkdir()
    (src / "hello").write_text("hi")
    a = Owner(
        {
            "mode": "mount",
            "mount_point": str(mp),
            "kind": "direct",
            "read_fd": 40,
            "write_fd": None,
            "bind_source": str(src),
            "nonblock": True,
            "timeout": 7,
        }
    )
    owners.append(a)
    a.wait("ready")
    assert lookup(mp / "hello", read=False)[0] == 0
    assert a.wait("answered")["answered"] == "MissingDirect"

    image = dump_autofs_mount(mp)
    assert image.mode is AutofsMode.DIRECT
    assert image.timeout == 7 and not image.catatonic
    assert image.owner is not None
    assert (image.owner.pid, image.owner.read_fd, image.owner.write_fd) == (a.pid, 40, None)
    assert image.owner.pgrp == a.pid and image.owner.read_nonblock
    assert not image.owner.keeps_write_end
    assert image.pipe is not None and image.pipe.packet_mode and image.pending_requests == 0
    assert [(h.pid, h.fd, h.end) for h in image.holders] == [(a.pid, 40, "read")]
    assert [(b.mount_point, b.fstype) for b in image.beneath] == [(str(mp), src_fstype(src))]
    image = AutofsMountImage.from_bytes(image.to_bytes())

    a.kill()
    remove_mounts_under(mp)
    assert not any(m.mount_point == str(mp) for m in read_mountinfo())

    b, sock = start_adopter(owners, mp, {"kind": "direct", "bind_source": str(src)})
    with sock:
        restored = restore_autofs_mount(image, owner=sock, timeout=DEADLINE)
    assert b.wait("ready")["read_fd"] == 40
    assert restored.owner_pid == b.pid and not restored.catatonic
    m = find_autofs_mount(mp)
    # A new superblock. Its anonymous device number is allocated afresh: it differs from the
    # dumped one unless the kernel happened to reuse the number the old mount freed.
    assert m.dev == restored.dev
    assert m.pgrp == b.pid and not m.catatonic and m.timeout == 7
    assert m.mode is AutofsMode.DIRECT
    assert m.pipe_ino == restored.pipe_ino
    assert os.readlink(f"/proc/{b.pid}/fd/40") == f"pipe:[{m.pipe_ino}]"
    assert fdinfo_flags(b.pid, 40) & os.O_NONBLOCK
    assert fdinfo_flags(b.pid, 40) & os.O_CLOEXEC
    # systemd style: nobody but the kernel holds a write end.
    assert [(h.pid, h.fd, h.end) for h in find_pipe_holders(m.pipe_ino or 0)] == [
        (b.pid, 40, "read")
    ]
    assert lookup(mp / "hello", read=False)[0] == 0
    assert b.wait("answered")["answered"] == "MissingDirect"
    assert (mp / "hello").read_text() == "hi"


def src_fstype(path: Path) -> str:
    """The fstype of the filesystem holding ``path`` (what a bind mount of it shows)."""
    dev = os.stat(path).st_dev
    return next(i.fstype for i in reversed(read_mountinfo()) if i.dev == dev)


def test_automount_style_indirect_mount_migrates(area: Path, owners: list[Owner]) -> None:
    mp = area / "indirect"
    mp.mkdir()
    a = Owner(
        {
            "mode": "mount",
            "mount_point": str(mp),
            "kind": "indirect",
            "read_fd": 41,
            "write_fd": 42,
            "timeout": 30,
        }
    )
    owners.append(a)
    a.wait("ready")
    assert lookup(mp / "before", read=False)[0] == 0
    assert a.wait("answered")["name"] == "before"

    [report] = [r for r in list_autofs_mounts() if r.mount.mount_point == str(mp)]
    assert report.state == "active" and report.write_end_held
    assert [(h.pid, h.fd) for h in report.readers] == [(a.pid, 41)]
    assert [(h.pid, h.fd) for h in report.writers] == [(a.pid, 42)]

    image = dump_autofs_mount(mp)
    assert image.owner is not None
    assert (image.owner.read_fd, image.owner.write_fd) == (41, 42)
    assert image.owner.keeps_write_end and not image.owner.read_nonblock
    assert image.mode is AutofsMode.INDIRECT and image.timeout == 30 and image.fd == 42
    image = AutofsMountImage.from_bytes(image.to_bytes())

    a.kill()
    remove_mounts_under(mp)

    b, sock = start_adopter(owners, mp, {"kind": "indirect"})
    with sock:
        restored = restore_autofs_mount(image, owner=sock, timeout=DEADLINE)
    b.wait("ready")
    m = find_autofs_mount(mp)
    assert m.pgrp == b.pid and m.fd == 42 and m.timeout == 30 and not m.catatonic
    holders = sorted((h.pid, h.fd, h.end) for h in find_pipe_holders(m.pipe_ino or 0))
    assert holders == [(b.pid, 41, "read"), (b.pid, 42, "write")]
    assert m.pipe_ino == restored.pipe_ino
    for key in ("after1", "after2"):
        assert lookup(mp / key, read=False)[0] == 0
        event = b.wait("answered")
        assert (event["answered"], event["name"]) == ("MissingIndirect", key)


def test_catatonic_mount_comes_back_catatonic(area: Path, owners: list[Owner]) -> None:
    mp = area / "cat"
    mp.mkdir()
    a = Owner(
        {"mode": "mount", "mount_point": str(mp), "kind": "indirect", "read_fd": 40, "write_fd": 41}
    )
    owners.append(a)
    a.wait("ready")
    with AutofsControl.open() as ctl:
        fd = ctl.openmount(mp, os.stat(mp).st_dev)
        try:
            ctl.catatonic(fd)
        finally:
            os.close(fd)
    image = dump_autofs_mount(mp)
    assert image.catatonic and image.owner is None and image.pipe is None
    a.kill()
    remove_mounts_under(mp)

    restored = restore_autofs_mount(AutofsMountImage.from_bytes(image.to_bytes()))
    assert restored.catatonic and restored.read_fd is None
    m = find_autofs_mount(mp)
    assert m.catatonic and m.fd == -1
    assert lookup(mp / "missing", read=False)[0] == errno.ENOENT


def test_restore_into_this_process(area: Path) -> None:
    """owner=None: the restoring process becomes the owner and answers the kernel itself."""
    mp = area / "self"
    mp.mkdir()
    # An image without an owner restores catatonic; give it one (automount style).
    image = AutofsMountImage(
        mount_point=str(mp),
        mode=AutofsMode.INDIRECT,
        source="pyautofs-test",
        timeout=5,
        owner=AutofsOwner(pid=1, pgrp=1, comm="x", read_fd=50, write_fd=51),
    )
    restored = restore_autofs_mount(image)
    assert restored.read_fd is not None and restored.write_fd is not None
    try:
        m = find_autofs_mount(mp)
        assert m.pgrp == os.getpgrp() and m.source == "pyautofs-test" and m.timeout == 5
        client = subprocess.Popen(
            [sys.executable, "-c", "import os, sys; os.stat(sys.argv[1])", str(mp / "k")],
            start_new_session=True,
        )
        try:
            ready, _, _ = select.select([restored.read_fd], [], [], DEADLINE)
            assert ready, "no packet from the kernel"
            pkt = decode_packet(os.read(restored.read_fd, 512))
            assert isinstance(pkt, MissingIndirect) and pkt.name == b"k"
            assert pkt.dev == restored.dev
            os.mkdir(mp / "k")
            with AutofsControl.open() as ctl:
                fd = ctl.openmount(mp, restored.dev)
                try:
                    ctl.ready(fd, pkt.token)
                finally:
                    os.close(fd)
            assert client.wait(DEADLINE) == 0
        finally:
            if client.poll() is None:
                client.kill()
                client.wait(DEADLINE)
    finally:
        remove_mounts_under(mp)
        os.close(restored.read_fd)
        os.close(restored.write_fd)


def test_pending_request_is_captured_without_consuming_it(area: Path, owners: list[Owner]) -> None:
    mp = area / "pending"
    mp.mkdir()
    a = Owner(
        {"mode": "mount", "mount_point": str(mp), "kind": "indirect", "read_fd": 40, "write_fd": 41}
    )
    owners.append(a)
    a.wait("ready")
    a.proc.send_signal(signal.SIGSTOP)
    client = subprocess.Popen(
        [sys.executable, "-c", "import os, sys; os.stat(sys.argv[1])", str(mp / "waiting")],
        start_new_session=True,
    )
    try:
        image = _dump_when_pending(mp)
        assert image.pending_requests == 1
        assert image.pipe is not None
        pkt = decode_packet(image.pipe.packets[0])
        assert isinstance(pkt, MissingIndirect) and pkt.name == b"waiting"
        a.proc.send_signal(signal.SIGCONT)
        assert a.wait("answered")["name"] == "waiting"  # the owner still got the packet
        assert client.wait(DEADLINE) == 0
    finally:
        a.proc.send_signal(signal.SIGCONT)
        if client.poll() is None:
            remove_mounts_under(mp)  # catatonic releases the client
            client.wait(DEADLINE)


def _dump_when_pending(mp: Path) -> AutofsMountImage:
    """Dump once the client's request is queued in the pipe (bounded wait)."""
    deadline = time.monotonic() + DEADLINE
    while True:
        image = dump_autofs_mount(mp)
        if image.pending_requests or time.monotonic() > deadline:
            return image
        time.sleep(0.01)


def test_handover_failure_detaches_the_new_mount(area: Path, owners: list[Owner]) -> None:
    """The owner cannot install at its fd numbers (busy): the restore fails cleanly."""
    mp = area / "busy"
    mp.mkdir()
    image = AutofsMountImage(
        mount_point=str(mp),
        mode=AutofsMode.INDIRECT,
        source="pyautofs-test",
        timeout=0,
        owner=AutofsOwner(pid=1, pgrp=1, comm="x", read_fd=0, write_fd=None),  # 0 is busy
    )
    b, sock = start_adopter(owners, mp, {"kind": "indirect"})
    with sock, pytest.raises(HandoverFailed, match="already open") as exc:
        restore_autofs_mount(image, owner=sock, timeout=DEADLINE)
    assert exc.value.errno == errno.EBUSY
    assert not any(m.mount_point == str(mp) for m in read_mountinfo())
    assert b.proc.wait(DEADLINE) != 0


# -- dump errors and the image format --------------------------------------------------


def test_dump_of_a_non_autofs_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no autofs mount"):
        dump_autofs_mount(tmp_path)


def test_dump_with_a_wrong_owner_pid(area: Path, owners: list[Owner]) -> None:
    mp = area / "wrong"
    mp.mkdir()
    a = Owner(
        {"mode": "mount", "mount_point": str(mp), "kind": "indirect", "read_fd": 40, "write_fd": 41}
    )
    owners.append(a)
    a.wait("ready")
    with pytest.raises(ProcessLookupError, match=f"pid {os.getpid()}"):
        dump_autofs_mount(mp, owner_pid=os.getpid())
    assert dump_autofs_mount(mp, owner_pid=a.pid).owner is not None


def sample_image() -> AutofsMountImage:
    return AutofsMountImage(
        mount_point="/mnt/x",
        mode=AutofsMode.DIRECT,
        source="systemd-1",
        timeout=300,
        uid=1000,
        gid=100,
        strictexpire=True,
        mount_options=("rw", "nosuid", "relatime"),
        dev=49,
        pipe_ino=12345,
        fd=5,
        pgrp=1,
        owner=AutofsOwner(pid=1, pgrp=1, comm="systemd", read_fd=40, write_fd=None),
        holders=(PipeHolder(pid=1, fd=40, end="read", comm="systemd", pgrp=1),),
        pipe=PipeImage(size=65536, packet_mode=True, packets=(b"p" * 304,)),
        beneath=(BeneathMount("/mnt/x", "nfs", "srv:/x"),),
    )


def test_image_round_trips() -> None:
    image = sample_image()
    assert AutofsMountImage.from_bytes(image.to_bytes()) == image
    assert AutofsMountImage.from_json(json.loads(json.dumps(image.to_json()))) == image
    assert int(image.mount_flags()) == 2  # MS_NOSUID


def _edit(change: dict[str, Any]) -> bytes:
    obj = sample_image().to_json()
    obj.update(change)
    return json.dumps(obj).encode()


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"\xff\xfe", "not JSON"),
        (b"[]", "JSON object"),
        (_edit({"format": "other"}), "not an autofs mount image"),
        (_edit({"version": 2}), "version 2"),
        (_edit({"mode": "sideways"}), "bad mode"),
        (_edit({"timeout": "300"}), "timeout must be int"),
        (_edit({"timeout": -1}), "timeout is negative"),
        (_edit({"catatonic": 1}), "catatonic must be bool"),
        (_edit({"uid": True}), "uid must be int"),
        (_edit({"pipe": "!!!"}), "bad pipe image"),
        (_edit({"pipe": "UFlBRlBJUEU="}), "bad pipe image"),
        (_edit({"owner": {"pid": 1}}), "owner.pgrp is missing"),
        (_edit({"holders": [1]}), r"holders\[0\]"),
        (_edit({"mount_options": [1]}), "must be strings"),
    ],
)
def test_corrupt_images_are_refused(raw: bytes, message: str) -> None:
    with pytest.raises(AutofsImageError, match=message):
        AutofsMountImage.from_bytes(raw)


def test_what_an_autofs_pipe_shows_through_each_end(area: Path) -> None:
    """The kernel sets O_DIRECT on the write side only: a read end shows no sign of it."""
    mp = area / "flags"
    mp.mkdir()
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        mount_autofs(mp, AutofsOptions(fd=w))
        assert fdinfo_flags(os.getpid(), w) & os.O_DIRECT
        assert not fdinfo_flags(os.getpid(), r) & os.O_DIRECT
        assert not snapshot_pipe(r).packet_mode  # empty, and the read end cannot tell
        assert snapshot_pipe(r, packet=True).packet_mode
        assert snapshot_pipe(w).packet_mode  # the write end can
    finally:
        os.close(r)
        os.close(w)


def test_orphaned_mount_is_dumped_without_owner(area: Path, owners: list[Owner]) -> None:
    """Owner killed, no lookup since: not catatonic yet, but nobody holds the read end."""
    mp = area / "orphan"
    mp.mkdir()
    a = Owner(
        {"mode": "mount", "mount_point": str(mp), "kind": "indirect", "read_fd": 40, "write_fd": 41}
    )
    owners.append(a)
    a.wait("ready")
    a.kill()
    image = dump_autofs_mount(mp)
    assert not image.catatonic and image.pipe_ino is not None and image.pipe_ino > 0
    assert image.owner is None and image.holders == () and image.pipe is None
    remove_mounts_under(mp)
    restored = restore_autofs_mount(image)
    assert restored.catatonic and find_autofs_mount(mp).catatonic
