"""Install open files at exact fd numbers: the fd-table half of a restore.

A restored process must find its files at the numbers it had (the autofs owner's pipe read
end on fd 40, say), while the restorer itself already holds fds, possibly at those very
numbers. :func:`install_fds` takes a *plan*, ``{target: source}``, and makes every target
refer to the open file its source referred to when the call began.

It is a parallel copy, solved like a register allocator's: a target can be overwritten once
no pending entry still needs to read it, so entries are done in an order where every target
is free to be overwritten ("ready"); what is left once nothing is ready consists only of
cycles (a swap is a 2-cycle), and each cycle is broken by copying one of its fds to a
temporary. Temporaries are made with ``F_DUPFD_CLOEXEC`` above every number the plan names,
so they can never land on a number the plan uses, and are closed before returning. A plan
without cycles needs no temporary at all, and each target costs one ``dup3``.

CRIU solves the same problem differently: it moves all of its own fds above the highest
target first and then places targets in ascending order. Copying in dependency order touches
nothing but the plan's own fds.

Not thread-safe against other threads of this process that open or close fds while it runs:
a target found free could be taken by another thread before it is installed, exactly as
with ``dup2``.
"""

from __future__ import annotations

import errno
import fcntl
import os
import resource
import select
from collections.abc import Iterable, Mapping

__all__ = ["install_fds"]


def _open_among(fds: Iterable[int]) -> set[int]:
    """Which of ``fds`` are open, in one ``poll`` per 1,024 fds.

    ``poll`` reports ``POLLNVAL`` for a number that is not an open fd and, with an empty
    event mask, nothing (or only POLLHUP/POLLERR) for an open one. Probing each fd with
    ``fcntl(F_GETFD)`` costs a raised Python exception per free number, about five times
    as much.
    """
    fds = list(fds)
    closed: set[int] = set()
    for start in range(0, len(fds), 1024):
        poller = select.poll()
        for fd in fds[start : start + 1024]:
            poller.register(fd, 0)
        closed.update(fd for fd, ev in poller.poll(0) if ev & select.POLLNVAL)
    return set(fds) - closed


def _dup_above(fd: int, floor: int) -> int:
    """A close-on-exec copy of ``fd`` at a number >= ``floor``, or anywhere when there is
    no room up there.

    The fallback is safe because temporaries are only needed to break cycles, and by then
    every number the plan names is open: every source was open from the start and is never
    closed, every finished target is open, and every unfinished target is the source of
    another entry. ``F_DUPFD`` only ever picks a free number, so it cannot hit one.
    """
    try:
        return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, floor)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EMFILE):
            raise
    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 0)


def _check_plan(plan: Mapping[int, int], replace: bool) -> None:
    """Refuse a bad plan before touching anything."""
    for target, source in plan.items():
        for what, fd in (("target", target), ("source", source)):
            if not isinstance(fd, int) or isinstance(fd, bool):
                raise TypeError(f"install_fds: {what} fd must be an int, not {fd!r}")
            if fd < 0:
                raise ValueError(f"install_fds: {what} fd {fd} is negative")
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if limit != resource.RLIM_INFINITY:
        too_high = sorted(t for t in plan if t >= limit)
        if too_high:
            raise OSError(
                errno.EBADF,
                f"install_fds: target fd {too_high[0]} is not below RLIMIT_NOFILE ({limit}); "
                "raise the limit with resource.setrlimit first",
            )
    sources = set(plan.values())
    maybe_busy = set() if replace else {t for t, s in plan.items() if t != s} - sources
    is_open = _open_among(sources | maybe_busy)
    for target, source in plan.items():
        if source not in is_open:
            raise OSError(
                errno.EBADF, f"install_fds: source fd {source} (for target {target}) is not open"
            )
    busy = sorted(maybe_busy & is_open)
    if busy:
        raise OSError(
            errno.EBUSY,
            f"install_fds: target fd{'s' if len(busy) > 1 else ''} "
            f"{', '.join(map(str, busy))} already open outside the plan "
            "(pass replace=True to close what is there)",
        )


def install_fds(
    plan: Mapping[int, int],
    *,
    replace: bool = False,
    cloexec: bool = True,
    close_sources: bool = False,
) -> None:
    """Make each fd ``target`` refer to the open file that ``plan[target]`` referred to.

    Sources and targets may overlap in any way: swaps, longer cycles, chains where one
    entry's source is another entry's target, several targets sharing one source. Every
    source must be open. A target that is open but is not a source of the plan is *busy*:
    that is an error (``OSError(EBUSY)``) unless ``replace=True``, which closes what was there.
    Bad plans are refused before anything changes: negative numbers (``ValueError``), a
    source that is not open or a target at or above ``RLIMIT_NOFILE`` (``OSError(EBADF)``).

    Installed targets are close-on-exec by default, the safe choice for fds such as an
    autofs pipe, which must not leak into mount helpers; pass ``cloexec=False`` for targets
    that an ``exec``'d program should inherit (as ``dup2`` makes them). This applies to
    entries whose target equals their source too.

    Fds the plan does not name are never touched. Sources that are not also targets are
    left open unless ``close_sources=True``, which closes each of them once at the end.
    """
    _check_plan(plan, replace)
    inheritable = not cloexec
    pending = {t: s for t, s in plan.items() if t != s}
    uses: dict[int, int] = {}
    readers: dict[int, list[int]] = {}
    for t, s in pending.items():
        uses[s] = uses.get(s, 0) + 1
        readers.setdefault(s, []).append(t)
    ready = [t for t in pending if t not in uses]
    floor = max(max(plan, default=0), max(plan.values(), default=0)) + 1
    temps: list[int] = []
    try:
        while pending:
            while ready:
                t = ready.pop()
                s = pending.pop(t)
                os.dup2(s, t, inheritable=inheritable)
                left = uses[s] - 1
                uses[s] = left
                if left == 0 and s in pending:
                    ready.append(s)
            if not pending:
                break
            # Only cycles are left: every pending target is still read by exactly one
            # other pending entry. Park one in a temporary and let the cycle unwind.
            t = next(iter(pending))
            tmp = _dup_above(t, floor)
            temps.append(tmp)
            moved = [u for u in readers.pop(t, ()) if u in pending and pending[u] == t]
            for u in moved:
                pending[u] = tmp
            readers[tmp] = moved
            uses[tmp] = len(moved)
            uses[t] = 0
            ready.append(t)
    finally:
        for tmp in temps:
            os.close(tmp)
    for t, s in plan.items():
        if t == s:
            os.set_inheritable(t, inheritable)
    if close_sources:
        for s in set(plan.values()) - plan.keys():
            os.close(s)
