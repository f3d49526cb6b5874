"""The sun map parser: features, and arbitrary text never crashes it."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from pyautofs import MapWarning, SunMap, load_map, parse_master_map, parse_sun_map
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
