"""``+name`` includes in file maps and master maps: what each name means, loops and depth.

Pure: the parsers hand a ``+name`` line here with a ``read_include(name, including)``
callable that does the reading (files in ``_sources``; anything in tests and fuzzers).

As in automount(8):

- ``+/path`` and ``+file:/path`` include that file; ``+dir:/path`` (master maps) every
  ``*.autofs`` file of the directory, in name order;
- ``+name`` is looked up as a map name: a file next to the including one or in ``/etc``,
  else a NIS map. A name that finds the including file itself (Debian's default
  ``/etc/auto.master`` holds ``+auto.master``) or no file at all is a NIS include; NIS is
  not read here, so it is skipped with a note, not an error;
- ``+ldap:...`` includes an LDAP map where the reader can read one (master maps);
- an include that would loop, or nest deeper than :data:`MAX_INCLUDE_DEPTH`, is refused
  with a warning.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import attrs

from ._types import MapWarning

__all__ = [
    "MAX_INCLUDE_DEPTH",
    "MAX_INCLUDES",
    "Included",
    "IncludeSkipped",
    "ReadInclude",
    "includes",
]

MAX_INCLUDE_DEPTH = 16
MAX_INCLUDES = 256
"""Maps one parse may include in all: files that include each other in every order would
otherwise be read a factorial number of times within the depth limit."""


@attrs.frozen
class Included:
    """One map an include brings in: a name unique to it (a real path) and its text."""

    name: str
    text: str


class IncludeSkipped(Exception):
    """An include the reader does not read; ``note`` for an expected one (NIS)."""

    def __init__(self, message: str, *, note: bool = False) -> None:
        super().__init__(message)
        self.note = note


ReadInclude = Callable[[str, str], Sequence[Included]]
"""``read_include(name, including)``: the maps ``+name`` in ``including`` brings in.

Raises :class:`IncludeSkipped` or OSError."""


def includes(
    name: str,
    path: str,
    number: int,
    *,
    stack: tuple[str, ...],
    read_include: ReadInclude | None,
    warnings: list[MapWarning],
    budget: list[int],
) -> Iterator[Included]:
    """The included maps to parse for a ``+name`` line; what is refused becomes a warning.

    ``budget`` is a one-item list: the includes this parse may still read.
    """
    if read_include is None:
        warnings.append(MapWarning(path, number, f"include {name!r}: includes are not read here"))
        return
    if budget[0] <= 0:
        warnings.append(
            MapWarning(path, number, f"more than {MAX_INCLUDES} includes: {name!r} skipped")
        )
        return
    budget[0] -= 1
    try:
        found = read_include(name, path)
    except IncludeSkipped as exc:
        warnings.append(MapWarning(path, number, str(exc), note=exc.note))
        return
    except OSError as exc:
        warnings.append(MapWarning(path, number, f"included map {name}: {exc.strerror or exc}"))
        return
    for included in found:
        if included.name in stack:
            chain = " -> ".join([*stack, included.name])
            warnings.append(MapWarning(path, number, f"include loop: {chain}"))
            continue
        if len(stack) >= MAX_INCLUDE_DEPTH:
            warnings.append(
                MapWarning(path, number, f"includes nested deeper than {MAX_INCLUDE_DEPTH}")
            )
            continue
        yield included
