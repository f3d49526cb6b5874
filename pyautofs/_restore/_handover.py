"""Handing restored pipes and autofs mounts to the processes that will own them.

A coordinator (the restorer) rebuilds pipes and autofs mounts, then sends each end to the
process that should own it over a unix socket, in one message per process: a JSON header
listing the items and the fds themselves (SCM_RIGHTS). The receiving process installs every
fd at its exact number with one :func:`~pyautofs.restore.install_fds`, issues SETPIPEFD for each
autofs mount (the kernel then makes *its* process group the mount's owner), closes the write
ends that a systemd-style owner does not keep, and answers with one JSON confirmation.

Message, coordinator to owner (``data`` of one ``send_fds`` call)::

    {"pyautofs-handover": 1, "items": [
        {"kind": "pipe", "read_target": 7, "write_target": null},
        {"kind": "autofs", "mount_point": "/mnt/a", "dev": 49, "read_target": 40,
         "write_target": null, "temp_write_target": 5}]}

The fds follow in item order: a pipe item carries its read end if ``read_target`` is set,
then its write end if ``write_target`` is set; an autofs item always carries read end then
write end. ``write_target`` null on an autofs item means the owner closes the write end once
SETPIPEFD is done (systemd style); ``temp_write_target``, if free in the owner, is where that
temporary write end sits meanwhile, so mountinfo's ``fd=`` shows the number it had before.

Reply, owner to coordinator: ``{"ok": true, "pid": P, "items": [{"pipe_ino": N}, ...]}`` or
``{"ok": false, "errno": E, "error": "..."}``.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Callable, Generator, Sequence
from typing import Any

import attrs

from .._proto._errors import ProtocolError
from .._sys._autofs import AutofsControl
from .._sys._scm import recv_fds, recv_protocol, run_blocking, send_fds, send_protocol
from ._autofs import take_over_autofs_mount
from ._install import install_fds

__all__ = [
    "PipeHandover",
    "AutofsHandover",
    "HandoverItem",
    "HandoverFailed",
    "Adopted",
    "send_handover",
    "receive_handover",
    "adopt_handover",
    "accept_handover",
    "handover_targets",
    "send_confirmation",
    "wait_confirmation",
]

_KEY = "pyautofs-handover"
_VERSION = 1


# -- fd transport: one message carries any number of fds (pyautofs/_sys/_scm.py) --------
_send_fds = send_fds
_recv_fds = recv_fds


def _left(deadline: float, timeout: float | None, what: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError(f"{what}: not done within {timeout} s")
    return left


def _run_until(
    gen: Generator[Callable[[], Any], Any, Any],
    sock: socket.socket,
    deadline: float | None,
    timeout: float | None,
    what: str,
) -> Any:
    """Run one fd-message protocol generator, every syscall bounded by ``deadline``.

    A message may span several records (more than 253 fds, or more than 4 KiB of data). A
    peer that stops half way through one would block a plain ``recv_fds``/``send_fds``
    forever, however long the caller was willing to wait for the *first* record, so each
    step gets what is left of the one deadline as the socket's timeout. A step that fails
    (the deadline included) is thrown into the generator, which closes every fd it received
    for the message before the error propagates.
    """
    if deadline is None:
        return run_blocking(gen)

    def bounded(step: Callable[[], Any]) -> Any:
        sock.settimeout(_left(deadline, timeout, what))
        try:
            return step()
        except TimeoutError:  # socket.timeout is TimeoutError
            raise TimeoutError(f"{what}: not done within {timeout} s") from None

    saved = sock.gettimeout()
    try:
        return run_blocking(gen, bounded)
    finally:
        sock.settimeout(saved)


# -- items -----------------------------------------------------------------------------


@attrs.frozen
class PipeHandover:
    """A pipe for the owner: the fd numbers its ends go to (None: that end is not sent)."""

    read_target: int | None
    write_target: int | None

    def fd_count(self) -> int:
        """How many fds travel with this item."""
        return (self.read_target is not None) + (self.write_target is not None)


@attrs.frozen
class AutofsHandover:
    """An autofs mount for the owner to take over with SETPIPEFD."""

    mount_point: str
    dev: int
    """The restored mount's ``st_dev`` (the OPENMOUNT devid)."""
    read_target: int
    write_target: int | None
    """Where the owner keeps the write end (automount style), or None to close it after
    SETPIPEFD (systemd style)."""
    temp_write_target: int | None = None
    """For the systemd style: where the write end sits during SETPIPEFD, if free."""

    def fd_count(self) -> int:
        """How many fds travel with this item (always the read and the write end)."""
        return 2


HandoverItem = PipeHandover | AutofsHandover


class HandoverFailed(ProtocolError):
    """The owner process could not adopt what it was sent; ``errno`` is its error."""


