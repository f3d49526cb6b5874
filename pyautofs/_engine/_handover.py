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

Wire protocol (SOCK_SEQPACKET): old -> new ``state`` (JSON + fds, 3 per mount: read end,
ioctl fd, lock fd), new -> old ``ready`` (or ``error``), old -> new ``final`` (JSON).
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

__all__ = [
    "HANDOVER_ENV",
    "HANDOVER_VERSION",
    "HandoverError",
    "MountState",
    "encode_state",
    "decode_state",
    "send_state",
    "receive_state",
]

HANDOVER_ENV = "PYAUTOFS_HANDOVER_FD"
"""The environment variable that tells a successor which fd is its handover socket."""
HANDOVER_VERSION = 1


class HandoverError(RuntimeError):
    """The handover protocol failed; the old engine keeps serving."""


@attrs.frozen
class MountState:
    """What a successor needs to serve one mount without remounting it."""

    path: str
    mode: str
    dev: int
    timeout: int
    strictexpire: bool
    created_dir: bool
    mounted: tuple[str, ...]
    created_keys: tuple[str, ...]
    key_timeouts: Mapping[str, int]
    negative: Mapping[str, tuple[float, int]]
    """key -> (seconds left, errno)."""

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        d = attrs.asdict(self)
        d["negative"] = {k: list(v) for k, v in self.negative.items()}
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> MountState:
        """Inverse of :meth:`to_json`."""
        return cls(
            path=str(d["path"]),
            mode=str(d["mode"]),
            dev=int(d["dev"]),
            timeout=int(d["timeout"]),
            strictexpire=bool(d["strictexpire"]),
            created_dir=bool(d["created_dir"]),
            mounted=tuple(d["mounted"]),
            created_keys=tuple(d["created_keys"]),
            key_timeouts={str(k): int(v) for k, v in d["key_timeouts"].items()},
            negative={str(k): (float(v[0]), int(v[1])) for k, v in d["negative"].items()},
        )


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
    if not isinstance(msg, dict) or msg.get("v") != HANDOVER_VERSION:
        raise HandoverError(f"unsupported handover message version: {str(msg)[:80]}")
    if msg.get("kind") != kind:
        raise HandoverError(f"expected a {kind!r} handover message, got {msg.get('kind')!r}")
    return msg, [MountState.from_json(m) for m in msg.get("mounts", ())]


def send_state(sock: socket.socket, mounts: Sequence[MountState], fds: Sequence[int]) -> None:
    """Send the ``state`` message with 3 fds per mount (read end, ioctl fd, lock fd)."""
    from .._sys._scm import send_fds

    if len(fds) != 3 * len(mounts):
        raise ValueError("send_state needs 3 fds per mount")
    send_fds(sock, list(fds), encode_state("state", mounts))


def receive_state(
    sock: socket.socket,
) -> tuple[dict[str, Any], list[tuple[MountState, int, int, int]]]:
    """Receive the ``state`` message; returns (header, [(state, read_fd, ioctlfd, lock_fd)])."""
    from .._sys._scm import recv_fds

    data, fds = recv_fds(sock)
    try:
        msg, mounts = decode_state(data, "state")
        if len(fds) != 3 * len(mounts):
            raise HandoverError(f"handover carried {len(fds)} fds for {len(mounts)} mounts")
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return msg, [(m, fds[3 * i], fds[3 * i + 1], fds[3 * i + 2]) for i, m in enumerate(mounts)]
