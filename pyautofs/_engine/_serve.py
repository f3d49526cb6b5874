"""``pyautofs serve``: an Automounter driven by autofs maps.

Maps come from ``_maps``; this module turns a lookup into mounts (bind and tmpfs through
mount(2), anything else through mount(8) in the engine's process group) and handles the
signals: SIGTERM/SIGINT shut down gracefully (a second one forces the exit, after saying
what is left), SIGHUP re-reads the maps and forgets failed lookups, SIGUSR2 hands every
mount to a successor started from the code on disk now (zero-downtime upgrade; another
SIGUSR2 meanwhile is logged and ignored), and SIGUSR1 (sent by ``pyautofs serve
--takeover`` in another session) lets another engine take the mounts it asked for, after
the requests in flight are answered. A :class:`~._notify.Notifier` tells the supervisor.

Two rules from the security model shape the request path:

- Any local user chooses the keys, so every key, program output and path reaches the log
  only through :func:`printable`, and failure lines are rate-limited.
- A bind mount's source can be on a file system that hangs (an autofs mount nobody answers,
  a dead NFS server). When the kernel can resolve the source from its caches alone
  (openat2 with RESOLVE_CACHED, which never blocks), it is bind-mounted inline; otherwise
  its ``exists()`` and mount(2) run in a worker thread, at most :data:`FOREIGN_THREADS` at
  once, under the request's deadline: at the deadline the thread is abandoned (the engine
  answers the requester) and a mount it makes later is undone.
"""

from __future__ import annotations

import errno
import grp
import logging
import os
import platform
import pwd
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from typing import TypeVar

import attrs
import trio

from .._maps._ldap import LdapMap, is_ldap_name, read_map_keys
from .._maps._program import MAX_PROGRAM_OUTPUT, ProgramMap
from .._maps._sources import load_map, parse_master_map, reload_map
from .._maps._sun import SunMap
from .._maps._types import MapEntry, MountSpec, OffsetMount
from .._proto._escape import printable
from .._sys._autofs import AutofsControl
from .._sys._mount import AutofsMode, MountFlags, UmountFlags, bind_fd, mount, umount2
from .._sys._mountinfo import autofs_mounts, read_mountinfo
from .._sys._resolve import open_dir_cached
from .._sys._trust import check_trusted
from ._automounter import Automounter, MountHandler
from ._control import ControlServer, control_socket_path
from ._helpers import bind_mount, mount_tmpfs, run_mount
from ._ldap import LdapPool
from ._notify import Notifier
from ._requests import ExpireRequest, MountRequest, Requester

__all__ = ["ServeConfig", "MountConfig", "serve", "config_from_master", "config_for_map"]

log = logging.getLogger("pyautofs")


@attrs.frozen
class MountConfig:
    """One autofs mount to serve from one map."""

    mount_point: str
    map_path: str
    direct: bool = False
    timeout: int = 600
    defaults: tuple[str, ...] = ()
    strictexpire: bool = False


@attrs.frozen
class ServeConfig:
    """Everything ``pyautofs serve`` serves."""

    mounts: tuple[MountConfig, ...]
    master: str | None = None
    takeover: bool = False
    negative_timeout: float = 10.0
    request_timeout: float = 60.0
    lock_dir: str = "/run/pyautofs"
    restored: Mapping[str, int] = attrs.field(factory=dict)
    """Mount point -> read end of its restored pipe (``serve --restore``): those mounts
    are served through that pipe as it is (``Automounter.add_mount(pipe_fd=...)``)."""


def config_for_map(mount_point: str, map_path: str, timeout: int = 600) -> list[MountConfig]:
    """The config of ``pyautofs serve MOUNTPOINT MAPFILE``."""
    if not is_ldap_name(map_path):
        map_path = os.path.abspath(map_path)
    return [MountConfig(os.path.abspath(mount_point), map_path, timeout=timeout)]


def config_from_master(master: str, default_timeout: int = 600) -> list[MountConfig]:
    """One MountConfig per indirect master line, and one per key of each direct map."""
    entries, _warnings = parse_master_map(master)
    out: list[MountConfig] = []
    for e in entries:
        timeout = default_timeout if e.timeout is None else e.timeout
        if not e.direct:
            out.append(
                MountConfig(e.mount_point, e.map_path, False, timeout, e.options, e.strictexpire)
            )
            continue
        try:
            m = load_map(e.map_path, defaults=e.options, direct=True)
        except OSError as exc:
            log.warning(
                "%s: direct map %s: %s", printable(master), printable(e.map_path), exc.strerror
            )
            continue
        if isinstance(m, ProgramMap):
            log.warning(
                "%s: direct program map %s is not supported",
                printable(master),
                printable(e.map_path),
            )
            continue
        try:
            keys = read_map_keys(m) if isinstance(m, LdapMap) else m.keys()
        except OSError as exc:
            log.warning("%s: direct map %s: %s", printable(master), printable(e.map_path), exc)
            continue
        seen = {mc.mount_point for mc in out}
        for key in keys:
            if key in seen:
                log.warning(
                    "%s: %s is in two maps; the first one serves it",
                    printable(master),
                    printable(key),
                )
                continue
            seen.add(key)
            out.append(MountConfig(key, e.map_path, True, timeout, e.options, e.strictexpire))
    return out