def _encode(items: Sequence[HandoverItem]) -> bytes:
    out = []
    for item in items:
        d = attrs.asdict(item)
        d["kind"] = "pipe" if isinstance(item, PipeHandover) else "autofs"
        out.append(d)
    return json.dumps({_KEY: _VERSION, "items": out}, separators=(",", ":")).encode()


def _opt_int(d: dict[str, Any], key: str) -> int | None:
    value = d.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{key} must be a non-negative int, not {value!r}")
    return value


def _decode(data: bytes) -> list[HandoverItem]:
    try:
        msg = json.loads(data)
        if not isinstance(msg, dict) or msg.get(_KEY) != _VERSION:
            raise ValueError(f"not a version-{_VERSION} handover message")
        items: list[HandoverItem] = []
        for d in msg["items"]:
            if d.get("kind") == "pipe":
                items.append(PipeHandover(_opt_int(d, "read_target"), _opt_int(d, "write_target")))
            elif d.get("kind") == "autofs":
                read_target = _opt_int(d, "read_target")
                dev = _opt_int(d, "dev")
                if read_target is None or dev is None or not isinstance(d["mount_point"], str):
                    raise ValueError("autofs item needs mount_point, dev and read_target")
                items.append(
                    AutofsHandover(
                        mount_point=d["mount_point"],
                        dev=dev,
                        read_target=read_target,
                        write_target=_opt_int(d, "write_target"),
                        temp_write_target=_opt_int(d, "temp_write_target"),
                    )
                )
            else:
                raise ValueError(f"unknown item kind {d.get('kind')!r}")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise OSError(errno.EPROTO, f"malformed handover message: {exc}") from None
    return items


# -- coordinator side ------------------------------------------------------------------


def send_handover(
    sock: socket.socket,
    items: Sequence[HandoverItem],
    fds: Sequence[int],
    *,
    timeout: float | None = None,
    deadline: float | None = None,
) -> None:
    """Send ``items`` and their ``fds`` (in item order) to an owner in one message.

    The caller keeps its copies of ``fds``: close them once sent (a systemd-style mount
    needs every write end outside the kernel closed for EOF to mean "catatonic").
    ``timeout`` (seconds) or ``deadline`` (``time.monotonic()`` value) bounds the whole
    send, every record of it: ``TimeoutError`` when an owner stops reading.
    """
    want = sum(item.fd_count() for item in items)
    if len(fds) != want:
        raise ValueError(f"{len(items)} handover items need {want} fds, got {len(fds)}")
    if deadline is None and timeout is not None:
        deadline = time.monotonic() + timeout
    gen = send_protocol(sock, list(fds), _encode(items))
    _run_until(gen, sock, deadline, timeout, "sending the handover")


def wait_confirmation(
    sock: socket.socket, timeout: float | None = 30.0, *, deadline: float | None = None
) -> dict[str, Any]:
    """Wait for the owner's reply; raise :class:`HandoverFailed` if it reports an error.

    ``timeout`` (seconds from now) or ``deadline`` (a ``time.monotonic()`` value, which
    wins) bounds the whole reply, not just its first record: an owner that stops half way
    through a reply that spans several records gets ``TimeoutError`` too.
    """
    if deadline is None and timeout is not None:
        deadline = time.monotonic() + timeout
    try:
        data, fds = _run_until(
            recv_protocol(sock), sock, deadline, timeout, "waiting for the handover confirmation"
        )
    except EOFError:
        data, fds = b"", []
    for fd in fds:
        os.close(fd)
    if not data:
        raise HandoverFailed(
            errno.EPIPE, "the owner closed the socket without confirming (did it exit?)"
        )
    try:
        reply = json.loads(data)
        ok = reply["ok"]
    except (ValueError, KeyError, TypeError) as exc:
        raise OSError(errno.EPROTO, f"malformed handover confirmation: {exc}") from None
    if not ok:
        err = reply.get("errno") or errno.EPROTO
        raise HandoverFailed(err, f"owner pid {reply.get('pid')}: {reply.get('error')}")
    out: dict[str, Any] = reply
    return out


# -- owner side ------------------------------------------------------------------------


@attrs.frozen
class Adopted:
    """What the owner ended up with for one item, at the fd numbers it asked for."""

    item: HandoverItem
    read_fd: int | None
    write_fd: int | None


def receive_handover(sock: socket.socket) -> tuple[list[HandoverItem], list[int]]:
    """Receive one handover message: the items and their fds (close-on-exec).

    ``EOFError`` when the coordinator closed the socket.
    """
    data, fds = _recv_fds(sock)
    if not data and not fds:
        raise EOFError("the coordinator closed the handover socket")
    try:
        items = _decode(data)
        want = sum(item.fd_count() for item in items)
        if len(fds) != want:
            raise OSError(errno.EPROTO, f"handover carried {len(fds)} fds for {want}")
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return items, fds


