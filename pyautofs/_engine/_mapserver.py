"""The :class:`MapServer`: one :class:`~._automounter.Automounter` serving the mounts of a
:class:`~._serve_config.ServeConfig` from their maps, multi-mount entries and their offset
triggers included.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Mapping, Sequence

import trio

from .._maps._ldap import LdapMap
from .._maps._program import MAX_PROGRAM_OUTPUT, ProgramMap
from .._maps._sources import load_map, reload_map
from .._maps._sun import SunMap
from .._maps._types import MapEntry, OffsetMount
from .._proto._escape import printable
from .._sys._mount import AutofsMode, MountFlags, UmountFlags, mount, umount2
from .._sys._mountinfo import read_mountinfo
from .._sys._trust import check_trusted
from ._automounter import Automounter, MountHandler
from ._ldap import LdapPool
from ._requests import ExpireRequest, MountRequest, Requester
from ._serve_config import MountConfig, ServeConfig, config_from_master
from ._serve_lookup import ProgramMapError, Variables, describe_run, exec_problem, run_program
from ._serve_mounts import ForeignCalls, mount_spec, unmount_if_mounted

__all__ = ["FAILURE_LOG_BURST", "FAILURE_LOG_RATE", "MapServer"]

log = logging.getLogger("pyautofs")


FAILURE_LOG_RATE = 10.0
"""Failed-lookup log lines per second, at most (bursts of :data:`FAILURE_LOG_BURST`)."""
FAILURE_LOG_BURST = 50

_NO_SUCH_KEY = "no such key in the map"


class RateLimit:
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
        self.automounter: Automounter = Automounter(
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
        self.foreign: ForeignCalls = ForeignCalls()
        self._failure_log = RateLimit()
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
        variables = Variables(requester)
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
                errno.ENOENT, f"{where} failed: {describe_run(run, amap.timeout)}"
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
            await mount_spec(root, request.path, self.foreign)
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
        await mount_spec(spec.spec, request.path, self.foreign)
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
                    unmount_if_mounted(path)
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
