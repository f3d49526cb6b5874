"""LDAP maps against a real OpenLDAP slapd that the tests start (``tests/_slapd.py``).

The pure parts (names, schemas, filters, settings) first; then the lookup pool on a trio
loop against a live server (concurrency, a stopped and a hung server, failover, TLS); then
``pyautofs serve`` end to end on the real kernel (both schemas, the wildcard, a filter
injection, a master map read from LDAP, a server stopped and brought back).
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio
from _harness import Server, lookup

from pyautofs import load_map, parse_master_map
from pyautofs._maps._ldap import (
    RFC2307,
    RFC2307BIS,
    LdapError,
    LdapMap,
    LdapSettings,
    escape_filter_value,
    load_ldap_settings,
    parse_ldap_map_name,
)
from pyautofs._sys._mountinfo import autofs_mounts

ldap = pytest.importorskip("ldap", reason="LDAP maps need python-ldap (the 'ldap' extra)")

from _slapd import SLAPD, SUFFIX, Slapd, automount_map_ldif  # noqa: E402

from pyautofs._engine._ldap import RETRY_AFTER, LdapPool  # noqa: E402

needs_slapd = pytest.mark.skipif(SLAPD is None, reason="needs OpenLDAP's slapd (package slapd)")

TEST_DN = f"automountMapName=auto.test,{SUFFIX}"
NIS_DN = f"nisMapName=auto.nis,{SUFFIX}"


def directory_entries(exports: str) -> str:
    return (
        automount_map_ldif(
            "auto.test",
            {
                "alpha": f"-fstype=bind :{exports}/alpha",
                "beta": f":{exports}/beta",
                "/": f"-fstype=bind :{exports}/&",
                "star*": f":{exports}/alpha",
                "sp ace": f":{exports}/beta",
                "home": ":/home/$USER",
            },
        )
        + automount_map_ldif("auto.star", {"*": f":{exports}/&", "gamma": f":{exports}/alpha"})
        + automount_map_ldif("auto.nis", {"alpha": f":{exports}/beta"}, schema="rfc2307")
        + automount_map_ldif("auto.incl", {"/mnt/from-ldap": f"ldap:{TEST_DN} --timeout=5"})
    )


# -- pure -------------------------------------------------------------------------------


def test_filter_values_are_escaped_per_rfc4515() -> None:
    assert escape_filter_value("*)(objectClass=*") == "\\2a\\29\\28objectClass=\\2a"
    assert escape_filter_value("a\\b\0") == "a\\5cb\\00"
    assert escape_filter_value("plain.key-1") == "plain.key-1"
    amap = LdapMap(("ldap://h",), TEST_DN, RFC2307BIS)
    f = amap.search_filter("*)(objectClass=*")
    assert f == (
        "(&(objectClass=automount)(|(automountKey=\\2a\\29\\28objectClass=\\2a)"
        "(automountKey=/)(automountKey=\\2a)))"
    )


def test_map_names_and_schemas() -> None:
    s = LdapSettings(uris=("ldapi://%2Frun%2Fslapd", "ldap://b"), search_base=SUFFIX)
    m = parse_ldap_map_name(f"ldap://h:389/{TEST_DN}", s)
    assert (m.uris, m.dn, m.schema) == (("ldap://h:389",), TEST_DN, RFC2307BIS)
    m = parse_ldap_map_name(f"ldaps://h/{NIS_DN}", s)
    assert (m.uris, m.schema) == (("ldaps://h",), RFC2307)
    m = parse_ldap_map_name(f"ldap:{TEST_DN}", s)
    assert m.uris == s.uris
    m = parse_ldap_map_name(f"ldap:///{TEST_DN}", s)
    assert m.uris == s.uris
    m = parse_ldap_map_name("ldap:auto.home", s)
    assert m.dn == f"automountMapName=auto.home,{SUFFIX}"
    assert parse_ldap_map_name(f"ldap:ou=auto.x,{SUFFIX}", s).schema.entry_attribute == "cn"
    for bad in ("ldap:", "ldap://h", f"ldap:cn=x,{SUFFIX}"):
        with pytest.raises(ValueError):
            parse_ldap_map_name(bad, s)
    with pytest.raises(ValueError, match="SEARCH_BASE"):
        parse_ldap_map_name("ldap:auto.home", LdapSettings(uris=("ldap://h",)))


def test_settings_file(tmp_path: Path) -> None:
    conf = tmp_path / "autofs"
    conf.write_text(
        'LDAP_URI="ldap://a ldap://b"\nSEARCH_BASE=dc=x\nMAP_OBJECT_CLASS=nisMap\n'
        "ENTRY_OBJECT_CLASS=nisObject\nMAP_ATTRIBUTE=nisMapName\nENTRY_ATTRIBUTE=cn\n"
        "VALUE_ATTRIBUTE=nisMapEntry\nLDAP_AUTH=external\nLDAP_TIMEOUT=2\n# comment\n"
    )
    s = load_ldap_settings(str(conf))
    assert s.uris == ("ldap://a", "ldap://b") and s.schema == RFC2307 and s.auth == "external"
    assert s.timeout == 2.0 and s.search_base == "dc=x"
    conf.write_text("MAP_OBJECT_CLASS=nisMap\n")
    with pytest.raises(ValueError, match="must be set with the others"):
        load_ldap_settings(str(conf))
    conf.write_text("LDAP_AUTH=kerberos\n")
    with pytest.raises(ValueError, match="LDAP_AUTH"):
        load_ldap_settings(str(conf))
    assert load_ldap_settings(str(tmp_path / "missing")) == LdapSettings()


def test_choose_exact_then_slash_then_star() -> None:
    m = LdapMap(("ldap://h",), TEST_DN, RFC2307BIS)
    r = [
        ("a", {"automountKey": [b"*"], "automountInformation": [b":/star"]}),
        ("b", {"automountKey": [b"/"], "automountInformation": [b":/slash"]}),
        ("c", {"automountKey": [b"k"], "automountInformation": [b":/exact"]}),
        ("d", {"automountKey": [b"K"], "automountInformation": [b":/upper"]}),
    ]
    assert m.choose("k", r) == ":/exact"
    assert m.choose("K", r) == ":/upper"
    assert m.choose("x", r) == ":/slash"
    assert m.choose("x", r[:1]) == ":/star"
    assert m.choose("x", []) is None


# -- the lookup pool, on a trio loop, against a live slapd -------------------------------


@pytest.fixture(scope="module")
def slapd() -> Iterator[Slapd]:
    if SLAPD is None:
        pytest.skip("needs OpenLDAP's slapd (package slapd)")
    server = Slapd(directory_entries("/srv/exports"))
    try:
        yield server
    finally:
        server.remove()


def ldapi_map(server: Slapd, dn: str = TEST_DN, **settings: object) -> LdapMap:
    s = LdapSettings(uris=(server.ldapi_uri,), auth="external", **settings)  # type: ignore[arg-type]
    return parse_ldap_map_name(f"ldap:{dn}", s)


def source(entry: object) -> str:
    root = entry.root  # type: ignore[attr-defined]
    assert root is not None
    return str(root.source)


async def test_lookups_wildcards_schemas_and_injection(slapd: Slapd) -> None:
    pool = LdapPool()
    try:
        m = ldapi_map(slapd)
        assert source(await pool.lookup(m, "alpha", {})) == "/srv/exports/alpha"
        assert source(await pool.lookup(m, "other", {})) == "/srv/exports/other"  # "/" key
        assert source(await pool.lookup(m, "star*", {})) == "/srv/exports/alpha"
        assert source(await pool.lookup(m, "sp ace", {})) == "/srv/exports/beta"
        # $VARS are expanded in the directory's text, never in the key.
        assert source(await pool.lookup(m, "home", {"USER": "alice"})) == "/home/alice"
        assert source(await pool.lookup(m, "$USER", {"USER": "alice"})) == "/srv/exports/$USER"
        # An injected filter finds nothing more than the wildcard gives any unknown key.
        # Key text is never unquoted or taken as a comment: these stay names.
        for key in ('..""', "..#", ".\\.", "''.."):
            assert source(await pool.lookup(m, key, {})) == f"/srv/exports/{key}"
        e = await pool.lookup(m, "*)(objectClass=*", {})
        assert source(e) == "/srv/exports/*)(objectClass=*"
        star = ldapi_map(slapd, f"automountMapName=auto.star,{SUFFIX}")
        assert source(await pool.lookup(star, "gamma", {})) == "/srv/exports/alpha"
        assert source(await pool.lookup(star, "zeta", {})) == "/srv/exports/zeta"
        nis = ldapi_map(slapd, NIS_DN)
        assert source(await pool.lookup(nis, "alpha", {})) == "/srv/exports/beta"
        assert await pool.lookup(nis, "*)(cn=*", {}) is None
        assert await pool.lookup(nis, "nosuch", {}) is None
        assert await pool.lookup(nis, "..", {}) is None
        missing = ldapi_map(slapd, f"automountMapName=auto.none,{SUFFIX}")
        assert await pool.lookup(missing, "alpha", {}) is None
        # One connection, kept: many lookups, one socket.
        assert len(pool._by_uris) == 1
        conn = next(iter(pool._by_uris.values())).connection
        for _ in range(20):
            await pool.lookup(m, "alpha", {})
        assert next(iter(pool._by_uris.values())).connection is conn
    finally:
        pool.close()


def test_a_file_master_map_includes_one_from_ldap(slapd: Slapd, tmp_path: Path) -> None:
    """``+ldap://server/DN`` in auto.master: that master map's lines, read from LDAP."""
    master = tmp_path / "auto.master"
    master.write_text(
        f"/mnt/local /etc/auto.local\n+{slapd.ldap_uri}/automountMapName=auto.incl,{SUFFIX}\n"
    )
    entries, warnings = parse_master_map(str(master))
    assert not warnings
    assert [(e.mount_point, e.map_path, e.timeout) for e in entries] == [
        ("/mnt/local", "/etc/auto.local", None),
        ("/mnt/from-ldap", f"{slapd.ldap_uri}/{TEST_DN}", 5),
    ]
    # A file map cannot include an LDAP map (its lookups would block): a warning.
    amap = tmp_path / "auto.x"
    amap.write_text(f"a :/a\n+{slapd.ldap_uri}/{TEST_DN}\n")
    m = load_map(str(amap))
    assert [w.line for w in m.warnings] == [2]  # type: ignore[union-attr]


