"""SCM_RIGHTS fd passing: any count, close-on-exec, and no leak on any failure path."""

from __future__ import annotations

import array
import fcntl
import os
import re
import resource
import signal
import socket
import stat
import struct

import pytest
import trio

from pyautofs import FdChannel, FdPassError, peer_credentials, recv_fds, send_fds
from pyautofs.restore import accept_peer, worker_listener

KINDS = [socket.SOCK_STREAM, socket.SOCK_SEQPACKET]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def fresh_files(n: int) -> list[int]:
    """``n`` distinct open files (pipe ends), so identity checks mean something."""
    out: list[int] = []
    while len(out) < n:
        r, w = os.pipe()
        out += [r, w]
    for fd in out[n:]:
        os.close(fd)
    return out[:n]


def child_sends(sock: socket.socket, fds: list[int], data: bytes) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            send_fds(sock, fds, data)
        finally:
            os._exit(0)
    return pid


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("count", [1, 253, 254, 1000])
def test_fds_cross_processes_intact(kind: int, count: int) -> None:
    a, b = socket.socketpair(socket.AF_UNIX, kind)
    files = fresh_files(count)
    payload = os.urandom(10_000)
    pid = child_sends(b, files, payload)
    try:
        data, fds = recv_fds(a)
        assert data == payload
        assert len(fds) == count
        for got, sent in zip(fds, files, strict=True):  # identity and order
            assert (os.fstat(got).st_dev, os.fstat(got).st_ino) == (
                os.fstat(sent).st_dev,
                os.fstat(sent).st_ino,
            )
            assert fcntl.fcntl(got, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        for fd in fds:
            os.close(fd)
    finally:
        os.waitpid(pid, 0)
        for fd in files:
            os.close(fd)
        a.close()
        b.close()


def test_many_messages_in_a_row_on_a_stream_keep_their_fds_apart() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    files = fresh_files(6)
    try:
        for i in range(1, 6):
            send_fds(b, files[:i], b"m" * i)
        for i in range(1, 6):
            data, fds = recv_fds(a)
            assert data == b"m" * i and len(fds) == i
            for fd in fds:
                os.close(fd)
    finally:
        for fd in files:
            os.close(fd)
        a.close()
        b.close()


@pytest.mark.parametrize("kind", KINDS)
def test_foreign_message_is_refused_and_its_fds_closed(kind: int) -> None:
    a, b = socket.socketpair(socket.AF_UNIX, kind)
    files = fresh_files(3)
    before = open_fds()
    try:
        b.sendmsg(
            [b"hello there, not ours"],
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", files))],
        )
        with pytest.raises(FdPassError, match="not a pyautofs fd message"):
            recv_fds(a)
        assert open_fds() == before
    finally:
        for fd in files:
            os.close(fd)
        a.close()
        b.close()


def test_data_without_its_fds_is_an_error() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        header = struct.pack("=4sHHII", b"PAFD", 1, 1, 5, 0)  # claims 5 fds, carries none
        b.send(header)
        with pytest.raises(FdPassError, match="without its fds"):
            recv_fds(a)
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("kind", KINDS)
def test_peer_dying_mid_message_leaves_nothing_open(kind: int) -> None:
    a, b = socket.socketpair(socket.AF_UNIX, kind)
    files = fresh_files(300)
    pid = os.fork()
    if pid == 0:
        # Send the first record of a 600-fd message (253 fds), then die.
        header = struct.pack("=4sHHII", b"PAFD", 1, 1, 600, 0)
        b.sendmsg([header], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", files[:253]))])
        os.kill(os.getpid(), signal.SIGKILL)
    b.close()
    os.waitpid(pid, 0)
    before = open_fds()
    try:
        with pytest.raises(FdPassError, match=r"got 253 of 600 fds"):
            recv_fds(a)
        assert open_fds() == before
    finally:
        for fd in files:
            os.close(fd)
        a.close()


def test_receiver_out_of_fds_reports_it_and_leaks_nothing() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    files = fresh_files(100)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        b.close()
        try:
            # Fill every hole in the fd table, then leave exactly 17 free slots.
            top = max(int(name) for name in os.listdir("/proc/self/fd"))
            while os.open("/dev/null", os.O_RDONLY) < top:
                pass
            base = open_fds()
            limit = max(int(name) for name in os.listdir("/proc/self/fd")) + 1 + 17
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
            try:
                recv_fds(a)
                msg = b"no error"
            except FdPassError as exc:
                msg = (str(exc) + f"|{open_fds() - base}").encode()
            os.write(w, msg)
        finally:
            os._exit(0)
    os.close(w)
    a.close()
    try:
        send_fds(b, files)
        os.waitpid(pid, 0)
        report = os.read(r, 1000).decode()
        assert "|" in report, report
        text, leaked = report.rsplit("|", 1)
        got = re.search(r"receiver ran out of fds: got (\d+) of 100", text)
        assert got is not None, text
        assert 10 <= int(got.group(1)) < 100
        assert leaked == "0"
    finally:
        os.close(r)
        for fd in files:
            os.close(fd)
        b.close()


def test_eof_between_messages_is_eoferror() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    b.close()
    with pytest.raises(EOFError):
        recv_fds(a)
    a.close()


def test_peer_credentials_name_the_peer() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        creds = peer_credentials(a)
        assert (creds.pid, creds.uid, creds.gid) == (os.getpid(), os.getuid(), os.getgid())
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("kind", KINDS)
async def test_fdchannel_round_trip_with_a_sync_peer(kind: int) -> None:
    chan, other = FdChannel.pair(kind)
    files = fresh_files(600)
    try:
        async with chan, other:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(chan.send, files, b"async")
                data, fds = await other.receive()
            assert data == b"async" and len(fds) == 600
            assert all(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC for fd in fds)
            for fd in fds:
                os.close(fd)
    finally:
        for fd in files:
            os.close(fd)


async def test_fdchannel_cancelled_mid_message_closes_what_it_got() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    chan = FdChannel(a)
    files = fresh_files(300)
    try:
        header = struct.pack("=4sHHII", b"PAFD", 1, 1, 600, 0)
        b.sendmsg([header], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", files[:253]))])
        before = open_fds()
        with trio.move_on_after(0.2):
            await chan.receive()
        assert open_fds() == before
        with pytest.raises(trio.BrokenResourceError):
            await chan.receive()
    finally:
        await chan.aclose()
        b.close()
        for fd in files:
            os.close(fd)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a child as another uid")
def test_worker_listener_is_private_and_accepts_only_the_expected_peer() -> None:
    listener, path = worker_listener()
    listener.settimeout(10)  # a deadline: a child that never connects fails the test
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
        assert not path.startswith("\0")
        # Our own uid is accepted, and the credentials name us.
        client = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        client.connect(path)
        conn, creds = accept_peer(listener, pid=os.getpid())
        assert creds.pid == os.getpid()
        conn.close()
        client.close()
        # A child that became nobody (after connecting is too late: SO_PEERCRED records
        # the credentials at connect time) is refused.
        os.chmod(os.path.dirname(path), 0o755)
        os.chmod(path, 0o666)
        pid = os.fork()
        if pid == 0:
            try:
                os.setgid(65534)
                os.setuid(65534)
                s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                s.connect(path)
                s.recv(1)
            finally:
                os._exit(0)
        with pytest.raises(PermissionError, match="refused a connection from pid"):
            accept_peer(listener)
        os.waitpid(pid, 0)
    finally:
        listener.close()
        os.unlink(path)
        os.rmdir(os.path.dirname(path))
