"""One error hierarchy: FormatError for undecodable input, ProtocolError for broken peers."""

from __future__ import annotations

import errno
import socket

import pytest

import pyautofs
from pyautofs import FormatError, ProtocolError
from pyautofs.lowlevel import decode_packet
from pyautofs.restore import AutofsMountImage, PipeImage


def test_the_roots_are_what_callers_already_catch() -> None:
    assert issubclass(FormatError, ValueError)
    assert issubclass(ProtocolError, OSError)


@pytest.mark.parametrize(
    "name",
    ["PacketError", "PipeImageError", "AutofsImageError"],
)
def test_decoders_of_untrusted_bytes_raise_format_errors(name: str) -> None:
    import pyautofs.lowlevel
    import pyautofs.restore

    cls = getattr(pyautofs.lowlevel, name, None) or getattr(pyautofs.restore, name)
    assert issubclass(cls, FormatError)


@pytest.mark.parametrize("name", ["FdPassError", "HandoverFailed"])
def test_broken_peers_raise_protocol_errors(name: str) -> None:
    import pyautofs.restore

    cls = getattr(pyautofs.restore, name, None) or getattr(pyautofs, name)
    assert issubclass(cls, ProtocolError)


def test_a_protocol_error_keeps_an_errno() -> None:
    assert ProtocolError("peer went away").errno == errno.EPROTO
    assert str(ProtocolError("peer went away")) == "[Errno 71] peer went away"
    assert ProtocolError(errno.EMFILE, "out of fds").errno == errno.EMFILE


def test_real_bad_input_lands_on_the_roots() -> None:
    with pytest.raises(FormatError):
        decode_packet(b"\x05\x00\x00\x00" * 3)
    with pytest.raises(FormatError):
        PipeImage.from_bytes(b"not an image")
    with pytest.raises(FormatError):
        AutofsMountImage.from_bytes(b"{}")
    # A message cut short by a peer that then dies: the fd layer's own error, a ProtocolError.
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        a.send(b"\x00\x01")
        a.close()
        with pytest.raises(ProtocolError):
            pyautofs.recv_fds(b)
    finally:
        b.close()
