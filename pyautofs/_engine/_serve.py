"""``pyautofs serve``: an Automounter driven by autofs maps.

Maps come from ``_maps``; this module turns a lookup into mounts (bind and tmpfs through
mount(2), anything else through mount(8) in the engine's process group) and handles the
signals: SIGTERM/SIGINT shut down gracefully, SIGHUP re-reads the maps, SIGUSR2 hands every
mount to a successor started from the code on disk now (zero-downtime upgrade).
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

from .._maps._sun import MapEntry, MountSpec, ProgramMap, SunMap, load_map, parse_master_map
from ._automounter import Automounter
from ._helpers import bind_mount, mount_tmpfs, run_mount
from ._requests import MountRequest, Requester

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
    return [MountConfig(os.path.abspath(mount_point), os.path.abspath(map_path), timeout=timeout)]


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
        if isinstance(m, ProgramMap):
            log.warning("%s: direct program map %s is not supported", master, e.map_path)
            continue
        for key in m.keys():  # noqa: SIM118 - a SunMap, not a dict
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
        readonly = "ro" in spec.options
        bind_mount(spec.source, target, readonly=readonly)
    elif spec.fstype == "tmpfs":
        mount_tmpfs(target, ",".join(spec.options), source=spec.source or "tmpfs")
    else:
        await run_mount(target, spec.source, spec.fstype, spec.options)


class MapServer:
    """Serves the mounts of a :class:`ServeConfig` with one :class:`Automounter`."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.automounter = Automounter(
            takeover=config.takeover,
            negative_timeout=config.negative_timeout,
            request_timeout=config.request_timeout,
            lock_dir=config.lock_dir,
        )
        self.maps: dict[str, SunMap | ProgramMap] = {}
        self.mounts: dict[str, MountConfig] = {}
        for mc in config.mounts:
            self._register(mc)

    def _load(self, mc: MountConfig) -> SunMap | ProgramMap:
        return load_map(mc.map_path, defaults=mc.defaults, direct=mc.direct)

    def _register(self, mc: MountConfig) -> None:
        try:
            self.maps[mc.mount_point] = self._load(mc)
        except OSError as exc:
            log.error("%s: map %s cannot be read: %s; not served", mc.mount_point, mc.map_path, exc)
            return
        self.mounts[mc.mount_point] = mc
        self.automounter.add_mount(
            mc.mount_point,
            self._on_missing,
            mode="direct" if mc.direct else "indirect",
            timeout=mc.timeout,
            strictexpire=mc.strictexpire,
        )

    async def _lookup(self, request: MountRequest) -> MapEntry | None:
        amap = self.maps[request.mount_point]
        key = request.mount_point if self.mounts[request.mount_point].direct else request.key
        variables = _Variables(request.requester)
        if isinstance(amap, ProgramMap):
            argv, env = amap.command(key, variables)
            with trio.move_on_after(amap.timeout) as scope:
                done = await trio.run_process(
                    argv, env=env, check=False, capture_stdout=True, capture_stderr=True, stdin=b""
                )
            if scope.cancelled_caught:
                log.warning(
                    "program map %s %s: no answer within %s s", amap.path, key, amap.timeout
                )
                return None
            return amap.parse_output(key, done.stdout, done.returncode, variables)
        return amap.lookup(key, variables)

    async def _on_missing(self, request: MountRequest) -> None:
        entry = await self._lookup(request)
        if entry is None:
            raise OSError(errno.ENOENT, "no such key in the map", request.path)
        root = entry.root
        if root is None:
            raise OSError(
                errno.ENOENT,
                "multi-mount entries without a root mount are not served",
                request.path,
            )
        if len(entry.mounts) > 1:
            log.warning(
                "%s: offsets of multi-mount entry %r are not served; root only",
                request.mount_point,
                entry.key,
            )
        await _mount_spec(root, request.path)

    def reload(self) -> None:
        """SIGHUP: re-read every map (and the master map's list of mounts)."""
        for mp, mc in self.mounts.items():
            try:
                self.maps[mp] = self.maps[mp].reload()
            except OSError as exc:
                log.error(
                    "%s: map %s cannot be re-read: %s; keeping the old one", mp, mc.map_path, exc
                )
        log.info("maps re-read")

    async def reload_master(self) -> None:
        """Add mounts a changed master map names, remove the ones it no longer names."""
        if self.config.master is None:
            self.reload()
            return
        wanted = {mc.mount_point: mc for mc in config_from_master(self.config.master)}
        for mp in list(self.mounts):
            if mp not in wanted:
                del self.mounts[mp]
                self.maps.pop(mp, None)
                await self.automounter.remove_mount(mp)
                log.info("%s: no longer in the master map; removed", mp)
        for mp, mc in wanted.items():
            if mp not in self.mounts:
                self._register(mc)
        self.reload()


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
        signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2
    ) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(am.run)
            log.info("serving %d autofs mount(s); pid %d", len(server.mounts), os.getpid())
            async for signum in signals:
                if signum in (signal.SIGTERM, signal.SIGINT):
                    log.info("%s: shutting down", signal.Signals(signum).name)
                    am.stop()
                    break
                if signum == signal.SIGHUP:
                    await server.reload_master()
                elif signum == signal.SIGUSR2:
                    pid = await am.hand_over([sys.executable, "-m", "pyautofs", *argv], env=env)
                    if pid is not None:
                        log.info("handed over to pid %d; exiting", pid)
                        break
    return 0


def run_serve(config: ServeConfig, argv: Sequence[str]) -> int:
    """Run :func:`serve` in a fresh trio event loop (for the command line)."""
    return trio.run(serve, config, argv)
