"""Every /dev/autofs command and the legacy ioctls, against the real kernel, with the errno
a user sees on each error path. Clients run in their own sessions; every wait has a deadline.
"""

from __future__ import annotations

import errno
import os
import select
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

from pyautofs import AutofsMode
from pyautofs.lowlevel import (
    AUTOFS_SUPER_MAGIC,
    AutofsControl,
    AutofsOptions,
    ExpireFlags,
    ExpireIndirect,
    LegacyMountRoot,
    MissingDirect,
    MissingIndirect,
    MountFlags,
    Packet,
    UmountFlags,
    decode_packet,
    find_autofs_mount,
    mount,
    mount_autofs,
    umount2,
)

pytestmark = pytest.mark.kernel


@attrs.define
class Autofs:
    path: Path
    read_fd: int
    write_fd: int
    ctl: AutofsControl
    ioctlfd: int
    dev: int

    def packet(self, timeout: float = 10.0) -> Packet:
        ready, _, _ = select.select([self.read_fd], [], [], timeout)
        assert ready, "no packet from the kernel within the deadline"
        return decode_packet(os.read(self.read_fd, 512))


def make(tmp_path: Path, name: str = "mnt", **options: object) -> Autofs:
    mp = tmp_path / name
    mp.mkdir(exist_ok=True)
    r, w = os.pipe2(os.O_CLOEXEC)
    new_api = bool(options.pop("new_api", False))
    dev = mount_autofs(mp, AutofsOptions(fd=w, pgrp=os.getpgrp(), **options), new_api=new_api)  # type: ignore[arg-type]
    ctl = AutofsControl.open()
    return Autofs(mp, r, w, ctl, ctl.openmount(mp, dev), dev)


def destroy(a: Autofs) -> None:
    try:
        a.ctl.catatonic(a.ioctlfd)  # releases anyone still waiting
    except OSError:
        pass
    for sub in sorted(a.path.iterdir(), reverse=True):
        if os.path.ismount(sub):
            umount2(sub, UmountFlags.DETACH)
    os.close(a.ioctlfd)
    a.ctl.close()
    umount2(a.path, UmountFlags.DETACH)
    os.close(a.read_fd)
    os.close(a.write_fd)


@pytest.fixture
def autofs(tmp_path: Path) -> Iterator[Autofs]:
    a = make(tmp_path)
    try:
        yield a
    finally:
        destroy(a)


def client(path: Path) -> subprocess.Popen[bytes]:
    """stat(path) in a new session; exits with the errno (0 on success)."""
    code = f"import os,sys\ntry: os.stat({str(path)!r})\nexcept OSError as e: sys.exit(e.errno)"
    return subprocess.Popen([sys.executable, "-c", code], start_new_session=True)


