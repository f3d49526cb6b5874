"""LDAP map lookups that never block the engine.

One kept connection per list of servers, shared by every map and lookup on them. It is
made in a worker thread (connect, StartTLS, bind block in libldap), one attempt at a time,
under a deadline; a lookup then sends its search without blocking and waits for its answer,
which one reader task per connection takes off the socket when it is readable and hands to
the lookup that asked. 100 lookups in flight are 100 searches pipelined on one connection,
answered in parallel by the server. A lookup has ``timeout`` seconds; a server that goes
away fails the lookups in flight at once (the engine's negative cache then answers repeats
without asking), and the next lookup connects again, trying each server in order.
"""

from __future__ import annotations

import errno
import logging
import math
from collections.abc import Mapping
from typing import Any

import trio

from .._maps._ldap import Connection, LdapError, LdapMap, LdapSettings, connect
from .._maps._types import MapEntry
from .._proto._escape import printable

__all__ = ["LdapPool", "LdapLookups"]

log = logging.getLogger("pyautofs")

MAX_IN_FLIGHT = 64
"""Searches one connection carries at once. Each is a small write on a blocking socket,
which a hung server does not read (a Unix socket counts ~1 KiB of buffer per write): with
this bound, and the connection dropped when a search outlives its deadline, the unread
requests stay far below the socket's buffer and a write never blocks the engine. Lookups
beyond it wait for a slot, under their deadline."""

RETRY_AFTER = 1.0
"""Seconds after every server failed to connect during which lookups fail without a try."""


class _Waiter:
    """One lookup's wait for its answer."""

    __slots__ = ("done", "event", "result")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.done = False
        self.result: list[Any] | LdapError = []

    def finish(self, result: list[Any] | LdapError) -> None:
        self.result = result
        self.done = True
        self.event.set()


