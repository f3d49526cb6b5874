"""The sun map parser: features, and arbitrary text never crashes it."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from pyautofs import MapWarning, SunMap, load_map, parse_master_map, parse_sun_map
from pyautofs._maps._include import MAX_INCLUDES, Included
from pyautofs._maps._master import parse_master
from pyautofs._maps._sources import reload_map


def test_features() -> None:
    m = parse_sun_map(
        "# comment\n"
        "a -fstype=bind :/srv/a\n"
        "t -fstype=tmpfs,size=1m :tmpfs\n"
        "n -rw,soft server:/export/n\n"
        "multi / :/srv/root /sub -ro :/srv/sub\n"
        "cont -fstype=bind \\\n  :/srv/c\n"
        "* :/srv/&\n",
        "m",
    )
    a = m.lookup("a")
    assert a is not None and a.root is not None
    assert (a.root.fstype, a.root.source) == ("bind", "/srv/a")
    t = m.lookup("t")
    assert t is not None and t.root is not None and t.root.options == ("size=1m",)
    n = m.lookup("n")
    assert (
        n is not None
        and n.root is not None
        and (n.root.fstype, n.root.options) == ("nfs", ("rw", "soft"))
    )
    multi = m.lookup("multi")
    assert multi is not None and [o.offset for o in multi.mounts] == ["/", "/sub"]
    assert m.lookup("cont") is not None
    w = m.lookup("zzz")
    assert w is not None and w.root is not None and w.root.source == "/srv/zzz"
    for bad in ("..", ".", "a/b", ""):
        assert m.lookup(bad) is None


def test_bad_lines_warn_with_their_line() -> None:
    m = parse_sun_map("ok :/x\nbad one two three\n/abs :/y\nnoloc -ro\n", "f")
    assert [(w.line, w.file) for w in m.warnings] == [(2, "f"), (3, "f"), (4, "f")]
    assert m.keys() == ["ok"]


@settings(max_examples=300)
@given(st.text(max_size=400))
def test_arbitrary_text_gives_entries_and_warnings_never_an_exception(text: str) -> None:
    m = parse_sun_map(text, "fuzz")
    assert all(isinstance(w, MapWarning) for w in m.warnings)
    for key in m.keys()[:5]:
        m.lookup(key)
    m.lookup("anything")


@settings(max_examples=100)
@given(st.text(max_size=300))
def test_arbitrary_master_map_never_raises(text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "auto.master"
        path.write_text(text)
        entries, warnings = parse_master_map(str(path))
        assert all(isinstance(w, MapWarning) for w in warnings)
        assert all(e.mount_point.startswith("/") for e in entries)


def test_sun_map_includes_first_definition_wins_and_loops_warn(tmp_path: Path) -> None:
    (tmp_path / "auto.inner").write_text("a :/inner/a\nb :/inner/b\n+auto.outer\n")
    (tmp_path / "auto.outer").write_text(
        "a :/outer/a\n+auto.inner\nc :/outer/c\nc :/outer/c2\n+auto.missing\n+ldap:ou=x\n"
    )
    m = load_map(str(tmp_path / "auto.outer"))
    assert isinstance(m, SunMap)

    def source(key: str) -> str:
        e = m.lookup(key)
        assert e is not None and e.root is not None
        return e.root.source

    assert (source("a"), source("b"), source("c")) == ("/outer/a", "/inner/b", "/outer/c")
    messages = [str(w) for w in m.warnings]
    outer, inner = tmp_path / "auto.outer", tmp_path / "auto.inner"
    assert f"{inner}:3: include loop: {outer} -> {inner} -> {outer}" in messages
    assert f"{outer}:4: duplicate key 'c': the first definition is used" in messages
    # A name that is no file is a NIS map (as automount(8) reads it): a note, not an error.
    nis = next(w for w in m.warnings if w.line == 5)
    assert nis.note and "+auto.missing is a NIS map" in nis.message
    assert f"{outer}:6: included map 'ldap:ou=x': LDAP maps cannot be included here" in messages
    # A change to an included file is a change to the map.
    assert reload_map(m) is m
    os.utime(inner, (1, 1))
    assert reload_map(m) is not m


def test_master_map_includes_and_dir(tmp_path: Path) -> None:
    d = tmp_path / "master.d"
    d.mkdir()
    (d / "b.autofs").write_text("/mnt/b /etc/auto.b\n/mnt/a /etc/auto.dup\n")
    (d / "a.autofs").write_text("/mnt/c /etc/auto.c\n+" + str(tmp_path / "auto.master") + "\n")
    (d / "ignored.conf").write_text("/mnt/x /etc/auto.x\n")
    (tmp_path / "auto.extra").write_text("/mnt/e /etc/auto.e\n/mnt/gone /etc/auto.g\n")
    master = tmp_path / "auto.master"
    master.write_text(
        f"/mnt/a /etc/auto.a\n+dir:{d}\n+auto.extra\n/mnt/gone -null\n+dir:{tmp_path}/nodir\n"
    )
    entries, warnings = parse_master_map(str(master))
    assert [e.mount_point for e in entries] == ["/mnt/a", "/mnt/c", "/mnt/b", "/mnt/e"]
    messages = [str(w) for w in warnings]
    assert any("include loop" in w and str(master) in w for w in messages)
    assert f"{d / 'b.autofs'}:2: duplicate mount point /mnt/a: the first line is used" in messages
    assert any(w.startswith(f"{master}:5: included directory") for w in messages)


def test_debian_default_master_map_plus_auto_master_is_a_nis_include(tmp_path: Path) -> None:
    """Debian's /etc/auto.master holds ``+auto.master``: a NIS include, skipped with a note
    (automount(8) asks NIS for it), not an include loop."""
    master = tmp_path / "auto.master"
    master.write_text(f"/misc {tmp_path}/auto.misc\n+dir:{tmp_path}/master.d\n+auto.master\n")
    (tmp_path / "auto.misc").write_text("cd -fstype=iso9660,ro,nosuid,nodev :/dev/cdrom\n")
    (tmp_path / "master.d").mkdir()
    entries, warnings = parse_master_map(str(master))
    assert [e.mount_point for e in entries] == ["/misc"]
    assert [(w.line, w.note) for w in warnings] == [(3, True)]
    assert "NIS" in warnings[0].message and "loop" not in warnings[0].message
    # A map file that includes itself by name is the same: NIS, a note.
    amap = tmp_path / "auto.home"
    amap.write_text("a :/srv/a\n+auto.home\n")
    m = load_map(str(amap))
    assert isinstance(m, SunMap) and m.keys() == ["a"]
    assert [w.note for w in m.warnings] == [True]
    # A real loop between two files is still refused, with a warning.
    (tmp_path / "m1").write_text(f"+{tmp_path}/m2\n")
    (tmp_path / "m2").write_text(f"+{tmp_path}/m1\n/x {tmp_path}/auto.misc\n")
    entries, warnings = parse_master_map(str(tmp_path / "m1"))
    assert [e.mount_point for e in entries] == ["/x"]
    assert any("include loop" in w.message and not w.note for w in warnings)


@settings(max_examples=200)
@given(st.text(max_size=300), st.text(max_size=100))
def test_parsers_take_text_and_an_include_callable(text: str, included: str) -> None:
    """No files: includes come from a callable, so the parsers can be fuzzed directly."""
    calls: list[str] = []

    def read_include(name: str, including: str) -> list[Included]:
        calls.append(name)
        return [Included(f"inc:{name}", included)]

    m = parse_sun_map(text, "fuzz", read_include=read_include)
    assert all(isinstance(w, MapWarning) for w in m.warnings)
    for key in m.keys()[:5]:
        m.lookup(key)
    entries, _ = parse_master(text, "fuzz", read_include=read_include)
    assert all(e.mount_point.startswith("/") for e in entries)
    assert len(calls) <= 2 * MAX_INCLUDES
