"""Takeover between unrelated engines (``takeover=True``, ``pyautofs serve --takeover``).

An engine that takes over a mount a live pyautofs engine serves leaves a takeover request
next to the locks (:mod:`._lock`) and sends that engine SIGUSR1. The owner
(``pyautofs serve`` calls ``release_requested`` on SIGUSR1) waits for an idle moment, stops
reading, lets its handlers finish and answers them, then lets go of the mount without
unmounting anything and drops it from its lock: that is the answer. Only then does the new
engine go through CATATONIC + SETPIPEFD, so no request the old engine had started fails,
and the keys it mounted are all seen as mounted.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from typing import TYPE_CHECKING

import trio

from .._sys._mountinfo import autofs_mounts
from ._served import RequestPipe, ServedMount
from ._setup import MountTable, adopt, new_pipe, release, start_mounts, start_reader

if TYPE_CHECKING:
    from ._automounter import Automounter

__all__ = ["take_over_from", "release_mount"]

log = logging.getLogger("pyautofs")


async def take_over_from(eng: Automounter, m: ServedMount, holder: int) -> None:
    """Take ``m`` from the live pyautofs engine ``holder``, which drains first.

    Everything slow (reading mountinfo, the pipe) is done before asking, so the lookups
    that queue between the owner's last read and our CATATONIC, the ones a takeover loses,
    are only those of a few hundred microseconds.
    """
    existing = [a for a in autofs_mounts() if a.mount_point == m.path]
    if not existing:
        start_mounts(eng, [m])
        return
    am = existing[-1]
    r, w = new_pipe(eng.pipe_size)
    try:
        request = eng._lock.ask(m.path)
        try:
            os.kill(holder, signal.SIGUSR1)
            log.info("%s: asked pyautofs pid %d to drain and let go", m.path, holder)
            with trio.move_on_after(eng.drain_timeout) as scope:
                while eng._lock.holder(m.path) == holder:
                    await trio.sleep(0.001)
            if scope.cancelled_caught:
                log.warning(
                    "%s: pid %d did not let go within %s s; taking the mount anyway, "
                    "without its lock",
                    m.path,
                    holder,
                    eng.drain_timeout,
                )
        except ProcessLookupError:
            pass  # it died meanwhile: plain adoption
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(request)
        if m.indirect:
            pipe = RequestPipe(r)
            adopt(eng, m, am, w, MountTable.read())
        else:
            os.close(r)
            r = -1
            pipe = eng._shared_pipe()
            adopt(eng, m, am, pipe.write_fd, MountTable.read())
    except BaseException:
        if r >= 0:
            os.close(r)
        release(eng, m)
        raise
    finally:
        os.close(w)
    pipe.route(m)
    if m.indirect:
        start_reader(eng, pipe)
    eng._mounts_changed()
    log.info("%s: taken over from pid %d", m.path, holder)


async def release_mount(eng: Automounter, m: ServedMount, idle_wait: float) -> None:
    """Stop serving ``m`` and leave the autofs mount and its keys as they are."""
    deadline = trio.current_time() + idle_wait
    while m.ledger.in_flight and trio.current_time() < deadline:
        await trio.sleep(0.0005)
    pipe = m.pipe
    if pipe is not None and not pipe.shared:
        pipe.stop()
    with trio.move_on_after(eng.request_timeout):
        while m.ledger.in_flight:
            await trio.sleep(0.001)
    del eng._mounts[m.path]
    # What queued after the last read would fail at the new owner's CATATONIC anyway;
    # failing it here means no token waits on a new owner that might never come.
    if pipe is not None and not pipe.shared:
        from ._setup import drain

        drain(eng, pipe)
    release(eng, m, keep_dir=True)
    eng._mounts_changed(flush=True)
    log.info("%s: released to another engine", m.path)
