"""The sans-IO fd-message protocol, driven by hypothesis over boundaries and faults.

The "kernel" here is a model of what ``net/unix/af_unix.c`` does with the records
:func:`encode_message` makes: on a stream, a read takes bytes across records but never goes
past the end of a record that carried fds, and gets those fds; on seqpacket, a read is one
record (cut and flagged ``MSG_TRUNC`` if too long). fds are tokens (plain ints), so every
one can be accounted for: each token fed to the reader comes out exactly once, in a
message or from ``abort()``, except those the modelled kernel itself closed (MSG_CTRUNC).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyautofs._proto._fdmsg import (
    HEADER_SIZE,
    INLINE_MAX,
    MSG_CTRUNC,
    MSG_TRUNC,
    FdMessageReader,
    FdPassError,
    encode_message,
    single_record_fds,
)


@dataclass
class Skb:
    data: bytes
    fds: list[int] | None
    pos: int = 0
    ctrunc_keep: int | None = None  # deliver only this many fds, with MSG_CTRUNC


@dataclass
class Kernel:
    """The receive queue of one unix socket."""

    stream: bool
    queue: list[Skb] = field(default_factory=list)
    closed_by_kernel: list[int] = field(default_factory=list)

    def read(self, size: int) -> tuple[bytes, list[int], int]:
        if not self.queue:
            return b"", [], 0  # the peer is gone: EOF
        if not self.stream:
            skb = self.queue.pop(0)
            flags = MSG_TRUNC if len(skb.data) > size else 0
            got, more = self._fds(skb)
            return skb.data[:size], got, flags | more
        out = bytearray()
        fds: list[int] = []
        flags = 0
        got_fds = False
        while size and self.queue:
            skb = self.queue[0]
            take = skb.data[skb.pos : skb.pos + size]
            out += take
            size -= len(take)
            skb.pos += len(take)
            if skb.fds is not None:
                fds, flags = self._fds(skb)
                got_fds = True
            if skb.pos < len(skb.data):
                break
            self.queue.pop(0)
            if got_fds:
                break
        return bytes(out), fds, flags

    def _fds(self, skb: Skb) -> tuple[list[int], int]:
        fds = skb.fds or []
        skb.fds = None
        if skb.ctrunc_keep is not None and skb.ctrunc_keep < len(fds):
            self.closed_by_kernel += fds[skb.ctrunc_keep :]
            return fds[: skb.ctrunc_keep], MSG_CTRUNC
        return fds, 0


@st.composite
def messages(draw: st.DrawFn) -> list[tuple[int, int]]:
    """(nfds, ndata) of a few messages, with the boundaries that matter."""
    counts = st.sampled_from([0, 1, 2, 16, 252, 253, 254, 506, 507, 700])
    sizes = st.sampled_from([0, 1, 15, 16, INLINE_MAX, INLINE_MAX + 1, 70_000])
    return draw(st.lists(st.tuples(counts, sizes), min_size=1, max_size=4))


FAULTS = st.sampled_from(["none", "none", "cut", "ctrunc", "magic", "count", "stray"])


def build(
    stream: bool, shapes: Sequence[tuple[int, int]], fault: str, where: int
) -> tuple[Kernel, list[tuple[bytes, list[int]]], int]:
    """The queue for ``shapes``, with ``fault`` applied at record number ``where``.

    Returns the kernel, the messages as sent, and how many whole messages come before the
    fault (the reader must deliver exactly those).
    """
    kernel = Kernel(stream)
    sent: list[tuple[bytes, list[int]]] = []
    token = 1000
    owner: list[int] = []  # message index of each record
    for index, (nfds, ndata) in enumerate(shapes):
        fds = list(range(token, token + nfds))
        token += nfds
        data = bytes((index + i) % 251 for i in range(ndata))
        sent.append((data, fds))
        for payload, record_fds in encode_message(fds, data, stream):
            kernel.queue.append(Skb(bytes(payload), list(record_fds) or None))
            owner.append(index)
    if fault == "none" or not kernel.queue:
        return kernel, sent, len(sent)
    where %= len(kernel.queue)
    victim = owner[where]
    skb = kernel.queue[where]
    if fault == "cut":  # the peer died: the queue ends inside (or right before) a record
        kernel.queue = kernel.queue[:where]
        if where and owner[where - 1] == victim:
            return kernel, sent, victim
        return kernel, sent, victim  # at a boundary: EOF after the whole ones
    if fault == "ctrunc":
        with_fds = [i for i, s in enumerate(kernel.queue) if s.fds]
        if not with_fds:
            return kernel, sent, -1  # nothing to truncate: no fault
        where = with_fds[where % len(with_fds)]
        kernel.queue[where].ctrunc_keep = len(kernel.queue[where].fds or []) // 2
        return kernel, sent, owner[where]
    if fault == "magic":
        kernel.queue[where] = Skb(b"XXXX" + skb.data[4:], skb.fds)
        if not any(o == victim for o in owner[:where]) or skb.data[:4] in (b"PAFD", b"PAFC"):
            return kernel, sent, victim
        kernel.queue[where] = skb  # a data record: corrupt data is not ours to see
        return kernel, sent, -1
    if fault == "count":  # a first record that announces one fd more (or less) than it has
        firsts = [i for i, s in enumerate(kernel.queue) if s.data[:4] == b"PAFD"]
        s = kernel.queue[firsts[where % len(firsts)]]
        nfds = int.from_bytes(s.data[8:12], "little")
        # one fewer is a valid shorter message when the first record is full: not a fault
        nfds += 1 if where % 2 or not 0 < nfds <= 253 else -1
        where = firsts[where % len(firsts)]
        kernel.queue[where] = Skb(s.data[:8] + nfds.to_bytes(4, "little") + s.data[12:], s.fds)
        return kernel, sent, owner[where]
    # "stray": fds riding on bytes that start no record (a foreign sender's doing)
    kernel.queue.insert(where, Skb(b"\0" * 3, [1]))
    return kernel, sent, victim


def run_reader(
    kernel: Kernel, reader: FdMessageReader, sizes: list[int], exact: bool
) -> tuple[list[tuple[bytes, list[int]]], BaseException, list[int], list[int]]:
    """Drive ``reader`` like a driver would, until it raises; return the messages, the
    error, what ``abort()`` handed back, and every fd the reader was given."""
    out: list[tuple[bytes, list[int]]] = []
    fed: list[int] = []
    i = 0
    try:
        while True:
            size = sizes[i % len(sizes)]
            if reader.wanted() > 1000:  # through bulk data in big reads: keeps the test quick
                size *= 997
            i += 1
            if exact or not reader.stream:
                size = min(size, reader.wanted()) if reader.stream else reader.wanted()
            data, fds, flags = kernel.read(size)
            fed += fds
            reader.feed(data, fds, flags)
            while reader.has_message():
                message = reader.next_message()
                assert message is not None
                out.append(message)
            if i > 100_000:
                raise AssertionError("no progress")
    except (FdPassError, EOFError) as exc:
        return out, exc, reader.abort(), fed


@settings(max_examples=200, deadline=None)
@given(
    stream=st.booleans(),
    shapes=messages(),
    fault=FAULTS,
    where=st.integers(0, 1000),
    sizes=st.lists(st.integers(1, 100), min_size=1, max_size=8),
    exact=st.booleans(),
)
def test_reader_gives_exact_messages_or_a_clean_error(
    stream: bool,
    shapes: list[tuple[int, int]],
    fault: str,
    where: int,
    sizes: list[int],
    exact: bool,
) -> None:
    kernel, sent, whole = build(stream, shapes, fault, where)
    if whole < 0:
        fault, whole = "none", len(sent)
    reader = FdMessageReader(stream)
    out, error, leftover, fed = run_reader(kernel, reader, sizes, exact)
    # Every message before the fault arrives exactly, in order, and none after it.
    assert out == sent[:whole]
    if fault == "none":
        assert isinstance(error, EOFError)
    elif fault == "ctrunc":
        assert isinstance(error, FdPassError) and "ran out of fds" in str(error)
    else:
        assert isinstance(error, (FdPassError, EOFError))
        if fault != "cut":
            assert isinstance(error, FdPassError)
    # Nothing is lost or duplicated: each fd is in a message, handed back, or was closed
    # by the kernel.
    delivered = [fd for _, fds in out for fd in fds]
    assert sorted(delivered + leftover) == sorted(fed)
    assert reader.abort() == []


@settings(max_examples=100, deadline=None)
@given(stream=st.booleans(), shapes=messages(), sizes=st.lists(st.integers(1, 64), min_size=1))
def test_exact_reads_never_cross_a_message_boundary(
    stream: bool, shapes: list[tuple[int, int]], sizes: list[int]
) -> None:
    """What lets recv_fds keep no state between calls: asking for wanted() bytes never
    takes a byte of the next message."""
    kernel, sent, _ = build(stream, shapes, "none", 0)
    for expected in sent:
        reader = FdMessageReader(stream)
        got = None
        i = 0
        while got is None:
            size = sizes[i % len(sizes)] * (997 if reader.wanted() > 1000 else 1)
            size = min(size, reader.wanted()) if stream else reader.wanted()
            i += 1
            data, fds, flags = kernel.read(size)
            reader.feed(data, fds, flags)
            got = reader.next_message()
        assert got == expected
        assert reader.at_boundary()
    assert not kernel.queue


def test_fast_path_takes_only_the_exact_prebuilt_shape() -> None:
    ((record, fds),) = encode_message([5, 6, 7], b"", stream=True)
    payload = b"".join(fd.to_bytes(4, "little") for fd in fds)
    anc = [(1, 1, payload)]
    assert single_record_fds(bytes(record), anc, 0) == [5, 6, 7]
    assert single_record_fds(bytes(record), anc, MSG_CTRUNC) is None
    assert single_record_fds(bytes(record), [(1, 1, payload[:8])], 0) is None
    assert single_record_fds(bytes(record), [(1, 2, payload)], 0) is None
    assert single_record_fds(bytes(record) + b"x", anc, 0) is None
    assert single_record_fds(bytes(record), [], 0) is None
    assert len(record) == HEADER_SIZE


def test_encode_refuses_oversized_data() -> None:
    class Huge(bytes):
        def __len__(self) -> int:
            return (1 << 30) + 1

    with pytest.raises(ValueError, match="limited to"):
        encode_message([], Huge(), stream=True)


def test_a_header_announcing_no_fds_but_carrying_one_is_never_delivered() -> None:
    # Found by the property test above: a stream message whose header says 0 fds while
    # the read that holds it carries 1 was delivered as (b"", []) before the error.
    kernel, sent, whole = build(True, [(1, 0)], "count", 0)
    assert whole == 0
    out, error, leftover, fed = run_reader(kernel, FdMessageReader(True), [1], False)
    assert out == []
    assert isinstance(error, FdPassError)
    assert sorted(leftover) == sorted(fed) == sent[0][1]