def handover_targets(items: Sequence[HandoverItem]) -> set[int]:
    """Every fd number ``items`` may install something at (temporary places included)."""
    out: set[int] = set()
    for item in items:
        for t in (item.read_target, item.write_target):
            if t is not None:
                out.add(t)
        if isinstance(item, AutofsHandover) and item.temp_write_target is not None:
            out.add(item.temp_write_target)
    return out


def _offsets(items: Sequence[HandoverItem]) -> list[int]:
    """Where each item's fds start in the message's fd list."""
    out = []
    pos = 0
    for item in items:
        out.append(pos)
        pos += item.fd_count()
    return out


def _is_free(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return True
    return False


def adopt_handover(
    items: Sequence[HandoverItem],
    fds: Sequence[int],
    *,
    replace: bool = False,
    control: AutofsControl | None = None,
) -> list[Adopted]:
    """Install received fds at their targets and take over the autofs mounts.

    One :func:`install_fds` places every fd (installed targets are close-on-exec; received
    fds that are not targets are closed), then each autofs mount gets SETPIPEFD from this
    process, and systemd-style write ends are closed. If installing fails, every received
    fd is closed and nothing is installed.
    """
    plan: dict[int, int] = {}
    loose: dict[int, int] = {}  # item index -> received write end that has no target

    def assign(target: int, fd: int) -> None:
        if target in plan:
            for received in fds:
                os.close(received)
            raise OSError(errno.EINVAL, f"handover items name target fd {target} twice")
        plan[target] = fd

    for idx, (item, pos) in enumerate(zip(items, _offsets(items), strict=True)):
        if isinstance(item, PipeHandover):
            if item.read_target is not None:
                assign(item.read_target, fds[pos])
            if item.write_target is not None:
                assign(item.write_target, fds[pos + (item.read_target is not None)])
            continue
        assign(item.read_target, fds[pos])
        if item.write_target is not None:
            assign(item.write_target, fds[pos + 1])
        else:
            loose[idx] = fds[pos + 1]
    # Optional places for systemd-style write ends, only where nothing else goes.
    for idx, item in enumerate(items):
        if idx in loose and isinstance(item, AutofsHandover):
            t = item.temp_write_target
            if t is not None and t not in plan and t not in fds and _is_free(t):
                plan[t] = loose.pop(idx)
    kept = set(loose.values())
    try:
        # A write end that only lives until SETPIPEFD must not sit on a number that install
        # is about to overwrite: move it above everything first.
        floor = max([*plan, *fds], default=0) + 1
        for idx, fd in loose.items():
            if fd in plan:
                moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, floor)
                os.close(fd)
                kept.discard(fd)
                kept.add(moved)
                loose[idx] = moved
        install_fds(plan, replace=replace)
    except BaseException:
        for fd in {*fds, *kept}:
            try:
                os.close(fd)
            except OSError:
                pass
        raise
    for fd in set(fds) - plan.keys() - kept:
        os.close(fd)
    needs_control = control is None and any(isinstance(i, AutofsHandover) for i in items)
    own = AutofsControl.open() if needs_control else control
    out = []
    try:
        for idx, item in enumerate(items):
            if isinstance(item, PipeHandover):
                out.append(Adopted(item, item.read_target, item.write_target))
                continue
            found = loose.pop(idx, None)
            if found is None:
                found = item.write_target
            if found is None:
                found = item.temp_write_target
            assert found is not None
            write_fd: int = found
            try:
                take_over_autofs_mount(item.mount_point, item.dev, write_fd, control=own)
            finally:
                if item.write_target is None:
                    os.close(write_fd)
            out.append(Adopted(item, item.read_target, item.write_target))
    finally:
        for fd in loose.values():  # only left over after an error
            os.close(fd)
        if needs_control and own is not None:
            own.close()
    return out


def send_confirmation(
    sock: socket.socket, adopted: Sequence[Adopted] | None, error: BaseException | None = None
) -> None:
    """Answer the coordinator: success with each item's pipe inode, or the error."""
    reply: dict[str, Any] = {"pid": os.getpid()}
    if error is None:
        reply["ok"] = True
        reply["items"] = [
            {"pipe_ino": None if a.read_fd is None else os.fstat(a.read_fd).st_ino}
            for a in adopted or ()
        ]
    else:
        reply["ok"] = False
        reply["errno"] = getattr(error, "errno", None)
        reply["error"] = f"{type(error).__name__}: {error}"
    _send_fds(sock, [], json.dumps(reply).encode())


def accept_handover(
    sock: socket.socket, *, replace: bool = False, control: AutofsControl | None = None
) -> list[Adopted]:
    """The owner's whole turn: receive, adopt, confirm. Errors are confirmed, then raised."""
    items, fds = receive_handover(sock)
    try:
        adopted = adopt_handover(items, fds, replace=replace, control=control)
    except Exception as exc:
        send_confirmation(sock, None, exc)
        raise
    send_confirmation(sock, adopted)
    return adopted
