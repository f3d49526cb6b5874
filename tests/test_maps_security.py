"""What a hostile key, a broken map or a replaced map file can do (issue 12, items 1, 2, 10, 11).

The attacks that come from a user's lookup run as uid 65534 (``setpriv``), in their own
session, against a real ``pyautofs serve`` on the real kernel.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from _harness import Server, lookup
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyautofs._maps._program import ProgramMap
from pyautofs._maps._sources import MAX_MAP_BYTES, MapTooLarge, load_map, read_map_file
from pyautofs._maps._sun import parse_sun_map, split_words


@pytest.fixture
def world() -> Iterator[Path]:
    """A directory uid 65534 can walk: exports/{pub,nobody,$USER}, a secret above them."""
    root = Path(tempfile.mkdtemp(prefix="pyautofs-sec-"))
    try:
        root.chmod(0o755)
        exports = root / "srv" / "exports"
        for name in ("pub", "nobody", "$USER", "root"):
            (exports / name).mkdir(parents=True)
            (exports / name / "f").write_text(f"export {name}")
        (root / "srv" / "f").write_text("SECRET above the exports")
        (root / "mnt").mkdir()
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


ESCAPING_KEYS = ['..""', "..#", ".\\.", "''..", '"".."', "..\\"]


@pytest.mark.kernel
def test_program_map_keys_cannot_leave_the_export(world: Path) -> None:
    """Item 1: quotes, comments and escapes in a key no longer turn into '..'."""
    exports = world / "srv" / "exports"
    prog = world / "auto.prog"
    prog.write_text(f'#!/bin/sh\necho "-fstype=bind :{exports}/$1"\n')
    prog.chmod(0o755)
    server = Server(world, "--timeout", "0", str(world / "mnt"), str(prog))
    try:
        assert lookup(world / "mnt" / "pub" / "f", user=65534) == (0, "export pub")
        for key in ESCAPING_KEYS:
            err, out = lookup(world / "mnt" / key / "f", user=65534)
            assert "SECRET" not in out, key
            assert err != 0, (key, out)
    finally:
        assert server.stop() == 0


@pytest.mark.kernel
def test_file_map_keys_are_not_quoted_or_expanded(world: Path) -> None:
    """Items 1 and 2: a file map's key is put in as it is, never expanded."""
    exports = world / "srv" / "exports"
    amap = world / "auto.files"
    amap.write_text(f"mine -fstype=bind :{exports}/$USER\n* -fstype=bind :{exports}/&\n")
    server = Server(world, "--timeout", "0", str(world / "mnt"), str(amap))
    try:
        # The map's own text is expanded, for the user who looks it up ...
        assert lookup(world / "mnt" / "mine" / "f", user=65534) == (0, "export nobody")
        # ... the key never: "$USER" is the directory called "$USER".
        assert lookup(world / "mnt" / "$USER" / "f", user=65534) == (0, "export $USER")
        for key in ESCAPING_KEYS:
            err, out = lookup(world / "mnt" / key / "f", user=65534)
            assert "SECRET" not in out, key
            assert err != 0, (key, out)
    finally:
        assert server.stop() == 0


def test_keys_are_never_expanded_or_quoted_in_a_parsed_map() -> None:
    m = parse_sun_map("* -fstype=bind,&opt :/srv/exports/&\nv :/home/$USER\n", "m")
    for key in ("$USER", "${HOME}", '..""', "..#", "a b", "a\tb", "-x", "&", "*", "#"):
        e = m.lookup(key, {"USER": "root", "HOME": "/root"})
        assert e is not None and e.root is not None
        assert e.root.source == "/srv/exports/" + key
        assert e.root.options == (key + "opt",)
    e = m.lookup("v", {"USER": "alice"})
    assert e is not None and e.root is not None and e.root.source == "/home/alice"


def test_a_template_that_lets_the_key_escape_is_refused() -> None:
    # ".&" with the key "." would be ".." (a key "." is refused anyway); "&/.." in the
    # template itself walks up after the key: refused for every key.
    m = parse_sun_map("* :/srv/exports/&/..\n", "m")
    assert m.lookup("pub") is None


def test_program_output_is_split_at_whitespace_only() -> None:
    pm = ProgramMap("/bin/prog")
    for key in ESCAPING_KEYS:
        out = f"-fstype=bind :/srv/exports/{key}\n".encode()
        e = pm.parse_output(key, out, 0)
        if key.endswith("\\"):  # "..\\" then the newline: a continuation, leaving ".."
            assert e is None
            continue
        assert e is not None and e.root is not None
        assert e.root.source == f"/srv/exports/{key}"
    assert pm.parse_output("x", b"-fstype=bind :/srv/exports/..\n", 0) is None
    assert pm.parse_output("x", b"-fstype=bind :/srv/exports/& /a :/srv/../b\n", 0) is None
    e = pm.parse_output("k", b"-fstype=bind \\\n :/srv/&\n", 0)
    assert e is not None and e.root is not None and e.root.source == "/srv/k"
    assert pm.parse_output("k", b"", 0) is None
    assert pm.parse_output("k", b":/srv/k\n", 1) is None