async def test_concurrent_lookups_share_one_connection(slapd: Slapd) -> None:
    pool = LdapPool()
    m = ldapi_map(slapd)
    results: dict[int, str] = {}

    async def one(i: int) -> None:
        results[i] = source(await pool.lookup(m, f"k{i}", {}))

    try:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                for i in range(100):
                    nursery.start_soon(one, i)
        assert results == {i: f"/srv/exports/k{i}" for i in range(100)}
        assert len(pool._by_uris) == 1
    finally:
        pool.close()


async def test_a_hung_server_never_blocks_the_loop_and_a_stopped_one_fails_fast(
    new_slapd: Callable[..., Slapd],
) -> None:
    server = new_slapd(directory_entries("/srv/exports"))
    pool = LdapPool()
    try:
        m = ldapi_map(server, timeout=1.0, network_timeout=1.0)
        assert source(await pool.lookup(m, "alpha", {})) == "/srv/exports/alpha"
        gaps: list[float] = []

        async def ticker() -> None:
            last = trio.current_time()
            while True:
                await trio.sleep(0.01)
                now = trio.current_time()
                gaps.append(now - last)
                last = now

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ticker)
            server.pause()  # SIGSTOP: connected, but nothing answers
            t0 = trio.current_time()
            with pytest.raises(LdapError, match="no answer in time"):
                await pool.lookup(m, "beta", {})
            assert trio.current_time() - t0 < 5
            # A new connection to the hung server: its SASL EXTERNAL bind waits in a worker
            # thread, never holding the process (python-ldap's sasl_interactive_bind_s
            # holds the GIL throughout: the loop stood still for the whole timeout).
            fresh = LdapPool()
            try:
                with pytest.raises(LdapError):
                    await fresh.lookup(m, "beta", {})
            finally:
                fresh.close()
            server.resume()
            assert source(await pool.lookup(m, "beta", {})) == "/srv/exports/beta"
            server.stop()  # gone: the lookup fails at once, with the reason
            t0 = trio.current_time()
            with pytest.raises(LdapError, match="LDAP server"):
                await pool.lookup(m, "gamma", {})
            assert trio.current_time() - t0 < 3
            with pytest.raises(LdapError, match="no LDAP server answered"):
                await pool.lookup(m, "gamma", {})
            # Right after every server failed, lookups fail without a new attempt each.
            t0 = trio.current_time()
            with pytest.raises(LdapError, match="no LDAP server answered"):
                await pool.lookup(m, "delta", {})
            assert trio.current_time() - t0 < 0.5
            server.start()  # back: a lookup connects again once the retry pause is over
            await trio.sleep(RETRY_AFTER)
            assert source(await pool.lookup(m, "gamma", {})) == "/srv/exports/gamma"
            nursery.cancel_scope.cancel()
        assert max(gaps) < 0.5, max(gaps)
    finally:
        pool.close()


