"""Sun-format map entries: text in, compiled entries out, a key in, mount specs out.

Pure: no files, no processes, no kernel calls.

A map line is ``key [-options] location``: ``#`` at the start of a word starts a comment,
a trailing ``\\`` continues the line, ``"..."`` and ``\\x`` quote the map's own text, ``*``
is the wildcard key (used only when no exact key matches) and ``&`` in the options, offsets
or location stands for the key. ``-fstype=bind :/path`` and a plain ``:/path`` bind-mount a
local path, ``-fstype=tmpfs`` mounts a tmpfs, anything else is for mount(8). Multi-mount
entries (``key /a :/x /b :/y``) list offsets below the key.

The order of work is automount(8)'s, and it is what keeps a key harmless:

1. the map's own text is split into words and unquoted (:func:`split_words`);
2. ``$VAR`` and ``${VAR}`` are expanded in those words (only there: never in a key);
3. the entry's shape (options, offsets, locations) is decided (:func:`compile_entry`);
4. only then is ``&`` replaced by the key, in each field. The key's text is never split,
   unquoted, taken as a comment or expanded, and a location that the substitution makes
   leave the directory the entry names (a ``..`` component after the first ``&``) is
   refused (:class:`EscapeError`).

An entry without ``$`` variables depends only on the key, so it is compiled once, when the
map is read; a lookup is then a dict hit, the ``&`` substitution and the escape check.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Mapping, Sequence

import attrs

from .._proto._escape import printable
from ._include import MAX_INCLUDES, ReadInclude, includes
from ._types import EscapeError, MapEntry, MapWarning, MountSpec, OffsetMount, valid_key

__all__ = [
    "map_lines",
    "MountSpec",
    "OffsetMount",
    "MapEntry",
    "MapWarning",
    "CompiledEntry",
    "EscapeError",
    "valid_key",
    "logical_lines",
    "split_words",
    "expand_variables",
    "compile_entry",
    "check_location",
    "SunMap",
    "parse_sun_map",
]

log = logging.getLogger("pyautofs.maps")


def logical_lines(text: str) -> Iterator[tuple[int, str]]:
    """(first line number, text) of each line, continuations joined; linear time."""
    buf: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.rstrip()
        if not buf:
            start = number
            stripped = line.lstrip()
            if not stripped or stripped.startswith("#"):
                continue
        if line.endswith("\\"):
            buf.append(line[:-1])
            continue
        buf.append(line)
        yield start, " ".join(buf)
        buf = []
    if buf:
        yield start, " ".join(buf)


# One word: unquoted characters, \x escapes and "..." strings, glued together. The
# alternatives never overlap, so the regex engine is linear in the line's length.
_WORD = re.compile(r'\s*(?:(#)|((?:[^\s"\\]|\\.|"(?:[^"\\]|\\.)*")+)|(\S))', re.DOTALL)
_UNQUOTE = re.compile(r'\\(.)|"((?:[^"\\]|\\.)*)"', re.DOTALL)
_UNESCAPE = re.compile(r"\\(.)", re.DOTALL)


def _unquote(match: re.Match[str]) -> str:
    if match.group(1) is not None:
        return match.group(1)
    return _UNESCAPE.sub(r"\1", match.group(2))


def split_words(line: str) -> list[str]:
    """Split a line of the map's own text into unquoted words; raises ValueError.

    Linear time, whatever the line. Never used on a key or on text that holds one.
    """
    words: list[str] = []
    pos, end = 0, len(line)
    while pos < end:
        m = _WORD.match(line, pos)
        if m is None:  # only whitespace left
            break
        pos = m.end()
        if m.group(1) is not None:
            break  # a comment runs to the end of the line
        word = m.group(2)
        if word is None:
            if m.group(3) is None:
                break
            if m.group(3) == '"':
                raise ValueError("an unterminated quote")
            raise ValueError("a lone backslash")
        if '"' in word or "\\" in word:
            word = _UNQUOTE.sub(_unquote, word)
        words.append(word)
    return words


_VAR = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")


def expand_variables(text: str, variables: Mapping[str, str]) -> str:
    """``$NAME`` and ``${NAME}`` replaced by their values (unknown ones by nothing)."""
    if "$" not in text:
        return text
    return _VAR.sub(lambda m: variables.get(m.group(1) or m.group(2), ""), text)


def _options(word: str) -> list[str]:
    return [o for o in word[1:].split(",") if o]


@attrs.frozen
class _Field:
    """One mount of a compiled entry, ``&`` not yet replaced."""

    offset: str
    fstype: str
    source: str
    options: tuple[str, ...]


def _spec_fields(options: Sequence[str], location: str) -> tuple[str, str, tuple[str, ...]]:
    fstype = ""
    rest: list[str] = []
    for opt in options:
        if opt.startswith("fstype="):
            fstype = opt[len("fstype=") :]
        elif opt:
            rest.append(opt)
    if location.startswith(":"):
        source = location[1:]
        fstype = fstype or "bind"
    else:
        source = location
        fstype = fstype or ("nfs" if ":" in location else "bind")
    if fstype == "bind":
        rest = [o for o in rest if o not in ("bind", "rbind")]
    return fstype, source, tuple(rest)


def _normalize_offset(offset: str) -> str:
    parts = [p for p in offset.split("/") if p and p != "."]
    return "/" + "/".join(parts)


@attrs.frozen
class CompiledEntry:
    """An entry's shape, decided from the map's text; :meth:`resolve` puts a key in it."""

    fields: tuple[_Field, ...]
    uses_key: bool

    def resolve(self, key: str) -> MapEntry:
        """The entry for ``key``: ``&`` replaced in each field; raises EscapeError."""
        if not self.uses_key:
            return MapEntry(
                key,
                tuple(
                    OffsetMount(f.offset, MountSpec(f.fstype, f.source, f.options)) for f in self
                ),
            )
        mounts = []
        for f in self.fields:
            source = f.source.replace("&", key)
            check_location(f.source, source)
            offset = f.offset
            if "&" in offset:
                offset = f.offset.replace("&", key)
                check_location(f.offset, offset)
                offset = _normalize_offset(offset)
            options = tuple(o.replace("&", key) for o in f.options)
            mounts.append(OffsetMount(offset, MountSpec(f.fstype, source, options)))
        return MapEntry(key, tuple(mounts))

    def __iter__(self) -> Iterator[_Field]:
        return iter(self.fields)


def compile_entry(words: Sequence[str], defaults: Sequence[str] = ()) -> CompiledEntry:
    """The shape of an entry from its words after the key (variables expanded).

    Raises ValueError for an entry without a location, or with words after it.
    """
    options = list(defaults)
    i = 0
    while i < len(words) and words[i].startswith("-"):
        options += _options(words[i])
        i += 1
    if i >= len(words):
        raise ValueError("no location")
    triples: list[tuple[str, list[str], str]] = []
    if not words[i].startswith("/"):
        if i + 1 != len(words):
            raise ValueError(f"unexpected {words[i + 1]!r} after the location")
        triples.append(("/", options, words[i]))
    else:
        # A multi-mount entry: /offset [-options] location ...
        while i < len(words):
            offset = words[i]
            if not offset.startswith("/"):
                raise ValueError(f"expected an offset starting with '/', got {offset!r}")
            i += 1
            opts = list(options)
            while i < len(words) and words[i].startswith("-"):
                opts += _options(words[i])
                i += 1
            if i >= len(words) or words[i].startswith("/"):
                raise ValueError(f"offset {offset} has no location")
            if ".." in offset.split("/"):
                raise ValueError(f"offset {offset} has a '..' component")
            triples.append((offset if "&" in offset else _normalize_offset(offset), opts, words[i]))
            i += 1
    fields = []
    for offset, opts, location in triples:
        fstype, source, rest = _spec_fields(opts, location)
        fields.append(_Field(offset, fstype, source, rest))
    uses_key = any(
        "&" in f.source or "&" in f.offset or any("&" in o for o in f.options) for f in fields
    )
    return CompiledEntry(tuple(fields), uses_key)


def check_location(template: str, resolved: str) -> None:
    """Refuse ``resolved`` if the key's text made it leave the directory ``template`` names.

    What follows the last ``/`` before the template's first ``&`` came (partly) from the
    key; it must hold no ``..`` component. Raises :class:`EscapeError`.
    """
    at = template.find("&")
    if at < 0:
        return
    start = template.rfind("/", 0, at) + 1
    if ".." in resolved[start:].split("/"):
        raise EscapeError(f"{resolved!r} leaves {template[:start] or template!r}")


_RESOLVED_CACHE_SIZE = 16384
_MISSING = object()


@attrs.define
class SunMap:
    """A parsed file map: exact keys, an optional wildcard, and the warnings.

    ``entries`` holds each key's words after the key (the map's text, unexpanded);
    ``compiled`` the entries without ``$`` variables, compiled once.
    """

    path: str
    entries: dict[str, list[str]]
    defaults: tuple[str, ...] = ()
    direct: bool = False
    warnings: list[MapWarning] = attrs.Factory(list)
    sources: dict[str, float] = attrs.Factory(dict)
    """Every file read (this one and its includes) -> its mtime then."""
    compiled: dict[str, CompiledEntry] = attrs.Factory(dict)
    _resolved: dict[str, MapEntry | None] = attrs.field(
        factory=dict, init=False, repr=False, eq=False
    )

    def keys(self) -> list[str]:
        """The exact keys (for browse mode and direct maps)."""
        return [k for k in self.entries if k != "*"]

    def lookup(self, key: str, variables: Mapping[str, str] | None = None) -> MapEntry | None:
        """Resolve ``key`` (exact, then the wildcard); None if there is no such key.

        An entry the key cannot be put into safely (see :func:`check_location`) is None too.
        """
        cached = self._resolved.get(key, _MISSING)
        if cached is not _MISSING:
            return cached  # type: ignore[return-value]
        if not valid_key(key, direct=self.direct):
            return None
        which = key if key in self.entries else "*"
        compiled = self.compiled.get(which)
        if compiled is None:
            words = self.entries.get(which)
            if words is None:
                return None
            try:
                vs = {} if variables is None else variables
                compiled = compile_entry([expand_variables(w, vs) for w in words], self.defaults)
                return compiled.resolve(key)
            except ValueError as exc:
                _log_unusable(self.path, key, exc)
                return None
        try:
            entry: MapEntry | None = compiled.resolve(key)
        except EscapeError as exc:
            _log_unusable(self.path, key, exc)
            entry = None
        if len(self._resolved) >= _RESOLVED_CACHE_SIZE:
            self._resolved.clear()
        self._resolved[key] = entry
        return entry


def _log_unusable(path: str, key: str, exc: Exception) -> None:
    log.warning("%s: map entry for %s is unusable: %s", path, printable(key), printable(str(exc)))


def parse_sun_map(
    text: str,
    path: str = "<map>",
    *,
    read_include: ReadInclude | None = None,
    defaults: Sequence[str] = (),
    direct: bool = False,
) -> SunMap:
    """Parse map text; bad lines become warnings (and log lines), never errors.

    ``+name`` lines include other maps through ``read_include`` (see :mod:`._include`);
    without it, every include is skipped with a warning. The first definition of a key
    wins, whether it comes from this text or an included one.
    """
    entries: dict[str, list[str]] = {}
    warnings: list[MapWarning] = []
    for where, number, words in map_lines(text, path, read_include=read_include, warnings=warnings):
        _add_entry(words, where, number, direct=direct, entries=entries, warnings=warnings)
    compiled: dict[str, CompiledEntry] = {}
    for key, words in entries.items():
        if not any("$" in w for w in words):
            compiled[key] = compile_entry(words, defaults)  # checked when it was read
    for w in warnings:
        log.log(logging.INFO if w.note else logging.WARNING, "%s", w)
    return SunMap(path, entries, tuple(defaults), direct, warnings, {}, compiled)


def map_lines(
    text: str,
    path: str,
    *,
    read_include: ReadInclude | None,
    warnings: list[MapWarning],
    stack: tuple[str, ...] | None = None,
    budget: list[int] | None = None,
) -> Iterator[tuple[str, int, list[str]]]:
    """Every non-empty line of a map and of the maps it includes, split into words.

    Yields ``(file, line number, words)``; an included map's lines come in place of its
    ``+name`` line. A line that cannot be split, and a refused include, become a warning.
    The same walk serves file maps and master maps.
    """
    if stack is None:
        stack = (path,)
    if budget is None:
        budget = [MAX_INCLUDES]
    for number, line in logical_lines(text):
        try:
            words = split_words(line)
        except ValueError as exc:
            warnings.append(MapWarning(path, number, f"cannot split the line: {exc}"))
            continue
        if not words:
            continue
        if not words[0].startswith("+"):
            yield path, number, words
            continue
        for inc in includes(
            words[0][1:],
            path,
            number,
            stack=stack,
            read_include=read_include,
            warnings=warnings,
            budget=budget,
        ):
            yield from map_lines(
                inc.text,
                inc.name,
                read_include=read_include,
                warnings=warnings,
                stack=(*stack, inc.name),
                budget=budget,
            )


def _add_entry(
    words: list[str],
    path: str,
    number: int,
    *,
    direct: bool,
    entries: dict[str, list[str]],
    warnings: list[MapWarning],
) -> None:
    key, body = words[0], words[1:]
    if key != "*" and not valid_key(key, direct=direct):
        what = "an absolute path" if direct else "a name without '/'"
        warnings.append(MapWarning(path, number, f"bad key {key!r}: expected {what}"))
        return
    try:
        # The shape is checked with the variables left in: a value cannot add words.
        compile_entry(body)
    except ValueError as exc:
        warnings.append(MapWarning(path, number, f"bad entry for {key!r}: {exc}"))
        return
    if key in entries:
        warnings.append(
            MapWarning(path, number, f"duplicate key {key!r}: the first definition is used")
        )
        return
    entries[key] = body