_UNAME = platform.uname()
_HOST_VARIABLES = {
    "HOST": _UNAME.node,
    "SHOST": _UNAME.node.split(".")[0],
    "ARCH": _UNAME.machine,
    "CPU": _UNAME.machine,
    "OSNAME": _UNAME.system,
    "OSREL": _UNAME.release,
    "OSVERS": _UNAME.version,
}


class _Variables(Mapping[str, str]):
    """The macros automount provides, for one requester, computed only when a map uses one.

    Most maps use none, and a passwd lookup per request would cost more than the mount.
    """

    __slots__ = ("_requester", "_values")

    def __init__(self, requester: Requester) -> None:
        self._requester = requester
        self._values: dict[str, str] | None = None

    def _all(self) -> dict[str, str]:
        if self._values is None:
            r = self._requester
            values = {"UID": str(r.uid), "GID": str(r.gid), **_HOST_VARIABLES}
            try:
                pw = pwd.getpwuid(r.uid)
                values["USER"], values["HOME"] = pw.pw_name, pw.pw_dir
            except KeyError:
                pass
            try:
                values["GROUP"] = grp.getgrgid(r.gid).gr_name
            except KeyError:
                pass
            self._values = values
        return self._values

    def __getitem__(self, name: str) -> str:
        return self._all()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())


FOREIGN_THREADS = 8
"""Worker threads that may block on a foreign file system at once (bind sources)."""
MAX_PROGRAM_STDERR = 4096
"""Bytes of a map program's stderr kept for the log; the rest is read and dropped."""
FAILURE_LOG_RATE = 10.0
"""Failed-lookup log lines per second, at most (bursts of :data:`FAILURE_LOG_BURST`)."""
FAILURE_LOG_BURST = 50

_T = TypeVar("_T")
_NO_SUCH_KEY = "no such key in the map"


class ProgramMapError(OSError):
    """A map program failed (exit status, signal, deadline, exec error): not "no such key".

    Its errno is ENOENT, so the requester sees what automount(8) gives it; the message and
    the log say what went wrong.
    """


