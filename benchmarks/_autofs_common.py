"""What the autofs benchmarks share: a workspace, the servers under test, and the clients.

**Workspace.** A temporary directory holding an export to bind-mount, map files and mount
points, together with every process a benchmark starts. Closing it leaves nothing behind:
every autofs mount under it is made catatonic (which releases any waiting lookup), every
process it started and that is still alive is SIGKILLed and reaped, every mount under it is
detached, and the directory is removed. Benchmarks run in a private mount namespace
(:func:`enter_private_mount_namespace`), so even a crash cannot leak a mount onto the machine.

**Servers**, each started in its own session, because lookups from the owner's process group
never trigger (``reference/autofs-kernel.md`` §4.3):

- ``pyautofs``: ``pyautofs serve MOUNTPOINT MAPFILE --timeout 0`` (the trio engine);
- ``automount``: Debian's automount 5.1.8, ``automount -f -t 0 MASTER`` with a master map
  naming the same map;
- ``floor``: a minimal synchronous responder (this file run as ``floor MOUNTPOINT EXPORT``):
  one blocking ``read`` per packet, ``mkdir`` + bind ``mount`` + READY through the package's
  ``_sys`` bindings. Nothing that answers the kernel from Python can do much less.

**Clients.** One small Python process per client, in its own session, that ``stat``\\ s keys
``PREFIX<i>`` and times each call with ``perf_counter_ns`` (CLOCK_MONOTONIC, comparable across
processes). A lookup counts as failed unless the ``stat`` shows the export's own inode, that
is, unless the key really was bind-mounted. Several clients wait on a gate (a pipe whose
write end the parent closes) after signalling that they started, so that interpreter
start-up is never timed.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import math
import os
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

import attrs

from pyautofs.lowlevel import (
    SAFE_PATH,
    AutofsControl,
    MountFlags,
    OwnedAutofsMount,
    UmountFlags,
    UntrustedPathError,
    autofs_mounts,
    check_trusted,
    mount,
    read_mountinfo,
    umount2,
    unshare_mount_namespace,
)

__all__ = [
    "AUTOMOUNT",
    "AUTOMOUNT_FLAG",
    "ClientRun",
    "Server",
    "StopResult",
    "Workspace",
    "automount_fifo",
    "automount_flag_pid",
    "automount_running",
    "automount_version",
    "check_environment",
    "detach_under",
    "enter_private_mount_namespace",
    "key_names",
    "make_catatonic_under",
    "mounts_under",
    "percentile",
    "pin",
    "run_clients",
    "start_automount",
    "start_floor",
    "start_serve",
    "summarize_us",
    "tidy",
]

AUTOMOUNT = shutil.which("automount", path=SAFE_PATH) or "/usr/sbin/automount"
"""Debian's automount(8) (package autofs, 5.1.8 on Debian 12), looked up in a fixed system
PATH; :func:`check_environment` and :func:`automount_version` refuse it unless its owner
and mode pass :func:`~pyautofs._sys._trust.check_trusted` (it runs as root)."""

AUTOMOUNT_FLAG = "/run/autofs-running"
"""automount's machine-wide flag file: the pid of the one automount allowed to run (a second
one exits with "program is already running"); removed on a clean exit, left by SIGKILL."""

AUTOMOUNT_WAIT = 600.0
"""Seconds to wait for another automount (one runs per machine) to exit before starting."""

START_DEADLINE = 30.0
"""Seconds a server may take to put its autofs mount in place."""

_MARKER = "marker"


def check_environment(*, automount: bool = False) -> str | None:
    """Why the autofs benchmarks cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root: autofs mounts need CAP_SYS_ADMIN"
    if not os.path.exists("/dev/autofs"):
        return "needs /dev/autofs (CONFIG_AUTOFS_FS=y, or 'modprobe autofs4')"
    if automount and not os.access(AUTOMOUNT, os.X_OK):
        return f"needs automount(8) at {AUTOMOUNT} (apt-get install autofs)"
    if automount:
        try:
            check_trusted(AUTOMOUNT)
        except UntrustedPathError as exc:
            return str(exc.strerror)
    return None


