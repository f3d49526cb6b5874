"""``pyautofs serve``: an Automounter driven by autofs maps.

Maps come from ``_maps``; this module turns a lookup into mounts (bind and tmpfs through
mount(2), anything else through mount(8) in the engine's process group) and handles the
signals: SIGTERM/SIGINT shut down gracefully, SIGHUP re-reads the maps, SIGUSR2 hands every
mount to a successor started from the code on disk now (zero-downtime upgrade), and SIGUSR1
(sent by ``pyautofs serve --takeover`` in another session) lets another engine take the
mounts it asked for, after the requests in flight are answered.
"""

from __future__ import annotations

import errno
import grp
import logging
import os
import platform
import pwd
import signal
import sys
from collections.abc import Iterator, Mapping, Sequence

import attrs
import trio

from .._maps._ldap import LdapMap, is_ldap_name
from .._maps._program import ProgramMap
from .._maps._sources import load_map, parse_master_map, reload_map
from .._maps._sun import SunMap
from .._maps._types import MapEntry, MountSpec, OffsetMount
from .._sys._mount import AutofsMode, MountFlags, UmountFlags, mount, umount2
from .._sys._mountinfo import read_mountinfo
from ._automounter import Automounter, MountHandler
from ._helpers import bind_mount, mount_tmpfs, run_mount
from ._ldap import LdapPool
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
            log.warning("%s: direct map %s: %s", master, e.map_path, exc)
            continue
        if not isinstance(m, SunMap):
            kind = "program" if isinstance(m, ProgramMap) else "LDAP"
            log.warning("%s: direct %s map %s is not supported", master, kind, e.map_path)
            continue
        for key in m.keys():  # noqa: SIM118 - a SunMap, not a dict
            if any(mc.mount_point == key for mc in out):
                log.warning("%s: %s is in two maps; the first one serves it", master, key)
                continue
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