async def test_a_flood_of_lookups_on_a_hung_server_never_blocks_a_write(
    new_slapd: Callable[..., Slapd],
) -> None:
    """1,000 distinct keys while slapd is stopped: each search is a write on the connection,
    which nobody reads. Unbounded, the writes fill the socket's buffer and the next one
    blocks the whole loop; bounded (MAX_IN_FLIGHT), lookups wait for a slot and fail at
    their deadline while the loop runs on."""
    server = new_slapd(directory_entries("/srv/exports"))
    pool = LdapPool()
    m = ldapi_map(server, timeout=1.0, network_timeout=1.0)
    assert source(await pool.lookup(m, "alpha", {})) == "/srv/exports/alpha"
    # If the loop blocks anyway, this thread lets slapd go on after 15 s, so the test
    # ends (and fails on the gap) instead of hanging.
    watchdog = threading.Timer(15, server.resume)
    failures = 0
    gaps: list[float] = []

    async def ticker() -> None:
        last = trio.current_time()
        while True:
            await trio.sleep(0.01)
            now = trio.current_time()
            gaps.append(now - last)
            last = now

    async def one(i: int) -> None:
        nonlocal failures
        try:
            await pool.lookup(m, f"flood{i}-" + "x" * 100, {})
        except LdapError:
            failures += 1

    try:
        server.pause()
        watchdog.start()
        async with trio.open_nursery() as outer:
            outer.start_soon(ticker)
            async with trio.open_nursery() as nursery:
                for i in range(1000):
                    nursery.start_soon(one, i)
            outer.cancel_scope.cancel()
        assert failures == 1000
        assert max(gaps) < 1.0, max(gaps)
    finally:
        watchdog.cancel()
        server.resume()
        pool.close()


