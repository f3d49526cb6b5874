"""The autofs "sun" map format and master maps: text in, mount specs and warnings out.

Pure parsing, plus running program maps (a subprocess, never a shell). No kernel calls.

A map line is ``key [-options] location``: ``#`` starts a comment line, a trailing ``\\``
continues the line, ``*`` is the wildcard key (used only when no exact key matches) and
``&`` in the options or location stands for the key. ``-fstype=bind :/path`` and a plain
``:/path`` bind-mount a local path, ``-fstype=tmpfs`` mounts a tmpfs, anything else is
for mount(8). Multi-mount entries (``key /a :/x /b :/y``) list offsets below the key.

A line ``+name`` includes another map file there (``+/path``, ``+file:/path``, or a name
found next to the including file or in ``/etc``): as in automount(8), the first definition
of a key wins, whether it comes from the file or an included one. Master maps include
other master maps the same way, and ``+dir:/path`` includes every ``*.autofs`` file of a
directory, in name order. An include that would loop is refused with a warning.

A bad line never stops anything: it becomes a :class:`MapWarning` (file:line and why), is
logged to ``pyautofs.maps`` and skipped.
"""

from __future__ import annotations

import logging
import os
import posixpath
import re
import shlex
import stat
import subprocess
from collections.abc import Iterator, Mapping, Sequence

import attrs

__all__ = [
    "MountSpec",
    "OffsetMount",
    "MapEntry",
    "MapWarning",
    "SunMap",
    "ProgramMap",
    "MasterEntry",
    "parse_sun_map",
    "parse_master_map",
    "load_map",
    "valid_key",
    "MAX_PROGRAM_OUTPUT",
    "MAX_INCLUDE_DEPTH",
]

log = logging.getLogger("pyautofs.maps")

MAX_PROGRAM_OUTPUT = 64 * 1024
MAX_INCLUDE_DEPTH = 16
_RESOLVED_CACHE_SIZE = 16384
_MISSING = object()
_VAR = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")


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
    """A map line that was skipped, and why."""

    file: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}"


def valid_key(key: str, *, direct: bool = False) -> bool:
    """Whether ``key`` can be spliced into a path safely."""
    if not key or "\0" in key or (len(key.encode(errors="surrogateescape")) > 255 and not direct):
        return False
    if direct:
        return key.startswith("/") and ".." not in key.split("/")
    return "/" not in key and key not in (".", "..")


def _substitute(text: str, key: str, variables: Mapping[str, str]) -> str:
    text = text.replace("&", key)
    if "$" in text:
        text = _VAR.sub(lambda m: variables.get(m.group(1) or m.group(2), ""), text)
    return text


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """Join continuation lines and drop comments; (first line number, text)."""
    out: list[tuple[int, str]] = []
    buf: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.rstrip()
        if not buf:
            start = number
            if not line.strip() or line.lstrip().startswith("#"):
                continue
        if line.endswith("\\"):
            buf.append(line[:-1])
            continue
        buf.append(line)
        out.append((start, " ".join(buf)))
        buf = []
    if buf:
        out.append((start, " ".join(buf)))
    return out


def _split(line: str) -> list[str]:
    return shlex.split(line, comments=True, posix=True)


def _token_lines(
    text: str, path: str, warnings: list[MapWarning]
) -> Iterator[tuple[int, list[str]]]:
    """(line number, tokens) of each non-empty logical line; unsplittable ones warn."""
    for number, line in _logical_lines(text):
        try:
            tokens = _split(line)
        except ValueError as exc:
            warnings.append(MapWarning(path, number, f"cannot split the line: {exc}"))
            continue
        if tokens:
            yield number, tokens


def _spec(options: Sequence[str], location: str) -> MountSpec:
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
    return MountSpec(fstype, source, tuple(rest))


def _options(token: str) -> list[str]:
    return [o for o in token[1:].split(",") if o]


