"""The sockets a restore coordinator and its workers meet on: private, and peer-checked.

A worker takes fds only from its coordinator, so the socket it connects to lives in the
filesystem (never the abstract namespace, which has no permissions), 0600 in a fresh 0700
directory named uniquely (concurrent restores never collide: criu#1720, #2499), and the
coordinator accepts a connection only from the expected uid (and pid), as ``SO_PEERCRED``
recorded them at connect time.
"""

from __future__ import annotations

import errno
import os
import socket
import tempfile

from .._sys._scm import PeerCredentials, peer_credentials

__all__ = ["worker_listener", "accept_peer"]


def worker_listener(name: str = "worker.sock", *, backlog: int = 16) -> tuple[socket.socket, str]:
    """A listening AF_UNIX socket for a restore worker: mode 0600 inside a fresh 0700 dir.

    Returns (socket, path); remove the socket file and its directory when done.
    """
    directory = tempfile.mkdtemp(prefix="pyautofs-")  # created 0700
    path = os.path.join(directory, name)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)  # the socket file is created 0600
    try:
        sock.bind(path)
    except BaseException:
        sock.close()
        os.rmdir(directory)
        raise
    finally:
        os.umask(old)
    sock.listen(backlog)
    return sock, path


def accept_peer(
    listener: socket.socket, *, uid: int | None = None, pid: int | None = None
) -> tuple[socket.socket, PeerCredentials]:
    """Accept one connection whose peer has the expected uid (default: ours) and pid.

    Connections from anyone else are closed and refused with ``PermissionError`` naming who
    tried: a restore worker must take fds only from its coordinator.
    """
    want_uid = os.getuid() if uid is None else uid
    conn, _ = listener.accept()
    creds = peer_credentials(conn)
    if creds.uid != want_uid or (pid is not None and creds.pid != pid):
        conn.close()
        expected = f"uid {want_uid}" + (f", pid {pid}" if pid is not None else "")
        raise PermissionError(
            errno.EACCES,
            f"refused a connection from pid {creds.pid} uid {creds.uid}: expected {expected}",
        )
    return conn, creds
