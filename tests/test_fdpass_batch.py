"""The batch fd-passing APIs against the real kernel: recv_fds_many, FdChannel.receive_many
and close_fds. Interleaved senders, EMFILE part-way through a batch, cancellation in the
middle of receive_many, and nothing left open on any path."""

from __future__ import annotations

import array
import fcntl
import os
import resource
import socket
import struct

import pytest
import trio

from pyautofs import FdChannel, FdPassError, close_fds, recv_fds_many, send_fds

KINDS = [socket.SOCK_STREAM, socket.SOCK_SEQPACKET]


def open_fds() -> set[int]:
    """The open fds, without the one the listing itself used."""
    listed = {int(name) for name in os.listdir("/proc/self/fd")}
    out = set()
    for fd in listed:
        try:
            fcntl.fcntl(fd, fcntl.F_GETFD)
        except OSError:
            continue
        out.add(fd)
    return out


def identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def fresh_pipes(n: int) -> list[int]:
    out: list[int] = []
    while len(out) < n:
        r, w = os.pipe()
        out += [r, w]
    for fd in out[n:]:
        os.close(fd)
    return out[:n]


# Mixed shapes: the fast path, data inline and not, more than 253 fds.
SHAPES = [(1, b""), (0, b"x"), (3, b"abc"), (253, b""), (254, b""), (5, b"d" * 5000), (600, b"")]


def check(got: list[tuple[bytes, list[int]]], want: list[tuple[bytes, list[int]]]) -> None:
    assert [d for d, _ in got] == [d for d, _ in want]
    for (_, fds), (_, sent) in zip(got, want, strict=True):
        assert [identity(fd) for fd in fds] == [identity(fd) for fd in sent]
        assert all(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC for fd in fds)


@pytest.mark.parametrize("kind", KINDS)
def test_recv_fds_many_takes_every_shape_whole(kind: int) -> None:
    a, b = socket.socketpair(socket.AF_UNIX, kind)
    files = fresh_pipes(600)
    want = [(data, files[:n]) for n, data in SHAPES * 2]
    pid = os.fork()
    if pid == 0:
        try:
            a.close()
            for data, fds in want:
                send_fds(b, fds, data)
        finally:
            os._exit(0)
    b.close()
    got: list[tuple[bytes, list[int]]] = []
    try:
        a.settimeout(None)
        while len(got) < len(want):
            batch = recv_fds_many(a, 5)
            assert 1 <= len(batch) <= 6  # one more than asked when a stream cannot stop
            got += batch
        check(got, want)
        with pytest.raises(EOFError):
            recv_fds_many(a)
    finally:
        a.close()
        os.waitpid(pid, 0)
        close_fds(sorted(fd for _, fds in got for fd in fds))
        close_fds(files)


@pytest.mark.parametrize("kind", KINDS)
def test_recv_fds_many_on_a_nonblocking_socket(kind: int) -> None:
    a, b = socket.socketpair(socket.AF_UNIX, kind)
    a.setblocking(False)
    files = fresh_pipes(2)
    try:
        with pytest.raises(BlockingIOError):
            recv_fds_many(a)
        for _ in range(10):
            send_fds(b, files)
        got = recv_fds_many(a, 64)
        assert len(got) == 10  # all that was queued, without waiting for more
        check(got, [(b"", files)] * 10)
        close_fds([fd for _, fds in got for fd in fds])
        # A batch of 1-fd messages, then one of another shape at its end: both paths.
        for i in range(40):
            send_fds(b, files[i % 2 : i % 2 + 1])
        send_fds(b, files, b"last")
        got = recv_fds_many(a, 64)
        check(got, [(b"", files[i % 2 : i % 2 + 1]) for i in range(40)] + [(b"last", files)])
        close_fds([fd for _, fds in got for fd in fds])
        with pytest.raises(BlockingIOError):
            recv_fds_many(a)
        b.close()
        with pytest.raises(EOFError):
            recv_fds_many(a)
    finally:
        close_fds(files)
        a.close()
        if b.fileno() >= 0:
            b.close()


@pytest.mark.parametrize("kind", KINDS)
def test_interleaved_senders_each_get_their_messages_through_whole(kind: int) -> None:
    """Four processes send on one socket at once. Single-record messages (up to 253 fds,
    data inline) never interleave inside, so each arrives with its own fds."""
    a, b = socket.socketpair(socket.AF_UNIX, kind)
    senders, per = 4, 150
    mine = [os.pipe() for _ in range(senders)]
    pids = []
    for s in range(senders):
        pid = os.fork()
        if pid == 0:
            try:
                a.close()
                for i in range(per):
                    n = 1 + (i * 7 + s) % 40
                    send_fds(b, [mine[s][0]] * n, f"{s}:{i}:{n};".encode() * (1 + i % 3))
            finally:
                os._exit(0)
        pids.append(pid)
    b.close()
    seen: dict[int, list[int]] = {s: [] for s in range(senders)}
    try:
        total = 0
        while total < senders * per:
            for data, fds in recv_fds_many(a, 32):
                s, i, n = (int(x) for x in data.decode().split(";")[0].split(":"))
                assert len(fds) == n
                assert {identity(fd) for fd in fds} == {identity(mine[s][0])}
                seen[s].append(i)
                close_fds(fds)
                total += 1
        assert all(order == list(range(per)) for order in seen.values())  # each in order
    finally:
        a.close()  # senders blocked on a full socket get EPIPE, not a hang
        for pid in pids:
            os.waitpid(pid, 0)
        for r, w in mine:
            os.close(r)
            os.close(w)


