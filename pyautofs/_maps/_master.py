"""Master maps (auto.master): text in, one :class:`MasterEntry` per mount point out.

Pure: includes are read through a ``read_include`` callable (see :mod:`._include`). A line
is ``mount-point map [options]``; ``/-`` is a direct map; ``-null`` as the map drops the
lines before it for that mount point; the first line for a mount point wins. Map names are
kept as written (``file:`` and ``program:`` prefixes dropped): the sources layer finds the
file a relative name means. ``ldap:``/``ldaps:`` names are LDAP maps. Bad lines become
:class:`MapWarning` (file:line and why) and are skipped.
"""

from __future__ import annotations

import logging
import posixpath

import attrs

from ._include import ReadInclude
from ._sun import map_lines
from ._types import MapWarning

__all__ = ["MasterEntry", "parse_master", "map_source_kind"]

log = logging.getLogger("pyautofs.maps")


@attrs.frozen
class MasterEntry:
    """One line of a master map."""

    mount_point: str
    """An absolute path, or ``"/-"`` for a direct map."""
    map_path: str
    """A file (absolute, or a name the sources layer finds), or an ``ldap:``/``ldaps:`` map."""
    timeout: int | None
    options: tuple[str, ...]
    """Sun options that become the map entries' defaults."""
    strictexpire: bool = False

    @property
    def direct(self) -> bool:
        """True for a ``/-`` line."""
        return self.mount_point == "/-"


def map_source_kind(name: str) -> tuple[str, str] | None:
    """(``file`` or ``ldap``, the name to read) of a map name; None if not supported.

    ``file:X`` and ``program:X`` are files (a program map is an executable file);
    ``ldap:...`` and ``ldaps:...`` are LDAP maps, kept whole; ``yp:``, ``nis:``,
    ``hesiod:``, ``sss:`` and the like are not read here.
    """
    head, colon, rest = name.partition(":")
    if not colon or "/" in head:
        return ("file", name) if name and not name.startswith("-") else None
    head = head.split(",", 1)[0]  # automount's "type,format:" form
    if head in ("file", "program", "exec"):
        return ("file", rest) if rest else None
    if head in ("ldap", "ldaps"):
        return ("ldap", name) if rest else None
    return None


def parse_master(
    text: str, path: str = "<master>", *, read_include: ReadInclude | None = None
) -> tuple[list[MasterEntry], list[MapWarning]]:
    """Parse master-map text (and what it includes); bad lines become warnings."""
    entries: list[MasterEntry] = []
    warnings: list[MapWarning] = []
    for where, number, words in map_lines(text, path, read_include=read_include, warnings=warnings):
        if len(words) < 2:
            warnings.append(MapWarning(where, number, "a mount point with no map"))
            continue
        entry = _entry(words, where, number, entries, warnings)
        if entry is not None:
            entries.append(entry)
    for w in warnings:
        log.log(logging.INFO if w.note else logging.WARNING, "%s", w)
    return entries, warnings


def _entry(
    words: list[str],
    path: str,
    number: int,
    entries: list[MasterEntry],
    warnings: list[MapWarning],
) -> MasterEntry | None:
    mount_point, name, rest = words[0], words[1], words[2:]
    if not mount_point.startswith("/"):
        warnings.append(MapWarning(path, number, f"mount point {mount_point!r} is not absolute"))
        return None
    if mount_point != "/-":
        mount_point = posixpath.normpath(mount_point)
    if name == "-null":
        entries[:] = [e for e in entries if e.mount_point != mount_point]
        return None
    if mount_point != "/-" and any(e.mount_point == mount_point for e in entries):
        warnings.append(
            MapWarning(path, number, f"duplicate mount point {mount_point}: the first line is used")
        )
        return None
    source = map_source_kind(name)
    if source is None:
        warnings.append(MapWarning(path, number, f"map source {name!r} is not supported"))
        return None
    timeout: int | None = None
    options: list[str] = []
    strict = False
    i = 0
    try:
        while i < len(rest):
            word = rest[i]
            if word.startswith("--timeout="):
                timeout = int(word.split("=", 1)[1])
            elif word in ("--timeout", "-t"):
                i += 1
                timeout = int(rest[i])
            elif word == "strictexpire":
                strict = True
            elif word.startswith("--") or word in ("browse", "nobrowse", "--ghost"):
                pass  # accepted, no effect here
            elif word.startswith("-"):
                options += [o for o in word[1:].split(",") if o]
            i += 1
    except (ValueError, IndexError):
        warnings.append(MapWarning(path, number, f"bad options {' '.join(rest)!r}"))
        return None
    if timeout is not None and timeout < 0:
        warnings.append(MapWarning(path, number, f"bad timeout {timeout}"))
        return None
    return MasterEntry(mount_point, source[1], timeout, tuple(options), strict)
