"""What ``pyautofs serve`` serves: :class:`MountConfig` and :class:`ServeConfig`, made from a
map or a master map.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import attrs

from .._maps._ldap import LdapMap, is_ldap_name, read_map_keys
from .._maps._program import ProgramMap
from .._maps._sources import load_map, parse_master_map
from .._proto._escape import printable

__all__ = ["MountConfig", "ServeConfig", "config_for_map", "config_from_master"]

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
