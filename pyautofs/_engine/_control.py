"""The control socket of ``pyautofs serve``: quiesce expiry for a checkpoint, and status.

CRIU freezes every thread of the process tree it dumps. A thread inside the EXPIRE ioctl
waits in the kernel (state D) until the expire packet is answered, and CRIU cannot seize
it ("Unseizable non-zombie ... state D"). So before a dump, expiry must stop, and the
dumper must know that it *has* stopped: a signal alone cannot say when the last EXPIRE
ioctl returned. The control socket answers only once it has.

**Where.** A SOCK_SEQPACKET unix socket, mode 0600, in the engine's lock directory (root
only, 0700), named ``serve.<mount namespace>.<pid>.sock``; CRIU restores it at the same path.
A client that runs in another mount or pid namespace reaches it as
``/proc/<pid>/root/<path>`` (``pyautofs criu-hook`` finds it that way from the dumped
tree's pid). Only root (or this process's own user) may talk to it: the peer's uid is
checked on every connection.

**Protocol.** One request per connection, one ASCII line, one reply, then the server closes
the connection (a client that waits for that EOF knows the server holds no fd of it any
more, which matters when the next thing to happen is a freeze):

- ``pause-expiry [SECONDS]`` → ``ok paused`` once no EXPIRE ioctl is in flight. No new one
  is issued until ``resume-expiry``, or until SECONDS (default 300) pass: a dump that fails
  runs no post-dump action, and expiry must not stay off for ever. Pausing again while
  paused only renews the lease.
- ``resume-expiry`` → ``ok resumed`` (or ``ok not paused``).
- ``restored`` → ``ok restored N``: the process was restored (CRIU's post-restore and
  post-resume actions): every served mount's device number is read again from mountinfo,
  and the N that changed are followed (a restored superblock has a new one, which may even
  equal the old one of *another* mount, so a packet's device alone cannot tell), then a
  pause in force is ended.
- ``status`` → ``ok {json}``: pid, paused, mount points.

Anything else gets ``error <text>``. A connection that sends nothing within 10 s is closed.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import socket
import stat
import struct
from collections.abc import Callable

import trio

from ._automounter import Automounter

__all__ = [
    "ControlServer",
    "DEFAULT_PAUSE_LEASE",
    "control_socket_path",
]

log = logging.getLogger("pyautofs")

DEFAULT_PAUSE_LEASE = 300.0
"""Seconds a ``pause-expiry`` lasts without a ``resume-expiry``."""
_REQUEST_DEADLINE = 10.0
_MAX_REQUEST = 256
_MAX_CLIENTS = 8
_UCRED = struct.Struct("=iII")


def control_socket_path(lock_dir: str, pid: int | None = None) -> str:
    """Where ``serve`` (pid ``pid``, default this one) listens, in ``lock_dir``."""
    try:
        ns = os.stat("/proc/self/ns/mnt").st_ino
    except OSError:
        ns = 0
    return os.path.join(lock_dir, f"serve.{ns}.{os.getpid() if pid is None else pid}.sock")


class ControlServer:
    """The control socket of one engine. Run it with ``await nursery.start(server.run)``."""

    def __init__(
        self,
        engine: Automounter,
        path: str,
        *,
        mount_points: Callable[[], list[str]] | None = None,
    ) -> None:
        self.engine = engine
        self.path = path
        self._mount_points = mount_points or (lambda: engine.mount_points)
        self._paused = False
        self._lease_scope: trio.CancelScope | None = None
        self._lock = trio.Lock()

    @property
    def paused(self) -> bool:
        """True while a checkpoint pause is in force."""
        return self._paused

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen until cancelled; ``task_status.started(path)`` once connections are taken.

        The socket file is removed when this returns; a pause still in force is undone.
        """
        listener = await _listen(self.path)
        try:
            limiter = trio.CapacityLimiter(_MAX_CLIENTS)
            async with trio.open_nursery() as nursery:
                task_status.started(self.path)
                while True:
                    conn, _ = await listener.accept()
                    nursery.start_soon(self._client, conn, limiter, nursery)
        finally:
            listener.close()
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            if self._paused:
                self._paused = False
                self.engine.resume_expiry()

    async def _client(
        self, conn: trio.socket.SocketType, limiter: trio.CapacityLimiter, nursery: trio.Nursery
    ) -> None:
        with conn:
            if not limiter.available_tokens:
                return  # busy: close at once, the client sees EOF
            async with limiter:
                uid = _peer_uid(conn)
                if uid not in (0, os.getuid()):
                    log.warning("control socket: refused a connection from uid %d", uid)
                    return
                with trio.move_on_after(_REQUEST_DEADLINE):
                    try:
                        request = await conn.recv(_MAX_REQUEST)
                    except OSError:
                        return
                    reply = await self.handle(request.decode("ascii", "replace"), nursery)
                    try:
                        await conn.send(reply.encode())
                    except OSError:
                        pass  # a client that only queued its request (criu-hook post-dump)

    async def handle(self, request: str, nursery: trio.Nursery) -> str:
        """Carry out one request line; the reply line."""
        words = request.split()
        if not words:
            return "error empty request"
        command, args = words[0], words[1:]
        async with self._lock:
            if command == "pause-expiry" and len(args) <= 1:
                try:
                    lease = float(args[0]) if args else DEFAULT_PAUSE_LEASE
                except ValueError:
                    return f"error not a number of seconds: {args[0][:20]!r}"
                if not (0 < lease < math.inf):
                    return "error the lease must be a positive number of seconds"
                await self._pause(lease, nursery)
                return "ok paused"
            if command == "resume-expiry" and not args:
                if not self._paused:
                    return "ok not paused"
                self._resume("resume-expiry")
                return "ok resumed"
            if command == "restored" and not args:
                changed = self.engine.refresh_devices()
                if self._paused:
                    self._resume("restored")
                return f"ok restored {changed}"
            if command == "status" and not args:
                status = {
                    "pid": os.getpid(),
                    "paused": self._paused,
                    "mount_points": self._mount_points(),
                }
                return "ok " + json.dumps(status)
        return f"error unknown request {request[:40]!r}"

    async def _pause(self, lease: float, nursery: trio.Nursery) -> None:
        if self._lease_scope is not None:
            self._lease_scope.cancel()
        if not self._paused:
            await self.engine.pause_expiry()
            self._paused = True
            log.info("expiry paused for a checkpoint (for at most %g s)", lease)
        scope = trio.CancelScope()
        self._lease_scope = scope
        nursery.start_soon(self._lease, scope, lease)

    async def _lease(self, scope: trio.CancelScope, lease: float) -> None:
        with scope:
            await trio.sleep(lease)
            async with self._lock:
                if self._paused and self._lease_scope is scope:
                    self._resume(f"no resume-expiry within {lease:g} s")

    def _resume(self, why: str) -> None:
        if self._lease_scope is not None:
            self._lease_scope.cancel()
            self._lease_scope = None
        self._paused = False
        self.engine.resume_expiry()
        log.info("expiry resumed (%s)", why)


def _peer_uid(conn: trio.socket.SocketType) -> int:
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    return int(_UCRED.unpack(raw)[1])


async def _listen(path: str) -> trio.socket.SocketType:
    """Bind ``path`` (0600; its directory must be root-only), replacing a stale socket."""
    directory = os.path.dirname(path)
    st = os.lstat(directory)
    if st.st_uid != os.getuid() or st.st_mode & 0o077 or not stat.S_ISDIR(st.st_mode):
        raise PermissionError(
            errno.EPERM,
            "the control socket's directory must be a directory of ours, mode 0700",
            directory,
        )
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)  # left by a process that died; ours to replace
    except FileNotFoundError:
        pass
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)
    try:
        await sock.bind(path)
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old)
    sock.listen(_MAX_CLIENTS)
    return sock
