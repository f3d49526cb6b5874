"""The base of the objects that own one file descriptor.

An owner closes its fd exactly once: :meth:`FdObject.close` is idempotent and leaves ``fd``
at -1, so a second close (or a ``with`` block after an explicit close) never closes a
number the process has since reused for something else.
"""

from __future__ import annotations

import os
from typing import TypeVar

__all__ = ["FdObject"]

_T = TypeVar("_T", bound="FdObject")


class FdObject:
    """Owns one file descriptor: ``fd``, an idempotent :meth:`close`, a context manager."""

    __slots__ = ("_fd",)

    def __init__(self, fd: int) -> None:
        self._fd = fd

    @property
    def fd(self) -> int:
        """The file descriptor (-1 once closed)."""
        return self._fd

    def close(self) -> None:
        """Close the fd. Idempotent."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __enter__(self: _T) -> _T:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