async def test_failover_to_a_second_server(new_slapd: Callable[..., Slapd]) -> None:
    first = new_slapd(directory_entries("/first"))
    second = new_slapd(directory_entries("/second"))
    pool = LdapPool()
    try:
        s = LdapSettings(uris=(first.ldap_uri, second.ldap_uri), timeout=2, network_timeout=1)
        m = parse_ldap_map_name(f"ldap:{TEST_DN}", s)
        assert source(await pool.lookup(m, "a1", {})) == "/first/a1"
        first.stop()
        try:  # fails if it went out on the link that went away, else goes to the second
            assert source(await pool.lookup(m, "a2", {})) == "/second/a2"
        except LdapError:
            pass
        assert source(await pool.lookup(m, "a3", {})) == "/second/a3"
        first.start()
        assert source(await pool.lookup(m, "a4", {})) == "/second/a4"  # kept
    finally:
        pool.close()


async def test_tls_ldaps_and_starttls_with_a_self_signed_ca(slapd: Slapd) -> None:
    pool = LdapPool()
    try:
        for uri, starttls in ((slapd.ldaps_uri, False), (slapd.ldap_uri, True)):
            s = LdapSettings(uris=(uri,), ca_file=str(slapd.ca), starttls=starttls, timeout=3)
            m = parse_ldap_map_name(f"ldap:{TEST_DN}", s)
            assert source(await pool.lookup(m, "alpha", {})) == "/srv/exports/alpha"
            # Without the CA the server cannot be trusted: no lookup.
            bad = LdapSettings(
                uris=(uri,), ca_file="/etc/ssl/certs/nonexistent.pem", starttls=starttls, timeout=3
            )
            m = parse_ldap_map_name(f"ldap:{TEST_DN}", bad)
            with pytest.raises(LdapError, match="no LDAP server answered"):
                await pool.lookup(m, "alpha", {})
    finally:
        pool.close()


