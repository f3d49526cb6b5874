"""Upgrade: hand every mount to a successor process without a lookup failing (SIGUSR2).

The protocol and why it needs no catatonic window are in :mod:`._handover`. Here are both
sides: :func:`hand_over` in the old engine, :func:`take_over_from_predecessor` in the new.
Only one upgrade runs at a time: a second request while one is in progress is logged and
ignored (``Automounter.hand_over`` returns None at once).
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import trio

from .._proto._ledger import MountLedger
from .._sys._mount import AutofsMode
from ._fdchannel import FdChannel
from ._handover import (
    HANDOVER_ENV,
    HandoverError,
    MountState,
    receive_message,
    receive_state_blocking,
    send_message,
)
from ._served import RequestPipe, ServedMount
from ._setup import start_mounts, start_reader

if TYPE_CHECKING:
    from ._automounter import Automounter

__all__ = ["hand_over", "take_over_from_predecessor", "mount_state"]

log = logging.getLogger("pyautofs")


def mount_state(m: ServedMount, pipe_index: int = -1) -> MountState:
    now = time.perf_counter()
    return MountState(
        path=m.path,
        mode=m.mode.value,
        dev=m.dev,
        timeout=m.timeout,
        strictexpire=m.strictexpire,
        created_dir=m.created_dir,
        mounted=tuple(sorted(m.ledger.mounted)),
        created_keys=tuple(sorted(m.ledger.created)),
        key_timeouts=dict(m.key_timeouts),
        negative={k: (left, err) for k, left, err in m.ledger.negative.items(now)},
        pipe=pipe_index,
    )


async def hand_over(
    eng: Automounter, argv: Sequence[str], timeout: float, env: Mapping[str, str] | None
) -> int | None:
    """The old engine's side (see ``Automounter.hand_over``)."""
    mounts = list(eng._mounts.values())
    pipes: list[RequestPipe] = []
    index: dict[int, int] = {}
    for m in mounts:
        if m.pipe is not None and id(m.pipe) not in index:
            index[id(m.pipe)] = len(pipes)
            pipes.append(m.pipe)
    fds: list[int] = [eng._lock.fd] if eng._lock.fd >= 0 else []
    pipe_info: list[dict[str, Any]] = []
    for p in pipes:
        fds.append(p.read_fd)
        if p.shared:
            fds.append(p.write_fd)
        pipe_info.append({"shared": p.shared})
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    channel = FdChannel(parent)
    proc: subprocess.Popen[bytes] | None = None
    try:
        child_env = dict(os.environ if env is None else env)
        child_env[HANDOVER_ENV] = str(child.fileno())
        try:
            # A plain child: it stays in our process group, which lets it answer the kernel.
            proc = subprocess.Popen(list(argv), pass_fds=(child.fileno(),), env=child_env)
        finally:
            child.close()
        states = [mount_state(m, index[id(m.pipe)] if m.pipe is not None else -1) for m in mounts]
        with trio.fail_after(timeout):
            await send_message(
                channel, "state", states, fds, pipes=pipe_info, lock=eng._lock.fd >= 0
            )
            await receive_message(channel, "ready")
    except (OSError, HandoverError, ValueError, EOFError, trio.TooSlowError) as exc:
        reason = (
            f"no confirmation within {timeout} s" if isinstance(exc, trio.TooSlowError) else exc
        )
        log.error("handover failed, this engine goes on serving: %s", reason)
        if proc is not None:
            with trio.CancelScope(shield=True):
                proc.kill()
                await trio.to_thread.run_sync(proc.wait)
        await channel.aclose()
        return None
    # The successor reads the pipes now. Stop reading, finish what we read, hand over.
    for p in pipes:
        p.stop()
    with trio.CancelScope(shield=True):
        await eng._expiry.pause()
        await eng._idle.wait()
        try:
            with trio.fail_after(max(5.0, timeout)):
                await send_message(channel, "final", [mount_state(m) for m in mounts], [])
        except (OSError, trio.TooSlowError, trio.BrokenResourceError) as exc:
            log.warning("handover: final state not delivered: %s", exc)
    await channel.aclose()
    log.info("handed %d mount(s) over to pid %d", len(mounts), proc.pid)
    eng._upgraded = True
    eng.stop()
    return proc.pid