def automount_flag_pid() -> int | None:
    """The pid in automount's flag file, or None when there is none."""
    try:
        with open(AUTOMOUNT_FLAG) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def automount_fifo(mountpoint: str) -> str:
    """The log-priority fifo automount makes in /run for ``mountpoint``."""
    return "/run/autofs.fifo" + mountpoint.replace("/", "-")


def automount_running() -> int | None:
    """The pid of a live automount that holds the flag file (so no other may start)."""
    pid = automount_flag_pid()
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/comm") as f:
            return pid if f.read().strip() == "automount" else None
    except OSError:
        return None


def automount_version() -> str | None:
    """automount's version string (``5.1.8``), or None when it is not installed."""
    if not os.access(AUTOMOUNT, os.X_OK):
        return None
    try:
        check_trusted(AUTOMOUNT)
        out = subprocess.run(
            [AUTOMOUNT, "-V"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in out.splitlines():
        if "version" in line.lower():
            return line.split()[-1]
    return None


def enter_private_mount_namespace() -> None:
    """Move this process into a new mount namespace with ``/`` rprivate.

    Every mount the benchmark makes, and every mount its children make, stays in it and
    disappears with it. unshare needs a single-threaded process: when threads are left over
    (say, from trio's thread cache after another benchmark) and the process is already
    outside the machine's namespace (``pyautofs bench`` enters one first), it stays there.
    """
    try:
        unshare_mount_namespace(make_private=True)
    except OSError as exc:
        if exc.errno != errno.EINVAL or os.readlink("/proc/self/ns/mnt") == os.readlink(
            "/proc/1/ns/mnt"
        ):
            raise


# -- statistics -------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank ``q`` quantile (0 < q <= 1) of ``values``."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))]


def tidy(row: dict[str, object]) -> dict[str, object]:
    """Round the floats of a result row for the table: 3 or more significant digits."""
    return {key: _round(value) for key, value in row.items()}


def _round(value: object) -> object:
    if not isinstance(value, float) or not math.isfinite(value):
        return value
    size = abs(value)
    if size >= 100:
        return round(value)
    return round(value, 1 if size >= 10 else 2 if size >= 1 else 3)


def summarize_us(ns: Sequence[int]) -> dict[str, float]:
    """Median, p90 and p99 of nanosecond samples, in microseconds."""
    if not ns:
        return {"median_us": math.nan, "p90_us": math.nan, "p99_us": math.nan}
    us = [v / 1000 for v in ns]
    return {
        "median_us": statistics.median(us),
        "p90_us": percentile(us, 0.90),
        "p99_us": percentile(us, 0.99),
    }


# -- mounts -----------------------------------------------------------------------------


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def mounts_under(root: str) -> list[str]:
    """Mount points at or below ``root`` in this namespace, in mount order."""
    return [m.mount_point for m in read_mountinfo() if _under(m.mount_point, root)]


def make_catatonic_under(root: str) -> None:
    """Make every autofs mount at or below ``root`` catatonic (any waiter gets ENOENT)."""
    found = [m for m in autofs_mounts() if _under(m.mount_point, root) and not m.catatonic]
    if not found:
        return
    with AutofsControl.open() as control:
        for m in found:
            try:
                fd = control.openmount(m.mount_point, m.dev)
            except OSError:
                continue
            try:
                control.catatonic(fd)
            except OSError:
                pass
            finally:
                os.close(fd)


def detach_under(root: str) -> None:
    """Lazily unmount everything at or below ``root``, innermost first."""
    for _ in range(3):  # a mount stacked on another shows up again once its top is gone
        points = mounts_under(root)
        if not points:
            return
        for point in reversed(points):
            try:
                umount2(point, UmountFlags.DETACH)
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.ENOENT):
                    raise


# -- workspace --------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True)
_OWNER = "owner.pid"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sweep_stale(prefix: str) -> None:
    """Remove what benchmarks killed outright left: their workspace directories (whose owner
    process is gone) and the fifos their automount left in /run. Their mounts and processes
    died with them (see :func:`_die_with_parent`)."""
    tmp = tempfile.gettempdir()
    for name in os.listdir(tmp):
        root = os.path.join(tmp, name)
        if not name.startswith(prefix) or not os.path.isdir(root):
            continue
        try:
            check_trusted(root)  # made by us (mkdtemp), not planted by another user
            with open(os.path.join(root, _OWNER)) as f:
                owner = int(f.read())
        except (OSError, ValueError):
            continue  # not ours to judge
        if _alive(owner) or mounts_under(root):
            continue
        fifo_prefix = os.path.basename(automount_fifo(root)) + "-"
        for fifo in os.listdir("/run"):
            if fifo.startswith(fifo_prefix):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join("/run", fifo))
        shutil.rmtree(root, ignore_errors=True)


