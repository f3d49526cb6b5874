"""Quiescing a running ``pyautofs serve`` for a checkpoint, from outside it.

``serve`` listens on a control socket (see :mod:`pyautofs._engine._control` for the protocol)
in its root-only lock directory. A checkpoint tool knows only the pid of the process tree it
dumps, and usually runs in other namespaces than that tree: CRIU runs on the host, the
daemon in its own pid and mount namespace. So the socket is found from the tree itself:

1. the tree is the pid and its descendants (``/proc/<pid>/task/*/children``);
2. each process's sockets are the ``socket:[ino]`` links in ``/proc/<pid>/fd``;
3. ``/proc/<pid>/net/unix`` (the process's own network namespace) names the listening ones
   by inode and path; a serve control socket is called ``serve.<ns>.<pid>.sock``;
4. the path is reached through ``/proc/<pid>/root`` (the process's own mount namespace), by
   an ``O_PATH`` fd on its directory, so its length never hits the 108-byte limit of a
   socket address.

Requests wait for the server's reply *and* for it to close the connection: once that EOF
arrives, the server holds no fd of this exchange, so a freeze right after finds none.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import time
from collections.abc import Iterable

__all__ = ["ControlError", "find_control_sockets", "control_request"]

_NAME = re.compile(r"serve\.\d+\.\d+\.sock")
_ACCEPTCON = 0x10000  # __SO_ACCEPTCON in /proc/net/unix's Flags: a listening socket


class ControlError(OSError):
    """A serve control socket refused a request or did not answer in time."""


def _tree(pid: int) -> list[int]:
    """``pid`` and every descendant, parents first."""
    out = [pid]
    i = 0
    while i < len(out):
        p = out[i]
        i += 1
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{p}/task/{tid}/children", "rb") as f:
                    out += [int(c) for c in f.read().split()]
            except OSError:
                continue
    return out


def _socket_inodes(pid: int) -> set[int]:
    out: set[int] = set()
    fd_dir = f"/proc/{pid}/fd/"
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return out
    for name in names:
        try:
            link = os.readlink(fd_dir + name)
        except OSError:
            continue
        if link.startswith("socket:["):
            out.add(int(link[8:-1]))
    return out


def _listening_paths(pid: int, inodes: set[int]) -> list[str]:
    """The filesystem paths of ``pid``'s listening unix sockets among ``inodes``."""
    try:
        with open(f"/proc/{pid}/net/unix", "rb") as f:
            lines = f.read().decode(errors="replace").splitlines()[1:]
    except OSError:
        return []
    out = []
    for line in lines:
        # Num RefCount Protocol Flags Type St Inode [Path]
        fields = line.split(None, 7)
        if len(fields) < 8 or not fields[7].startswith("/"):
            continue
        if int(fields[6]) in inodes and int(fields[3], 16) & _ACCEPTCON:
            out.append(fields[7])
    return out


def find_control_sockets(pids: Iterable[int]) -> list[tuple[int, str]]:
    """Every serve control socket in the process trees rooted at ``pids``: (pid, path), the
    path as seen in that process's mount namespace."""
    found = []
    for root in pids:
        for pid in _tree(root):
            inodes = _socket_inodes(pid)
            if not inodes:
                continue
            for path in _listening_paths(pid, inodes):
                if _NAME.fullmatch(os.path.basename(path)):
                    found.append((pid, path))
    return found


def control_request(
    request: str,
    path: str,
    *,
    pid: int | None = None,
    timeout: float = 30.0,
    wait_reply: bool = True,
) -> str:
    """Send one request to the control socket at ``path`` (in ``pid``'s mount namespace, if
    given) and return the reply after the server closed the connection.

    ``wait_reply=False`` only queues the request: for a server that is frozen (CRIU's
    post-dump and post-restore actions run while the tree is stopped), which reads it
    once it runs again. Raises :class:`ControlError` for an ``error`` reply or when the
    whole exchange takes longer than ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    where = f"/proc/{pid}/root{path}" if pid is not None else path
    dirfd = os.open(os.path.dirname(where) or ".", os.O_PATH | os.O_CLOEXEC)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(timeout)
            sock.connect(f"/proc/self/fd/{dirfd}/{os.path.basename(where)}")
            sock.send(request.encode("ascii"))
            if not wait_reply:
                return ""
            try:
                reply = sock.recv(65536).decode("ascii", "replace")
                while True:  # until the server has closed its end
                    sock.settimeout(max(0.001, deadline - time.monotonic()))
                    if not sock.recv(1):
                        break
            except TimeoutError:
                raise ControlError(
                    errno.ETIMEDOUT, f"{path}: no answer to {request!r} within {timeout} s"
                ) from None
    finally:
        os.close(dirfd)
    if not reply:
        raise ControlError(errno.ECONNRESET, f"{path}: closed without answering {request!r}")
    if not reply.startswith("ok"):
        raise ControlError(errno.EPROTO, f"{path}: {request!r}: {reply}")
    return reply
