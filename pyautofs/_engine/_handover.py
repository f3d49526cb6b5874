"""Zero-downtime handover of a live automounter to a successor process.

automount(8) and CRIU change a mount's owner through catatonic mode (CATATONIC, then
SETPIPEFD), and every lookup in that window fails with ENOENT. pyautofs avoids the window
with two facts (``reference/autofs-kernel.md`` §4.5a):

- any process in the owner process group may read the pipe and answer the kernel, and
- a child stays in its parent's process group.

So the old engine starts its successor as a plain child (same process group), passes it
every pipe read end, ioctl fd and lock fd over a socketpair with SCM_RIGHTS, plus its state
(mounts, mounted keys, negative cache, timeouts). The successor starts reading the same
pipes and says ``ready``. Only then does the old engine stop reading. Requests it had
already read finish in the old process, which answers them; then it sends its final state
and exits without touching the mounts. The pipes never stop being read, so no lookup fails.

While both read, each packet goes to exactly one reader (a pipe read is atomic, one packet
per read), and each process answers the tokens it read: no token is answered twice or not
at all. If the successor does not confirm in time, the old engine kills it and goes on
serving: a failed upgrade never takes the automounter down.

Wire protocol (SOCK_SEQPACKET, each message framed by :mod:`pyautofs._sys._scm`, so any
size and any number of fds): old -> new ``state`` (JSON + fds: the engine lock, then each
request pipe's read end and, for the shared pipe of direct mounts, its write end), new ->
old ``ready`` (or ``error``), old -> new ``final`` (JSON). Decoding is tolerant: unknown
fields are ignored and missing ones take their defaults, so an upgrade may add fields.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from .._proto._errors import ProtocolError
from ._fdchannel import FdChannel

__all__ = [
    "HANDOVER_ENV",
    "upgrade_fd_from_environment",
    "HANDOVER_VERSION",
    "HandoverError",
    "MountState",
    "encode_state",
    "decode_state",
    "send_message",
    "receive_message",
    "receive_state_blocking",
]

HANDOVER_ENV = "PYAUTOFS_HANDOVER_FD"
"""The environment variable that tells a successor which fd is its handover socket."""
HANDOVER_VERSION = 2


def upgrade_fd_from_environment() -> int | None:
    """The handover socket a predecessor's ``Automounter.hand_over`` passed to this process.

    Reads (and removes, so no child inherits it) ``PYAUTOFS_HANDOVER_FD``; None when this
    process is no successor. Give the result to ``Automounter.run`` as ``handover_fd``.
    """
    value = os.environ.pop(HANDOVER_ENV, None)
    if value is None:
        return None
    if not value.isdigit():
        raise ValueError(f"{HANDOVER_ENV}={value!r} is not an fd number")
    return int(value)


class HandoverError(ProtocolError):
    """The handover protocol failed; the old engine keeps serving."""


@attrs.frozen
class MountState:
    """What a successor needs to serve one mount without remounting it."""

    path: str
    mode: str = "indirect"
    dev: int = 0
    timeout: int = 0
    strictexpire: bool = False
    created_dir: bool = False
    mounted: tuple[str, ...] = ()
    created_keys: tuple[str, ...] = ()
    key_timeouts: Mapping[str, int] = attrs.Factory(dict)
    negative: Mapping[str, tuple[float, int]] = attrs.Factory(dict)
    """key -> (seconds left, errno)."""
    pipe: int = -1
    """Index of its request pipe in the message's ``pipes`` (-1: none passed)."""

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        d = attrs.asdict(self)
        d["negative"] = {k: list(v) for k, v in self.negative.items()}
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> MountState:
        """Inverse of :meth:`to_json`: unknown fields are ignored, missing ones defaulted."""
        try:
            return cls(
                path=str(d["path"]),
                mode=str(d.get("mode", "indirect")),
                dev=int(d.get("dev", 0)),
                timeout=int(d.get("timeout", 0)),
                strictexpire=bool(d.get("strictexpire", False)),
                created_dir=bool(d.get("created_dir", False)),
                mounted=tuple(str(k) for k in d.get("mounted", ())),
                created_keys=tuple(str(k) for k in d.get("created_keys", ())),
                key_timeouts={str(k): int(v) for k, v in d.get("key_timeouts", {}).items()},
                negative={
                    str(k): (float(v[0]), int(v[1])) for k, v in d.get("negative", {}).items()
                },
                pipe=int(d.get("pipe", -1)),
            )
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            raise HandoverError(f"malformed mount state: {exc!r}") from None


def encode_state(kind: str, mounts: Sequence[MountState], **extra: Any) -> bytes:
    """One protocol message: ``{"v", "kind", "pid", "mounts", ...}`` as JSON."""
    msg = {"v": HANDOVER_VERSION, "kind": kind, "pid": os.getpid(), **extra}
    msg["mounts"] = [m.to_json() for m in mounts]
    return json.dumps(msg).encode()


def decode_state(data: bytes, kind: str) -> tuple[dict[str, Any], list[MountState]]:
    """Parse and check a protocol message of the expected ``kind``."""
    try:
        msg = json.loads(data)
    except ValueError as exc:
        raise HandoverError(f"malformed handover message: {exc}") from None
    version = msg.get("v") if isinstance(msg, dict) else None
    if not isinstance(version, int) or version < HANDOVER_VERSION:
        raise HandoverError(f"unsupported handover message version: {str(msg)[:80]}")
    if msg.get("kind") != kind:
        raise HandoverError(f"expected a {kind!r} handover message, got {msg.get('kind')!r}")
    return msg, [MountState.from_json(m) for m in msg.get("mounts", ())]


async def send_message(
    channel: FdChannel, kind: str, mounts: Sequence[MountState], fds: Sequence[int], **extra: Any
) -> None:
    """Send one framed protocol message (any size, any number of fds)."""
    await channel.send(fds, encode_state(kind, mounts, **extra))


async def receive_message(
    channel: FdChannel, kind: str
) -> tuple[dict[str, Any], list[MountState], list[int]]:
    """Receive one framed message of ``kind``; its fds are closed if it is not valid."""
    data, fds = await channel.receive()
    try:
        msg, mounts = decode_state(data, kind)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return msg, mounts, fds


def receive_state_blocking(
    sock: socket.socket,
) -> tuple[dict[str, Any], list[MountState], list[int]]:
    """The successor's first read, before trio runs its reader: the ``state`` message."""
    from .._sys._scm import recv_fds

    data, fds = recv_fds(sock)
    try:
        msg, mounts = decode_state(data, "state")
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return msg, mounts, fds