@pytest.mark.parametrize("kind", KINDS)
def test_emfile_part_way_through_a_batch_leaves_nothing_open(kind: int) -> None:
    """The receiver has room for 50 fds; 20 queued messages of 10 fds each. The batch fails
    with EMFILE, and the child's fd table is exactly as it was."""
    a, b = socket.socketpair(socket.AF_UNIX, kind)
    files = fresh_pipes(10)
    for _ in range(20):
        send_fds(b, files)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            b.close()
            top = max(open_fds())
            while os.open("/dev/null", os.O_RDONLY) < top:  # fill every hole below the top
                pass
            before = open_fds()
            room = max(before) + 1 + 50  # exactly 50 free slots
            resource.setrlimit(resource.RLIMIT_NOFILE, (room, room))
            try:
                recv_fds_many(a, 20)
                report = "no error"
            except FdPassError as exc:
                report = f"{exc.errno}|{exc}|{sorted(open_fds() ^ before)}"
            os.write(w, report.encode())
        finally:
            os._exit(0)
    os.close(w)
    try:
        os.waitpid(pid, 0)
        report = os.read(r, 4000).decode()
        assert report.count("|") == 2, report
        err, text, diff = report.split("|")
        assert int(err) == 24, report  # EMFILE
        assert "ran out of fds" in text and "dropped too" in text
        assert diff == "[]", f"left open or closed by mistake: {diff}"
    finally:
        os.close(r)
        close_fds(files)
        a.close()
        b.close()


async def test_receive_many_drains_what_is_queued_in_one_go() -> None:
    chan, other = FdChannel.pair(socket.SOCK_STREAM)
    files = fresh_pipes(300)
    want = [(data, files[:n]) for n, data in SHAPES]
    async with chan, other:
        for data, fds in want:
            await chan.send(fds, data)
        got = await other.receive_many()
        check(got, want)
        close_fds([fd for _, fds in got for fd in fds])
        # Nothing queued: it waits for the next message.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(chan.send, files[:2], b"later")
            got = await other.receive_many()
        check(got, [(b"later", files[:2])])
        close_fds([fd for _, fds in got for fd in fds])
    close_fds(files)


@pytest.mark.parametrize("kind", KINDS)
async def test_cancelled_in_the_middle_of_receive_many_closes_the_whole_batch(kind: int) -> None:
    a, b = socket.socketpair(socket.AF_UNIX, kind)
    chan = FdChannel(a)
    files = fresh_pipes(300)
    try:
        for _ in range(3):
            send_fds(b, files[:4], b"whole")
        # The first record of a 600-fd message, then nothing: receive_many is half-way.
        header = struct.pack("=4sHHII", b"PAFD", 1, 1, 600, 0)
        b.sendmsg([header], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", files[:253]))])
        before = open_fds()
        with trio.move_on_after(0.3) as scope:
            await chan.receive_many()
        assert scope.cancelled_caught
        assert open_fds() == before  # the 3 whole messages and the 253 fds: all closed
        with pytest.raises(trio.BrokenResourceError):
            await chan.receive_many()
    finally:
        await chan.aclose()
        b.close()
        close_fds(files)


async def test_cancelled_between_messages_loses_nothing() -> None:
    chan, other = FdChannel.pair(socket.SOCK_SEQPACKET)
    files = fresh_pipes(2)
    async with chan, other:
        with trio.move_on_after(0.05):
            await other.receive_many()
        with trio.move_on_after(0.05):
            await other.receive()
        await chan.send(files, b"still fine")
        got = await other.receive_many()
        check(got, [(b"still fine", files)])
        close_fds(got[0][1])
    close_fds(files)


def test_close_fds_closes_exactly_the_runs_it_is_given() -> None:
    r, w = os.pipe()
    fds = [os.dup(r) for _ in range(40)]
    keep = fds[10]  # a gap: two runs and a short one
    rest = [fd for fd in fds if fd != keep]
    before = open_fds()
    close_fds([*rest, rest[0]])  # a repeat is harmless (EBADF is ignored)
    assert open_fds() == before - set(rest)
    assert keep in open_fds()
    close_fds([])
    close_fds(iter([keep, r, w]))
    assert not {keep, r, w} & open_fds()