async def test_simple_bind(slapd: Slapd) -> None:
    pool = LdapPool()
    try:
        s = LdapSettings(
            uris=(slapd.ldap_uri,), auth="simple", bind_dn=f"cn=admin,{SUFFIX}", bind_password="x"
        )
        with pytest.raises(LdapError, match="Invalid credentials"):
            await pool.lookup(parse_ldap_map_name(f"ldap:{TEST_DN}", s), "alpha", {})
        s = LdapSettings(
            uris=(slapd.ldap_uri,),
            auth="simple",
            bind_dn=f"cn=admin,{SUFFIX}",
            bind_password="secret",
        )
        e = await pool.lookup(parse_ldap_map_name(f"ldap:{TEST_DN}", s), "alpha", {})
        assert source(e) == "/srv/exports/alpha"
    finally:
        pool.close()


# -- pyautofs serve, end to end ----------------------------------------------------------


@pytest.fixture
def new_slapd() -> Iterator[Callable[..., Slapd]]:
    """Start slapds for a test; every one is killed and removed afterwards, whatever happens."""
    if SLAPD is None:
        pytest.skip("needs OpenLDAP's slapd (package slapd)")
    started: list[Slapd] = []

    def start(entries: str, *, tls: bool = False) -> Slapd:
        server = Slapd(entries, tls=tls)
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in started:
            server.remove()