async def _mount_spec(spec: MountSpec, target: str) -> None:
    if spec.fstype == "bind":
        if not os.path.exists(spec.source):
            raise OSError(errno.ENOENT, f"{spec.source} (from the map) does not exist", target)
        readonly = "ro" in spec.options
        bind_mount(spec.source, target, readonly=readonly)
    elif spec.fstype == "tmpfs":
        mount_tmpfs(target, ",".join(spec.options), source=spec.source or "tmpfs")
    else:
        await run_mount(target, spec.source, spec.fstype, spec.options)


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
        self._ldap = LdapPool()
        self.mounts: dict[str, MountConfig] = {}
        self._entries: dict[str, MapEntry] = {}
        """Key path -> the multi-mount entry it was mounted from (for its offsets)."""
        for mc in config.mounts:
            self._register(mc)

    def _load(self, mc: MountConfig) -> SunMap | ProgramMap | LdapMap:
        return load_map(mc.map_path, defaults=mc.defaults, direct=mc.direct)

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
                mc.mount_point,
                mc.map_path,
                exc.strerror or exc,
            )
            return
        self.mounts[mc.mount_point] = mc
        self.automounter.add_mount(
            mc.mount_point,
            self._on_missing,
            on_expire=self._on_expire,
            mode="direct" if mc.direct else "indirect",
            timeout=mc.timeout,
            strictexpire=mc.strictexpire,
        )

    async def _lookup(self, mount_point: str, key: str, requester: Requester) -> MapEntry | None:
        amap = self.maps[mount_point]
        variables = _Variables(requester)
        if isinstance(amap, ProgramMap):
            command = amap.command(key, variables)
            if command is None:
                return None
            argv, env = command
            with trio.move_on_after(amap.timeout) as scope:
                done = await trio.run_process(
                    argv, env=env, check=False, capture_stdout=True, capture_stderr=True, stdin=b""
                )
            if scope.cancelled_caught:
                log.warning(
                    "program map %s %s: no answer within %s s", amap.path, key, amap.timeout
                )
                return None
            return amap.parse_output(key, done.stdout, done.returncode)
        if isinstance(amap, LdapMap):
            return await self._ldap.lookup(amap, key, variables)
        return amap.lookup(key, variables)

    def _key_of(self, mount_point: str, key: str) -> str:
        return mount_point if self.mounts[mount_point].direct else key

    async def _on_missing(self, request: MountRequest) -> None:
        mp = request.mount_point
        entry = await self._lookup(mp, self._key_of(mp, request.key), request.requester)
        if entry is None:
            raise OSError(errno.ENOENT, "no such key in the map", request.path)
        root = entry.root
        if root is not None:
            await _mount_spec(root, request.path)
        if len(entry.mounts) == 1 and root is not None:
            return
        try:
            if root is not None:
                # Triggers mounted inside a bind of a shared mount would propagate back
                # into the source tree; keep them in this mount only.
                mount(None, request.path, None, MountFlags.PRIVATE)
            self._entries[request.path] = entry
            if not self._mount_triggers(request.path, entry, "/"):
                raise OSError(errno.ENOENT, "no offset of the entry could be set up", request.path)
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
                log.warning("%s: offset %s of %r not served: %s", key_path, offset, entry.key, exc)
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
        await _mount_spec(spec.spec, request.path)
        self._mount_triggers(key_path, entry, offset)

    async def _on_expire(self, request: ExpireRequest) -> None:
        """The kernel found the key idle: unmount its offsets (deepest first), then it."""
        await self._unmount_tree(request.path)

    async def _unmount_tree(self, key_path: str) -> None:
        """Unmount everything at and below ``key_path`` that serving it put there.

        Deepest first: what covers an offset, then the offset's trigger (through the
        engine, or directly for the leftovers of a dead server), then the enclosing mount.
        A busy mount raises EBUSY; the triggers of the offsets still reachable are put back,
        so nothing is lost and the key stays usable.
        """
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
                        log.warning("%s: offset trigger not restored: %s", target, exc)

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
        for info in read_mountinfo():
            if info.fstype != "autofs" or info.mount_point in self.automounter.mount_points:
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
                log.warning("%s: offset trigger not adopted: %s", info.mount_point, exc)
        await trio.lowlevel.checkpoint()

    async def reload(self) -> None:
        """SIGHUP: re-read every map, off the event loop (lookups go on meanwhile)."""
        current = dict(self.maps)
        fresh = await trio.to_thread.run_sync(_reread_maps, current, dict(self.mounts))
        for mp, amap in fresh.items():
            if mp in self.maps and self.maps[mp] is current[mp]:
                self.maps[mp] = amap
        log.info("maps re-read")

    async def reload_master(self) -> None:
        """Add mounts a changed master map names, remove the ones it no longer names."""
        if self.config.master is None:
            await self.reload()
            return
        try:
            configs = await trio.to_thread.run_sync(config_from_master, self.config.master)
        except OSError as exc:
            log.error("master map %s cannot be re-read: %s; keeping the mounts", exc.filename, exc)
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
                log.info("%s: no longer in the master map; removed", mp)
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
                mp,
                mc.map_path if mc else "?",
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


async def serve(
    config: ServeConfig, argv: Sequence[str], *, env: Mapping[str, str] | None = None
) -> int:
    """Serve until SIGTERM/SIGINT; returns the exit status."""
    server = MapServer(config)
    if not server.mounts:
        log.error("nothing to serve")
        return 1
    am = server.automounter
    with trio.open_signal_receiver(
        signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2
    ) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(am.run)
            await server.adopt_offsets()
            log.info("serving %d autofs mount(s); pid %d", len(server.mounts), os.getpid())
            async for signum in signals:
                if signum in (signal.SIGTERM, signal.SIGINT):
                    log.info("%s: shutting down", signal.Signals(signum).name)
                    am.stop()
                    break
                if signum == signal.SIGHUP:
                    await server.reload_master()
                elif signum == signal.SIGUSR1:
                    # Another engine (``serve --takeover``) asks for some of our mounts.
                    for path in await server.release_requested():
                        server.forget(path)
                    if not am.mount_points:
                        log.info("every mount was taken over by another engine; exiting")
                        break
                elif signum == signal.SIGUSR2:
                    pid = await am.hand_over([sys.executable, "-m", "pyautofs", *argv], env=env)
                    if pid is not None:
                        log.info("handed over to pid %d; exiting", pid)
                        break
    return 0


def run_serve(config: ServeConfig, argv: Sequence[str]) -> int:
    """Run :func:`serve` in a fresh trio event loop (for the command line)."""
    return trio.run(serve, config, argv)