async def _no_such_key(request: object) -> None:
    import errno

    raise OSError(errno.ENOENT, "no longer served")


async def take_over_from_predecessor(
    eng: Automounter, fd: int, task_status: trio.TaskStatus[Automounter]
) -> None:
    """The successor's side: serve the inherited pipes, confirm, then merge final state."""
    sock = socket.socket(fileno=fd)
    try:
        header, states, fds = receive_state_blocking(sock)
    except BaseException:
        sock.close()
        raise
    try:
        at = 0
        lock_fd = -1
        if header.get("lock"):
            lock_fd, at = fds[0], 1
        pipes: list[RequestPipe] = []
        for info in header.get("pipes", ()):
            shared = bool(info.get("shared")) if isinstance(info, dict) else False
            p = RequestPipe(fds[at], fds[at + 1] if shared else -1, shared=shared)
            at += 2 if shared else 1
            os.set_blocking(p.read_fd, False)
            pipes.append(p)
        if at != len(fds):
            raise HandoverError(f"handover carried {len(fds)} fds, the state names {at}")
    except BaseException:
        for f in fds:
            os.close(f)
        sock.close()
        raise
    fds = []
    orphans = []
    now = time.perf_counter()
    assert eng._ctl is not None
    for st in states:
        m = eng._mounts.get(st.path)
        if m is None:
            # Mounted by the predecessor but not registered here: the owner of this engine
            # may still want it (an on-demand offset mount); otherwise (the map dropped it)
            # serve it with a handler that fails, and remove it at the end.
            handler = None
            if eng.unregistered_handler is not None:
                handler = eng.unregistered_handler(st.path, AutofsMode(st.mode))
            m = ServedMount(
                st.path,
                AutofsMode(st.mode),
                handler or _no_such_key,
                None,
                st.timeout,
                st.strictexpire,
                {},
                MountLedger(eng.negative_timeout),
            )
            eng._mounts[st.path] = m
            if handler is None:
                orphans.append(st.path)
        m.mode = AutofsMode(st.mode)
        m.dev = st.dev
        m.created_dir = st.created_dir
        m.ledger.adopt(st.mounted, st.created_keys)
        for key, seconds in st.key_timeouts.items():
            m.key_timeouts.setdefault(key, seconds)
        m.ledger.negative.restore(((k, v[0], v[1]) for k, v in st.negative.items()), now)
        m.adopted = True
        if not 0 <= st.pipe < len(pipes):
            log.warning("%s: the predecessor passed no pipe for it; mounting it again", m.path)
            continue
        try:
            m.attach_control(eng._ctl, st.timeout)
        except OSError as exc:
            log.warning("%s: inherited, but: %s", m.path, exc)
        pipes[st.pipe].route(m)
    for p in pipes:
        if p.shared and (eng._shared is None or eng._shared.read_fd < 0):
            eng._shared = p
        if p.routes or p.shared:
            start_reader(eng, p)
        else:
            p.close()
    if lock_fd >= 0:
        eng._lock.adopt(lock_fd, eng._lock_listing())
    else:
        eng._acquire_lock()
    start_mounts(eng, [m for m in eng._mounts.values() if m.pipe is None and not m.dev])
    task_status.started(eng)
    channel = FdChannel(sock)
    async with channel:
        await send_message(channel, "ready", [], [])
        log.info("took over %d mount(s) from pid %s", len(states), header.get("pid"))
        with trio.move_on_after(max(30.0, eng.shutdown_grace * 2)):
            try:
                _, finals, extra = await receive_message(channel, "final")
            except (EOFError, HandoverError, OSError, trio.BrokenResourceError) as exc:
                log.warning("handover: no final state from the predecessor: %s", exc)
            else:
                for f in extra:
                    os.close(f)
                now = time.perf_counter()
                for st in finals:
                    fm = eng._mounts.get(st.path)
                    if fm is not None:
                        fm.ledger.adopt(st.mounted, st.created_keys)
                        fm.ledger.negative.restore(
                            ((k, v[0], v[1]) for k, v in st.negative.items()), now
                        )
    for path in orphans:
        await eng.remove_mount(path)
