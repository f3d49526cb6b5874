"""`pyautofs serve` against Debian's automount(8) (5.1.8), on the same maps, for real.

The differential tests run automount(8), then `pyautofs serve`, on the same mount point with
the same map files and an identical fresh export tree, make the same lookups from another
session, and compare what each lookup saw: the contents (a file read, a directory listed) or
the errno. The last test starts automount(8), kills it, and has `pyautofs serve` adopt the
mount it left behind.
"""

from __future__ import annotations

import shutil
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from _automount import (
    AUTOMOUNT,
    Automount,
    Result,
    Serve,
    automount_fifo,
    detach_under,
    inspect_json,
    lookup,
    mounts_under,
)

from pyautofs._sys._mountinfo import read_mountinfo

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.automount,
    pytest.mark.skipif(AUTOMOUNT is None, reason="needs Debian's automount(8) (package autofs)"),
]

LOOKUP_LDAP = "/usr/lib/x86_64-linux-gnu/autofs/lookup_ldap.so"  # Debian's autofs-ldap

Lookup = tuple[str, str, Path]
"""(label, op, path): ``op`` is ``read``, ``list`` or ``write`` (see ``_automount.lookup``)."""


def make_exports(root: Path) -> Path:
    """A fresh export tree (each server starts from the same one): ``NAME/f`` holds NAME."""
    exports = root / "exports"
    assert not mounts_under(exports)
    shutil.rmtree(exports, ignore_errors=True)
    for name in ("alpha", "beta", "gamma", "dots..ok"):
        (exports / name).mkdir(parents=True)
        (exports / name / "f").write_text(name)
    (exports / "afile").write_text("a regular file, not a directory")
    return exports


def under_automount(
    tmp: Path,
    master: Path,
    mount_points: Sequence[Path],
    lookups: Sequence[Lookup],
) -> dict[str, Result]:
    make_exports(tmp)
    am = Automount(master, tmp, mount_points, cleanup=[tmp])
    try:
        results = {label: lookup(op, path) for label, op, path in lookups}
    finally:
        am.stop()
    assert not mounts_under(tmp), am.log()
    for mp in mount_points:
        assert not automount_fifo(mp).exists()
    return results


def under_serve(tmp: Path, args: Sequence[str], lookups: Sequence[Lookup]) -> dict[str, Result]:
    make_exports(tmp)
    server = Serve(tmp, "--timeout", "0", *args)
    try:
        results = {label: lookup(op, path) for label, op, path in lookups}
    finally:
        status = server.stop()
        detach_under([tmp])  # only if the server failed to clean up: then the asserts fail
    assert status == 0, server.log()
    assert not mounts_under(tmp), server.log()
    return results


def show(automount: dict[str, Result], serve: dict[str, Result]) -> None:
    """The side-by-side table (visible with ``pytest -s``)."""
    width = max(len(k) for k in automount)
    print(f"\n{'lookup':{width}}  {'automount(8)':30}  pyautofs serve")
    for key, got in automount.items():
        mark = "" if got == serve.get(key) else "   <- differs"
        print(f"{key:{width}}  {got!s:30}  {serve.get(key)!s}{mark}")


# The one documented difference on failures. automount(8) answers every failed mount with
# ENOENT, whatever went wrong (its mount thread calls send_fail(..., -ENOENT); the cause only
# goes to its log). pyautofs serve fails a request with the errno of the OSError its mount
# raised (README: "a handler that ... raises OSError means FAIL with its errno"), here
# mount(2)'s own: the looking-up process learns why. A missing key, or a wildcard target
# that does not exist, is ENOENT under both.
ENOENT_UNDER_AUTOMOUNT = ("error", "ENOENT")


def assert_same_but(
    automount: dict[str, Result], serve: dict[str, Result], errno_of_mount: dict[str, str]
) -> None:
    """Equal results, except that the lookups in ``errno_of_mount`` fail with ENOENT under
    automount(8) and with that errno (mount(2)'s) under pyautofs serve."""
    automount, serve = dict(automount), dict(serve)
    for label, name in errno_of_mount.items():
        assert automount.pop(label) == ENOENT_UNDER_AUTOMOUNT, label
        assert serve.pop(label) == ("error", name), label
    assert automount == serve