def _die_with_parent() -> None:
    """In a child, before exec: be SIGKILLed when the benchmark process dies.

    Servers and clients run in their own sessions and keep the private mount namespace
    alive, so a benchmark killed outright would otherwise leave them, and their mounts,
    behind. (The setting survives exec; the parent is single-threaded, so fork is safe.)
    """
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class Workspace:
    """A temporary directory with an export, maps and mount points, and its processes.

    Use it as a context manager; see the module notes for what closing it does.
    """

    def __init__(self, prefix: str = "pyautofs-bench-") -> None:
        _sweep_stale(prefix)
        self.root = tempfile.mkdtemp(prefix=prefix)
        with open(os.path.join(self.root, _OWNER), "w") as f:
            f.write(f"{os.getpid()}\n")
        self.export = os.path.join(self.root, "export")
        os.mkdir(self.export)
        with open(os.path.join(self.export, _MARKER), "w") as f:
            f.write("bind-mounted by an automounter\n")
        self.procs: list[subprocess.Popen[bytes]] = []
        self._fifos: list[str] = []
        self._automounts: set[int] = set()

    def __enter__(self) -> Workspace:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def path(self, *parts: str) -> str:
        """A path inside the workspace."""
        return os.path.join(self.root, *parts)

    def mountpoint(self, name: str) -> str:
        """A fresh, empty directory to mount on."""
        path = self.path(name)
        os.mkdir(path)
        return path

    def write(self, name: str, text: str) -> str:
        """Write a file in the workspace and return its path."""
        path = self.path(name)
        with open(path, "w") as f:
            f.write(text)
        return path

    def write_map(self, name: str, keys: Sequence[str] | None) -> str:
        """A sun-format map binding each key to the export; ``None`` gives a wildcard map."""
        if keys is None:
            text = f"* -fstype=bind :{self.export}\n"
        else:
            text = "".join(f"{k} -fstype=bind :{self.export}\n" for k in keys)
        return self.write(name, text)

    def spawn(self, argv: Sequence[str], **kwargs: object) -> subprocess.Popen[bytes]:
        """Start a process in its own session; it is SIGKILLed at close if still alive, and
        by the kernel if this process dies first (say, killed at a test's deadline)."""
        # preexec_fn runs one prctl between fork and exec; glibc keeps that fork-safe even
        # if some idle thread is left from an earlier benchmark.
        proc: subprocess.Popen[bytes] = subprocess.Popen(  # type: ignore[call-overload]
            list(argv),
            start_new_session=True,
            preexec_fn=_die_with_parent,  # noqa: PLW1509
            **kwargs,
        )
        self.procs.append(proc)
        return proc

    def automount_started(self, pid: int, mountpoint: str) -> None:
        """Remember what automount ``pid`` leaves in /run when it is killed: its flag file and
        the log-priority fifo it makes per mount. :meth:`close` removes them if still there."""
        self._automounts.add(pid)
        self._fifos.append(automount_fifo(mountpoint))

    def close(self) -> None:
        """Release waiters, kill leftovers, detach every mount, remove the directory."""
        with contextlib.suppress(OSError):
            make_catatonic_under(self.root)
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        self.procs.clear()
        detach_under(self.root)
        for fifo in self._fifos:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(fifo)
        if automount_flag_pid() in self._automounts:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(AUTOMOUNT_FLAG)
        left = mounts_under(self.root)
        shutil.rmtree(self.root, ignore_errors=not left)
        if left:
            raise RuntimeError(f"mounts left under {self.root}: {left[:5]}")


# -- servers ----------------------------------------------------------------------------


@attrs.frozen
class StopResult:
    """How a server stopped."""

    seconds: float
    """From the signal to the process's exit."""
    returncode: int
    killed: bool
    """True when it had to be SIGKILLed after the deadline."""