def _parse_entry_body(
    tokens: list[str], defaults: Sequence[str]
) -> list[tuple[str, list[str], str]]:
    """(offset, options, location) triples of an entry's body; raises ValueError."""
    options = list(defaults)
    i = 0
    while i < len(tokens) and tokens[i].startswith("-"):
        options += _options(tokens[i])
        i += 1
    if i >= len(tokens):
        raise ValueError("no location")
    if not tokens[i].startswith("/"):
        location = tokens[i]
        if i + 1 != len(tokens):
            raise ValueError(f"unexpected {tokens[i + 1]!r} after the location")
        return [("/", options, location)]
    # A multi-mount entry: /offset [-options] location ...
    out = []
    while i < len(tokens):
        offset = tokens[i]
        if not offset.startswith("/"):
            raise ValueError(f"expected an offset starting with '/', got {offset!r}")
        i += 1
        opts = list(options)
        while i < len(tokens) and tokens[i].startswith("-"):
            opts += _options(tokens[i])
            i += 1
        if i >= len(tokens) or tokens[i].startswith("/"):
            raise ValueError(f"offset {offset} has no location")
        out.append((posixpath.normpath(offset) if offset != "/" else "/", opts, tokens[i]))
        i += 1
    return out


def _check_local(spec: MountSpec, template: str) -> None:
    """A key substituted into a local path must not walk out of the written prefix."""
    if spec.fstype != "bind" or "&" not in template:
        return
    written = template.lstrip(":").split("&", 1)[0]
    prefix = posixpath.normpath(written) if written.rstrip("/") else "/"
    resolved = posixpath.normpath(spec.source)
    if not (resolved == prefix or resolved.startswith(prefix.rstrip("/") + "/")):
        raise ValueError(f"{spec.source!r} escapes {prefix!r}")


@attrs.define
class SunMap:
    """A parsed file map: exact keys, an optional wildcard, and the warnings."""

    path: str
    entries: dict[str, list[str]]
    """key -> the entry's tokens after the key (unresolved)."""
    defaults: tuple[str, ...] = ()
    direct: bool = False
    warnings: list[MapWarning] = attrs.Factory(list)
    sources: dict[str, float] = attrs.Factory(dict)
    """Every file read (this one and its includes) -> its mtime then."""
    _resolved: dict[str, MapEntry | None] = attrs.field(
        factory=dict, init=False, repr=False, eq=False
    )

    def keys(self) -> list[str]:
        """The exact keys (for browse mode and direct maps)."""
        return [k for k in self.entries if k != "*"]

    def lookup(self, key: str, variables: Mapping[str, str] | None = None) -> MapEntry | None:
        """Resolve ``key`` (exact, then the wildcard); None if there is no such key."""
        if not valid_key(key, direct=self.direct):
            return None
        cached = self._resolved.get(key, _MISSING)
        if cached is not _MISSING:
            return cached  # type: ignore[return-value]
        tokens = self.entries.get(key)
        if tokens is None:
            tokens = self.entries.get("*")
            if tokens is None:
                return None
        entry = resolve_entry(key, tokens, self.defaults, {} if variables is None else variables)
        if not any("$" in t for t in tokens):
            # Without variables an entry depends only on the key: resolve it once.
            if len(self._resolved) >= _RESOLVED_CACHE_SIZE:
                self._resolved.clear()
            self._resolved[key] = entry
        return entry

    def reload(self) -> SunMap:
        """Re-read the file if it or a file it includes changed; returns the current map."""
        try:
            if not os.path.exists(self.path) or all(
                _mtime(p) == t for p, t in self.sources.items()
            ):
                return self
        except OSError:
            pass  # an included file went away: re-read
        return parse_sun_map_file(self.path, defaults=self.defaults, direct=self.direct)