def indirect_master(tmp: Path, mnt: Path, amap: Path) -> Path:
    master = tmp / "auto.master"
    master.write_text(f"{mnt} {amap}\n")
    return master


def test_file_map_gives_the_same_results(tmp_path: Path) -> None:
    """Bind (plain and -fstype=bind), tmpfs, -ro, comment, continuation, a bad line, a missing
    key: each lookup sees the same contents or the same errno under both."""
    exports = tmp_path / "exports"
    mnt = tmp_path / "mnt"
    amap = tmp_path / "auto.test"
    amap.write_text(
        "# a comment line\n"
        f"#commented :{exports}/alpha\n"
        f"alpha :{exports}/alpha\n"
        f"bindopt -fstype=bind :{exports}/beta\n"
        "scratch -fstype=tmpfs,size=1m :tmpfs\n"
        "badtmpfs -fstype=tmpfs,size=lots :tmpfs\n"
        f"rokey -ro :{exports}/alpha\n"
        f"robind -fstype=bind,ro :{exports}/beta\n"
        f"cont -fstype=bind \\\n    :{exports}/gamma\n"
        "broken -fstype=bind\n"
        '"unterminated :/x\n'
        "  \n"
        f"-ro :{exports}/alpha\n"
        f"after :{exports}/beta\n"
    )
    lookups: list[Lookup] = [
        ("alpha/f", "read", mnt / "alpha" / "f"),
        ("bindopt/f", "read", mnt / "bindopt" / "f"),
        ("scratch/", "list", mnt / "scratch"),
        ("badtmpfs/", "list", mnt / "badtmpfs"),
        ("rokey/f", "read", mnt / "rokey" / "f"),
        ("rokey/ write", "write", mnt / "rokey"),
        ("robind/ write", "write", mnt / "robind"),
        ("cont/f", "read", mnt / "cont" / "f"),
        ("broken/", "list", mnt / "broken"),
        ("after/f", "read", mnt / "after" / "f"),
        ("unterminated/", "list", mnt / "unterminated"),
        ('"unterminated/', "list", mnt / '"unterminated'),
        ("#commented/", "list", mnt / "#commented"),
        ("-ro/", "list", mnt / "-ro"),
        ("nosuch/", "list", mnt / "nosuch"),
        ("mnt/ at the end", "list", mnt),
    ]
    master = indirect_master(tmp_path, mnt, amap)
    by_automount = under_automount(tmp_path, master, [mnt], lookups)
    by_serve = under_serve(tmp_path, [str(mnt), str(amap)], lookups)
    show(by_automount, by_serve)
    # tmpfs refuses size=lots: EINVAL from mount(2).
    assert_same_but(by_automount, by_serve, {"badtmpfs/": "EINVAL"})


def test_wildcard_map_gives_the_same_results(tmp_path: Path) -> None:
    """``* :EXPORTS/&``: an exact key wins, a key whose target is missing fails, and keys
    with dots (``..`` itself is never a key: the kernel resolves it to the parent) stay
    inside the exports."""
    exports = tmp_path / "exports"
    mnt = tmp_path / "mnt"
    amap = tmp_path / "auto.wild"
    amap.write_text(f"alpha :{exports}/beta\n* :{exports}/&\n")
    lookups: list[Lookup] = [
        ("alpha/f", "read", mnt / "alpha" / "f"),
        ("gamma/f", "read", mnt / "gamma" / "f"),
        ("dots..ok/f", "read", mnt / "dots..ok" / "f"),
        ("nosuch/", "list", mnt / "nosuch"),
        ("afile/", "list", mnt / "afile"),
        ("a..b/", "list", mnt / "a..b"),
        (".../", "list", mnt / "..."),
        ("..exports/", "list", mnt / "..exports"),
        (".hidden/", "list", mnt / ".hidden"),
        ("mnt/ at the end", "list", mnt),
    ]
    master = indirect_master(tmp_path, mnt, amap)
    by_automount = under_automount(tmp_path, master, [mnt], lookups)
    by_serve = under_serve(tmp_path, [str(mnt), str(amap)], lookups)
    show(by_automount, by_serve)
    # The target exists but is a file: binding it on the key's directory is ENOTDIR.
    assert_same_but(by_automount, by_serve, {"afile/": "ENOTDIR"})