@attrs.define
class Server:
    """A server under test, running in its own session with one autofs mount."""

    variant: str
    proc: subprocess.Popen[bytes]
    mountpoint: str
    log: str

    @property
    def pid(self) -> int:
        """The server's pid (and process group)."""
        return self.proc.pid

    def status(self) -> dict[str, int]:
        """The ``Vm*``/``Rss*`` lines of ``/proc/PID/status``, in KiB."""
        out = {}
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name.startswith(("Vm", "Rss")) and value.strip().endswith("kB"):
                    out[name] = int(value.split()[0])
        return out

    def rss_kib(self) -> int:
        """Resident set size now (``VmRSS``), in KiB."""
        return self.status()["VmRSS"]

    def stop(self, sig: int = signal.SIGTERM, deadline: float = 120.0) -> StopResult:
        """Send ``sig`` and time the process's exit; SIGKILL it after ``deadline`` seconds.

        The exit is seen through a pidfd, at once: ``Popen.wait`` with a timeout polls with
        sleeps of up to 50 ms, coarser than what is measured.
        """
        pidfd = os.pidfd_open(self.pid)
        try:
            poller = select.poll()
            poller.register(pidfd, select.POLLIN)
            t0 = time.perf_counter()
            signal.pidfd_send_signal(pidfd, sig)
            exited = bool(poller.poll(deadline * 1000))
            seconds = time.perf_counter() - t0
        finally:
            os.close(pidfd)
        if not exited:
            self.proc.kill()
        self.proc.wait(10)
        if self.variant == "automount" and automount_flag_pid() == self.pid:
            # Killed: remove what it leaves in /run, so that the next one starts cleanly.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(AUTOMOUNT_FLAG)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(automount_fifo(self.mountpoint))
        return StopResult(seconds, self.proc.returncode, not exited)

    def log_tail(self, lines: int = 10) -> str:
        """The end of the server's log, for error messages."""
        try:
            with open(self.log, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""


def pin(pid: int, cpus: set[int]) -> None:
    """Pin every thread of process ``pid`` to ``cpus`` (threads and children it makes later
    inherit the affinity of the thread that makes them)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(tid), cpus)


def _wait_mounted(server: Server, deadline: float = START_DEADLINE) -> Server:
    """Return once ``server`` owns a live autofs mount on its mount point."""
    end = time.monotonic() + deadline
    while True:
        for m in autofs_mounts():
            if m.mount_point == server.mountpoint and m.pgrp == server.pid and not m.catatonic:
                return server
        if server.proc.poll() is not None:
            raise RuntimeError(
                f"{server.variant} exited ({server.proc.returncode}) before mounting "
                f"{server.mountpoint}:\n{server.log_tail()}"
            )
        if time.monotonic() > end:
            raise TimeoutError(
                f"{server.variant} did not mount {server.mountpoint} within {deadline} s:\n"
                f"{server.log_tail()}"
            )
        time.sleep(0.01)


def _spawn_logged(ws: Workspace, variant: str, mountpoint: str, argv: Sequence[str]) -> Server:
    log = ws.path(f"{variant}-{os.path.basename(mountpoint)}.log")
    with open(log, "wb") as out:
        proc = ws.spawn(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    return _wait_mounted(Server(variant, proc, mountpoint, log))


def start_serve(ws: Workspace, mountpoint: str, mapfile: str, *, timeout: int = 0) -> Server:
    """``pyautofs serve MOUNTPOINT MAPFILE --timeout T`` in its own session."""
    argv = [sys.executable, "-m", "pyautofs", "serve", "--timeout", str(timeout)]
    return _spawn_logged(ws, "pyautofs", mountpoint, [*argv, mountpoint, mapfile])


def start_automount(
    ws: Workspace,
    mountpoint: str,
    mapfile: str,
    *,
    timeout: int = 0,
    wait: float = AUTOMOUNT_WAIT,
    progress: Callable[[str], None] | None = None,
) -> Server:
    """automount(8) in the foreground, in its own session, on a master map naming ``mapfile``.

    ``-f`` does not detach (nor call setsid), so the session comes from :meth:`Workspace.spawn`.
    The timeout is given both as ``-t`` and on the master map line, which is what wins.
    automount runs once per machine (:data:`AUTOMOUNT_FLAG`), across mount namespaces: while
    another one runs (another benchmark, a test), this waits up to ``wait`` seconds for it.
    """
    name = os.path.basename(mountpoint)
    master = ws.write(f"auto.master.{name}", f"{mountpoint} {mapfile} --timeout={timeout}\n")
    log = ws.path(f"automount-{name}.log")
    end = time.monotonic() + wait
    while True:
        other = automount_running()
        if other is not None:
            if time.monotonic() > end:
                raise TimeoutError(
                    f"automount pid {other} is still running after {wait:.0f} s, and automount "
                    f"runs once per machine ({AUTOMOUNT_FLAG})"
                )
            if progress is not None:
                progress(f"waiting for automount pid {other} to exit (one per machine)")
            time.sleep(0.5)
            continue
        with open(log, "wb") as out:
            proc = ws.spawn(
                [check_trusted(AUTOMOUNT), "-f", "-t", str(timeout), master],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        ws.automount_started(proc.pid, mountpoint)
        try:
            return _wait_mounted(Server("automount", proc, mountpoint, log))
        except RuntimeError:
            with open(log, errors="replace") as f:
                if "already running" not in f.read() or time.monotonic() > end:
                    raise
            # Lost a race with another automount's start: wait for that one.


def start_floor(ws: Workspace, mountpoint: str) -> Server:
    """The minimal synchronous responder (this file's ``floor`` mode) in its own session."""
    argv = [sys.executable, os.path.abspath(__file__), "floor", mountpoint, ws.export]
    return _spawn_logged(ws, "floor", mountpoint, argv)


# -- clients ----------------------------------------------------------------------------


def key_names(prefix: str, start: int, count: int) -> list[str]:
    """The keys ``PREFIX<start>`` .. ``PREFIX<start + count - 1>`` that clients look up."""
    return [f"{prefix}{i}" for i in range(start, start + count)]


# Deliberately tiny: the standard library only, every name local, nothing between the two
# clock reads but the stat and a tuple compare.
_CLIENT = r"""
import json, os, sys, time
mountpoint, prefix, start, count, passes, gate, ready, out = sys.argv[1:9]
start, count, passes, gate, ready = int(start), int(count), int(passes), int(gate), int(ready)
st = os.stat(sys.argv[9])
want = (st.st_dev, st.st_ino)
suffix = sys.argv[10] if len(sys.argv) > 10 else ""
paths = [f"{mountpoint}/{prefix}{i}{suffix}" for i in range(start, start + count)]
stat, clock = os.stat, time.perf_counter_ns
os.write(ready, b"."); os.close(ready)
os.read(gate, 1); os.close(gate)
result = {"t0": clock(), "passes": []}
for _ in range(passes):
    ns, errors = [], []
    for path in paths:
        t0 = clock()
        try:
            s = stat(path)
            err = 0 if (s.st_dev, s.st_ino) == want else -1
        except OSError as exc:
            err = exc.errno or -2
        ns.append(clock() - t0)
        if err:
            errors.append(err)
    result["passes"].append({"ns": ns, "errors": errors})
result["t1"] = clock()
with open(out, "w") as f:
    json.dump(result, f)
"""


@attrs.frozen
class ClientRun:
    """What one client measured."""

    t0_ns: int
    t1_ns: int
    passes: list[list[int]]
    """Per pass over its keys, the latency of each stat, in ns."""
    errors: list[list[int]]
    """Per pass, the errno of each failed lookup (-1: stat worked but nothing was mounted)."""


def run_clients(
    ws: Workspace,
    mountpoint: str,
    prefix: str,
    ranges: Sequence[tuple[int, int]],
    *,
    passes: int = 1,
    cpus: set[int] | None = None,
    deadline: float = 600.0,
    suffix: str = "",
) -> list[ClientRun]:
    """Run one client per ``(start, count)`` range of keys ``PREFIX<i>``, all at once.

    Every client starts, signals readiness and waits on a gate; the gate opens when all are
    ready. Each client makes ``passes`` passes over its keys (the first triggers mounts, the
    later ones find them mounted); ``suffix`` is appended to each path (``"/"`` makes a
    stat() of a direct mount point trigger, as a walk into it does). ``cpus`` pins every
    client to those CPUs before the gate opens. Clients still running after ``deadline``
    seconds are killed and the run fails.
    """
    gate_r, gate_w = os.pipe2(os.O_CLOEXEC)
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    procs: list[tuple[subprocess.Popen[bytes], str]] = []
    try:
        for n, (start, count) in enumerate(ranges):
            out = ws.path(f"client-{prefix}-{n}.json")
            argv = [sys.executable, "-I", "-S", "-c", _CLIENT, mountpoint, prefix]
            argv += [str(start), str(count), str(passes), str(gate_r), str(ready_w), out]
            argv.append(ws.export)
            if suffix:
                argv.append(suffix)
            proc = ws.spawn(argv, pass_fds=(gate_r, ready_w), stdin=subprocess.DEVNULL)
            procs.append((proc, out))
        os.close(ready_w)
        ready_w = -1
        end = time.monotonic() + deadline
        seen = 0
        while seen < len(procs):  # EOF early means a client died before it was ready
            chunk = os.read(ready_r, len(procs) - seen)
            if not chunk:
                break
            seen += len(chunk)
        if cpus is not None:
            for proc, _ in procs:
                pin(proc.pid, cpus)
        os.close(gate_w)
        gate_w = -1
        runs = []
        for proc, out in procs:
            try:
                proc.wait(max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise TimeoutError(f"a client did not finish within {deadline} s") from None
            if proc.returncode != 0:
                raise RuntimeError(f"a client failed with status {proc.returncode}")
            with open(out) as f:
                data = json.load(f)
            os.unlink(out)
            runs.append(
                ClientRun(
                    t0_ns=data["t0"],
                    t1_ns=data["t1"],
                    passes=[p["ns"] for p in data["passes"]],
                    errors=[p["errors"] for p in data["passes"]],
                )
            )
        return runs
    finally:
        for fd in (gate_r, gate_w, ready_r, ready_w):
            if fd >= 0:
                os.close(fd)
        for proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


# -- the floor: a minimal synchronous responder ------------------------------------------

_PACKET_SIZE = 304  # struct autofs_v5_packet on x86_64
_MISSING_INDIRECT = 3
_EXPIRE_INDIRECT = 4


class _Stop(Exception):
    pass


def _floor_main(mountpoint: str, export: str) -> int:
    """Serve ``mountpoint``: every key is a bind mount of ``export``. Runs until SIGTERM."""

    def on_term(signum: int, frame: object) -> None:
        raise _Stop

    signal.signal(signal.SIGTERM, on_term)
    # As the engine does: room for many queued requests; only the kernel keeps the write end.
    owned = OwnedAutofsMount.create(mountpoint, pipe_size=1 << 20, source="floor")
    control = AutofsControl.open()
    r, ioctlfd = owned.read_fd, owned.ioctlfd
    root = os.fsencode(mountpoint) + b"/"
    source = os.fsencode(export)
    read, mkdir, ready = os.read, os.mkdir, control.ready
    try:
        while True:
            pkt = read(r, _PACKET_SIZE)
            if not pkt:
                return 0  # catatonic or unmounted
            ptype = int.from_bytes(pkt[4:8], "little")
            token = int.from_bytes(pkt[8:12], "little")
            path = root + pkt[44 : 44 + int.from_bytes(pkt[40:44], "little")]
            try:
                if ptype == _MISSING_INDIRECT:
                    with contextlib.suppress(FileExistsError):
                        mkdir(path)
                    mount(source, path, None, MountFlags.BIND)
                elif ptype == _EXPIRE_INDIRECT:
                    umount2(path)
                    os.rmdir(path)
                else:
                    raise OSError(errno.EINVAL, "unexpected packet")
            except OSError as exc:
                control.fail(ioctlfd, token, -(exc.errno or errno.EIO))
            else:
                ready(ioctlfd, token)
    except _Stop:
        owned.catatonic()
        for key in os.listdir(mountpoint):
            with contextlib.suppress(OSError):
                umount2(os.path.join(mountpoint, key), UmountFlags.DETACH)
        owned.close()
        control.close()
        return 0


def _main(argv: Sequence[str]) -> int:
    if len(argv) == 3 and argv[0] == "floor":
        return _floor_main(argv[1], argv[2])
    print("usage: _autofs_common.py floor MOUNTPOINT EXPORT", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
