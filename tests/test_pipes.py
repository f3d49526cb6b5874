"""Pipe syscalls and pipe images, against the real kernel.

Everything here uses ordinary pipes, so no mark is needed: any Linux runs these tests.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import struct
import subprocess
import sys
import zlib
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyautofs._restore._pipeimage import PipeImage, PipeImageError, restore_pipe, snapshot_pipe
from pyautofs._sys._pipes import (
    PAGE_SIZE,
    PipeFlags,
    SpliceFlags,
    bytes_queued,
    get_pipe_size,
    packet_mode,
    pipe2,
    pipe_inode,
    pipe_max_size,
    set_packet_mode,
    set_pipe_size,
    splice,
    tee,
)

MiB = 1 << 20
DEADLINE = 30.0


@pytest.fixture
def pipes() -> Iterator[list[int]]:
    """Collects fds made by a test and closes them at the end."""
    fds: list[int] = []
    yield fds
    for fd in fds:
        os.close(fd)


def make_pipe(fds: list[int], flags: PipeFlags = PipeFlags.CLOEXEC) -> tuple[int, int]:
    r, w = pipe2(flags)
    fds += [r, w]
    return r, w


def fill(w: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(w, view) :]


def drain(r: int) -> bytes:
    """Everything queued in ``r`` now (non-blocking)."""
    out = []
    blocking = os.get_blocking(r)
    os.set_blocking(r, False)
    try:
        while True:
            try:
                chunk = os.read(r, MiB)
            except BlockingIOError:
                break
            if not chunk:
                break
            out.append(chunk)
    finally:
        os.set_blocking(r, blocking)
    return b"".join(out)


def read_packets(r: int) -> list[bytes]:
    """Read one packet per read until the pipe is empty."""
    out = []
    blocking = os.get_blocking(r)
    os.set_blocking(r, False)
    try:
        while True:
            try:
                out.append(os.read(r, 2 * PAGE_SIZE))
            except BlockingIOError:
                break
    finally:
        os.set_blocking(r, blocking)
    return out


def has_cap_sys_resource() -> bool:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) & (1 << 24))
    return False


# -- _sys._pipes -----------------------------------------------------------------------


def test_pipe2_direct_marks_only_the_write_end(pipes: list[int]) -> None:
    r, w = make_pipe(pipes, PipeFlags.CLOEXEC | PipeFlags.DIRECT)
    assert packet_mode(w)
    assert not packet_mode(r)
    assert not os.get_inheritable(r) and not os.get_inheritable(w)
    assert pipe_inode(r) == pipe_inode(w) == os.fstat(r).st_ino


def test_packet_mode_keeps_writes_apart_and_can_be_toggled(pipes: list[int]) -> None:
    r, w = make_pipe(pipes)
    os.write(w, b"ab")
    os.write(w, b"cd")
    assert os.read(r, 100) == b"abcd"  # plain: merged
    set_packet_mode(w, True)
    os.write(w, b"ab")
    os.write(w, b"cd")
    assert os.read(r, 1) == b"a"  # packet: the rest of "ab" is thrown away
    assert os.read(r, 100) == b"cd"
    set_packet_mode(w, False)
    assert not packet_mode(w)


def test_set_pipe_size_rounds_to_power_of_two_pages(pipes: list[int]) -> None:
    r, _ = make_pipe(pipes)
    assert set_pipe_size(r, 1) == PAGE_SIZE
    assert set_pipe_size(r, PAGE_SIZE + 1) == 2 * PAGE_SIZE
    assert set_pipe_size(r, 3 * 16 * PAGE_SIZE) == 64 * PAGE_SIZE
    assert get_pipe_size(r) == 64 * PAGE_SIZE


def test_set_pipe_size_limits(pipes: list[int]) -> None:
    r, w = make_pipe(pipes)
    fill(w, b"x" * (3 * PAGE_SIZE))
    with pytest.raises(OSError, match="more is queued") as busy:
        set_pipe_size(r, PAGE_SIZE)
    assert busy.value.errno == errno.EBUSY
    above = pipe_max_size() * 2
    if has_cap_sys_resource():
        assert set_pipe_size(r, above) == above
    else:
        with pytest.raises(PermissionError, match="CAP_SYS_RESOURCE"):
            set_pipe_size(r, above)


def test_bytes_queued_and_tee_do_not_consume(pipes: list[int]) -> None:
    r, w = make_pipe(pipes)
    r2, w2 = make_pipe(pipes, PipeFlags.CLOEXEC | PipeFlags.NONBLOCK)
    with pytest.raises(BlockingIOError):
        tee(r, w2, 100)  # empty, but a writer is left: EAGAIN with SPLICE_F_NONBLOCK
    fill(w, b"hello world")
    assert bytes_queued(r) == 11
    assert tee(r, w2, 1 << 20) == 11
    assert bytes_queued(r) == 11
    assert os.read(r2, 100) == b"hello world"
    assert os.read(r, 100) == b"hello world"


def test_tee_on_empty_pipe_without_writer_returns_zero(pipes: list[int]) -> None:
    r, w = pipe2()
    os.close(w)
    pipes.append(r)
    _, w2 = make_pipe(pipes)
    assert tee(r, w2, 100, SpliceFlags.NONBLOCK) == 0


def test_splice_moves_bytes(pipes: list[int]) -> None:
    r, w = make_pipe(pipes)
    r2, w2 = make_pipe(pipes)
    fill(w, b"abcdef")
    assert splice(r, w2, 4) == 4
    assert os.read(r2, 10) == b"abcd"
    assert bytes_queued(r) == 2


# -- snapshot and restore --------------------------------------------------------------


def test_snapshot_is_nondestructive_and_restore_byte_exact_1mib(pipes: list[int]) -> None:
    r, w = make_pipe(pipes, PipeFlags.CLOEXEC | PipeFlags.NONBLOCK)
    assert set_pipe_size(r, MiB) == MiB
    blob = os.urandom(MiB)
    fill(w, blob)
    image = snapshot_pipe(r)
    assert image.size == MiB
    assert image.data == blob and image.packets == ()
    assert not image.packet_mode
    assert image.nonblock  # this read end is O_NONBLOCK
    assert bytes_queued(r) == MiB
    r2, w2 = restore_pipe(image)
    pipes += [r2, w2]
    assert get_pipe_size(r2) == MiB
    assert not os.get_blocking(r2) and os.get_blocking(w2)
    assert drain(r2) == blob
    assert drain(r) == blob  # the original is intact


def test_snapshot_of_a_pipe_between_two_processes(pipes: list[int]) -> None:
    """A writer process fills a pipe, we capture it, a reader process still gets it all."""
    r, w = make_pipe(pipes)
    set_pipe_size(r, MiB)
    writer = subprocess.run(
        [sys.executable, "-c", "import os,sys; b=bytes(range(256))*4096; os.write(1,b)"],
        stdout=w,
        timeout=DEADLINE,
        check=True,
    )
    assert writer.returncode == 0
    expected = bytes(range(256)) * 4096
    image = snapshot_pipe(r)
    assert image.contents == expected
    os.close(w)
    pipes.remove(w)
    reader = subprocess.run(
        [
            sys.executable,
            "-c",
            "import hashlib,sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())",
        ],
        stdin=r,
        capture_output=True,
        timeout=DEADLINE,
        check=True,
    )
    assert reader.stdout.decode().strip() == hashlib.sha256(expected).hexdigest()


def test_empty_pipe_keeps_its_size(pipes: list[int]) -> None:
    r, _ = make_pipe(pipes)
    set_pipe_size(r, 256 * 1024)
    image = snapshot_pipe(r)
    assert image == PipeImage(size=256 * 1024)
    r2, w2 = restore_pipe(image)
    pipes += [r2, w2]
    assert get_pipe_size(r2) == 256 * 1024
    assert bytes_queued(r2) == 0


def test_packet_pipe_keeps_boundaries(pipes: list[int]) -> None:
    r, w = make_pipe(pipes, PipeFlags.CLOEXEC | PipeFlags.DIRECT)
    sent = [b"a", b"bb" * 100, os.urandom(304), os.urandom(PAGE_SIZE), b"z"]
    for p in sent:
        os.write(w, p)
    image = snapshot_pipe(r)  # through the read end: the buffers show packet mode
    assert image.packets == tuple(sent)
    assert image.data == b""
    assert image.packet_mode
    r2, w2 = restore_pipe(image)
    pipes += [r2, w2]
    assert packet_mode(w2)
    assert read_packets(r2) == sent
    assert read_packets(r) == sent


def test_full_packet_pipe(pipes: list[int]) -> None:
    """Every slot used: no room for the sentinel until the first packet is read out."""
    r, w = make_pipe(pipes, PipeFlags.CLOEXEC | PipeFlags.DIRECT | PipeFlags.NONBLOCK)
    slots = get_pipe_size(r) // PAGE_SIZE
    sent = [bytes([i]) * (i + 1) for i in range(slots)]
    for p in sent:
        os.write(w, p)
    with pytest.raises(BlockingIOError):
        os.write(w, b"one too many")
    image = snapshot_pipe(r)
    assert image.packets == tuple(sent)
    r2, w2 = restore_pipe(image)
    pipes += [r2, w2]
    assert read_packets(r2) == sent


def test_full_single_packet_pipe_trusts_the_mode(pipes: list[int]) -> None:
    r, w = make_pipe(pipes, PipeFlags.CLOEXEC | PipeFlags.DIRECT)
    set_pipe_size(r, PAGE_SIZE)
    os.write(w, b"p" * PAGE_SIZE)
    assert snapshot_pipe(r, packet=True).packets == (b"p" * PAGE_SIZE,)
    assert snapshot_pipe(w).packets == (b"p" * PAGE_SIZE,)  # the write end shows O_DIRECT


def test_packets_then_plain_data(pipes: list[int]) -> None:
    r, w = make_pipe(pipes, PipeFlags.CLOEXEC | PipeFlags.DIRECT)
    os.write(w, b"p1")
    os.write(w, b"p2")
    set_packet_mode(w, False)
    os.write(w, b"plain ")
    os.write(w, b"data")
    image = snapshot_pipe(r)
    assert image.packets == (b"p1", b"p2")
    assert image.data == b"plain data"
    r2, w2 = restore_pipe(image)
    pipes += [r2, w2]
    assert read_packets(r2) == [b"p1", b"p2", b"plain data"]


def test_snapshot_through_the_write_end(pipes: list[int]) -> None:
    r, w = make_pipe(pipes, PipeFlags.CLOEXEC | PipeFlags.DIRECT)
    image = snapshot_pipe(w)
    assert image.packet_mode  # empty, but the write end carries O_DIRECT
    os.write(w, b"x" * 10)
    assert snapshot_pipe(w).packets == (b"x" * 10,)
    assert bytes_queued(r) == 10


def test_empty_packet_pipe_through_read_end_needs_the_hint(pipes: list[int]) -> None:
    r, _ = make_pipe(pipes, PipeFlags.CLOEXEC | PipeFlags.DIRECT)
    assert not snapshot_pipe(r).packet_mode
    image = snapshot_pipe(r, packet=True)
    assert image.packet_mode
    r2, w2 = restore_pipe(image)
    pipes += [r2, w2]
    assert packet_mode(w2)


def test_snapshot_refuses_a_non_pipe() -> None:
    fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    try:
        with pytest.raises(OSError, match="not a pipe"):
            snapshot_pipe(fd)
    finally:
        os.close(fd)


def test_restore_refuses_contents_that_do_not_fit() -> None:
    image = PipeImage(size=PAGE_SIZE, packets=(b"a", b"b"))  # two packets need two slots
    with pytest.raises(OSError, match="does not fit") as exc:
        restore_pipe(image)
    assert exc.value.errno == errno.ENOSPC


def test_restore_cloexec_choice(pipes: list[int]) -> None:
    r, w = restore_pipe(PipeImage(size=PAGE_SIZE), cloexec=False)
    pipes += [r, w]
    assert os.get_inheritable(r) and os.get_inheritable(w)


# -- the serialised form ---------------------------------------------------------------


def sample_image() -> PipeImage:
    return PipeImage(
        size=65536, packet_mode=True, nonblock=True, packets=(b"one", b"two" * 50), data=b"t"
    )


def test_image_round_trips() -> None:
    image = sample_image()
    raw = image.to_bytes()
    assert PipeImage.from_bytes(raw) == image
    assert PipeImage.from_bytes(bytearray(raw)) == image
    assert PipeImage.from_bytes(PipeImage(size=4096).to_bytes()) == PipeImage(size=4096)
    assert "packets" in repr(image) and "two" not in repr(image)


def _recrc(raw: bytearray) -> bytes:
    struct.pack_into("<I", raw, 24, zlib.crc32(bytes(raw[28:]), zlib.crc32(bytes(raw[:24]))))
    return bytes(raw)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b[:10], "truncated"),
        (lambda b: b"NOTAPIPE" + b[8:], "not a pipe image"),
        (lambda b: _recrc(bytearray(b[:8]) + struct.pack("<H", 9) + b[10:]), "version 9"),
        (lambda b: b[:-1] + bytes([b[-1] ^ 1]), "CRC32"),
        (lambda b: _recrc(bytearray(b + b"extra")), "length mismatch"),
        (lambda b: _recrc(bytearray(b[:10]) + struct.pack("<H", 0x80) + b[12:]), "flags"),
        (lambda b: _recrc(bytearray(b[:12]) + struct.pack("<I", 0) + b[16:]), "size"),
        (
            lambda b: _recrc(bytearray(b[:16]) + struct.pack("<I", 1 << 20) + b[20:]),
            "truncated",
        ),
        (lambda b: _recrc(bytearray(b[:28]) + struct.pack("<I", 0) + b[32:]), "empty packet"),
    ],
)
def test_corrupt_images_are_refused(mutate: object, message: str) -> None:
    raw = sample_image().to_bytes()
    bad = mutate(raw)  # type: ignore[operator]
    with pytest.raises(PipeImageError, match=message):
        PipeImage.from_bytes(bad)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=300)
@given(st.binary(max_size=200))
def test_garbage_never_parses_silently(raw: bytes) -> None:
    with pytest.raises(PipeImageError):
        PipeImage.from_bytes(b"PYAFPIPE" + raw)


def test_constructor_validates() -> None:
    with pytest.raises(ValueError, match="pipe size"):
        PipeImage(size=0)
    with pytest.raises(ValueError, match="empty"):
        PipeImage(size=4096, packets=(b"",))


def test_fcntl_numbers_match_the_stdlib() -> None:
    # fcntl gained these names in 3.10; our fallbacks must agree with them.
    assert fcntl.F_SETPIPE_SZ == 1031 and fcntl.F_GETPIPE_SZ == 1032