def test_master_map_with_indirect_and_direct_gives_the_same_results(tmp_path: Path) -> None:
    """A master map with an indirect mount and a direct (``/-``) map, under both."""
    exports = tmp_path / "exports"
    ind = tmp_path / "ind"
    direct_mp = tmp_path / "direct" / "beta"
    indirect_map = tmp_path / "auto.ind"
    indirect_map.write_text(f"alpha :{exports}/alpha\n")
    direct_map = tmp_path / "auto.direct"
    direct_map.write_text(f"{direct_mp} -fstype=bind :{exports}/beta\n")
    master = tmp_path / "auto.master"
    master.write_text(f"{ind} {indirect_map}\n/- {direct_map}\n")
    lookups: list[Lookup] = [
        ("ind/alpha/f", "read", ind / "alpha" / "f"),
        ("ind/nosuch/", "list", ind / "nosuch"),
        ("direct/beta/f", "read", direct_mp / "f"),
        ("direct/", "list", direct_mp.parent),
        ("ind/ at the end", "list", ind),
    ]
    by_automount = under_automount(tmp_path, master, [ind, direct_mp], lookups)
    by_serve = under_serve(tmp_path, ["--master", str(master)], lookups)
    show(by_automount, by_serve)
    assert by_automount == by_serve


def test_includes_and_duplicate_keys_give_the_same_results(tmp_path: Path) -> None:
    """``+map`` in a map, ``+dir:`` and ``+file`` in a master map, and a key defined twice:
    the first definition wins under both; an include loop is where they differ."""
    exports = tmp_path / "exports"
    one, two = tmp_path / "one", tmp_path / "two"
    inner = tmp_path / "auto.inner"
    inner.write_text(f"alpha :{exports}/gamma\nbeta :{exports}/beta\n+{tmp_path}/auto.outer\n")
    outer = tmp_path / "auto.outer"
    outer.write_text(
        f"alpha :{exports}/alpha\n+{inner}\ngamma :{exports}/gamma\ngamma :{exports}/beta\n"
    )
    two_map = tmp_path / "auto.two"
    two_map.write_text(f"beta :{exports}/beta\n")
    master_d = tmp_path / "master.d"
    master_d.mkdir()
    (master_d / "two.autofs").write_text(f"{two} {two_map}\n")
    (master_d / "skipped.conf").write_text(f"{tmp_path}/three {two_map}\n")
    extra = tmp_path / "auto.master.extra"
    extra.write_text(f"{one} {outer}\n")
    master = tmp_path / "auto.master"
    master.write_text(f"+{extra}\n+dir:{master_d}\n")
    lookups: list[Lookup] = [
        ("one/alpha/f", "read", one / "alpha" / "f"),
        ("one/beta/f", "read", one / "beta" / "f"),
        ("one/gamma/f", "read", one / "gamma" / "f"),
        ("two/beta/f", "read", two / "beta" / "f"),
        ("one/ at the end", "list", one),
    ]
    by_automount = under_automount(tmp_path, master, [one, two], lookups)
    by_serve = under_serve(tmp_path, ["--master", str(master)], lookups)
    show(by_automount, by_serve)
    # The one difference: automount(8) follows the loop (inner includes outer) until its
    # maximum include depth, logs "maximum include depth exceeded", and then fails every key
    # defined after the include. pyautofs cuts the loop with a warning (file:line and the
    # chain) and serves the rest of the map.
    assert by_automount.pop("one/gamma/f") == ("error", "ENOENT")
    assert by_serve.pop("one/gamma/f") == ("ok", "gamma")
    assert by_automount.pop("one/ at the end") == ("ok", ["alpha", "beta"])
    assert by_serve.pop("one/ at the end") == ("ok", ["alpha", "beta", "gamma"])
    assert by_automount == by_serve
    assert not (tmp_path / "three").exists()


