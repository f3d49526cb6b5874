"""The handover message and the owner's side of it, with pipes only (no autofs needed).

The coordinator and the owner are the two ends of a SOCK_SEQPACKET socketpair in this
process, so the fds really travel through SCM_RIGHTS and come back as new numbers.
"""

from __future__ import annotations

import errno
import json
import os
import socket
from collections.abc import Iterator

import pytest

from pyautofs._restore import _handover
from pyautofs._restore._handover import (
    AutofsHandover,
    HandoverFailed,
    PipeHandover,
    adopt_handover,
    receive_handover,
    send_confirmation,
    send_handover,
    wait_confirmation,
)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        yield a, b


def free_numbers(count: int, start: int = 600) -> list[int]:
    out: list[int] = []
    fd = start
    while len(out) < count:
        try:
            os.fstat(fd)
        except OSError:
            out.append(fd)
        fd += 1
    return out


def test_many_pipes_cross_the_socket_and_land_on_their_numbers(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    coordinator, owner = pair
    pipes = [os.pipe2(os.O_CLOEXEC) for _ in range(300)]  # 600 fds: three batches of 253
    targets = free_numbers(600)
    items = [PipeHandover(targets[2 * i], targets[2 * i + 1]) for i in range(300)]
    fds = [fd for p in pipes for fd in p]
    inodes = [os.fstat(fd).st_ino for fd in fds]
    send_handover(coordinator, items, fds)
    for fd in fds:
        os.close(fd)
    got_items, got_fds = receive_handover(owner)
    assert got_items == items and len(got_fds) == 600
    adopted = adopt_handover(got_items, got_fds)
    try:
        assert [(a.read_fd, a.write_fd) for a in adopted] == [
            (i.read_target, i.write_target) for i in items
        ]
        assert [os.fstat(t).st_ino for t in targets] == inodes
        assert not any(os.get_inheritable(t) for t in targets)
        for fd in set(got_fds) - set(targets):  # the received copies were closed
            assert not _open(fd)
        send_confirmation(owner, adopted)
        reply = wait_confirmation(coordinator, 5)
        assert reply["pid"] == os.getpid()
        assert [e["pipe_ino"] for e in reply["items"]] == inodes[0::2]
    finally:
        for t in targets:
            os.close(t)


def _open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_only_the_ends_asked_for(pair: tuple[socket.socket, socket.socket]) -> None:
    coordinator, owner = pair
    r, w = os.pipe2(os.O_CLOEXEC)
    r2, w2 = os.pipe2(os.O_CLOEXEC)
    [t1, t2] = free_numbers(2)
    send_handover(coordinator, [PipeHandover(t1, None), PipeHandover(None, t2)], [r, w2])
    ino_r, ino_w2 = os.fstat(r).st_ino, os.fstat(w2).st_ino
    for fd in (r, w, r2, w2):
        os.close(fd)
    adopt_handover(*receive_handover(owner))
    try:
        assert os.fstat(t1).st_ino == ino_r and os.fstat(t2).st_ino == ino_w2
    finally:
        os.close(t1)
        os.close(t2)


def test_duplicate_targets_close_everything(pair: tuple[socket.socket, socket.socket]) -> None:
    coordinator, owner = pair
    r, w = os.pipe2(os.O_CLOEXEC)
    [t] = free_numbers(1)
    send_handover(coordinator, [PipeHandover(t, t)], [r, w])
    os.close(r)
    os.close(w)
    before = set(os.listdir("/proc/self/fd"))
    items, fds = receive_handover(owner)
    with pytest.raises(OSError, match="twice") as exc:
        adopt_handover(items, fds)
    assert exc.value.errno == errno.EINVAL
    assert set(os.listdir("/proc/self/fd")) == before


def test_busy_target_closes_received_fds(pair: tuple[socket.socket, socket.socket]) -> None:
    coordinator, owner = pair
    r, w = os.pipe2(os.O_CLOEXEC)
    send_handover(coordinator, [PipeHandover(r, None)], [w])  # r is busy in the owner
    os.close(w)
    before = set(os.listdir("/proc/self/fd"))
    items, fds = receive_handover(owner)
    with pytest.raises(OSError, match="already open") as exc:
        adopt_handover(items, fds)
    assert exc.value.errno == errno.EBUSY
    assert set(os.listdir("/proc/self/fd")) == before
    os.close(r)


def test_fd_count_must_match_the_items(pair: tuple[socket.socket, socket.socket]) -> None:
    coordinator, _ = pair
    with pytest.raises(ValueError, match="need 2 fds"):
        send_handover(coordinator, [AutofsHandover("/mnt", 1, 40, None)], [])


@pytest.mark.parametrize(
    "payload",
    [
        b"not json",
        json.dumps({"pyautofs-handover": 9, "items": []}).encode(),
        json.dumps({"pyautofs-handover": 1, "items": [{"kind": "teapot"}]}).encode(),
        json.dumps(
            {"pyautofs-handover": 1, "items": [{"kind": "pipe", "read_target": -3}]}
        ).encode(),
        json.dumps({"pyautofs-handover": 1, "items": [{"kind": "autofs", "dev": 1}]}).encode(),
    ],
)
def test_malformed_messages_are_refused_and_fds_closed(
    pair: tuple[socket.socket, socket.socket], payload: bytes
) -> None:
    coordinator, owner = pair
    r, w = os.pipe2(os.O_CLOEXEC)
    _handover._send_fds(coordinator, [r], payload)
    os.close(r)
    os.close(w)
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(OSError, match="malformed handover message") as exc:
        receive_handover(owner)
    assert exc.value.errno == errno.EPROTO
    assert set(os.listdir("/proc/self/fd")) == before


def test_closed_socket_is_eof(pair: tuple[socket.socket, socket.socket]) -> None:
    coordinator, owner = pair
    coordinator.shutdown(socket.SHUT_WR)
    with pytest.raises(EOFError):
        receive_handover(owner)


def test_error_confirmation(pair: tuple[socket.socket, socket.socket]) -> None:
    coordinator, owner = pair
    send_confirmation(owner, None, FileExistsError(errno.EEXIST, "nope"))
    with pytest.raises(HandoverFailed, match="nope") as exc:
        wait_confirmation(coordinator, 5)
    assert exc.value.errno == errno.EEXIST


def test_confirmation_timeout(pair: tuple[socket.socket, socket.socket]) -> None:
    coordinator, _ = pair
    with pytest.raises(TimeoutError):
        wait_confirmation(coordinator, 0.05)


def test_owner_gone_before_confirming(pair: tuple[socket.socket, socket.socket]) -> None:
    coordinator, owner = pair
    owner.shutdown(socket.SHUT_WR)
    with pytest.raises(HandoverFailed, match="without confirming") as exc:
        wait_confirmation(coordinator, 5)
    assert exc.value.errno == errno.EPIPE