def resolve_entry(
    key: str, tokens: Sequence[str], defaults: Sequence[str], variables: Mapping[str, str]
) -> MapEntry | None:
    """Turn an entry's tokens into mounts for ``key``; None if the entry is unusable."""
    subst = [_substitute(t, key, variables) for t in tokens]
    try:
        triples = _parse_entry_body(subst, defaults)
        mounts = []
        for (offset, options, location), template in zip(
            triples, _templates(tokens, defaults), strict=False
        ):
            spec = _spec(options, location)
            _check_local(spec, template)
            mounts.append(OffsetMount(offset, spec))
    except ValueError as exc:
        log.warning("map entry for %r is unusable: %s", key, exc)
        return None
    return MapEntry(key, tuple(mounts))


def _templates(tokens: Sequence[str], defaults: Sequence[str]) -> list[str]:
    try:
        return [loc for _, _, loc in _parse_entry_body(list(tokens), defaults)]
    except ValueError:
        return []


def _mtime(path: str) -> float:
    return os.stat(path).st_mtime


def _include_target(name: str, including: str) -> str | None:
    """The file a ``+name`` line includes; None for a source this parser cannot read."""
    if name.startswith("file:"):
        name = name[len("file:") :]
    elif ":" in name.split("/", 1)[0]:
        return None  # ldap:, yp:, nis: and such
    if not name:
        return None
    if name.startswith("/"):
        return name
    base = os.path.dirname(os.path.abspath(including)) if including != "<map>" else "."
    for directory in (base, "/etc"):
        candidate = os.path.join(directory, name)
        if os.path.exists(candidate):
            return candidate
    return os.path.join(base, name)


def _chain(stack: Sequence[str], last: str) -> str:
    return " -> ".join([*stack, last])


def parse_sun_map(
    text: str,
    path: str = "<map>",
    *,
    defaults: Sequence[str] = (),
    direct: bool = False,
    _stack: tuple[str, ...] = (),
) -> SunMap:
    """Parse map text; bad lines become warnings (and log lines), never errors.

    ``+name`` lines include other map files (see the module documentation).
    """
    entries: dict[str, list[str]] = {}
    warnings: list[MapWarning] = []
    sources: dict[str, float] = {}
    stack = (*_stack, os.path.realpath(path)) if path != "<map>" else _stack
    for number, tokens in _token_lines(text, path, warnings):
        key, body = tokens[0], tokens[1:]
        if key.startswith("+"):
            target = _include_target(key[1:], path)
            problem = None
            if target is None:
                problem = f"included map {key[1:]!r}: only files can be included"
            elif os.path.realpath(target) in stack:
                problem = f"include loop: {_chain(stack, os.path.realpath(target))}"
            elif len(stack) >= MAX_INCLUDE_DEPTH:
                problem = f"includes nested deeper than {MAX_INCLUDE_DEPTH}"
            elif os.access(target, os.X_OK) and os.path.isfile(target):
                problem = f"included map {target}: program maps cannot be included"
            if problem is not None:
                warnings.append(MapWarning(path, number, problem))
                continue
            assert target is not None
            try:
                included = parse_sun_map_file(
                    target, defaults=defaults, direct=direct, _stack=stack
                )
            except OSError as exc:
                warnings.append(MapWarning(path, number, f"included map {target}: {exc.strerror}"))
                continue
            for k, v in included.entries.items():
                entries.setdefault(k, v)
            warnings.extend(included.warnings)
            sources.update(included.sources)
            continue
        if key != "*" and not valid_key(key, direct=direct):
            what = "an absolute path" if direct else "a name without '/'"
            warnings.append(MapWarning(path, number, f"bad key {key!r}: expected {what}"))
            continue
        try:
            _parse_entry_body(body, defaults)
        except ValueError as exc:
            warnings.append(MapWarning(path, number, f"bad entry for {key!r}: {exc}"))
            continue
        if key in entries:
            warnings.append(
                MapWarning(path, number, f"duplicate key {key!r}: the first definition is used")
            )
            continue
        entries[key] = body
    if not _stack:
        for w in warnings:
            log.warning("%s", w)
    return SunMap(path, entries, tuple(defaults), direct, warnings, sources)


