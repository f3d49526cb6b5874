"""Test helpers: automount(8) and ``pyautofs serve`` as real processes, and path lookups.

Both automounters run in their own session (lookups from an automounter's own process group
never trigger a mount), with their output in a log file. Lookups run in a separate short-lived
process, also in its own session, and come back as comparable values:
``("ok", content)`` or ``("error", "ENOENT")``. That process runs this file as a script
(``python -I _automount.py OP PATH``), which imports nothing from pyautofs: it stays quick.

automount(8) runs once per machine (its flag file ``/run/autofs-running`` is shared by every
mount namespace), so :class:`Automount` first waits for any other one to exit. Killed, it
leaves behind its mounts, one log-priority fifo per mount point in ``/run``, and maybe the
flag file; :meth:`Automount.stop` removes all three (the flag file only if it names our
process).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

__all__ = [
    "AUTOMOUNT",
    "Automount",
    "Result",
    "Serve",
    "automount_fifo",
    "detach_under",
    "inspect_json",
    "lookup",
    "mounts_under",
]

AUTOMOUNT = shutil.which("automount")
"""Debian's automount(8), or None when the autofs package is not installed."""

AUTOMOUNT_FLAG = Path("/run/autofs-running")
OTHER_AUTOMOUNT_WAIT = 300.0
"""Seconds to wait for somebody else's automount(8) (a benchmark, another test) to exit."""
START_DEADLINE = 30.0
STOP_DEADLINE = 30.0
LOOKUP_TIMEOUT = 30.0

Result = tuple[str, object]
"""``("ok", value)`` or ``("error", "ENOENT")``: what one lookup saw."""


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def mounts_under(root: str | os.PathLike[str], fstype: str | None = None) -> list[str]:
    """Mount points at or below ``root`` in this mount namespace, in mountinfo order."""
    from pyautofs._sys._mountinfo import read_mountinfo  # not at the top: lookups stay quick

    top = os.fspath(root)
    return [
        m.mount_point
        for m in read_mountinfo()
        if _under(m.mount_point, top) and (fstype is None or m.fstype == fstype)
    ]


def detach_under(roots: Iterable[str | os.PathLike[str]]) -> None:
    """``umount -l`` everything at or below each root, deepest first (and stacked ones too)."""
    for root in roots:
        for _ in range(5):  # a mount stacked on another shows up again once its top is gone
            points = mounts_under(root)
            if not points:
                break
            order = sorted(enumerate(points), key=lambda ip: (ip[1].count("/"), ip[0]))
            for _, point in reversed(order):
                subprocess.run(
                    ["umount", "-l", point], capture_output=True, timeout=30, check=False
                )


def automount_fifo(mount_point: str | os.PathLike[str]) -> Path:
    """The log-priority fifo automount(8) makes for ``mount_point`` (``/a/b``: ``-a-b``)."""
    return Path("/run/autofs.fifo-" + os.fspath(mount_point).strip("/").replace("/", "-"))


def automount_running() -> list[int]:
    """Pids of every automount(8) on the machine."""
    r = subprocess.run(
        ["pgrep", "-x", "automount"], capture_output=True, text=True, timeout=30, check=False
    )
    return [int(p) for p in r.stdout.split()]


