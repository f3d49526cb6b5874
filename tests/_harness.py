"""What the end-to-end tests share: a ``pyautofs serve`` process, lookups, mount cleanup.

- :class:`Server` / :func:`start_serve`: ``pyautofs serve`` in its own session, returned
  once it is serving. Readiness comes from ``--ready-fd`` (``READY=1`` on a pipe), never
  from the log's text; EOF on that pipe means the server exited without getting there.
- :func:`lookup`: read or stat a path from a process in its *own session*. Lookups from
  the mount owner's process group never trigger a mount (the kernel lets the daemon see
  its own mount points as they are), so a test that looks up from its own process would
  test nothing.
- :func:`remove_mounts_under`: takes down every mount at or below a directory, autofs
  mounts made catatonic first so that nothing waits on a pipe no one reads.

Every wait has a deadline: a hang fails the test, it never stalls the run.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType

from pyautofs.lowlevel import (
    AutofsControl,
    OwnedAutofsMount,
    UmountFlags,
    read_mountinfo,
    umount2,
)

DEADLINE = 20.0
"""Seconds any one step of a test may take (a lookup, a server's start)."""

STOP_DEADLINE = 30.0
"""Seconds a server may take to shut down gracefully."""

SYSTEM_PYTHON = "/usr/bin/python3"
"""For lookups as another user: the venv's python may sit under /root (0700)."""

_LOOKUP = """\
import os, sys
path, read = sys.argv[1], sys.argv[2] == "read"
try:
    if read:
        with open(path) as f:
            print(f.read(), end="")
    else:
        print(os.stat(path).st_dev, end="")
except OSError as e:
    sys.exit(e.errno)
"""


def lookup(
    path: str | os.PathLike[str],
    *,
    read: bool = True,
    user: int | None = None,
    timeout: float = DEADLINE,
) -> tuple[int, str]:
    """Read (or, ``read=False``, stat) ``path`` from a process in its own session.

    Returns (0, the file's content or the ``st_dev`` as text) or (errno, ""). ``user`` runs
    the lookup as that uid and gid (with ``setpriv`` and the system python).
    """
    python = [sys.executable]
    if user is not None:
        python = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"]
        python.append(SYSTEM_PYTHON)
    r = subprocess.run(
        [*python, "-c", _LOOKUP, os.fspath(path), "read" if read else "stat"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        start_new_session=True,
    )
    return r.returncode, r.stdout


def wait_ready(
    proc: subprocess.Popen[bytes], ready_r: int, log: Path, timeout: float = DEADLINE
) -> None:
    """Wait for ``READY=1`` on the read end of a ``--ready-fd`` pipe (then close it).

    EOF before the line means the server exited (or closed the fd) without becoming ready.
    """
    try:
        deadline = time.monotonic() + timeout
        data = b""
        while not data.endswith(b"\n"):
            left = deadline - time.monotonic()
            assert left > 0, f"not ready within {timeout} s:\n{log.read_text()}"
            ready, _, _ = select.select([ready_r], [], [], left)
            if ready:
                chunk = os.read(ready_r, 64)
                assert chunk, f"exited ({proc.wait(timeout=10)}) before READY:\n{log.read_text()}"
                data += chunk
        assert data == b"READY=1\n", data
    finally:
        os.close(ready_r)


def start_serve(
    log: Path,
    args: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    wrapper: Sequence[str] = (),
) -> subprocess.Popen[bytes]:
    """``pyautofs serve ARGS`` in its own session, its stderr in ``log``, returned once it
    is serving (``--ready-fd``). ``wrapper`` is a command that execs its arguments (say,
    ``unshare ... sh -c``); ``env`` replaces the environment."""
    ready_r, ready_w = os.pipe()
    argv = [*wrapper, sys.executable, "-m", "pyautofs", "serve", "--ready-fd", str(ready_w)]
    argv += args
    try:
        with log.open("w") as err:
            proc = subprocess.Popen(
                argv,
                stderr=err,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                pass_fds=(ready_w,),
                env=env,
            )
    finally:
        os.close(ready_w)
    try:
        wait_ready(proc, ready_r, log)
    except BaseException:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        raise
    return proc


class Server:
    """``pyautofs serve -v --lock-dir WORKDIR/locks ARGS``, ready, logging to a file.

    A context manager: leaving it stops the server (SIGTERM, then SIGKILL after
    :data:`STOP_DEADLINE`).
    """

    def __init__(self, workdir: Path, *args: str, env: Mapping[str, str] | None = None) -> None:
        self.logfile = workdir / f"serve-{len(list(workdir.glob('serve-*')))}.log"
        self.proc = start_serve(
            self.logfile, ["-v", "--lock-dir", str(workdir / "locks"), *args], env=env
        )

    @property
    def pid(self) -> int:
        """The server's process id."""
        return self.proc.pid

    def log(self) -> str:
        """Everything it has logged so far."""
        return self.logfile.read_text()

    def wait_log(self, text: str, count: int = 1, timeout: float = DEADLINE) -> None:
        """Wait until ``text`` stands ``count`` times in the log (for what follows a
        signal or a lookup; readiness never needs this)."""
        deadline = time.monotonic() + timeout
        while self.log().count(text) < count:
            assert self.proc.poll() is None, self.log()
            assert time.monotonic() < deadline, self.log()
            time.sleep(0.02)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Send ``sig`` (if it still runs) and return its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=STOP_DEADLINE)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def __enter__(self) -> Server:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def remove_mounts_under(path: str | os.PathLike[str]) -> None:
    """Take down every mount at or below ``path``, innermost first.

    Autofs mounts go catatonic first: a process waiting on one is released with ENOENT
    rather than left blocked on a pipe nobody reads once its server is gone.
    """
    base = os.fspath(path)
    infos = [
        i for i in read_mountinfo() if i.mount_point == base or i.mount_point.startswith(base + "/")
    ]
    with AutofsControl.open() as ctl:
        for info in infos:
            if info.fstype != "autofs":
                continue
            try:
                fd = ctl.openmount(info.mount_point, info.dev)
            except OSError:
                continue
            try:
                ctl.catatonic(fd)
            finally:
                os.close(fd)
    for info in reversed(infos):
        try:
            umount2(info.mount_point, UmountFlags.DETACH)
        except OSError:
            pass  # went with its parent


@contextlib.contextmanager
def hung_autofs(path: Path) -> Iterator[Path]:
    """An autofs mount at ``path`` whose requests nobody answers (its pipe is never read).

    On exit what is queued fails with ENOENT, and the mount goes catatonic and away.
    """
    mount = OwnedAutofsMount.create(path, nonblocking=True)
    try:
        yield path
    finally:
        mount.close()