class _RateLimit:
    """A token bucket for log lines a local user can cause; counts what it suppresses."""

    def __init__(self, rate: float = FAILURE_LOG_RATE, burst: int = FAILURE_LOG_BURST) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._last = time.monotonic()
        self.suppressed = 0

    def allow(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        self.suppressed += 1
        return False

    def take_suppressed(self) -> int:
        n, self.suppressed = self.suppressed, 0
        return n


class _ForeignCalls:
    """Runs calls that may block on a foreign file system in a bounded set of threads.

    A call still running when the caller's deadline passes is abandoned: the caller gets
    ``trio.Cancelled`` at once, the thread finishes (or stays stuck) on its own, and the
    call sees ``abandoned`` set so that it can undo what it does after that.
    """

    def __init__(self, threads: int = FOREIGN_THREADS) -> None:
        self.limiter = trio.CapacityLimiter(threads)
        self._lock = threading.Lock()
        self.abandoned_running = 0
        """Abandoned calls whose thread has not returned yet (stuck in the kernel)."""

    async def run(self, fn: Callable[[threading.Event], _T], what: str) -> _T:
        abandoned = threading.Event()

        def call() -> _T:
            try:
                return fn(abandoned)
            finally:
                if abandoned.is_set():
                    with self._lock:
                        self.abandoned_running -= 1
                    log.info("an abandoned %s returned", what)

        try:
            return await trio.to_thread.run_sync(call, abandon_on_cancel=True, limiter=self.limiter)
        except trio.Cancelled:
            with self._lock:
                abandoned.set()
                self.abandoned_running += 1
            log.warning(
                "%s did not return before the request's deadline; abandoned "
                "(%d abandoned call(s) still blocked)",
                what,
                self.abandoned_running,
            )
            raise


def _unmount_if_mounted(path: str) -> None:
    """Unmount what covers ``path`` (EINVAL, nothing mounted there, is not an error)."""
    try:
        umount2(path, UmountFlags.NOFOLLOW)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise


def _bind_blocking(abandoned: threading.Event, source: str, target: str, readonly: bool) -> None:
    if not os.path.exists(source):
        raise OSError(errno.ENOENT, f"{source} (from the map) does not exist", target)
    if abandoned.is_set():
        return
    bind_mount(source, target, readonly=readonly)
    if abandoned.is_set():
        # The requester was answered (ETIMEDOUT) while the source hung: undo, or the mount
        # would sit on a key the engine believes failed.
        umount2(target, UmountFlags.DETACH)


_PROC_FD = os.path.isdir("/proc/self/fd")


def _bind_from_cache(source: str, target: str, readonly: bool) -> bool:
    """Bind-mount ``source`` inline if the kernel resolves it from its caches alone.

    The O_PATH fd is what was resolved; the bind reaches it without walking the source's
    file system again: ``open_tree`` + ``move_mount`` on the fd (:func:`bind_fd`, the
    cheaper route), or mount(2) through /proc/self/fd, a magic link that jumps to it (for
    ``ro``, which needs a remount, and on kernels without ``open_tree``). False when the
    source is not all cached (or not a directory): the caller takes the thread path.
    """
    fd = open_dir_cached(source)
    if fd is None:
        return False
    try:
        if readonly or not bind_fd(fd, target):
            if not _PROC_FD:
                return False
            bind_mount(f"/proc/self/fd/{fd}", target, readonly=readonly)
    finally:
        os.close(fd)
    return True


async def _mount_spec(spec: MountSpec, target: str, foreign: _ForeignCalls) -> None:
    if spec.fstype == "bind":
        readonly = "ro" in spec.options
        source = spec.source
        if _bind_from_cache(source, target, readonly):
            return  # no walk could block: done inline, on the engine's fast path
        await foreign.run(
            lambda abandoned: _bind_blocking(abandoned, source, target, readonly),
            f"bind mount of {printable(source)}",
        )
    elif spec.fstype == "tmpfs":
        # No foreign path is walked: the target is a directory of our own autofs mount,
        # which the engine itself just made on its own thread.
        mount_tmpfs(target, ",".join(spec.options), source=spec.source or "tmpfs")
    else:
        await run_mount(target, spec.source, spec.fstype, spec.options)


async def _read_bounded(stream: trio.abc.ReceiveStream, limit: int) -> tuple[bytes, int]:
    """Up to ``limit`` bytes of ``stream`` (read to its end); and how many there were."""
    kept = bytearray()
    total = 0
    while True:
        chunk = await stream.receive_some(65536)
        if not chunk:
            return bytes(kept), total
        total += len(chunk)
        if len(kept) < limit:
            kept += chunk[: limit - len(kept)]


@attrs.frozen
class ProgramRun:
    """What one run of a map program did."""

    returncode: int | None
    """Exit status (negative: killed by that signal); None when it missed its deadline."""
    stdout: bytes
    stdout_total: int
    stderr: bytes
    stderr_total: int


async def run_program(argv: Sequence[str], env: Mapping[str, str], timeout: float) -> ProgramRun:
    """Run a map program with bounded output capture and a deadline (then SIGKILL).

    It runs in the engine's process group (so its path walks never trigger our own mounts)
    with stdin from /dev/null. An exec failure raises ``OSError``.
    """
    proc = await trio.lowlevel.open_process(
        list(argv),
        env=dict(env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out: tuple[bytes, int] = (b"", 0)
    err: tuple[bytes, int] = (b"", 0)
    try:
        assert proc.stdout is not None and proc.stderr is not None
        with trio.move_on_after(timeout) as scope:

            async def read_out() -> None:
                nonlocal out
                out = await _read_bounded(proc.stdout, MAX_PROGRAM_OUTPUT + 1)  # type: ignore[arg-type]

            async def read_err() -> None:
                nonlocal err
                err = await _read_bounded(proc.stderr, MAX_PROGRAM_STDERR)  # type: ignore[arg-type]

            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_out)
                nursery.start_soon(read_err)
            await proc.wait()
    finally:
        with trio.CancelScope(shield=True):
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    await stream.aclose()
    returncode = None if scope.cancelled_caught else proc.returncode
    return ProgramRun(returncode, out[0], out[1], err[0], err[1])


def exec_problem(path: str, exc: OSError) -> str:
    """Why a map program could not be started, in words (a missing ``#!`` interpreter...)."""
    if exc.errno == errno.ENOENT and os.path.exists(path):
        try:
            with open(path, "rb") as f:
                first = f.readline(512)
        except OSError:
            first = b""
        if first.startswith(b"#!"):
            words = first[2:].split()
            interpreter = words[0] if words else b""
            return f"its interpreter {printable(interpreter)} (from the #! line) " + (
                "does not exist" if interpreter else "is missing from the #! line"
            )
    if exc.errno == errno.ENOEXEC:
        return "not a valid executable (a script needs a #! line)"
    return exc.strerror or str(exc)


def _describe_run(run: ProgramRun, timeout: float) -> str:
    if run.returncode is None:
        what = f"no answer within {timeout:g} s; killed"
    elif run.returncode < 0:
        try:
            what = f"killed by {signal.Signals(-run.returncode).name}"
        except ValueError:
            what = f"killed by signal {-run.returncode}"
    elif run.stdout_total > MAX_PROGRAM_OUTPUT:
        what = f"printed {run.stdout_total} bytes, over the {MAX_PROGRAM_OUTPUT}-byte limit"
    else:
        what = f"exit status {run.returncode}"
    if run.stderr_total:
        cut = f" (of {run.stderr_total} bytes)" if run.stderr_total > len(run.stderr) else ""
        what += f"; stderr{cut}: {printable(run.stderr.strip(), 1024)}"
    return what


def _depth(path: str) -> int:
    return path.count("/")


def _enclosing_offset(offset: str, offsets: Sequence[str]) -> str:
    """The nearest offset of the same entry that contains ``offset`` (``"/"``: the key)."""
    best = "/"
    for o in offsets:
        if offset.startswith(o + "/") and len(o) > len(best):
            best = o
    return best


class MapServer:
    """Serves the mounts of a :class:`ServeConfig` with one :class:`Automounter`.

    A multi-mount entry (``key / :/x /sub :/y``) is served as automount(8) serves it: the
    root (if any) is mounted on the key, and each offset gets its own autofs trigger (an
    ``offset`` mount, registered with the same engine), which mounts its location only when
    something walks into it. Offsets inside offsets get their triggers once the enclosing
    offset is mounted. When the kernel expires the key, the offsets go first, deepest first.
    """

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.automounter = Automounter(
            takeover=config.takeover,
            negative_timeout=config.negative_timeout,
            request_timeout=config.request_timeout,
            lock_dir=config.lock_dir,
            unregistered_handler=self._handler_for_unregistered,
        )
        self.maps: dict[str, SunMap | ProgramMap | LdapMap] = {}
        self._restored = dict(config.restored)  # each restored pipe is served once
        self._ldap = LdapPool()
        self.mounts: dict[str, MountConfig] = {}
        self._entries: dict[str, MapEntry] = {}
        """Key path -> the multi-mount entry it was mounted from (for its offsets)."""
        self.foreign = _ForeignCalls()
        self._failure_log = _RateLimit()
        self.created_parents: list[str] = []
        """Directories made for mount points' parents, removed again at exit (if empty)."""
        # The direct mounts of one map share its parse: loading it once per mount point
        # would cost O(N^2) time and memory for N direct mounts.
        self._loading: dict[tuple[str, str, bool], SunMap | ProgramMap | LdapMap] | None = {}
        for mc in config.mounts:
            self._register(mc)
        self._loading = None
        for path, fd in self._restored.items():  # its map could not be read: not served
            log.warning("%s: restored mount not served; its pipe is closed", printable(path))
            os.close(fd)
        self._restored.clear()

    def _load(self, mc: MountConfig) -> SunMap | ProgramMap | LdapMap:
        if self._loading is None:
            return load_map(mc.map_path, defaults=mc.defaults, direct=mc.direct)
        key = (mc.map_path, repr(mc.defaults), mc.direct)
        loaded = self._loading.get(key)
        if loaded is None:
            loaded = self._loading[key] = load_map(
                mc.map_path, defaults=mc.defaults, direct=mc.direct
            )
        return loaded

    def _register(
        self, mc: MountConfig, loaded: SunMap | ProgramMap | LdapMap | OSError | None = None
    ) -> None:
        try:
            if isinstance(loaded, OSError):
                raise loaded
            self.maps[mc.mount_point] = self._load(mc) if loaded is None else loaded
        except OSError as exc:
            log.error(
                "%s: map %s cannot be read: %s; not served",
                printable(mc.mount_point),
                printable(mc.map_path),
                exc.strerror or exc,
            )
            return
        self._make_parents(mc.mount_point)
        self.mounts[mc.mount_point] = mc
        self.automounter.add_mount(
            mc.mount_point,
            self._on_missing,
            on_expire=self._on_expire,
            mode="direct" if mc.direct else "indirect",
            timeout=mc.timeout,
            strictexpire=mc.strictexpire,
            pipe_fd=self._restored.pop(mc.mount_point, None),
        )

    def _make_parents(self, mount_point: str) -> None:
        """Create the missing parents of ``mount_point`` (the engine makes the leaf)."""
        missing: list[str] = []
        parent = os.path.dirname(mount_point)
        while parent != "/" and not os.path.lexists(parent):
            missing.append(parent)
            parent = os.path.dirname(parent)
        for path in reversed(missing):
            try:
                os.mkdir(path, 0o755)
            except FileExistsError:
                continue
            except OSError as exc:
                log.warning("%s: parent directory not created: %s", printable(path), exc.strerror)
                return
            self.created_parents.append(path)

    def remove_created_parents(self) -> None:
        """Remove the parent directories :meth:`_make_parents` made, deepest first, if empty."""
        for path in sorted(self.created_parents, key=_depth, reverse=True):
            try:
                os.rmdir(path)
            except OSError as exc:
                log.info("%s: created parent directory kept: %s", printable(path), exc.strerror)
        self.created_parents.clear()

    async def _lookup(self, mount_point: str, key: str, requester: Requester) -> MapEntry | None:
        """The map entry for ``key``: None for no such key, ``ProgramMapError`` for a failure."""
        amap = self.maps[mount_point]
        variables = _Variables(requester)
        if isinstance(amap, ProgramMap):
            return await self._run_program_map(amap, key, variables)
        if isinstance(amap, LdapMap):
            return await self._ldap.lookup(amap, key, variables)
        return amap.lookup(key, variables)

    async def _run_program_map(
        self, amap: ProgramMap, key: str, variables: Mapping[str, str]
    ) -> MapEntry | None:
        command = amap.command(key, variables)
        if command is None:
            return None
        argv, env = command
        where = f"map program {printable(amap.path)} {printable(key)}"
        try:
            # It runs as root: never one that another user could have written or replaced
            # (checked on every run, since the file can change), and run what was checked.
            argv = [check_trusted(argv[0]), *argv[1:]]
        except OSError as exc:
            raise ProgramMapError(
                errno.ENOENT, f"{where}: not run: {printable(exc.strerror or str(exc))}"
            ) from None
        try:
            run = await run_program(argv, env, amap.timeout)
        except OSError as exc:
            problem = exec_problem(amap.path, exc)
            raise ProgramMapError(errno.ENOENT, f"{where}: cannot run: {problem}") from None
        if run.returncode != 0 or run.stdout_total > MAX_PROGRAM_OUTPUT:
            raise ProgramMapError(
                errno.ENOENT, f"{where} failed: {_describe_run(run, amap.timeout)}"
            )
        if run.stderr_total:
            log.info("%s wrote to stderr: %s", where, printable(run.stderr.strip(), 1024))
        return amap.parse_output(key, run.stdout, 0)

    def _log_why(self, request: MountRequest, exc: BaseException) -> None:
        """Why a lookup failed, when there is more to say than "no such key".

        The engine logs one line per mount, unmount and failure (key, requester, latency);
        this adds the reason a map gave: a map program's exit status and stderr (WARNING),
        a bind source that does not exist, mount(8)'s message. Rate-limited, like the
        engine's lines: any local user can cause failures.
        """
        if not isinstance(exc, OSError) or exc.strerror == _NO_SUCH_KEY:
            return
        if not self._failure_log.allow():
            return
        suppressed = self._failure_log.take_suppressed()
        log.log(
            logging.WARNING if isinstance(exc, ProgramMapError) else logging.INFO,
            "lookup of %s under %s for pid %d failed: %s%s",
            printable(request.key or request.path),
            printable(request.mount_point),
            request.requester.tgid,
            printable(exc.strerror or str(exc), 1200),
            f" ({suppressed} more reasons not logged)" if suppressed else "",
        )

    def _key_of(self, mount_point: str, key: str) -> str:
        return mount_point if self.mounts[mount_point].direct else key

    async def _on_missing(self, request: MountRequest) -> None:
        try:
            await self._mount_entry(request)
        except BaseException as exc:
            self._log_why(request, exc)
            raise

    async def _mount_entry(self, request: MountRequest) -> None:
        """Mount what the map says for ``request``."""
        mp = request.mount_point
        entry = await self._lookup(mp, self._key_of(mp, request.key), request.requester)
        if entry is None:
            raise OSError(errno.ENOENT, _NO_SUCH_KEY)
        root = entry.root
        if root is not None:
            await _mount_spec(root, request.path, self.foreign)
        if len(entry.mounts) == 1 and root is not None:
            return
        try:
            if root is not None:
                # Triggers mounted inside a bind of a shared mount would propagate back
                # into the source tree; keep them in this mount only.
                mount(None, request.path, None, MountFlags.PRIVATE)
            self._entries[request.path] = entry
            if not self._mount_triggers(request.path, entry, "/"):
                raise OSError(errno.ENOENT, "no offset of the entry could be set up")
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._unmount_tree(request.path)
            raise

    def _mount_triggers(self, key_path: str, entry: MapEntry, below: str) -> int:
        """Put an offset trigger on each offset directly below ``below``; how many went up."""
        offsets = [m.offset for m in entry.mounts if m.offset != "/"]
        count = 0
        for offset in offsets:
            if _enclosing_offset(offset, offsets) != below:
                continue
            target = key_path + offset
            try:
                self.automounter.add_mount(target, self._on_offset, mode=AutofsMode.OFFSET)
            except (OSError, ValueError) as exc:
                log.warning(
                    "%s: offset %s of %s not served: %s",
                    printable(key_path),
                    printable(offset),
                    printable(entry.key),
                    printable(str(exc)),
                )
                continue
            count += 1
        return count

    def _split_offset(self, path: str) -> tuple[str, str, str] | None:
        """(served mount point, key path, offset) of an offset trigger at ``path``."""
        mp = max(
            (p for p in self.mounts if path.startswith(p.rstrip("/") + "/")),
            key=len,
            default=None,
        )
        if mp is None:
            return None
        if self.mounts[mp].direct:
            return mp, mp, path[len(mp) :]
        key, _, rest = path[len(mp) + 1 :].partition("/")
        if not rest:
            return None
        return mp, f"{mp}/{key}", "/" + rest

    def _handler_for_unregistered(self, path: str, mode: AutofsMode) -> MountHandler | None:
        if mode is AutofsMode.OFFSET and self._split_offset(path) is not None:
            return self._on_offset
        return None

    async def _on_offset(self, request: MountRequest) -> None:
        """An offset trigger fired: mount that offset's location on it."""
        where = self._split_offset(request.path)
        if where is None:
            raise OSError(errno.ENOENT, "offset outside every served mount", request.path)
        mp, key_path, offset = where
        entry = self._entries.get(key_path)
        if entry is None:  # adopted, or handed over: resolve the entry again
            key = self._key_of(mp, key_path[len(mp) + 1 :])
            entry = await self._lookup(mp, key, request.requester)
            if entry is None:
                raise OSError(errno.ENOENT, "the key is no longer in the map", request.path)
            self._entries[key_path] = entry
        spec: OffsetMount | None = next((m for m in entry.mounts if m.offset == offset), None)
        if spec is None:
            raise OSError(errno.ENOENT, f"the entry has no offset {offset}", request.path)
        await _mount_spec(spec.spec, request.path, self.foreign)
        self._mount_triggers(key_path, entry, offset)

    async def _on_expire(self, request: ExpireRequest) -> None:
        """The kernel found the key idle: unmount its offsets (deepest first), then it."""
        try:
            await self._unmount_tree(request.path)
        except OSError as exc:
            if exc.errno != errno.EBUSY:  # busy is normal; the engine logs "kept (EBUSY)"
                log.warning("%s not unmounted: %s", printable(request.path), exc.strerror)
            raise

    async def _unmount_tree(self, key_path: str) -> None:
        """Unmount everything at and below ``key_path`` that serving it put there.

        Deepest first: what covers an offset, then the offset's trigger (through the
        engine, or directly for the leftovers of a dead server), then the enclosing mount.
        A busy mount raises EBUSY; the triggers of the offsets still reachable are put back,
        so nothing is lost and the key stays usable.

        A key whose entry this server mounted is taken down from the engine's own record
        (:meth:`~Automounter.triggers_below`), without reading mountinfo; one it adopted or
        was handed over (which may hold a dead server's triggers) is found in mountinfo.
        """
        if key_path in self._entries:
            await self._unmount_own_tree(key_path)
        else:
            await self._unmount_found_tree(key_path)
        self._entries.pop(key_path, None)
        if os.path.isdir(key_path):
            # No root mount: the offsets' directories were made in the autofs file system
            # itself; the key can only be looked up afresh once they are gone.
            for dirpath, _dirs, _files in os.walk(key_path, topdown=False):
                if dirpath != key_path:
                    try:
                        os.rmdir(dirpath)
                    except OSError:
                        pass

    async def _unmount_own_tree(self, key_path: str) -> None:
        engine = self.automounter
        try:
            for path, mounted in engine.triggers_below(key_path):
                if mounted:
                    _unmount_if_mounted(path)
                if not await engine.remove_mount(path):
                    raise OSError(errno.EBUSY, "an offset is in use", path)
            if engine.is_covered(key_path):
                umount2(key_path, UmountFlags.NOFOLLOW)
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                self._restore_triggers(key_path)
            raise

    async def _unmount_found_tree(self, key_path: str) -> None:
        infos = read_mountinfo()
        prefix = key_path.rstrip("/") + "/"
        below = [
            (i.mount_point, n, i.fstype)
            for n, i in enumerate(infos)
            if i.mount_point.startswith(prefix)
        ]
        # Deeper paths first; on one path, the mount on top (listed later) first.
        below.sort(key=lambda t: (_depth(t[0]), t[1]), reverse=True)
        served = set(self.automounter.mount_points)
        try:
            for path, _, fstype in below:
                if fstype != "autofs":
                    umount2(path, UmountFlags.NOFOLLOW)
                elif path in served:
                    if not await self.automounter.remove_mount(path):
                        raise OSError(errno.EBUSY, "an offset is in use", path)
                else:
                    umount2(path, UmountFlags.DETACH | UmountFlags.NOFOLLOW)
            if any(i.mount_point == key_path and i.fstype != "autofs" for i in infos):
                umount2(key_path, UmountFlags.NOFOLLOW)
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                self._restore_triggers(key_path)
            raise

    def _restore_triggers(self, key_path: str) -> None:
        """After a refused expire: triggers back on every offset whose parent is mounted."""
        entry = self._entries.get(key_path)
        if entry is None:
            return
        covered = {i.mount_point for i in read_mountinfo() if i.fstype != "autofs"}
        offsets = [m.offset for m in entry.mounts if m.offset != "/"]
        for below in ("/", *sorted(offsets, key=_depth)):
            if below == "/":
                if entry.root is not None and key_path not in covered:
                    continue
            elif key_path + below not in covered:
                continue
            for offset in offsets:
                target = key_path + offset
                if (
                    _enclosing_offset(offset, offsets) == below
                    and target not in self.automounter.mount_points
                ):
                    try:
                        self.automounter.add_mount(target, self._on_offset, mode=AutofsMode.OFFSET)
                    except (OSError, ValueError) as exc:
                        log.warning(
                            "%s: offset trigger not restored: %s",
                            printable(target),
                            printable(str(exc)),
                        )

    async def release_requested(self) -> list[str]:
        """Let another engine take the mounts it asked for, offsets below them first."""
        asked = self.automounter.takeover_requests()
        for mp in asked:
            for offset in sorted(
                (p for p in self.automounter.mount_points if p.startswith(mp.rstrip("/") + "/")),
                key=_depth,
                reverse=True,
            ):
                await self.automounter.release(offset)
        return await self.automounter.release_requested()

    def forget(self, mount_point: str) -> None:
        """Stop tracking a mount another engine now serves."""
        self.mounts.pop(mount_point, None)
        self.maps.pop(mount_point, None)
        prefix = mount_point.rstrip("/") + "/"
        for key_path in [k for k in self._entries if k.startswith(prefix) or k == mount_point]:
            del self._entries[key_path]

    async def adopt_offsets(self) -> None:
        """Adopt the offset triggers a dead server left under the served mounts."""
        served = set(self.automounter.mount_points)
        for info in read_mountinfo():
            if info.fstype != "autofs" or info.mount_point in served:
                continue
            if "offset" not in info.super_options:
                continue
            if self._split_offset(info.mount_point) is None:
                continue
            try:
                self.automounter.add_mount(
                    info.mount_point, self._on_offset, mode=AutofsMode.OFFSET
                )
            except (OSError, ValueError) as exc:
                log.warning(
                    "%s: offset trigger not adopted: %s",
                    printable(info.mount_point),
                    printable(str(exc)),
                )
        await trio.lowlevel.checkpoint()

    async def reload(self) -> None:
        """SIGHUP: re-read every map, off the event loop (lookups go on meanwhile), and
        forget failed lookups (a key just added to a map must not keep failing)."""
        current = dict(self.maps)
        fresh = await trio.to_thread.run_sync(_reread_maps, current, dict(self.mounts))
        for mp, amap in fresh.items():
            if mp in self.maps and self.maps[mp] is current[mp]:
                self.maps[mp] = amap
        self.automounter.clear_negative()
        log.info("maps re-read; failed lookups forgotten")

    async def reload_master(self) -> None:
        """Add mounts a changed master map names, remove the ones it no longer names."""
        if self.config.master is None:
            await self.reload()
            return
        try:
            configs = await trio.to_thread.run_sync(config_from_master, self.config.master)
        except OSError as exc:
            log.error(
                "master map %s cannot be re-read: %s; keeping the mounts",
                printable(str(exc.filename)),
                exc.strerror or exc,
            )
            await self.reload()
            return
        wanted = {mc.mount_point: mc for mc in configs}
        for mp in list(self.mounts):
            if mp not in wanted:
                for offset in sorted(
                    (p for p in self.automounter.mount_points if p.startswith(mp + "/")),
                    key=_depth,
                    reverse=True,
                ):
                    await self.automounter.remove_mount(offset)
                del self.mounts[mp]
                self.maps.pop(mp, None)
                await self.automounter.remove_mount(mp)
                log.info("%s: no longer in the master map; removed", printable(mp))
        new = [mc for mp, mc in wanted.items() if mp not in self.mounts]
        loaded = await trio.to_thread.run_sync(_load_maps, new)
        for mc in new:
            self._register(mc, loaded.get(mc.mount_point))
        await self.reload()


def _reread_maps(
    maps: dict[str, SunMap | ProgramMap | LdapMap], mounts: dict[str, MountConfig]
) -> dict[str, SunMap | ProgramMap | LdapMap]:
    """The maps that changed, re-read (in a worker thread); a failed one keeps the old."""
    out = {}
    for mp, amap in maps.items():
        try:
            new = reload_map(amap)
        except OSError as exc:
            mc = mounts.get(mp)
            log.error(
                "%s: map %s cannot be re-read: %s; keeping the old one",
                printable(mp),
                printable(mc.map_path) if mc else "?",
                exc.strerror or exc,
            )
            continue
        if new is not amap:
            out[mp] = new
    return out


def _load_maps(configs: list[MountConfig]) -> dict[str, SunMap | ProgramMap | LdapMap | OSError]:
    """Each config's map read and parsed (in a worker thread), or why it could not be."""
    out: dict[str, SunMap | ProgramMap | LdapMap | OSError] = {}
    for mc in configs:
        try:
            out[mc.mount_point] = load_map(mc.map_path, defaults=mc.defaults, direct=mc.direct)
        except OSError as exc:
            out[mc.mount_point] = exc
    return out


_CONTROL_SIGNALS = (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
_STATUS_EVERY = 5.0


def _status(server: MapServer) -> str:
    st = server.automounter.statistics()
    return (
        f"serving {st.mounts} autofs mount(s); {st.mounted_keys} key(s) mounted; "
        f"{st.requests} lookup(s), {st.failed} failed, {st.in_flight} in flight"
    )


def _make_catatonic(paths: Sequence[str]) -> int:
    """CATATONIC on each autofs mount at ``paths``: every process waiting on it is woken
    with ENOENT (a forced exit answers nothing else). Returns how many went catatonic."""
    wanted = set(paths)
    done = 0
    try:
        with AutofsControl.open() as ctl:
            for m in autofs_mounts():
                if m.mount_point not in wanted or m.catatonic:
                    continue
                try:
                    fd = ctl.openmount(m.mount_point, m.dev)
                    try:
                        ctl.catatonic(fd)
                    finally:
                        os.close(fd)
                except OSError as exc:
                    log.warning("%s: not made catatonic: %s", printable(m.mount_point), exc)
                    continue
                done += 1
    except OSError as exc:
        log.warning("mounts not made catatonic: %s", exc)
    return done


def successor_env(environ: Mapping[str, str], pid: int) -> dict[str, str]:
    """The environment of an upgrade's successor.

    systemd's watchdog names its process in WATCHDOG_PID; once this process has sent
    MAINPID= for its successor, the successor is the one to feed it, so a WATCHDOG_PID that
    names this process is dropped (unset, it means "whoever reads it"). The rest, with
    NOTIFY_SOCKET and WATCHDOG_USEC, passes on as it is.
    """
    env = dict(environ)
    if env.get("WATCHDOG_PID") == str(pid):
        del env["WATCHDOG_PID"]
    return env


class _Serving:
    """The signal loop of one :func:`serve` run, and what it knows about the run's phase."""

    def __init__(
        self,
        server: MapServer,
        argv: Sequence[str],
        env: Mapping[str, str] | None,
        notifier: Notifier,
    ) -> None:
        self.server = server
        self.argv = argv
        self.env = env
        self.notifier = notifier
        self.stopping = False
        self.upgrading = False
        self.handed_over = False

    async def heartbeat(self) -> None:
        """WATCHDOG=1 at half the watchdog timeout, and STATUS= when the counts change."""
        interval = self.notifier.watchdog_interval
        last = ""
        while True:
            await trio.sleep(min(interval or _STATUS_EVERY, _STATUS_EVERY))
            if interval is not None:
                self.notifier.watchdog()
            if not self.stopping:
                status = _status(self.server)
                if status != last:
                    self.notifier.status(status)
                    last = status

    def left_behind(self) -> str:
        """What a forced exit leaves, in words."""
        am = self.server.automounter
        st = am.statistics()
        stuck = self.server.foreign.abandoned_running
        parts = [
            f"{st.in_flight} request(s) in flight",
            f"{st.mounted_keys} key(s) mounted",
            f"{len(am.mount_points)} autofs mount(s): "
            + (" ".join(printable(p) for p in am.mount_points[:10]) or "none")
            + (" ..." if len(am.mount_points) > 10 else ""),
        ]
        if stuck:
            parts.append(f"{stuck} mount call(s) blocked in the kernel")
        return "; ".join(parts)

    async def _upgrade(self) -> None:
        am = self.server.automounter
        try:
            env = successor_env(os.environ if self.env is None else self.env, os.getpid())
            pid = await am.hand_over([sys.executable, "-m", "pyautofs", *self.argv], env=env)
        except RuntimeError as exc:  # the engine refuses (shutting down, or already handing over)
            log.warning("SIGUSR2: no upgrade: %s", exc)
            pid = None
        finally:
            self.upgrading = False
        if pid is not None:
            self.handed_over = True
            self.notifier.main_pid(pid)
            log.info("handed over to pid %d; exiting", pid)
            if self.stopping:
                # The shutdown asked for during the upgrade is the successor's to do now.
                log.info("passing the shutdown asked for during the upgrade on to pid %d", pid)
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        elif self.stopping:
            am.stop()

    async def handle_signals(self, signals: AsyncIterator[int], nursery: trio.Nursery) -> None:
        am = self.server.automounter
        async for signum in signals:
            name = signal.Signals(signum).name
            if signum in (signal.SIGTERM, signal.SIGINT):
                if self.stopping:
                    log.warning(
                        "second %s: forcing the exit; left behind: %s", name, self.left_behind()
                    )
                    released = _make_catatonic(am.mount_points)
                    log.warning(
                        "%d autofs mount(s) made catatonic: waiting lookups fail with ENOENT "
                        "now, and the next pyautofs serve adopts the mounts and their keys",
                        released,
                    )
                    for handler in logging.getLogger("pyautofs").handlers:
                        handler.flush()
                    os._exit(128 + signum)
                self.stopping = True
                self.notifier.stopping()
                if self.upgrading:
                    log.info("%s: shutting down once the upgrade in progress has ended", name)
                    continue
                log.info("%s: shutting down (send %s again to force the exit)", name, name)
                am.stop()
            elif self.stopping:
                log.info("%s ignored: shutting down", name)
            elif signum == signal.SIGHUP:
                if self.upgrading:
                    log.info("SIGHUP ignored: an upgrade is in progress")
                    continue
                self.notifier.reloading()
                await self.server.reload_master()
                self.notifier.ready(_status(self.server))
            elif signum == signal.SIGUSR1:
                # Another engine (``serve --takeover``) asks for some of our mounts.
                for path in await self.server.release_requested():
                    self.server.forget(path)
                if not am.mount_points:
                    log.info("every mount was taken over by another engine; exiting")
                    self.handed_over = True
                    am.stop()
            elif signum == signal.SIGUSR2:
                if self.upgrading:
                    log.warning("SIGUSR2 ignored: an upgrade is already in progress")
                    continue
                self.upgrading = True
                log.info("SIGUSR2: upgrading (handing every mount to a new process)")
                nursery.start_soon(self._upgrade)


async def serve(
    config: ServeConfig,
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    notifier: Notifier | None = None,
) -> int:
    """Serve until SIGTERM/SIGINT (or an upgrade, or a takeover); returns the exit status.

    ``notifier`` hears READY=1 once every mount is live, STATUS= as the counts change,
    RELOADING=1 on SIGHUP and STOPPING=1 at shutdown; its watchdog is fed while the event
    loop runs.
    """
    notifier = notifier or Notifier()
    # A signal that arrives after the receiver below is closed is re-raised by trio; for
    # these, whose default action is to die, ignoring it then is what is meant.
    saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in _CONTROL_SIGNALS}
    server: MapServer | None = None
    serving: _Serving | None = None
    try:
        server = MapServer(config)
        if not server.mounts:
            log.error("nothing to serve")
            return 1
        am = server.automounter
        serving = _Serving(server, argv, env, notifier)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, *_CONTROL_SIGNALS) as sigs:
            async with trio.open_nursery() as nursery:

                async def engine(task_status: trio.TaskStatus[Automounter]) -> None:
                    try:
                        await am.run(task_status=task_status)
                    finally:
                        nursery.cancel_scope.cancel()

                nursery.start_soon(serving.handle_signals, sigs, nursery)
                await nursery.start(engine)
                await _start_control(nursery, am, config.lock_dir)
                await server.adopt_offsets()
                log.info("serving %d autofs mount(s); pid %d", len(server.mounts), os.getpid())
                notifier.ready(_status(server))
                nursery.start_soon(serving.heartbeat)
    finally:
        if server is not None and not (serving is not None and serving.handed_over):
            server.remove_created_parents()
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    return 0


async def _start_control(nursery: trio.Nursery, am: Automounter, lock_dir: str) -> None:
    """The control socket (pause/resume expiry for a checkpoint); serving goes on without."""
    try:
        await nursery.start(ControlServer(am, control_socket_path(lock_dir)).run)
    except OSError as exc:
        log.warning("no control socket (criu-hook cannot pause expiry): %s", exc)


def run_serve(config: ServeConfig, argv: Sequence[str], *, notifier: Notifier | None = None) -> int:
    """Run :func:`serve` in a fresh trio event loop (for the command line)."""
    notifier = notifier or Notifier()
    try:
        return trio.run(lambda: serve(config, argv, notifier=notifier))
    finally:
        notifier.close()