class LdapLookups:
    """The connection to one list of servers, and the lookups waiting on it."""

    def __init__(self, uris: tuple[str, ...], settings: LdapSettings) -> None:
        self.uris = uris
        self.settings = settings
        self._conn: Connection | None = None
        self._connecting = trio.Lock()
        self._limiter = trio.CapacityLimiter(1)
        self._waiting: dict[int, _Waiter] = {}
        self._reading = False
        self._slots = trio.Semaphore(MAX_IN_FLIGHT)
        self._down_until = -math.inf
        self._down_error: LdapError | None = None

    @property
    def connection(self) -> Connection | None:
        """The connection now, if any."""
        return self._conn

    async def _connection(self) -> Connection:
        if self._conn is not None:
            return self._conn
        async with self._connecting:
            current = self.connection
            if current is not None:  # made while this lookup waited for the lock
                return current
            if trio.current_time() < self._down_until and self._down_error is not None:
                # Every server failed a moment ago: say so at once, without a new attempt
                # per lookup (a stampede of lookups of new keys while the directory is down).
                raise self._down_error
            deadline = (self.settings.network_timeout + self.settings.timeout) * len(self.uris)
            try:
                with trio.move_on_after(deadline + 1) as scope:
                    conn = await trio.to_thread.run_sync(
                        connect,
                        self.uris,
                        self.settings,
                        limiter=self._limiter,
                        abandon_on_cancel=True,
                    )
                if scope.cancelled_caught:
                    raise LdapError(
                        errno.EHOSTDOWN, f"no LDAP server of {' '.join(self.uris)} answered in time"
                    )
            except LdapError as exc:
                self._down_until = trio.current_time() + RETRY_AFTER
                self._down_error = exc
                raise
            log.info("LDAP: connected to %s", conn.uri)
            self._conn = conn
            return conn

    def _dispatch(self, conn: Connection) -> None:
        """Hand every answer that has arrived to the lookup that asked for it."""
        try:
            answers = conn.poll()
        except LdapError as exc:
            self._lost(conn, exc)
            return
        for msgid, result in answers:
            waiter = self._waiting.pop(msgid, None)
            if waiter is not None:
                waiter.finish(result)

    def _lost(self, conn: Connection, exc: LdapError) -> None:
        if self._conn is conn:
            self._conn = None
            log.warning("LDAP: %s; reconnecting at the next lookup", printable(str(exc)))
            try:
                trio.lowlevel.notify_closing(conn.fileno())
            except (OSError, ValueError):
                pass
            conn.close()
        for waiter in self._waiting.values():
            waiter.finish(exc)
        self._waiting.clear()

    async def _answer(self, conn: Connection, waiter: _Waiter) -> None:
        """Wait for ``waiter``'s answer. One waiting lookup at a time reads the socket for
        all (the one that finds nobody reading); when it has its answer it passes the job on
        to a lookup still waiting. A lone lookup thus reads its own answer, no task between.
        """
        while not waiter.done:
            if self._reading:
                await waiter.event.wait()
                waiter.event = trio.Event()
                continue
            self._reading = True
            try:
                self._dispatch(conn)  # answers libldap has read already
                if not waiter.done:
                    try:
                        await trio.lowlevel.wait_readable(conn.fileno())
                    except (OSError, trio.ClosedResourceError) as exc:
                        self._lost(
                            conn, LdapError(errno.EHOSTDOWN, f"LDAP server {conn.uri}: {exc}")
                        )
                        return
                    self._dispatch(conn)
            finally:
                self._reading = False
                for other in self._waiting.values():
                    if not other.done:
                        other.event.set()  # the next reader
                        break

    async def search(self, amap: LdapMap, key: str) -> list[Any]:
        """The results of one key's search; raises LdapError (no server, timeout, failure).

        A kept connection that the server closed while idle is only noticed when used: the
        lookup then tries once more on a new connection.
        """
        with trio.fail_after(self.settings.timeout + 1):
            async with self._slots:
                return await self._search(amap, key)

    async def _search(self, amap: LdapMap, key: str) -> list[Any]:
        for attempt in range(2):
            kept = self._conn is not None
            conn = await self._connection()
            waiter = _Waiter()
            try:
                msgid = conn.search(amap, key)
            except LdapError as exc:
                self._lost(conn, exc)
                waiter.finish(exc)
            else:
                self._waiting[msgid] = waiter
                try:
                    await self._answer(conn, waiter)
                finally:
                    if self._waiting.pop(msgid, None) is not None:
                        # Cancelled (its deadline): the server did not answer in time. An
                        # abandon would be one more unread write; drop the connection.
                        self._lost(
                            conn,
                            LdapError(
                                errno.EHOSTDOWN, f"LDAP server {conn.uri}: no answer in time"
                            ),
                        )
            result = waiter.result
            if isinstance(result, LdapError):
                if kept and attempt == 0 and self._conn is not conn:
                    continue  # the kept connection was gone: once more, afresh
                raise result
            return list(result)
        raise AssertionError("unreachable")

    def close(self) -> None:
        """Drop the connection (at exit)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                trio.lowlevel.notify_closing(conn.fileno())
            except (OSError, ValueError):
                pass
            conn.close()


class LdapPool:
    """The :class:`LdapLookups` of each list of servers (and settings) the maps use."""

    def __init__(self) -> None:
        self._by_uris: dict[tuple[tuple[str, ...], LdapSettings], LdapLookups] = {}

    async def lookup(
        self, amap: LdapMap, key: str, variables: Mapping[str, str]
    ) -> MapEntry | None:
        """The entry for ``key`` in ``amap``; None if it has none. Raises OSError if the
        directory cannot be asked (the engine answers ENOENT and caches that briefly)."""
        if not amap.valid_key(key):
            return None
        which = (amap.uris, amap.settings)
        lookups = self._by_uris.get(which)
        if lookups is None:
            lookups = self._by_uris[which] = LdapLookups(amap.uris, amap.settings)
        try:
            results = await lookups.search(amap, key)
        except trio.TooSlowError:
            raise LdapError(
                0, f"LDAP lookup of {printable(key)} in {amap.dn}: no answer in time"
            ) from None
        value = amap.choose(key, results)
        if value is None:
            return None
        try:
            return amap.resolve(key, value, variables)
        except ValueError as exc:
            log.warning(
                "LDAP map %s: entry for %s is unusable: %s",
                amap.dn,
                printable(key),
                printable(str(exc)),
            )
            return None

    def close(self) -> None:
        """Drop every connection."""
        for lookups in self._by_uris.values():
            lookups.close()