def parse_sun_map_file(
    path: str,
    *,
    defaults: Sequence[str] = (),
    direct: bool = False,
    _stack: tuple[str, ...] = (),
) -> SunMap:
    """Read and parse a map file (and the files it includes)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        mtime = os.fstat(f.fileno()).st_mtime
        text = f.read()
    smap = parse_sun_map(text, path, defaults=defaults, direct=direct, _stack=_stack)
    smap.sources[path] = mtime
    return smap


@attrs.frozen
class ProgramMap:
    """An executable map: run with the key as its only argument; stdout is the entry."""

    path: str
    defaults: tuple[str, ...] = ()
    timeout: float = 10.0
    direct: bool = False

    def command(
        self, key: str, variables: Mapping[str, str] | None = None
    ) -> tuple[list[str], dict[str, str]]:
        """The argv and the clean environment to run for ``key`` (never a shell)."""
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
        env.update(variables or {})
        return [self.path, key], env

    def parse_output(
        self, key: str, stdout: bytes, returncode: int, variables: Mapping[str, str] | None = None
    ) -> MapEntry | None:
        """The entry a run printed; None for a non-zero exit or empty output."""
        if returncode != 0 or len(stdout) > MAX_PROGRAM_OUTPUT:
            return None
        text = stdout.decode(errors="replace").replace("\\\n", " ").strip()
        if not text:
            return None
        try:
            tokens = _split(text)
        except ValueError:
            log.warning("%s %s: unparsable output", self.path, key)
            return None
        return resolve_entry(key, tokens, self.defaults, {} if variables is None else variables)

    def lookup(self, key: str, variables: Mapping[str, str] | None = None) -> MapEntry | None:
        """Run the program synchronously (with the deadline) and parse its output."""
        if not valid_key(key, direct=self.direct):
            return None
        argv, env = self.command(key, variables)
        try:
            done = subprocess.run(
                argv,
                env=env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=self.timeout,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.warning("program map %s %s: %s", self.path, key, exc)
            return None
        return self.parse_output(key, done.stdout, done.returncode, variables)

    def reload(self) -> ProgramMap:
        """Program maps are run afresh each time; nothing to reload."""
        return self


def load_map(
    path: str, *, defaults: Sequence[str] = (), direct: bool = False
) -> SunMap | ProgramMap:
    """A file map, or a program map if the file is executable."""
    st = os.stat(path)
    if stat.S_ISREG(st.st_mode) and st.st_mode & 0o111:
        return ProgramMap(path, tuple(defaults), direct=direct)
    return parse_sun_map_file(path, defaults=defaults, direct=direct)


@attrs.frozen
class MasterEntry:
    """One line of a master map."""

    mount_point: str
    """An absolute path, or ``"/-"`` for a direct map."""
    map_path: str
    timeout: int | None
    options: tuple[str, ...]
    """Sun options that become the map entries' defaults."""
    strictexpire: bool = False

    @property
    def direct(self) -> bool:
        """True for a ``/-`` line."""
        return self.mount_point == "/-"


def _resolve_map_name(name: str, master_dir: str) -> str | None:
    for prefix in ("file:", "program:"):
        if name.startswith(prefix):
            return name[len(prefix) :]
    if ":" in name or name.startswith("-"):
        return None
    if name.startswith("/"):
        return name
    for base in (master_dir, "/etc"):
        candidate = os.path.join(base, name)
        if os.path.exists(candidate):
            return candidate
    return os.path.join(master_dir, name)


def parse_master_map(path: str) -> tuple[list[MasterEntry], list[MapWarning]]:
    """Parse an auto.master file (and what it includes); bad lines become warnings.

    The first line for a mount point wins; ``-null`` drops the lines before it.
    """
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    entries: list[MasterEntry] = []
    warnings: list[MapWarning] = []
    _parse_master(text, path, (os.path.realpath(path),), entries, warnings)
    for w in warnings:
        log.warning("%s", w)
    return entries, warnings


