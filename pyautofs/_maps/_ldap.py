"""Autofs maps in LDAP, as automount(8) reads them: names, schemas, filters, the connection.

Map names (in a master map, or ``pyautofs serve MOUNTPOINT ldap:...``):

- ``ldap://server[:port]/DN`` and ``ldaps://server[:port]/DN``: that server, that map;
- ``ldap:DN`` (and ``ldap:///DN``): the servers of the settings (``LDAP_URI``, several
  for failover, ``ldapi://`` included);
- ``ldap:NAME``: the map called NAME below ``SEARCH_BASE``.

Schemas: RFC 2307bis (``automountMap``/``automountMapName``, entries ``automount`` with
``automountKey`` and ``automountInformation``), RFC 2307 (``nisMap``/``nisMapName``,
``nisObject`` with ``cn`` and ``nisMapEntry``) and the older ``automountMap`` keyed by
``ou``/``cn``. As automount(8), the schema follows from the first attribute of the map's DN
unless the settings name the classes and attributes (``MAP_OBJECT_CLASS``,
``ENTRY_OBJECT_CLASS``, ``MAP_ATTRIBUTE``, ``ENTRY_ATTRIBUTE``, ``VALUE_ATTRIBUTE``).

A lookup asks for one key, the ``/`` wildcard and ``*`` in one one-level search; the key is
escaped per RFC 4515, so ``*)(objectClass=*`` is just a key that does not exist; results are
compared to the key exactly, an exact key wins over ``/``, ``/`` over ``*``. The value is a
map entry in sun format: it is split, expanded and compiled as a file map's text is, then
the key goes in (``_sun``), with the same escape check.

The settings come from a file of ``NAME=value`` lines, automount(8)'s
``/etc/default/autofs`` by default (``PYAUTOFS_LDAP_CONFIG`` names another), with these
additions for the bind and TLS (automount keeps those in ``autofs_ldap_auth.conf``):
``LDAP_AUTH`` (``anonymous``, ``simple`` or ``external``: SASL EXTERNAL, for ldapi://),
``LDAP_BIND_DN``, ``LDAP_BIND_PASSWORD``, ``LDAP_STARTTLS`` (``yes``: StartTLS on ldap://,
required), ``LDAP_CACERT`` (a CA file; ``LDAPTLS_CACERT`` in the environment works too),
``LDAP_TIMEOUT`` (seconds for a search) and ``LDAP_NETWORK_TIMEOUT`` (seconds to connect).

The client is python-ldap (the ``ldap`` extra), OpenLDAP's own libldap underneath, as in
automount(8). Connecting and binding block, so the engine runs :meth:`LdapClient.connect`
in a worker thread; a search is sent without blocking and its answer polled
(:meth:`Connection.poll`) when the socket is readable, so many lookups share one connection
without a thread each.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from ._master import MasterEntry, parse_master
from ._sun import CompiledEntry, compile_entry, expand_variables, split_words
from ._types import MapEntry, MapWarning, valid_key

__all__ = [
    "LdapSchema",
    "RFC2307BIS",
    "RFC2307",
    "OLD_AUTOMOUNT",
    "LdapSettings",
    "LdapMap",
    "LdapError",
    "Connection",
    "escape_filter_value",
    "is_ldap_name",
    "parse_ldap_map_name",
    "load_ldap_settings",
    "connect",
    "read_master_map",
    "read_master_text",
    "read_map_keys",
]

DEFAULT_CONFIG = "/etc/default/autofs"
_COMPILED_CACHE_SIZE = 4096


class LdapError(OSError):
    """An LDAP server could not be reached or refused: one line, which server and why."""


@attrs.frozen
class LdapSchema:
    """The object classes and attributes an autofs map is stored with."""

    map_object_class: str
    entry_object_class: str
    map_attribute: str
    entry_attribute: str
    value_attribute: str


RFC2307BIS = LdapSchema(
    "automountMap", "automount", "automountMapName", "automountKey", "automountInformation"
)
RFC2307 = LdapSchema("nisMap", "nisObject", "nisMapName", "cn", "nisMapEntry")
OLD_AUTOMOUNT = LdapSchema("automountMap", "automount", "ou", "cn", "automountInformation")
_BY_MAP_ATTRIBUTE = {
    "automountmapname": RFC2307BIS,
    "nismapname": RFC2307,
    "ou": OLD_AUTOMOUNT,
}


@attrs.frozen
class LdapSettings:
    """Where the servers are and how to talk to them (see the module documentation)."""

    uris: tuple[str, ...] = ()
    search_base: str | None = None
    schema: LdapSchema | None = None
    """None: chosen from each map's DN, as automount(8) does."""
    auth: str = "anonymous"
    bind_dn: str | None = None
    bind_password: str | None = None
    starttls: bool = False
    ca_file: str | None = None
    timeout: float = 5.0
    network_timeout: float = 3.0


