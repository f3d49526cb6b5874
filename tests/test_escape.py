"""printable(): untrusted text becomes one line of printable ASCII."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pyautofs._proto._escape import printable


def test_plain_text_is_unchanged() -> None:
    assert printable("alpha-1.2_x") == "alpha-1.2_x"


def test_a_newline_cannot_forge_a_log_line() -> None:
    assert printable("key\nINFO forged") == "key\\nINFO forged"


def test_escapes_are_unambiguous() -> None:
    assert printable("a\\nb") == "a\\\\nb"
    assert printable("\x1b[2J") == "\\x1b[2J"
    assert printable(b"caf\xff") == "caf\\xff"
    assert printable("caf\u00e9 \u2603") == "caf\\xe9 \\u2603"


def test_long_text_is_cut() -> None:
    assert printable("x" * 300, limit=10) == "x" * 10 + "..."


@given(st.one_of(st.text(), st.binary()))
def test_always_one_printable_ascii_line(value: str | bytes) -> None:
    out = printable(value, limit=10_000)
    assert out.isascii() and out.isprintable()
    assert "\n" not in out and "\r" not in out
