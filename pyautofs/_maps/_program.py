"""Program maps: what to run for a key, and the entry its output names.

Pure: the engine runs the command (never through a shell, under a deadline) and hands the
output to :meth:`ProgramMap.parse_output`.

The output holds the key's text wherever the program put it, so nothing in it is unquoted,
taken as a comment or expanded: it is split at whitespace only, ``&`` stands for the key,
and a location with a ``..`` component is refused, as a key substituted into a file map's
entry is. A program that needs a space in a location cannot have one; one that printed
``"-fstype=bind :/srv/exports/$1"`` can no longer be walked out of ``/srv/exports`` by
keys such as ``..""``, ``..#``, ``.\\.`` or ``''..``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import attrs

from .._proto._escape import printable
from ._sun import compile_entry
from ._types import EscapeError, MapEntry, valid_key

__all__ = ["ProgramMap", "MAX_PROGRAM_OUTPUT"]

log = logging.getLogger("pyautofs.maps")

MAX_PROGRAM_OUTPUT = 64 * 1024
_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@attrs.frozen
class ProgramMap:
    """An executable map: run with the key as its only argument; stdout is the entry."""

    path: str
    defaults: tuple[str, ...] = ()
    timeout: float = 10.0
    direct: bool = False

    def command(
        self, key: str, variables: Mapping[str, str] | None = None
    ) -> tuple[list[str], dict[str, str]] | None:
        """The argv and the clean environment to run for ``key`` (never a shell).

        None for a key that cannot be looked up at all.
        """
        if not valid_key(key, direct=self.direct):
            return None
        env = {"PATH": _PATH}
        env.update(variables or {})
        return [self.path, key], env

    def parse_output(self, key: str, stdout: bytes, returncode: int) -> MapEntry | None:
        """The entry a run printed; None for a non-zero exit, empty or unusable output."""
        if returncode != 0 or len(stdout) > MAX_PROGRAM_OUTPUT:
            return None
        text = stdout.decode(errors="surrogateescape").replace("\\\n", " ")
        words = text.split()
        if not words:
            return None
        try:
            entry = compile_entry(words, self.defaults)
            for field in entry.fields:
                for part in (field.source, field.offset):
                    if ".." in part.split("/"):
                        raise EscapeError(f"{part!r} has a '..' component")
            return entry.resolve(key)
        except ValueError as exc:
            log.warning(
                "program map %s %s: unusable output: %s",
                self.path,
                printable(key),
                printable(str(exc)),
            )
            return None

    def reload(self) -> ProgramMap:
        """Program maps are run afresh each time; nothing to reload."""
        return self