def load_ldap_settings(path: str | None = None) -> LdapSettings:
    """The settings from ``path`` (default: ``$PYAUTOFS_LDAP_CONFIG`` or automount's file).

    A missing file gives the defaults; a bad value raises ValueError naming it.
    """
    if path is None:
        path = os.environ.get("PYAUTOFS_LDAP_CONFIG", DEFAULT_CONFIG)
    values: dict[str, str] = {}
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read(1 << 20)
    except FileNotFoundError:
        text = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        name, _, value = line.partition("=")
        try:
            words = shlex.split(value)
        except ValueError:
            words = [value]
        values[name.strip().upper()] = " ".join(words)
    schema = None
    names = ("MAP_OBJECT_CLASS", "ENTRY_OBJECT_CLASS", "MAP_ATTRIBUTE", "ENTRY_ATTRIBUTE")
    if any(n in values for n in (*names, "VALUE_ATTRIBUTE")):
        missing = [n for n in (*names, "VALUE_ATTRIBUTE") if not values.get(n)]
        if missing:
            raise ValueError(f"{path}: {', '.join(missing)} must be set with the others")
        schema = LdapSchema(*(values[n] for n in (*names, "VALUE_ATTRIBUTE")))
    auth = values.get("LDAP_AUTH", "anonymous").lower()
    if auth not in ("anonymous", "simple", "external"):
        raise ValueError(f"{path}: LDAP_AUTH={auth}: expected anonymous, simple or external")
    try:
        timeout = float(values.get("LDAP_TIMEOUT", "5") or 5)
        network_timeout = float(values.get("LDAP_NETWORK_TIMEOUT", "3") or 3)
    except ValueError:
        raise ValueError(f"{path}: LDAP_TIMEOUT and LDAP_NETWORK_TIMEOUT are seconds") from None
    if timeout <= 0 or network_timeout <= 0:
        raise ValueError(f"{path}: LDAP_TIMEOUT and LDAP_NETWORK_TIMEOUT must be above 0")
    return LdapSettings(
        uris=tuple(values.get("LDAP_URI", "").split()),
        search_base=values.get("SEARCH_BASE") or None,
        schema=schema,
        auth=auth,
        bind_dn=values.get("LDAP_BIND_DN") or None,
        bind_password=values.get("LDAP_BIND_PASSWORD"),
        starttls=values.get("LDAP_STARTTLS", "no").lower() in ("yes", "true", "1"),
        ca_file=values.get("LDAP_CACERT") or None,
        timeout=timeout,
        network_timeout=network_timeout,
    )


def is_ldap_name(name: str) -> bool:
    """Whether a map name is an LDAP map (``ldap:...`` or ``ldaps:...``)."""
    return name.startswith(("ldap:", "ldaps:"))


def escape_filter_value(value: str) -> str:
    """RFC 4515: ``*``, ``(``, ``)``, ``\\`` and NUL as ``\\XX``, so a key matches only itself."""
    out = []
    for ch in value:
        if ch in "*()\\\0":
            out.append(f"\\{ord(ch):02x}")
        else:
            out.append(ch)
    return "".join(out)


def _schema_for(dn: str, settings: LdapSettings) -> LdapSchema:
    if settings.schema is not None:
        return settings.schema
    first = dn.split("=", 1)[0].strip().lower()
    schema = _BY_MAP_ATTRIBUTE.get(first)
    if schema is None:
        raise ValueError(
            f"cannot tell the schema of {dn!r} from its first attribute; set MAP_OBJECT_CLASS "
            "and the other attribute names"
        )
    return schema


