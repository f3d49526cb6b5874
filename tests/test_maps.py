"""The sun map parser: features, and arbitrary text never crashes it."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from pyautofs import MapWarning, parse_master_map, parse_sun_map


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