def test_first_definition_of_a_key_wins_under_both(tmp_path: Path) -> None:
    exports = tmp_path / "exports"
    mnt = tmp_path / "mnt"
    amap = tmp_path / "auto.dup"
    inner = tmp_path / "auto.inner"
    inner.write_text(f"alpha :{exports}/gamma\nbeta :{exports}/beta\n")
    amap.write_text(
        f"alpha :{exports}/alpha\n+{inner}\ngamma :{exports}/gamma\ngamma :{exports}/beta\n"
    )
    lookups: list[Lookup] = [
        ("alpha/f", "read", mnt / "alpha" / "f"),
        ("beta/f", "read", mnt / "beta" / "f"),
        ("gamma/f", "read", mnt / "gamma" / "f"),
    ]
    master = indirect_master(tmp_path, mnt, amap)
    by_automount = under_automount(tmp_path, master, [mnt], lookups)
    by_serve = under_serve(tmp_path, [str(mnt), str(amap)], lookups)
    show(by_automount, by_serve)
    assert (
        by_automount
        == by_serve
        == {
            "alpha/f": ("ok", "alpha"),
            "beta/f": ("ok", "beta"),
            "gamma/f": ("ok", "gamma"),
        }
    )


def test_multimount_entry_gives_the_same_results(tmp_path: Path) -> None:
    """Multi-mount entries: a root with nested offsets, and offsets without a root.

    Both servers put an offset trigger on each offset, mounting it only when something
    walks into it; both make an offset's directory inside the root mount when it is
    missing (so ``sub`` appears inside the export ``alpha`` and stays there), and both
    make the directories of a rootless entry inside the autofs file system.
    """
    exports = tmp_path / "exports"
    mnt = tmp_path / "mnt"
    amap = tmp_path / "auto.multi"
    amap.write_text(
        f"multi / :{exports}/alpha /sub :{exports}/beta /sub/deep :{exports}/gamma\n"
        f"noroot /a :{exports}/alpha /b/c :{exports}/beta\n"
    )
    lookups: list[Lookup] = [
        ("multi/f", "read", mnt / "multi" / "f"),
        ("multi/", "list", mnt / "multi"),
        ("multi/sub/f", "read", mnt / "multi" / "sub" / "f"),
        ("multi/sub/deep/f", "read", mnt / "multi" / "sub" / "deep" / "f"),
        ("noroot/", "list", mnt / "noroot"),
        ("noroot/a/f", "read", mnt / "noroot" / "a" / "f"),
        ("noroot/b/c/f", "read", mnt / "noroot" / "b" / "c" / "f"),
        ("mnt/ at the end", "list", mnt),
    ]
    master = indirect_master(tmp_path, mnt, amap)
    by_automount = under_automount(tmp_path, master, [mnt], lookups)
    by_serve = under_serve(tmp_path, [str(mnt), str(amap)], lookups)
    show(by_automount, by_serve)
    assert by_automount == by_serve


def entry(mount_point: Path) -> dict[str, Any]:
    """``pyautofs inspect --json``'s entry for ``mount_point``."""
    mounts = inspect_json()["mounts"]
    assert isinstance(mounts, list)
    found = [m for m in mounts if m["mount_point"] == str(mount_point)]
    assert len(found) == 1, mounts
    e: dict[str, Any] = found[0]
    return e


def mount_id(path: Path) -> int:
    return [m.mount_id for m in read_mountinfo() if m.mount_point == str(path)][-1]