@attrs.frozen
class LdapMap:
    """One autofs map in a directory: where, which schema, and how a key is looked up."""

    uris: tuple[str, ...]
    dn: str
    schema: LdapSchema
    defaults: tuple[str, ...] = ()
    direct: bool = False
    settings: LdapSettings = attrs.field(factory=LdapSettings, repr=False)
    _compiled: dict[str, CompiledEntry] = attrs.field(
        factory=dict, init=False, repr=False, eq=False, hash=False
    )

    def search_filter(self, key: str) -> str:
        """One key, ``/`` and ``*``: a single search finds the key and both wildcards."""
        s = self.schema
        return (
            f"(&(objectClass={s.entry_object_class})(|({s.entry_attribute}="
            f"{escape_filter_value(key)})({s.entry_attribute}=/)({s.entry_attribute}=\\2a)))"
        )

    def attributes(self) -> list[str]:
        """The attributes a lookup reads."""
        return [self.schema.entry_attribute, self.schema.value_attribute]

    def choose(
        self, key: str, results: Sequence[tuple[str, Mapping[str, Sequence[bytes]]]]
    ) -> str | None:
        """The value for ``key`` among a search's results: exact, then ``/``, then ``*``."""
        found: dict[str, str] = {}
        attr_key, attr_value = (
            self.schema.entry_attribute.lower(),
            self.schema.value_attribute.lower(),
        )
        for _dn, attributes in results:
            lowered = {k.lower(): v for k, v in attributes.items()}
            keys = lowered.get(attr_key) or []
            values = lowered.get(attr_value) or []
            if not values:
                continue
            value = values[0].decode("utf-8", "replace")
            for k in keys:
                found.setdefault(k.decode("utf-8", "surrogateescape"), value)
        for candidate in (key,) if self.direct else (key, "/", "*"):
            if candidate in found:
                return found[candidate]
        return None

    def resolve(self, key: str, value: str, variables: Mapping[str, str]) -> MapEntry:
        """The entry a map value gives ``key``; raises ValueError (EscapeError included).

        A value without ``$`` variables is compiled once (values repeat: a wildcard's, or
        one location for many keys); the key goes in at each lookup.
        """
        compiled = self._compiled.get(value)
        if compiled is None:
            words = [expand_variables(w, variables) for w in split_words(value)]
            compiled = compile_entry(words, self.defaults)
            if "$" not in value:
                if len(self._compiled) >= _COMPILED_CACHE_SIZE:
                    self._compiled.clear()
                self._compiled[value] = compiled
        return compiled.resolve(key)

    def valid_key(self, key: str) -> bool:
        """Whether ``key`` can be looked up at all."""
        return valid_key(key, direct=self.direct)


def parse_ldap_map_name(
    name: str, settings: LdapSettings, *, defaults: Sequence[str] = (), direct: bool = False
) -> LdapMap:
    """The map an ``ldap:``/``ldaps:`` name means; raises ValueError for a bad one."""
    import urllib.parse

    scheme, _, rest = name.partition(":")
    if scheme not in ("ldap", "ldaps") or not rest:
        raise ValueError(f"{name!r} is not an LDAP map name")
    uris = settings.uris
    if rest.startswith("//"):
        server, slash, dn = rest[2:].partition("/")
        if not slash or not dn:
            raise ValueError(f"{name!r}: expected {scheme}://server/DN")
        dn = urllib.parse.unquote(dn)
        if server:
            uris = (f"{scheme}://{server}",)
    else:
        dn = rest
    if "=" not in dn:
        if settings.search_base is None:
            raise ValueError(f"{name!r}: a map name without a DN needs SEARCH_BASE")
        schema = settings.schema or RFC2307BIS
        dn = f"{schema.map_attribute}={dn},{settings.search_base}"
    if not uris:
        raise ValueError(f"{name!r}: no server (give ldap://server/DN, or set LDAP_URI)")
    return LdapMap(uris, dn, _schema_for(dn, settings), tuple(defaults), direct, settings)


