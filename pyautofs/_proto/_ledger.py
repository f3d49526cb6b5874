"""The mount-state ledger: which keys of one autofs mount are mounted, made, in flight, failing.

Pure bookkeeping, no I/O: the engine feeds it what happened and asks it what to do with a
missing-mount request. Time is passed in (``now``, any monotonic clock in seconds), so the
ledger is tested without a kernel and without sleeping.

The negative cache remembers keys whose lookup failed, so a repeated lookup fails at once
without running the handler again. Any local user can make the daemon look up any name, so
the cache is bounded twice: by age (an entry lives ``ttl`` seconds) and by size (at most
``max_entries``; the oldest entry goes first). Both bounds hold at every insertion, so no
sequence of lookups grows it past ``max_entries``.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from collections.abc import Set as AbstractSet

__all__ = ["NegativeCache", "MountLedger", "Verdict", "NEGATIVE_MAX_ENTRIES"]

_NO_ENTRIES: OrderedDict[str, tuple[float, int]] = OrderedDict()  # shared, never written
_NOTHING: frozenset[str] = frozenset()

NEGATIVE_MAX_ENTRIES = 16384
"""Default size bound of a negative cache (about 2 MB of Python objects when full)."""


class NegativeCache:
    """Failed keys with their errno, bounded by age (``ttl`` seconds) and size.

    Entries are kept in expiry order (every entry gets the same ``ttl``), so both evictions
    take from the front and cost O(1) per entry evicted.
    """

    __slots__ = ("_entries", "evicted", "max_entries", "ttl")

    def __init__(self, ttl: float, max_entries: int = NEGATIVE_MAX_ENTRIES) -> None:
        if ttl < 0:
            raise ValueError(f"ttl must be >= 0, not {ttl}")
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, not {max_entries}")
        self.ttl = ttl
        self.max_entries = max_entries
        self._entries: OrderedDict[str, tuple[float, int]] = _NO_ENTRIES  # made on first put
        self.evicted = 0
        """Entries dropped because the cache was full (not counting those that aged out)."""

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def get(self, key: str, now: float) -> int | None:
        """The errno ``key`` failed with, while its entry is fresh; else None (and drop it)."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] > now:
            return entry[1]
        del self._entries[key]
        return None

    def put(self, key: str, err: int, now: float) -> None:
        """Remember that ``key`` failed with ``err`` (positive errno) as of ``now``."""
        if self.ttl <= 0:
            return
        self._put(key, now + self.ttl, err, now)

    def _put(self, key: str, expires: float, err: int, now: float) -> None:
        if self._entries is _NO_ENTRIES:
            self._entries = OrderedDict()
        entries = self._entries
        entries.pop(key, None)
        entries[key] = (expires, err)
        self.prune(now)
        while len(entries) > self.max_entries:
            entries.popitem(last=False)
            self.evicted += 1

    def restore(self, entries: Iterable[tuple[str, float, int]], now: float) -> None:
        """Put back ``(key, seconds left, errno)`` entries (an upgrade's saved state)."""
        if self.ttl <= 0:
            return
        merged = dict(self._entries)
        for key, left, err in entries:
            if left > 0:
                merged[key] = (now + min(left, self.ttl), err)
        ordered = sorted(merged.items(), key=lambda kv: kv[1][0])
        self._entries = OrderedDict(ordered[-self.max_entries :])
        self.evicted += max(0, len(ordered) - self.max_entries)

    def discard(self, key: str) -> None:
        """Forget ``key`` (it was just mounted)."""
        self._entries.pop(key, None)

    def prune(self, now: float) -> int:
        """Drop entries that aged out; how many went."""
        entries = self._entries
        n = 0
        while entries:
            key, (expires, _) = next(iter(entries.items()))
            if expires > now:
                break
            del entries[key]
            n += 1
        return n

    def clear(self) -> int:
        """Forget every entry (a map reload); how many there were."""
        n = len(self._entries)
        if n:
            self._entries.clear()
        return n

    def items(self, now: float) -> Iterator[tuple[str, float, int]]:
        """``(key, seconds left, errno)`` of every fresh entry."""
        for key, (expires, err) in self._entries.items():
            if expires > now:
                yield key, expires - now, err


class Verdict(enum.Enum):
    """What to do with a missing-mount request."""

    SERVE = "serve"
    """Run the handler."""
    READY = "ready"
    """The key is already mounted: answer READY, never mount twice."""
    FAIL = "fail"
    """Answer FAIL at once with the errno given alongside."""


class MountLedger:
    """The state of one autofs mount's keys (``""`` is the key of a direct or offset mount).

    - ``mounted``: keys known to be mounted (by us, or found at adoption);
    - ``created``: key directories we made in an indirect root (removed when unmounted);
    - ``in_flight``: key -> token of the requests being served;
    - ``negative``: the bounded negative cache.
    """

    __slots__ = ("closing", "created", "in_flight", "mounted", "negative")

    def __init__(self, negative_ttl: float, negative_max: int = NEGATIVE_MAX_ENTRIES) -> None:
        # Read-only views; change them through the methods below. Both start as one shared
        # empty frozenset and become sets on first use: 10,000 direct mounts with nothing
        # mounted cost no sets.
        self.mounted: AbstractSet[str] = _NOTHING
        self.created: AbstractSet[str] = _NOTHING
        self.in_flight: dict[str, int] = {}
        self.negative = NegativeCache(max(0.0, negative_ttl), negative_max)
        self.closing = False

    def on_missing(self, key: str, now: float) -> tuple[Verdict, int]:
        """Decide what a missing-mount request for ``key`` gets: ``(verdict, errno)``."""
        if self.closing:
            return Verdict.FAIL, 2  # ENOENT: new requests fail at once while shutting down
        if self.negative._entries:
            err = self.negative.get(key, now)
            if err is not None:
                return Verdict.FAIL, err
        return Verdict.SERVE, 0

    def started(self, key: str, token: int) -> None:
        """A handler for ``key`` starts on ``token``."""
        self.in_flight[key] = token

    def finished(self, key: str, err: int, now: float, *, remember: bool = True) -> None:
        """The request for ``key`` ended: ``err`` 0 (mounted) or a positive errno."""
        self.in_flight.pop(key, None)
        if err == 0:
            self.add_mounted(key)
            self.negative.discard(key)
        elif remember:
            self.negative.put(key, err, now)

    def expired(self, key: str) -> None:
        """``key`` was unmounted by an expire."""
        self.discard_mounted(key)

    def add_mounted(self, key: str) -> None:
        if not isinstance(self.mounted, set):
            self.mounted = set(self.mounted)
        self.mounted.add(key)

    def discard_mounted(self, key: str) -> None:
        if key in self.mounted:
            assert isinstance(self.mounted, set)
            self.mounted.discard(key)

    def add_created(self, key: str) -> None:
        if not isinstance(self.created, set):
            self.created = set(self.created)
        self.created.add(key)

    def discard_created(self, key: str) -> None:
        if key in self.created:
            assert isinstance(self.created, set)
            self.created.discard(key)

    def adopt(self, mounted: Iterable[str], created: Iterable[str]) -> None:
        """Merge what a predecessor mounted and made."""
        self.mounted = set(self.mounted).union(mounted) or _NOTHING
        self.created = set(self.created).union(created) or _NOTHING