class Automount:
    """``automount -f -t 0 -p PIDFILE MASTER`` in its own session, until :meth:`stop`.

    ``mount_points`` are the autofs mounts the master map makes (the indirect mount points
    and the direct map keys): the constructor returns once all are in this namespace's
    mountinfo, owned by the new process. ``cleanup`` are the directories under which
    :meth:`stop` detaches whatever is left.
    """

    def __init__(
        self,
        master: Path,
        workdir: Path,
        mount_points: Sequence[str | os.PathLike[str]],
        cleanup: Sequence[str | os.PathLike[str]],
    ) -> None:
        assert AUTOMOUNT is not None
        self.mount_points = [os.fspath(p) for p in mount_points]
        self.cleanup = [os.fspath(p) for p in cleanup]
        n = len(list(workdir.glob("automount-*.log")))
        self.log_path = workdir / f"automount-{n}.log"
        self.pidfile = workdir / f"automount-{n}.pid"
        end = time.monotonic() + OTHER_AUTOMOUNT_WAIT
        while True:
            others = automount_running()
            if others:
                assert time.monotonic() < end, f"another automount(8) keeps running: {others}"
                time.sleep(0.2)
                continue
            with self.log_path.open("ab") as out:
                self.proc = subprocess.Popen(
                    [AUTOMOUNT, "-f", "-t", "0", "-p", str(self.pidfile), str(master)],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            try:
                self._wait_mounted()
                return
            except RuntimeError:
                self.stop()
                if "already running" not in self.log() or time.monotonic() > end:
                    raise
                # Lost a race with somebody else's automount start: wait for that one.

    def _wait_mounted(self) -> None:
        from pyautofs._sys._mountinfo import read_mountinfo

        end = time.monotonic() + START_DEADLINE
        while True:
            ours = {
                m.mount_point
                for m in read_mountinfo()
                if m.fstype == "autofs" and m.super_option("pgrp") == str(self.proc.pid)
            }
            if ours.issuperset(self.mount_points):
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"automount exited ({self.proc.returncode}):\n{self.log()}")
            if time.monotonic() > end:
                self.stop()
                raise TimeoutError(f"automount did not mount {self.mount_points}:\n{self.log()}")
            time.sleep(0.02)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, *, detach: bool = True) -> int:
        """Signal, wait (SIGKILL after a deadline), then remove what it left; its status.

        ``detach=False`` leaves its mounts in place (to adopt them): only the files it
        left in /run go.
        """
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=STOP_DEADLINE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=STOP_DEADLINE)
        finally:
            if detach:
                detach_under(self.cleanup)
            for mp in self.mount_points:
                automount_fifo(mp).unlink(missing_ok=True)
            with contextlib.suppress(OSError, ValueError, IndexError):
                if int(AUTOMOUNT_FLAG.read_text().split()[0]) == self.proc.pid:
                    AUTOMOUNT_FLAG.unlink()
        return self.proc.returncode


class Serve:
    """``pyautofs serve --lock-dir DIR ARGS...`` in its own session, until :meth:`stop`."""

    def __init__(self, workdir: Path, *args: str) -> None:
        n = len(list(workdir.glob("serve-*.log")))
        self.log_path = workdir / f"serve-{n}.log"
        argv = [sys.executable, "-m", "pyautofs", "serve", "-v"]
        argv += ["--lock-dir", str(workdir / "locks"), *args]
        with self.log_path.open("w") as err:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stderr=err, start_new_session=True
            )
        end = time.monotonic() + START_DEADLINE
        while "serving " not in self.log() or "mount(s)" not in self.log():
            if self.proc.poll() is not None or time.monotonic() > end:
                self.stop()
                raise RuntimeError(f"pyautofs serve did not start:\n{self.log()}")
            time.sleep(0.02)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Signal and wait (SIGKILL after a deadline); its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=STOP_DEADLINE)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=STOP_DEADLINE)
            raise


def _lookup_main(op: str, path: str) -> int:
    """In the lookup process: print the JSON form of what ``op`` on ``path`` saw."""
    value: object = None
    try:
        if op == "read":
            with open(path) as f:
                value = f.read()
        elif op == "list":
            value = sorted(os.listdir(path))
        elif op == "write":
            with open(os.path.join(path, "written-by-test"), "w") as f:
                f.write("x")
        else:
            print(f"unknown op {op!r}", file=sys.stderr)
            return 2
        print(json.dumps(["ok", value]))
    except OSError as exc:
        print(json.dumps(["error", errno.errorcode.get(exc.errno or 0, str(exc.errno))]))
    return 0


def lookup(op: str, path: str | os.PathLike[str]) -> Result:
    """``read`` a file, ``list`` a directory or ``write`` a new file in one, from a process in
    its own session (so that the lookup triggers the automounter)."""
    r = subprocess.run(
        [sys.executable, "-I", __file__, op, os.fspath(path)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=LOOKUP_TIMEOUT,
        check=True,
        start_new_session=True,
    )
    kind, value = json.loads(r.stdout)
    return (kind, value)


def inspect_json() -> dict[str, object]:
    """``pyautofs inspect --json``, parsed."""
    r = subprocess.run(
        [sys.executable, "-m", "pyautofs", "inspect", "--json"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=LOOKUP_TIMEOUT,
        check=True,
    )
    out: dict[str, object] = json.loads(r.stdout)
    return out


if __name__ == "__main__":
    sys.exit(_lookup_main(*sys.argv[1:]))
