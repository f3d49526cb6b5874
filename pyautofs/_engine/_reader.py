"""The reader: read a request pipe, decide each packet, and answer inline when it can.

One reader task reads each :class:`RequestPipe`. For a missing-mount request it asks the
mount's ledger first (negative cache, shutdown); then it drives the handler coroutine
itself with ``coro.send(None)``:

- a handler that completes without suspending (a file map with bind or tmpfs mounts) is
  answered right there: no task, no cancel scope, no deadline;
- a handler that suspends keeps running in this task, which stops being the reader: a fresh
  reader takes over the pipe, and this task's shielded scope gets the request deadline and
  becomes the handler's scope. The coroutine's pending trap is passed on to trio untouched
  (:func:`_resume`), so the handler sees an ordinary task.

Either way the request's :class:`Token` is answered once, by :func:`finish_missing`, from a
``finally``. Expire packets are answered inline by the default expire handler, or run in a
task of their own with a custom one.

Packets are decoded with one precompiled ``struct.Struct`` on the hot path; anything odd is
decoded again by :func:`~pyautofs._proto._packets.decode_packet` for the error message.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import time
import types
from collections.abc import Awaitable, Coroutine, Generator
from typing import TYPE_CHECKING, Any, cast

import trio

from .._proto._escape import printable
from .._proto._ledger import Verdict
from .._proto._packets import PacketError, decode_packet
from .._sys._mount import UmountFlags, umount2
from .._sys._mountinfo import autofs_mounts
from ._requests import ExpireRequest, MountRequest, Requester
from ._served import RequestPipe, ServedMount, Token

if TYPE_CHECKING:
    from ._automounter import Automounter

__all__ = ["read_pipe", "finish_missing"]

log = logging.getLogger("pyautofs")

_PACKET_BUFSIZE = 512  # > 304: one read returns one whole packet
_BURST = 32  # packets answered inline before the reader yields to other tasks
_V5 = struct.Struct("=iiIIQIIIII256s4x")
_V5_SIZE = _V5.size
_MISSING = (3, 5)  # autofs_ptype_missing_indirect, _missing_direct
_EXPIRE = (4, 6)
_INFO = logging.INFO


@types.coroutine
def _resume(coro: Coroutine[Any, Any, object], yielded: object) -> Generator[Any, Any, object]:
    """Carry on driving ``coro``, which already yielded ``yielded`` to our first send."""
    while True:
        try:
            sent = yield yielded
        except BaseException as exc:
            try:
                yielded = coro.throw(exc)
            except StopIteration as stop:
                return stop.value
        else:
            try:
                yielded = coro.send(sent)
            except StopIteration as stop:
                return stop.value


def _slow_decode(
    data: bytes,
) -> tuple[int, int, int, int, int, int, int, int, bytes] | None:
    """Decode a packet the fast path refused; None (logged) if it is not a v5 request."""
    try:
        pkt = decode_packet(data)
    except PacketError as exc:
        log.error("malformed packet ignored: %s", exc)
        return None
    if pkt.proto_version != 5:
        log.error("protocol v%d packet ignored; only v5 is served", pkt.proto_version)
        return None
    ptype = {"MissingIndirect": 3, "ExpireIndirect": 4, "MissingDirect": 5}.get(
        type(pkt).__name__, 6
    )
    p: Any = pkt
    return ptype, p.token, p.dev, p.ino, p.uid, p.gid, p.pid, p.tgid, p.name


_HEAD = struct.Struct("=iiII")  # proto version, type, token, and (v5) dev


def fail_unserved(eng: Automounter, pipe: RequestPipe, data: bytes) -> None:
    """Fail (EPROTO) the token of a packet the engine will not serve, where it can.

    A v4 packet, a malformed one or one of an unknown device still holds a requester in the
    kernel until someone answers. The token is at offset 8 in every packet version; the
    mount is the one its v5 device names, or the only mount writing to this pipe, or an
    autofs mount of that device found in mountinfo. Expire packets are answered the same
    way (the kernel then keeps the key).
    """
    if len(data) < 12 or eng._ctl is None:
        return
    ctl = eng._ctl
    version, _ptype, token, dev = _HEAD.unpack_from(data.ljust(16, b"\0"))
    m = pipe.routes.get(dev) if version == 5 else None
    if m is None and not pipe.shared and len(pipe.routes) == 1:
        (m,) = pipe.routes.values()
    if m is not None:
        Token(ctl, m, token).answer(-errno.EPROTO)
        return
    if version != 5 or not dev:
        return
    for am in autofs_mounts():
        if am.dev != dev:
            continue
        try:
            fd = ctl.openmount(am.mount_point, dev)
        except OSError:
            continue
        try:
            ctl.fail(fd, token, -errno.EPROTO)
            return
        except OSError:
            pass
        finally:
            os.close(fd)


async def read_pipe(eng: Automounter, pipe: RequestPipe) -> None:
    """Read ``pipe`` until told to stop; serve each packet (see the module docstring)."""
    fd = pipe.read_fd
    if fd < 0 or pipe.stop_reading:
        return
    read = os.read
    unpack = _V5.unpack
    routes = pipe.routes
    perf = time.perf_counter
    burst = 0
    with trio.CancelScope(shield=True) as scope:
        pipe.reader_scope = scope
        while not pipe.stop_reading:
            try:
                data = read(fd, _PACKET_BUFSIZE)
            except BlockingIOError:
                burst = 0
                try:
                    await trio.lowlevel.wait_readable(fd)
                except trio.ClosedResourceError:
                    return  # teardown closed the pipe
                continue
            except OSError:
                if pipe.read_fd < 0:
                    return  # closed under us
                raise
            if not data:
                eng._pipe_lost(pipe)
                return
            t0 = perf()
            if len(data) == _V5_SIZE:
                version, ptype, token, dev, _ino, uid, gid, pid, tgid, length, raw = unpack(data)
                name = raw[:length]
                if (
                    version != 5
                    or not 3 <= ptype <= 6
                    or not 0 < length < 256
                    or raw[length] != 0
                    or 0 in name
                    or 47 in name  # "/"
                ):
                    decoded = _slow_decode(data)
                    if decoded is None:
                        fail_unserved(eng, pipe, data)
                        continue
                    ptype, token, dev, _ino, uid, gid, pid, tgid, name = decoded
            else:
                decoded = _slow_decode(data)
                if decoded is None:
                    fail_unserved(eng, pipe, data)
                    continue
                ptype, token, dev, _ino, uid, gid, pid, tgid, name = decoded
            m = routes.get(dev)
            if m is None:
                m = eng._reroute(pipe, dev, name)
                if m is None:
                    fail_unserved(eng, pipe, data)
                    continue
            requester = Requester(pid, tgid, uid, gid)
            key = name.decode("utf-8", "surrogateescape") if m.indirect else ""
            if ptype in _MISSING:
                pending = start_missing(eng, m, key, token, requester, t0)
                if pending is not None:
                    # The handler suspended: a fresh reader takes the pipe, and this task
                    # becomes the handler's, under the request deadline.
                    pipe.reader_scope = None
                    assert eng._nursery is not None
                    eng._nursery.start_soon(read_pipe, eng, pipe)
                    await pending.run(scope)
                    return
            else:
                start_expire(eng, m, key, token, requester)
            burst += 1
            if burst >= _BURST:
                burst = 0
                await trio.lowlevel.cancel_shielded_checkpoint()


_NOT_STARTED = object()


class _Pending:
    """A missing-mount request whose handler suspended (or must wait for a slot)."""

    __slots__ = ("coro", "created", "eng", "m", "req", "t0", "tok", "yielded")

    def __init__(  # noqa: PLR0917
        self,
        eng: Automounter,
        m: ServedMount,
        tok: Token,
        req: MountRequest,
        coro: Awaitable[object] | None,
        yielded: object,
        created: bool,
        t0: float,
    ) -> None:
        self.eng, self.m, self.tok, self.req = eng, m, tok, req
        self.coro, self.yielded, self.created, self.t0 = coro, yielded, created, t0

    async def run(self, scope: trio.CancelScope) -> None:
        eng = self.eng
        status = -errno.ENOENT
        cut_short = False
        eng._in_flight += 1
        if eng._idle.is_set():
            eng._idle = trio.Event()
        eng._handler_scopes.add(scope)
        scope.deadline = trio.current_time() + (
            eng.shutdown_grace if eng._closing else eng.request_timeout
        )
        try:
            try:
                if self.coro is None:
                    await eng._limiter.acquire()
                try:
                    if self.coro is None:
                        await self.m.on_missing(self.req)
                    elif self.yielded is _NOT_STARTED:
                        await self.coro
                    else:
                        await _resume(cast("Coroutine[Any, Any, object]", self.coro), self.yielded)
                finally:
                    eng._limiter.release()
                status = 0
            except trio.Cancelled:
                cut_short = True
                status = -errno.EHOSTDOWN if eng._closing else -errno.ETIMEDOUT
                log.warning(
                    "%s: handler for %s %s",
                    self.m.path,
                    printable(self.req.key),
                    "cut short by shutdown"
                    if eng._closing
                    else f"timed out after {eng.request_timeout} s",
                )
                raise
            except OSError as exc:
                status = -(exc.errno or errno.EIO)
            except Exception:
                status = -errno.ENOENT
                log.exception("%s: handler for %s raised", self.m.path, printable(self.req.key))
        finally:
            eng._handler_scopes.discard(scope)
            finish_missing(
                eng, self.m, self.tok, self.req, status, self.created, cut_short, self.t0
            )
            eng._in_flight -= 1
            if eng._in_flight == 0:
                eng._idle.set()


def start_missing(  # noqa: PLR0917
    eng: Automounter,
    m: ServedMount,
    key: str,
    token: int,
    requester: Requester,
    t0: float,
) -> _Pending | None:
    """Serve a missing-mount request inline; a :class:`_Pending` if its handler suspended."""
    eng._requests += 1
    assert eng._ctl is not None
    tok = Token(eng._ctl, m, token)
    ledger = m.ledger
    if ledger.closing or (len(ledger.negative) and key in ledger.negative):
        verdict, err = ledger.on_missing(key, t0)
        if verdict is Verdict.FAIL:
            if not ledger.closing:
                eng._negative_hits += 1
            finish_missing(eng, m, tok, None, -err, False, True, t0)
            return None
    path = m.prefix + key if key else m.path
    req = MountRequest(m.path, m.mode, key, path, requester, token)
    status = -errno.ENOENT
    created = False
    handed_on = False  # True once a _Pending answers the token instead
    try:
        if key:
            if key in ledger.mounted and os.path.ismount(path):
                status = 0  # already mounted (e.g. rediscovered): never mount twice
                return None
            try:
                os.mkdir(path, 0o755)
                created = True
                ledger.add_created(key)
            except FileExistsError:
                pass
        ledger.in_flight[key] = token
        if not eng._limiter.value:
            # Every handler slot is taken: wait for one in a task of our own.
            handed_on = True
            return _Pending(eng, m, tok, req, None, None, created, t0)
        awaitable = m.on_missing(req)
        if not isinstance(awaitable, Coroutine):
            # Not a coroutine (an object with __await__): await it in a task of its own.
            eng._limiter.acquire_nowait()
            handed_on = True
            return _Pending(eng, m, tok, req, awaitable, _NOT_STARTED, created, t0)
        coro = awaitable
        try:
            yielded = coro.send(None)
        except StopIteration:
            status = 0
            return None
        eng._limiter.acquire_nowait()
        handed_on = True
        return _Pending(eng, m, tok, req, coro, yielded, created, t0)
    except OSError as exc:
        status = -(exc.errno or errno.EIO)
        return None
    except Exception:
        status = -errno.ENOENT
        log.exception("%s: handler for %s raised", m.path, printable(key))
        return None
    finally:
        if not handed_on:
            finish_missing(eng, m, tok, req, status, created, False, t0)


def finish_missing(  # noqa: PLR0917
    eng: Automounter,
    m: ServedMount,
    tok: Token,
    req: MountRequest | None,
    status: int,
    created: bool,
    cut_short: bool,
    t0: float,
) -> None:
    """Record the outcome, answer the token (exactly once) and log it."""
    key = req.key if req is not None else ""
    ledger = m.ledger
    try:
        if req is not None:
            ledger.finished(key, -status, t0, remember=not cut_short)
            if status == 0:
                if key in m.key_timeouts:
                    eng._apply_key_timeout(m, key)
            elif created:
                eng._rmdir_key(m, key)
    finally:
        tok.answer(status)
    now = time.perf_counter()
    if status == 0:
        eng._ready += 1
    else:
        eng._failed += 1
    eng._latencies.append((now - t0) * 1e6)
    if req is not None and log.isEnabledFor(_INFO):
        eng._request_log.add(
            "mounted" if status == 0 else f"failed ({errno.errorcode.get(-status, -status)})",
            m.path,
            key,
            req.requester.tgid,
            (now - t0) * 1e6,
            now,
        )


def start_expire(
    eng: Automounter, m: ServedMount, key: str, token: int, requester: Requester
) -> None:
    """Serve an expire packet: inline with the default handler, in a task with a custom one."""
    assert eng._ctl is not None and eng._nursery is not None
    tok = Token(eng._ctl, m, token)
    req = ExpireRequest(m.path, m.mode, key, m.key_path(key), requester, token)
    if m.on_expire is not None:
        eng._nursery.start_soon(_serve_expire, eng, m, tok, req)
        return
    status = -errno.EBUSY
    try:
        default_expire(m, req)
        status = 0
    except OSError as exc:
        status = -(exc.errno or errno.EIO)
    finally:
        finish_expire(eng, m, tok, req, status)


async def _serve_expire(eng: Automounter, m: ServedMount, tok: Token, req: ExpireRequest) -> None:
    status = -errno.EBUSY
    try:
        with trio.CancelScope(
            shield=True, deadline=trio.current_time() + eng.request_timeout
        ) as sc:
            assert m.on_expire is not None
            await m.on_expire(req)
            status = 0
        if sc.cancelled_caught:
            status = -errno.ETIMEDOUT
    except OSError as exc:
        status = -(exc.errno or errno.EIO)
    except Exception:
        log.exception("%s: expire handler for %s raised", m.path, printable(req.key))
    finally:
        finish_expire(eng, m, tok, req, status)


def finish_expire(
    eng: Automounter, m: ServedMount, tok: Token, req: ExpireRequest, status: int
) -> None:
    try:
        if status == 0:
            m.ledger.expired(req.key)
            eng._expired += 1
            if m.indirect and req.key in m.ledger.created and not os.path.ismount(req.path):
                eng._rmdir_key(m, req.key)
        else:
            eng._expire_refused += 1
    finally:
        tok.answer(status)
    if log.isEnabledFor(_INFO):
        eng._request_log.add(
            "unmounted" if status == 0 else f"kept ({errno.errorcode.get(-status, -status)})",
            m.path,
            req.key,
            0,
            0.0,
            time.perf_counter(),
        )


def default_expire(m: ServedMount, req: ExpireRequest) -> None:
    """Unmount the key (EBUSY if in use); the directory goes after READY is decided."""
    if not m.indirect and os.stat(m.path).st_dev == m.dev:
        return  # nothing covers the direct mount point: never unmount autofs itself
    try:
        umount2(req.path, UmountFlags.NOFOLLOW)
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # EINVAL: not mounted (a bare directory)
            raise