KEYS = (
    st.binary(min_size=1, max_size=255)
    .filter(lambda b: b"/" not in b and b"\0" not in b)
    .map(lambda b: b.decode("utf-8", "surrogateescape"))
)
BASE = "/srv/exports"


def _inside(source: str) -> bool:
    """``source`` is the base or below it (a key of blanks may name the base itself)."""
    resolved = posixpath.normpath(source)
    return resolved == BASE or resolved.startswith(BASE + "/")


@settings(max_examples=400, deadline=None)
@given(KEYS)
def test_no_key_leaves_a_file_map_entry(key: str) -> None:
    m = parse_sun_map(f"* -fstype=bind :{BASE}/&\nx/y :/nowhere\n", "m")
    e = m.lookup(key)
    if e is not None:
        assert e.root is not None and _inside(e.root.source), (key, e)
        assert e.root.source == f"{BASE}/{key}"


@pytest.fixture(scope="module")
def echo_program() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="pyautofs-prog-")
    prog = os.path.join(d, "auto.echo")
    with open(prog, "w") as f:
        f.write(f'#!/bin/sh\necho "-fstype=bind :{BASE}/$1"\n')
    os.chmod(prog, 0o755)
    yield prog
    shutil.rmtree(d)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(KEYS)
def test_no_key_leaves_a_program_map_entry(echo_program: str, key: str) -> None:
    pm = ProgramMap(echo_program)
    command = pm.command(key)
    if command is None:
        assert key in (".", "..")
        return
    argv, env = command
    done = subprocess.run(argv, env=env, capture_output=True, timeout=10, check=False)
    e = pm.parse_output(key, done.stdout, done.returncode)
    if e is not None:
        for m in e.mounts:
            assert _inside(m.spec.source), (key, done.stdout, e)


def test_a_long_line_parses_in_linear_time() -> None:
    """Item 10: a 1 MB line took 25 s (quadratic); it must take well under the deadline."""
    code = (
        "import sys, time\n"
        "from pyautofs._maps._sun import parse_sun_map, split_words\n"
        "line = 'k -fstype=bind ' + ':/x' + 'a\\\\b\"c d\"' * 200_000\n"
        "t = time.perf_counter()\n"
        "m = parse_sun_map(line + '\\n', 'm')\n"
        "assert len(split_words(line)) == 3, split_words(line)[:4]\n"
        "print(time.perf_counter() - t)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=20, check=False
    )
    assert r.returncode == 0, r.stderr


def test_split_words_quotes_and_comments() -> None:
    assert split_words('a "b c" d\\ e #f g') == ["a", "b c", "d e"]
    assert split_words('x"y z"w') == ["xy zw"]
    assert split_words("a#b") == ["a#b"]
    with pytest.raises(ValueError):
        split_words('a "b')


def test_a_map_over_the_size_cap_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    big = tmp_path / "auto.big"
    with big.open("wb") as f:
        f.truncate(MAX_MAP_BYTES + 1)
    with pytest.raises(MapTooLarge, match="larger than 16 MiB"):
        load_map(str(big))


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    """Item 11: open() of a FIFO with no writer blocked forever."""
    fifo = tmp_path / "auto.fifo"
    os.mkfifo(fifo)
    with pytest.raises(OSError, match="not a regular file"):
        read_map_file(str(fifo))
    with pytest.raises(OSError, match="not a regular file"):
        load_map(str(fifo))


@pytest.mark.kernel
def test_sighup_with_the_map_replaced_by_a_fifo_or_a_huge_file(world: Path) -> None:
    """Items 10 and 11 through the daemon: SIGHUP reports, keeps the old map, serves on."""
    exports = world / "srv" / "exports"
    amap = world / "auto.files"
    amap.write_text(f"pub -fstype=bind :{exports}/pub\n")
    server = Server(world, "--timeout", "0", str(world / "mnt"), str(amap))
    try:
        amap.unlink()
        os.mkfifo(amap)
        server.proc.send_signal(signal.SIGHUP)
        server.wait_log("maps re-read")
        assert "not a regular file" in server.log()
        assert lookup(world / "mnt" / "pub" / "f", user=65534) == (0, "export pub")
        amap.unlink()
        with amap.open("wb") as f:
            f.truncate(MAX_MAP_BYTES + 1)
        server.proc.send_signal(signal.SIGHUP)
        server.wait_log("maps re-read", 2)
        assert "larger than 16 MiB" in server.log()
        err, _ = lookup(world / "mnt" / "nosuch" / "f", user=65534)
        assert err != 0
    finally:
        assert server.stop() == 0
