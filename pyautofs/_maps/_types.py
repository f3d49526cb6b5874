"""The map layer's data: mount specs, resolved entries, warnings, and which keys are safe."""

from __future__ import annotations

import attrs

from .._proto._errors import FormatError

__all__ = ["MountSpec", "OffsetMount", "MapEntry", "MapWarning", "EscapeError", "valid_key"]


@attrs.frozen
class MountSpec:
    """What to mount: ``fstype`` ``bind``, ``tmpfs``, or a type for mount(8)."""

    fstype: str
    source: str
    options: tuple[str, ...] = ()


@attrs.frozen
class OffsetMount:
    """One mount of an entry; ``offset`` ``"/"`` is the key's own directory."""

    offset: str
    spec: MountSpec


@attrs.frozen
class MapEntry:
    """A resolved map entry for one key."""

    key: str
    mounts: tuple[OffsetMount, ...]

    @property
    def root(self) -> MountSpec | None:
        """The mount on the key's own directory, if any."""
        for m in self.mounts:
            if m.offset == "/":
                return m.spec
        return None


@attrs.frozen
class MapWarning:
    """A map line that was skipped, and why (``note``: expected, logged at INFO)."""

    file: str
    line: int
    message: str
    note: bool = False

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}"


class EscapeError(FormatError):
    """A key substituted into an entry would make a location leave what the entry names."""


def valid_key(key: str, *, direct: bool = False) -> bool:
    """Whether ``key`` can be spliced into a path safely."""
    if not key or "\0" in key or (len(key.encode(errors="surrogateescape")) > 255 and not direct):
        return False
    if direct:
        return key.startswith("/") and ".." not in key.split("/")
    return "/" not in key and key not in (".", "..")