def test_serve_adopts_the_mount_a_killed_automount_left(tmp_path: Path) -> None:
    """automount(8) mounts a key and is SIGKILLed; `pyautofs serve` adopts its autofs mount:
    the key stays mounted (the very same mount), new keys mount, and SIGTERM cleans up."""
    exports = make_exports(tmp_path)
    mnt = tmp_path / "mnt"
    amap = tmp_path / "auto.test"
    amap.write_text(f"alpha :{exports}/alpha\nbeta -fstype=bind :{exports}/beta\n")
    master = indirect_master(tmp_path, mnt, amap)
    am = Automount(master, tmp_path, [mnt], cleanup=[tmp_path])
    server: Serve | None = None
    try:
        assert lookup("read", mnt / "alpha" / "f") == ("ok", "alpha")
        alpha_mount = mount_id(mnt / "alpha")
        before = entry(mnt)
        assert automount_fifo(mnt).exists()  # the naming rule holds
        assert [r["pid"] for r in before["readers"]] == [am.pid]
        # SIGKILL: the autofs mount and alpha stay, and nobody reads the request pipe.
        am.stop(signal.SIGKILL, detach=False)
        assert not automount_fifo(mnt).exists()
        orphan = entry(mnt)
        assert orphan["state"] == "active"
        assert orphan["readers"] == []
        assert mounts_under(mnt) == [str(mnt), str(mnt / "alpha")]

        server = Serve(tmp_path, "--timeout", "0", str(mnt), str(amap))
        assert "adopted" in server.log()
        adopted = entry(mnt)
        assert adopted["dev"] == before["dev"]  # the same autofs mount, not a new one
        assert [r["pid"] for r in adopted["readers"]] == [server.pid]
        assert adopted["options"]["pgrp"] == server.pid
        assert adopted["write_end_held"] is False  # automount's went with it; ours is closed
        assert lookup("read", mnt / "alpha" / "f") == ("ok", "alpha")
        assert mount_id(mnt / "alpha") == alpha_mount  # automount's bind mount, kept
        assert lookup("read", mnt / "beta" / "f") == ("ok", "beta")
        assert lookup("list", mnt / "gamma") == ("error", "ENOENT")
        status = server.stop()
        assert status == 0, server.log()
        assert mounts_under(mnt) == [], server.log()
    finally:
        if server is not None:
            server.stop()
        am.stop()  # already dead: detaches what is left and removes its fifo


def test_ldap_map_gives_the_same_results(tmp_path: Path) -> None:
    """The same RFC 2307bis map in a real slapd, read by automount(8) (Debian's autofs-ldap)
    and by `pyautofs serve`: exact keys, the ``/`` wildcard, options, a key that is a filter
    injection, and a map without a wildcard (RFC 2307, ``nisMap``)."""
    ldap_tests = pytest.importorskip("_slapd")
    if ldap_tests.SLAPD is None or not Path(LOOKUP_LDAP).exists():
        pytest.skip("needs slapd and automount(8)'s LDAP module (packages slapd, autofs-ldap)")
    pytest.importorskip("ldap", reason="needs python-ldap (the 'ldap' extra)")
    exports = tmp_path / "exports"
    suffix = ldap_tests.SUFFIX
    entries = ldap_tests.automount_map_ldif(
        "auto.test",
        {
            "alpha": f":{exports}/alpha",
            "bindopt": f"-fstype=bind :{exports}/beta",
            "rokey": f"-ro :{exports}/alpha",
            "scratch": "-fstype=tmpfs,size=1m :tmpfs",
            "/": f":{exports}/&",
        },
    ) + ldap_tests.automount_map_ldif("auto.nis", {"alpha": f":{exports}/gamma"}, schema="rfc2307")
    server = ldap_tests.Slapd(entries, tls=False)
    try:
        mnt, nis = tmp_path / "mnt", tmp_path / "nis"
        master = tmp_path / "auto.master"
        master.write_text(
            f"{mnt} {server.ldap_uri}/automountMapName=auto.test,{suffix}\n"
            f"{nis} {server.ldap_uri}/nisMapName=auto.nis,{suffix}\n"
        )
        lookups: list[Lookup] = [
            ("alpha/f", "read", mnt / "alpha" / "f"),
            ("bindopt/f", "read", mnt / "bindopt" / "f"),
            ("rokey/ write", "write", mnt / "rokey"),
            ("scratch/", "list", mnt / "scratch"),
            ("gamma/f (wildcard)", "read", mnt / "gamma" / "f"),
            ("dots..ok/f (wildcard)", "read", mnt / "dots..ok" / "f"),
            ("nosuch/ (wildcard, no export)", "list", mnt / "nosuch"),
            ("injection/", "list", mnt / "*)(objectClass=*"),
            ("nis alpha/f", "read", nis / "alpha" / "f"),
            ("nis nosuch/", "list", nis / "nosuch"),
            ("nis injection/", "list", nis / "*)(nisMapName=*"),
        ]
        by_automount = under_automount(tmp_path, master, [mnt, nis], lookups)
        by_serve = under_serve(tmp_path, ["--master", str(master)], lookups)
        show(by_automount, by_serve)
        assert by_automount == by_serve
        assert by_serve["alpha/f"] == ("ok", "alpha")
        assert by_serve["nis alpha/f"] == ("ok", "gamma")
    finally:
        server.remove()
