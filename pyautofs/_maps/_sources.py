"""Where maps come from: files (and what they include), programs, LDAP (``_ldap``).

This is the only module of the map layer that reads files. A map file is opened with
``O_NONBLOCK`` and refused unless it is a regular file, so a FIFO or a device put where a
map was cannot hang a reload; it is read up to :data:`MAX_MAP_BYTES`, and a larger one is
refused with a one-line error (the old map stays in use). Reading and parsing are blocking
work: the engine runs them off its event loop.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence

from .._sys._files import read_regular_file
from ._include import Included, IncludeSkipped
from ._ldap import (
    LdapMap,
    is_ldap_name,
    load_ldap_settings,
    parse_ldap_map_name,
    read_master_map,
    read_master_text,
)
from ._master import MasterEntry, map_source_kind, parse_master
from ._program import ProgramMap
from ._sun import SunMap, parse_sun_map
from ._types import MapWarning

__all__ = [
    "MAX_MAP_BYTES",
    "MapTooLarge",
    "read_map_file",
    "FileIncludes",
    "load_map",
    "parse_sun_map_file",
    "parse_master_map",
    "find_map_file",
    "reload_map",
]

MAX_MAP_BYTES = 16 * 1024 * 1024


class MapTooLarge(OSError):
    """A map file larger than :data:`MAX_MAP_BYTES`."""


def read_map_file(path: str, limit: int = MAX_MAP_BYTES) -> tuple[str, float]:
    """(text, mtime) of a map file; never blocks on a FIFO or device, refuses big ones."""
    data, st = read_regular_file(
        path, limit, limit_text=f"{limit // (1024 * 1024)} MiB", too_large=MapTooLarge
    )
    return data.decode("utf-8", "replace"), st.st_mtime


def find_map_file(name: str, including_dir: str) -> str | None:
    """The file a relative map name means: next to the including file, else in /etc."""
    if name.startswith("/"):
        return name
    for directory in (including_dir, "/etc"):
        candidate = os.path.join(directory, name)
        if os.path.exists(candidate):
            return candidate
    return None


class FileIncludes:
    """``read_include`` for maps on disk; remembers each file read and its mtime."""

    def __init__(self, *, master: bool = False) -> None:
        self.master = master
        self.mtimes: dict[str, float] = {}

    def read(self, path: str) -> Included:
        """Read one map file (as :func:`read_map_file`), by its real path."""
        real = os.path.realpath(path)
        text, mtime = read_map_file(real)
        self.mtimes[path] = mtime
        return Included(real, text)

    def __call__(self, name: str, including: str) -> Sequence[Included]:
        """The files ``+name`` in ``including`` brings in (see ``_include``)."""
        base = os.path.dirname(including) if including.startswith("/") else "."
        if name.startswith("dir:"):
            if not self.master:
                raise IncludeSkipped(f"include {name!r}: only master maps include directories")
            directory = name[len("dir:") :]
            try:
                names = sorted(n for n in os.listdir(directory) if n.endswith(".autofs"))
            except OSError as exc:
                raise IncludeSkipped(
                    f"included directory {directory}: {exc.strerror or exc}"
                ) from None
            return [self.read(os.path.join(directory, n)) for n in names]
        kind = map_source_kind(name)
        if kind is None:
            raise IncludeSkipped(f"included map {name!r}: this source is not read")
        if kind[0] == "ldap":
            if not self.master:
                raise IncludeSkipped(f"included map {name!r}: LDAP maps cannot be included here")
            try:
                return [Included(name, read_master_text(name))]
            except ValueError as exc:
                raise IncludeSkipped(f"included master map {name!r}: {exc}") from None
        target = find_map_file(kind[1], base)
        plain = "/" not in kind[1] and ":" not in name
        if plain and (target is None or os.path.realpath(target) == os.path.realpath(including)):
            # automount(8) looks the name up in the next source of nsswitch: NIS.
            raise IncludeSkipped(f"+{name} is a NIS map; NIS is not read here, skipped", note=True)
        if target is None:
            raise OSError(errno.ENOENT, "no such map", name)
        st = os.stat(target)
        if stat.S_ISREG(st.st_mode) and st.st_mode & 0o111 and not self.master:
            raise IncludeSkipped(f"included map {target}: program maps cannot be included")
        return [self.read(target)]


def parse_sun_map_file(path: str, *, defaults: Sequence[str] = (), direct: bool = False) -> SunMap:
    """Read and parse a map file (and the files it includes)."""
    reader = FileIncludes()
    top = reader.read(path)
    smap = parse_sun_map(top.text, top.name, read_include=reader, defaults=defaults, direct=direct)
    smap.path = path
    smap.sources = reader.mtimes
    return smap


def load_map(
    path: str, *, defaults: Sequence[str] = (), direct: bool = False
) -> SunMap | ProgramMap | LdapMap:
    """A file map, a program map if the file is executable, or an ``ldap:`` map.

    An LDAP map is not read here (each lookup asks the directory); its name and the
    settings are checked, and a bad one raises OSError (EINVAL) with the reason.
    """
    if is_ldap_name(path):
        try:
            return parse_ldap_map_name(path, load_ldap_settings(), defaults=defaults, direct=direct)
        except ValueError as exc:
            raise OSError(errno.EINVAL, str(exc), path) from None
    st = os.stat(path)
    if stat.S_ISREG(st.st_mode) and st.st_mode & 0o111:
        return ProgramMap(path, tuple(defaults), direct=direct)
    return parse_sun_map_file(path, defaults=defaults, direct=direct)


def reload_map(amap: SunMap | ProgramMap | LdapMap) -> SunMap | ProgramMap | LdapMap:
    """``amap`` re-read if it or a file it includes changed; else ``amap`` itself.

    Program and LDAP maps are asked afresh at each lookup: nothing to re-read.
    """
    if not isinstance(amap, SunMap):
        return amap
    try:
        if all(os.stat(p).st_mtime == t for p, t in amap.sources.items()):
            return amap
    except OSError:
        pass  # a file went away: re-read (and fail, keeping the old map, if it is the map)
    return load_map(amap.path, defaults=amap.defaults, direct=amap.direct)


def parse_master_map(path: str) -> tuple[list[MasterEntry], list[MapWarning]]:
    """Parse an auto.master file (and what it includes); relative map names are found.

    A relative name is looked up next to the master map, then in /etc. An ``ldap:`` name
    reads the master map from the directory (blocking, bounded by the LDAP timeouts).
    """
    if is_ldap_name(path):
        try:
            return read_master_map(path)
        except ValueError as exc:
            raise OSError(errno.EINVAL, str(exc), path) from None
    reader = FileIncludes(master=True)
    top = reader.read(path)
    entries, warnings = parse_master(top.text, top.name, read_include=reader)
    base = os.path.dirname(os.path.abspath(path))
    out = []
    for e in entries:
        if e.map_path.startswith(("ldap:", "ldaps:")) or e.map_path.startswith("/"):
            out.append(e)
            continue
        found = find_map_file(e.map_path, base) or os.path.join(base, e.map_path)
        out.append(MasterEntry(e.mount_point, found, e.timeout, e.options, e.strictexpire))
    return out, warnings
