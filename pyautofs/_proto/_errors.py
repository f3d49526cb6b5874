"""The two roots of pyautofs's errors about bad input.

Every decoder of untrusted bytes or text (kernel packets, pipe and mount images, map
entries built from a key) raises a :class:`FormatError`; every peer that breaks a protocol
(an fd message cut short, a handover partner that answers nonsense or not at all) raises a
:class:`ProtocolError`, which is an :class:`OSError` and keeps an errno (``EPROTO`` unless
the peer's own is known). Catch the root to handle every case of one kind; the subclasses
say which decoder or protocol it was.
"""

from __future__ import annotations

import errno

__all__ = ["FormatError", "ProtocolError"]


class FormatError(ValueError):
    """Bytes or text from outside that are not in the format they claim to be."""


class ProtocolError(OSError):
    """A peer broke a protocol; ``errno`` says how (``EPROTO`` when given only a message).

    ``ProtocolError("what went wrong")`` is ``[Errno 71] what went wrong``; the usual
    ``OSError`` forms (``ProtocolError(errno, message)`` and longer) work as they do there.
    """

    def __init__(self, *args: object) -> None:
        if len(args) == 1 and isinstance(args[0], str):
            args = (errno.EPROTO, args[0])
        super().__init__(*args)