class Connection:
    """One bound connection to one server, used without blocking once made."""

    def __init__(self, handle: Any, uri: str, timeout: float) -> None:
        self.handle = handle
        self.uri = uri
        self.timeout = timeout

    def fileno(self) -> int:
        """The socket, to wait on for answers."""
        return int(self.handle.fileno())

    def search(self, amap: LdapMap, key: str) -> int:
        """Send the search for ``key``; its message id. Raises LdapError."""
        import ldap

        try:
            return int(
                self.handle.search_ext(
                    amap.dn,
                    ldap.SCOPE_ONELEVEL,
                    amap.search_filter(key),
                    amap.attributes(),
                    timeout=self.timeout,
                )
            )
        except ldap.LDAPError as exc:
            raise _error(self.uri, exc) from None

    def search_all(self, dn: str, filterstr: str, attributes: list[str]) -> int:
        """Send a one-level search of a whole map (master maps); its message id."""
        import ldap

        try:
            return int(
                self.handle.search_ext(
                    dn, ldap.SCOPE_ONELEVEL, filterstr, attributes, timeout=self.timeout
                )
            )
        except ldap.LDAPError as exc:
            raise _error(self.uri, exc) from None

    def poll(self) -> list[tuple[int, list[Any] | LdapError]]:
        """Every answer that has arrived, without blocking: (message id, results or error)."""
        import ldap

        out: list[tuple[int, list[Any] | LdapError]] = []
        while True:
            try:
                rtype, rdata, msgid, _ctrls = self.handle.result3(ldap.RES_ANY, 1, 0)
            except ldap.NO_SUCH_OBJECT as exc:
                msgid = (
                    exc.args[0].get("msgid") if exc.args and isinstance(exc.args[0], dict) else None
                )
                if msgid is None:
                    raise _error(self.uri, exc) from None
                out.append((int(msgid), []))
                continue
            except (ldap.SERVER_DOWN, ldap.CONNECT_ERROR, ldap.TIMEOUT) as exc:
                raise _error(self.uri, exc) from None
            except ldap.LDAPError as exc:
                msgid = (
                    exc.args[0].get("msgid") if exc.args and isinstance(exc.args[0], dict) else None
                )
                if msgid is None:
                    raise _error(self.uri, exc) from None
                out.append((int(msgid), _error(self.uri, exc)))
                continue
            if rtype is None:
                return out
            out.append((int(msgid), list(rdata or [])))

    def abandon(self, msgid: int) -> None:
        """Give up on a search (its deadline passed)."""
        import ldap

        try:
            self.handle.abandon_ext(msgid)
        except ldap.LDAPError:
            pass

    def close(self) -> None:
        """Unbind and close the socket."""
        import ldap

        try:
            self.handle.unbind_ext()
        except ldap.LDAPError:
            pass


def _error(uri: str, exc: Exception) -> LdapError:
    import errno

    info = exc.args[0] if exc.args and isinstance(exc.args[0], dict) else {}
    desc = info.get("desc") or type(exc).__name__
    extra = info.get("info")
    text = f"{desc} ({extra})" if extra else str(desc)
    return LdapError(errno.EHOSTDOWN, f"LDAP server {uri}: {text}")


def connect(uris: Sequence[str], settings: LdapSettings) -> Connection:
    """A bound connection to the first of ``uris`` that answers (blocking: run it in a thread).

    Each server gets ``network_timeout`` to connect and ``timeout`` for StartTLS and the
    bind. Raises LdapError naming every server tried and why it failed.
    """
    try:
        import ldap
    except ImportError:
        import errno

        raise LdapError(
            errno.ENOPKG, "LDAP maps need python-ldap: pip install 'pyautofs[ldap]'"
        ) from None
    failures = []
    for uri in uris:
        handle = ldap.initialize(uri)
        handle.timeout = settings.timeout  # python-ldap's own deadline for StartTLS, bind
        try:
            handle.set_option(ldap.OPT_PROTOCOL_VERSION, 3)
            handle.set_option(ldap.OPT_REFERRALS, 0)
            handle.set_option(ldap.OPT_NETWORK_TIMEOUT, settings.network_timeout)
            handle.set_option(ldap.OPT_TIMEOUT, settings.timeout)
            ca_file = settings.ca_file or os.environ.get("LDAPTLS_CACERT")
            if ca_file:
                handle.set_option(ldap.OPT_X_TLS_CACERTFILE, ca_file)
            if uri.startswith("ldaps:") or settings.starttls:
                handle.set_option(ldap.OPT_X_TLS_REQUIRE_CERT, ldap.OPT_X_TLS_DEMAND)
                try:
                    handle.set_option(ldap.OPT_X_TLS_NEWCTX, 0)
                except ValueError:
                    failures.append(f"cannot set up TLS (CA file {ca_file})")
                    _drop(handle)
                    continue
            if settings.starttls and uri.startswith("ldap:"):
                handle.start_tls_s()
            if settings.auth == "simple":
                handle.simple_bind_s(settings.bind_dn or "", settings.bind_password or "")
            elif settings.auth == "external":
                # Not sasl_non_interactive_bind_s: python-ldap holds the GIL through that
                # call, so a hung server froze the whole process for the timeout. EXTERNAL
                # is one step, which ldap_sasl_bind does with the GIL released.
                handle.sasl_bind_s("", "EXTERNAL", b"")
            else:
                handle.simple_bind_s("", "")
        except ldap.LDAPError as exc:
            failures.append(str(_error(uri, exc)).split(": ", 1)[-1])
            _drop(handle)
            continue
        return Connection(handle, uri, settings.timeout)
    import errno

    raise LdapError(
        errno.EHOSTDOWN,
        "no LDAP server answered: "
        + "; ".join(f"{u}: {why}" for u, why in zip(uris, failures, strict=False)),
    )