@pytest.fixture
def new_serve(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Start ``pyautofs serve`` for a test; each must exit 0 at SIGTERM afterwards."""
    started: list[Server] = []

    def start(config: Path, *args: str) -> Server:
        env = {**os.environ, "PYAUTOFS_LDAP_CONFIG": str(config)}
        serve = Server(tmp_path, "--timeout", "0", *args, env=env)
        started.append(serve)
        return serve

    yield start
    assert [s.stop() for s in started] == [0] * len(started), [s.log() for s in started]


@pytest.fixture
def exports(tmp_path: Path) -> Path:
    for name in ("alpha", "beta", "gamma", "delta", "*)(objectClass=*"):
        (tmp_path / "exports" / name).mkdir(parents=True)
        (tmp_path / "exports" / name / "f").write_text(name)
    return tmp_path / "exports"


@pytest.mark.kernel
@needs_slapd
def test_serve_ldap_maps_both_schemas_and_an_injected_key(
    tmp_path: Path,
    exports: Path,
    new_slapd: Callable[..., Slapd],
    new_serve: Callable[..., Server],
) -> None:
    direct = {f"{tmp_path}/direct/beta": f":{exports}/beta", "/": ":/", "*": ":/"}
    server = new_slapd(directory_entries(str(exports)) + automount_map_ldif("auto.direct", direct))
    conf = tmp_path / "autofs.conf"
    conf.write_text(f"LDAP_URI={server.ldapi_uri}\nLDAP_AUTH=external\nLDAP_TIMEOUT=3\n")
    master = tmp_path / "auto.master"
    master.write_text(
        f"{tmp_path}/mnt ldap:{TEST_DN}\n{tmp_path}/nis ldap:{NIS_DN}\n"
        f"{tmp_path}/star ldap:automountMapName=auto.star,{SUFFIX}\n"
        f"/- ldap:automountMapName=auto.direct,{SUFFIX}\n"
    )
    new_serve(conf, "--master", str(master))
    assert lookup(tmp_path / "mnt" / "alpha" / "f") == (0, "alpha")
    assert lookup(tmp_path / "mnt" / "gamma" / "f") == (0, "gamma")  # the "/" wildcard
    assert lookup(tmp_path / "nis" / "alpha" / "f") == (0, "beta")
    assert lookup(tmp_path / "nis" / "beta" / "f")[0] == 2
    # The key is a literal: it matches only the wildcard, as any unknown key does.
    assert lookup(tmp_path / "mnt" / "*)(objectClass=*" / "f") == (0, "*)(objectClass=*")
    assert lookup(tmp_path / "star" / "delta" / "f") == (0, "delta")  # the "*" wildcard
    assert lookup(tmp_path / "nis" / "*)(cn=*" / "f")[0] == 2
    # A direct map from LDAP: its keys read at start ("/" and "*" are not mount points).
    assert lookup(tmp_path / "direct" / "beta" / "f") == (0, "beta")
    assert [m.mount_point for m in autofs_mounts() if m.mount_point.startswith("/tmp")].count(
        f"{tmp_path}/direct/beta"
    ) == 1
    # An LDAP map named on the command line, as a map file would be.
    new_serve(conf, str(tmp_path / "cli"), f"ldap:{TEST_DN}")
    assert lookup(tmp_path / "cli" / "beta" / "f") == (0, "beta")


def test_slapd_fixture_leaves_nothing() -> None:
    if SLAPD is None:
        pytest.skip("needs OpenLDAP's slapd (package slapd)")
    server = Slapd("", tls=True)
    assert server.proc is not None and server.proc.poll() is None
    server.remove()
    assert server.proc.poll() is not None
    assert not server.dir.exists()


@pytest.mark.kernel
@needs_slapd
def test_serve_master_map_from_ldap_and_a_server_that_goes_away(
    tmp_path: Path,
    exports: Path,
    new_slapd: Callable[..., Slapd],
    new_serve: Callable[..., Server],
) -> None:
    entries = directory_entries(str(exports)) + automount_map_ldif(
        "auto.master",
        {
            f"{tmp_path}/mnt": f"ldap:{TEST_DN} --timeout=0",
            f"{tmp_path}/nis": f"ldap:{NIS_DN}",
        },
    )
    server = new_slapd(entries)
    conf = tmp_path / "autofs.conf"
    conf.write_text("LDAP_TIMEOUT=2\nLDAP_NETWORK_TIMEOUT=1\n")
    master = f"{server.ldap_uri}/automountMapName=auto.master,{SUFFIX}"
    serve = new_serve(conf, "--master", master, "--negative-timeout", "2")
    assert lookup(tmp_path / "mnt" / "alpha" / "f") == (0, "alpha")
    assert lookup(tmp_path / "nis" / "alpha" / "f") == (0, "beta")
    server.stop()
    t0 = time.monotonic()
    # The lookup fails with "host is down" (automount(8) says ENOENT), and the log
    # says which server and why.
    assert lookup(tmp_path / "mnt" / "beta" / "f")[0] == errno.EHOSTDOWN
    assert lookup(tmp_path / "mnt" / "beta" / "f")[0] == errno.EHOSTDOWN  # negative cache
    assert time.monotonic() - t0 < 5
    assert "LDAP server" in serve.log()
    assert serve.log().count("key='beta'") == 1, serve.log()
    assert lookup(tmp_path / "mnt" / "alpha" / "f") == (0, "alpha")  # mounted: still there
    server.start()
    time.sleep(2.1)  # the negative entry runs out
    assert lookup(tmp_path / "mnt" / "beta" / "f") == (0, "beta")