def _include_master(
    name: str,
    path: str,
    number: int,
    *,
    stack: tuple[str, ...],
    entries: list[MasterEntry],
    warnings: list[MapWarning],
) -> None:
    """A ``+name`` or ``+dir:DIR`` line of a master map."""
    if name.startswith("dir:"):
        directory = name[len("dir:") :]
        try:
            names = sorted(n for n in os.listdir(directory) if n.endswith(".autofs"))
        except OSError as exc:
            warnings.append(MapWarning(path, number, f"included directory {directory}: {exc}"))
            return
        targets = [os.path.join(directory, n) for n in names]
    else:
        target = _include_target(name, path)
        if target is None:
            warnings.append(
                MapWarning(
                    path, number, f"included master map {name!r}: only files can be included"
                )
            )
            return
        targets = [target]
    for target in targets:
        real = os.path.realpath(target)
        if real in stack:
            warnings.append(MapWarning(path, number, f"include loop: {_chain(stack, real)}"))
            continue
        if len(stack) >= MAX_INCLUDE_DEPTH:
            warnings.append(
                MapWarning(path, number, f"includes nested deeper than {MAX_INCLUDE_DEPTH}")
            )
            continue
        try:
            with open(target, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError as exc:
            warnings.append(
                MapWarning(path, number, f"included master map {target}: {exc.strerror}")
            )
            continue
        _parse_master(text, target, (*stack, real), entries, warnings)


def _parse_master(
    text: str,
    path: str,
    stack: tuple[str, ...],
    entries: list[MasterEntry],
    warnings: list[MapWarning],
) -> None:
    master_dir = os.path.dirname(os.path.abspath(path))
    for number, tokens in _token_lines(text, path, warnings):
        if tokens[0].startswith("+"):
            _include_master(
                tokens[0][1:], path, number, stack=stack, entries=entries, warnings=warnings
            )
            continue
        if len(tokens) < 2:
            warnings.append(MapWarning(path, number, "a mount point with no map"))
            continue
        mount_point, name, rest = tokens[0], tokens[1], tokens[2:]
        if not (mount_point == "/-" or mount_point.startswith("/")):
            warnings.append(
                MapWarning(path, number, f"mount point {mount_point!r} is not absolute")
            )
            continue
        if name == "-null":
            entries[:] = [e for e in entries if e.mount_point != mount_point]
            continue
        if mount_point != "/-" and any(
            e.mount_point == os.path.normpath(mount_point) for e in entries
        ):
            warnings.append(
                MapWarning(
                    path, number, f"duplicate mount point {mount_point}: the first line is used"
                )
            )
            continue
        map_path = _resolve_map_name(name, master_dir)
        if map_path is None:
            warnings.append(MapWarning(path, number, f"map source {name!r} is not supported"))
            continue
        timeout: int | None = None
        options: list[str] = []
        strict = False
        i = 0
        try:
            while i < len(rest):
                tok = rest[i]
                if tok.startswith("--timeout="):
                    timeout = int(tok.split("=", 1)[1])
                elif tok in ("--timeout", "-t"):
                    i += 1
                    timeout = int(rest[i])
                elif tok == "strictexpire":
                    strict = True
                elif tok.startswith("--") or tok in ("browse", "nobrowse", "--ghost"):
                    pass  # accepted, no effect here
                elif tok.startswith("-"):
                    options += _options(tok)
                i += 1
        except (ValueError, IndexError):
            warnings.append(MapWarning(path, number, f"bad options {' '.join(rest)!r}"))
            continue
        entries.append(
            MasterEntry(
                os.path.normpath(mount_point) if mount_point != "/-" else "/-",
                map_path,
                timeout,
                tuple(options),
                strict,
            )
        )