def _drop(handle: Any) -> None:
    import ldap

    try:
        handle.unbind_ext()
    except ldap.LDAPError:
        pass


def read_map_keys(amap: LdapMap) -> list[str]:
    """Every key of a direct map in LDAP (blocking: at start and on SIGHUP, as automount(8)
    reads a direct map whole to set up its mounts). Raises LdapError."""
    import ldap

    conn = connect(amap.uris, amap.settings)
    try:
        try:
            results = conn.handle.search_ext_s(
                amap.dn,
                ldap.SCOPE_ONELEVEL,
                f"(objectClass={amap.schema.entry_object_class})",
                [amap.schema.entry_attribute],
                timeout=amap.settings.timeout,
            )
        except ldap.LDAPError as exc:
            raise _error(conn.uri, exc) from None
    finally:
        conn.close()
    keys = []
    for _dn, attributes in sorted(results):
        lowered = {k.lower(): v for k, v in attributes.items()}
        for raw in lowered.get(amap.schema.entry_attribute.lower()) or []:
            key = raw.decode("utf-8", "surrogateescape")
            if key != "/" and valid_key(key, direct=True) and key not in keys:
                keys.append(key)
    return keys


def read_master_text(name: str, settings: LdapSettings | None = None) -> str:
    """A master map stored in LDAP as master-map text (blocking: at start and on SIGHUP).

    Each entry's key is a mount point and its value the rest of a master-map line. Without
    ``LDAP_URI`` in the settings, its ``ldap:DN`` maps are read from the master map's server.
    Raises LdapError, or ValueError for a bad name.
    """
    import ldap

    if settings is None:
        settings = load_ldap_settings()
    amap = parse_ldap_map_name(name, settings)
    conn = connect(amap.uris, settings)
    try:
        s = amap.schema
        try:
            results = conn.handle.search_ext_s(
                amap.dn,
                ldap.SCOPE_ONELEVEL,
                f"(objectClass={s.entry_object_class})",
                amap.attributes(),
                timeout=settings.timeout,
            )
        except ldap.LDAPError as exc:
            raise _error(conn.uri, exc) from None
    finally:
        conn.close()
    server = amap.uris[0] if not settings.uris and len(amap.uris) == 1 else None
    lines = []
    for _dn, attributes in sorted(results):
        lowered = {k.lower(): v for k, v in attributes.items()}
        keys = lowered.get(s.entry_attribute.lower()) or []
        values = lowered.get(s.value_attribute.lower()) or []
        if not (keys and values):
            continue
        value = values[0].decode("utf-8", "replace")
        scheme, _, rest = value.partition(":")
        if server is not None and scheme in ("ldap", "ldaps") and not rest.startswith("//"):
            value = f"{server}/{rest}"
        lines.append(f"{keys[0].decode('utf-8', 'replace')} {value}")
    return "\n".join(lines) + "\n"


def read_master_map(
    name: str, settings: LdapSettings | None = None
) -> tuple[list[MasterEntry], list[MapWarning]]:
    """A master map stored in LDAP, read whole and parsed (see :func:`read_master_text`)."""
    return parse_master(read_master_text(name, settings), name)