def python_as(code: str, *prefix: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*prefix, sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.parametrize("new_api", [False, True])
def test_trigger_decode_and_ready(tmp_path: Path, new_api: bool) -> None:
    a = make(tmp_path, new_api=new_api)
    try:
        c = client(a.path / "key")
        pkt = a.packet()
        assert isinstance(pkt, MissingIndirect)
        assert (pkt.name, pkt.dev, pkt.tgid, pkt.uid) == (b"key", a.dev, c.pid, 0)
        assert pkt.ino == os.stat(a.path).st_ino
        os.mkdir(a.path / "key")
        a.ctl.ready(a.ioctlfd, pkt.token)
        assert c.wait(timeout=10) == 0
        with pytest.raises(OSError) as info:  # the token is spent
            a.ctl.ready(a.ioctlfd, pkt.token)
        assert info.value.errno == errno.EINVAL
    finally:
        destroy(a)


def test_fail_gives_the_requester_that_errno(autofs: Autofs) -> None:
    c = client(autofs.path / "key")
    pkt = autofs.packet()
    with pytest.raises(ValueError, match="negative errno"):
        autofs.ctl.fail(autofs.ioctlfd, pkt.token, errno.EHOSTDOWN)
    autofs.ctl.fail(autofs.ioctlfd, pkt.token, -errno.EHOSTDOWN)
    assert c.wait(timeout=10) == errno.EHOSTDOWN


def test_catatonic_then_setpipefd_takes_the_mount_over(autofs: Autofs) -> None:
    autofs.ctl.catatonic(autofs.ioctlfd)
    m = find_autofs_mount(autofs.path)
    assert m.catatonic and m.fd == -1 and m.pipe_ino == -1
    assert client(autofs.path / "key").wait(timeout=10) == errno.ENOENT
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        autofs.ctl.setpipefd(autofs.ioctlfd, w)
        m = find_autofs_mount(autofs.path)
        assert not m.catatonic and m.pipe_ino == os.fstat(r).st_ino
        c = client(autofs.path / "k2")
        ready, _, _ = select.select([r], [], [], 10)
        assert ready
        pkt = decode_packet(os.read(r, 512))
        autofs.ctl.fail(autofs.ioctlfd, pkt.token, -errno.ENOENT)
        assert c.wait(timeout=10) == errno.ENOENT
    finally:
        os.close(r)
        os.close(w)


def test_setpipefd_on_a_live_mount_is_ebusy(autofs: Autofs) -> None:
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        with pytest.raises(OSError) as info:
            autofs.ctl.setpipefd(autofs.ioctlfd, w)
        assert info.value.errno == errno.EBUSY
    finally:
        os.close(r)
        os.close(w)


def test_timeout_round_trips(autofs: Autofs) -> None:
    assert autofs.ctl.set_timeout(autofs.ioctlfd, 7) == 0
    assert find_autofs_mount(autofs.path).timeout == 7
    assert autofs.ctl.set_timeout(autofs.ioctlfd, 3) == 7


def test_versions(tmp_path: Path, autofs: Autofs) -> None:
    assert autofs.ctl.version() == (1, 1)
    assert autofs.ctl.protover(autofs.ioctlfd) == 5
    assert autofs.ctl.protosubver(autofs.ioctlfd) >= 5
    v4 = make(tmp_path, "v4", minproto=3, maxproto=4)
    try:
        assert v4.ctl.protover(v4.ioctlfd) == 4
    finally:
        destroy(v4)


def test_openmount_with_a_wrong_devid_is_enoent(autofs: Autofs) -> None:
    with pytest.raises(FileNotFoundError):
        autofs.ctl.openmount(autofs.path, autofs.dev + 12345)


def test_expire_askumount_and_ismountpoint(autofs: Autofs, tmp_path: Path) -> None:
    assert autofs.ctl.expire(autofs.ioctlfd, ExpireFlags.IMMEDIATE) is False  # nothing: EAGAIN
    assert autofs.ctl.askumount(autofs.ioctlfd) is True
    top = autofs.ctl.ismountpoint(autofs.path)
    assert top.mounted and top.magic == AUTOFS_SUPER_MAGIC and top.devid == autofs.dev
    assert autofs.ctl.ismountpoint(autofs.path, ioctlfd=autofs.ioctlfd).mounted is False
    src = tmp_path / "src"
    src.mkdir()
    c = client(autofs.path / "key")
    pkt = autofs.packet()
    os.mkdir(autofs.path / "key")
    mount(src, autofs.path / "key", None, MountFlags.BIND)
    autofs.ctl.ready(autofs.ioctlfd, pkt.token)
    assert c.wait(timeout=10) == 0
    assert autofs.ctl.askumount(autofs.ioctlfd) is False
    assert autofs.ctl.ismountpoint(autofs.path, ioctlfd=autofs.ioctlfd).mounted is True
    # EXPIRE blocks until its packet is answered: issue it from another thread.
    result: list[bool] = []
    t = threading.Thread(
        target=lambda: result.append(autofs.ctl.expire(autofs.ioctlfd, ExpireFlags.IMMEDIATE))
    )
    t.start()
    pkt = autofs.packet()
    assert isinstance(pkt, ExpireIndirect) and pkt.name == b"key"
    umount2(autofs.path / "key")
    os.rmdir(autofs.path / "key")
    autofs.ctl.ready(autofs.ioctlfd, pkt.token)
    t.join(10)
    assert result == [True]


def test_direct_mount_and_requester(tmp_path: Path) -> None:
    a = make(tmp_path, "direct", mode=AutofsMode.DIRECT)
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x")
    try:
        c = client(a.path / "f")
        pkt = a.packet()
        assert isinstance(pkt, MissingDirect) and pkt.dev == a.dev
        mount(src, a.path, None, MountFlags.BIND)
        a.ctl.ready(a.ioctlfd, pkt.token)
        assert c.wait(timeout=10) == 0
        assert a.ctl.requester(a.ioctlfd, a.path) == (0, 0)
        assert a.ctl.ismountpoint(a.path, ioctlfd=a.ioctlfd).mounted is True
        umount2(a.path)
    finally:
        destroy(a)


def test_legacy_ioctls_on_the_root(autofs: Autofs) -> None:
    root = os.open(autofs.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        legacy = LegacyMountRoot(root)
        assert legacy.protover() == 5
        assert legacy.protosubver() >= 5
        assert legacy.set_timeout(9) == 0
        assert find_autofs_mount(autofs.path).timeout == 9
        assert legacy.expire() is None
        assert legacy.expire_multi(ExpireFlags.IMMEDIATE) is False
        c = client(autofs.path / "key")
        pkt = autofs.packet()
        legacy.fail(pkt.token)
        assert c.wait(timeout=10) == errno.ENOENT
    finally:
        os.close(root)


def test_eperm_without_cap_sys_admin(autofs: Autofs) -> None:
    # In a new user namespace the child has no CAP_SYS_ADMIN over the initial namespace.
    code = (
        "import errno\nfrom pyautofs.lowlevel import AutofsControl\n"
        "ctl = AutofsControl.open()\nprint(ctl.version())\n"
        f"try: ctl.openmount({str(autofs.path)!r}, {autofs.dev})\n"
        "except PermissionError as e: print('EPERM', e.errno == errno.EPERM)\n"
    )
    out = python_as(code, "unshare", "--user")
    assert out.stdout.splitlines() == ["(1, 1)", "EPERM True"], out.stderr


def test_eacces_from_a_foreign_process_group(autofs: Autofs) -> None:
    code = (
        "import os\nfrom pyautofs.lowlevel import AutofsControl\n"
        f"ctl = AutofsControl.open()\nfd = ctl.openmount({str(autofs.path)!r}, {autofs.dev})\n"
        "try: ctl.protover(fd)\nexcept PermissionError as e: print('EACCES', e.errno)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=30,
        start_new_session=True,
        check=False,
    )
    assert out.stdout.strip() == f"EACCES {errno.EACCES}", out.stderr


def test_bad_pipe_and_timeout_option_errors(tmp_path: Path) -> None:
    mp = tmp_path / "m"
    mp.mkdir()
    with pytest.raises(OSError, match="not the write end of a pipe"):
        mount_autofs(mp, AutofsOptions(fd=0))
    with pytest.raises(ValueError, match="TIMEOUT ioctl"):
        AutofsOptions.from_string("fd=3,timeout=5")


def test_offset_mount_triggers_like_direct(tmp_path: Path) -> None:
    a = make(tmp_path, "offset", mode=AutofsMode.OFFSET)
    try:
        assert find_autofs_mount(a.path).mode is AutofsMode.OFFSET
        c = client(a.path / "x")
        pkt = a.packet()
        assert isinstance(pkt, MissingDirect)
        a.ctl.fail(a.ioctlfd, pkt.token, -errno.ENOENT)
        assert c.wait(timeout=10) == errno.ENOENT
    finally:
        destroy(a)


def test_per_key_timeout(autofs: Autofs) -> None:
    c = client(autofs.path / "key")
    pkt = autofs.packet()
    os.mkdir(autofs.path / "key")
    autofs.ctl.ready(autofs.ioctlfd, pkt.token)
    assert c.wait(timeout=10) == 0
    autofs.ctl.set_timeout(autofs.ioctlfd, 1)
    # Linux >= 6.12: returns the previous effective timeout (the superblock's, 1 s).
    assert autofs.ctl.set_key_timeout(autofs.ioctlfd, "key", 30) == 1
    with pytest.raises(FileNotFoundError):
        autofs.ctl.set_key_timeout(autofs.ioctlfd, "nosuchkey", 30)
    with pytest.raises(ValueError, match="bare key"):
        autofs.ctl.set_key_timeout(autofs.ioctlfd, "a/b", 30)
    os.rmdir(autofs.path / "key")


def test_mount_point_with_space_and_newline_in_mountinfo(tmp_path: Path) -> None:
    a = make(tmp_path, "odd name\nwith newline")
    try:
        m = find_autofs_mount(a.path)
        assert m.mount_point == str(a.path)
        assert m.dev == a.dev and m.pipe_ino == os.fstat(a.read_fd).st_ino
    finally:
        destroy(a)


def test_owned_mount_create_read_answer_drain_close(tmp_path: Path) -> None:
    from pyautofs.lowlevel import OwnedAutofsMount, bytes_queued

    src = tmp_path / "src"
    src.mkdir()
    with OwnedAutofsMount.create(tmp_path / "mnt", timeout=5) as owned:
        assert find_autofs_mount(tmp_path / "mnt").timeout == 5
        ok, bad = client(tmp_path / "mnt" / "ok"), client(tmp_path / "mnt" / "bad")
        got: dict[bytes, int] = {}
        for _ in range(2):
            data = owned.read_packet()
            assert data
            pkt = decode_packet(data)
            assert isinstance(pkt, MissingIndirect)
            got[pkt.name] = pkt.token
        os.mkdir(tmp_path / "mnt" / "ok")
        mount(str(src), str(tmp_path / "mnt" / "ok"), None, MountFlags.BIND)
        owned.ready(got[b"ok"])
        owned.fail(got[b"bad"], -errno.EACCES)
        assert ok.wait(timeout=10) == 0
        assert bad.wait(timeout=10) == errno.EACCES
        # Queued and never read: drain answers it.
        late = client(tmp_path / "mnt" / "late")
        for _ in range(1000):
            if bytes_queued(owned.read_fd):
                break
            select.select([], [], [], 0.01)
        assert owned.drain() == 1
        assert late.wait(timeout=10) == errno.ENOENT
        umount2(tmp_path / "mnt" / "ok", UmountFlags.DETACH)
    assert owned.read_fd == owned.ioctlfd == -1
    owned.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        owned.read_packet()
    assert not os.path.ismount(tmp_path / "mnt")


def test_owned_direct_mount_keeps_no_ioctl_fd_and_adopt_takes_a_mount_over(
    tmp_path: Path,
) -> None:
    from pyautofs.lowlevel import OwnedAutofsMount

    first = OwnedAutofsMount.create(tmp_path / "d", mode="direct", nonblocking=True)
    try:
        assert first.ioctlfd == -1 and first.read_packet() is None
        second = OwnedAutofsMount.adopt(tmp_path / "d", timeout=7)
        try:
            assert first.read_packet() == b""  # catatonic, then the pipe went to `second`
            am = find_autofs_mount(tmp_path / "d")
            assert (am.dev, am.timeout, am.catatonic) == (first.dev, 7, False)
            c = client(tmp_path / "d" / "x")
            data = second.read_packet()
            assert data
            pkt = decode_packet(data)
            assert isinstance(pkt, MissingDirect)
            second.fail(pkt.token, -errno.EHOSTDOWN)
            assert c.wait(timeout=10) == errno.EHOSTDOWN
        finally:
            second.close()
    finally:
        first.close(unmount=False)
    assert not os.path.ismount(tmp_path / "d")
