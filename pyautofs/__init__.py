"""pyautofs: the Linux autofs protocol and file-descriptor passing.

This module is the everyday API; it only re-exports. The raw kernel bindings are in
:mod:`pyautofs.lowlevel`.
"""

from __future__ import annotations

from ._proto._moved import Getattr as _Getattr
from ._proto._moved import moved_names as _moved_names

__version__ = "0.1.0"

# -- the automount engine (_engine)
from ._engine._automounter import Automounter as Automounter
from ._engine._automounter import ExpireHandler as ExpireHandler
from ._engine._automounter import MountHandler as MountHandler
from ._engine._automounter import MountPointBusyError as MountPointBusyError
from ._engine._fdchannel import FdChannel as FdChannel
from ._engine._helpers import bind_mount as bind_mount
from ._engine._helpers import mount_tmpfs as mount_tmpfs
from ._engine._helpers import run_mount as run_mount
from ._engine._helpers import unmount as unmount
from ._engine._requests import AutomounterStatistics as AutomounterStatistics
from ._engine._requests import ExpireRequest as ExpireRequest
from ._engine._requests import MountRequest as MountRequest
from ._engine._requests import Requester as Requester

# -- serving autofs maps with an Automounter (what `pyautofs serve` runs)
from ._engine._serve import MapServer as MapServer
from ._engine._serve import MountConfig as MountConfig
from ._engine._serve import ServeConfig as ServeConfig
from ._engine._serve import config_for_map as config_for_map
from ._engine._serve import config_from_master as config_from_master
from ._maps._include import Included as Included
from ._maps._ldap import LdapMap as LdapMap
from ._maps._ldap import LdapSchema as LdapSchema
from ._maps._ldap import LdapSettings as LdapSettings

# -- autofs maps (_maps)
from ._maps._master import MasterEntry as MasterEntry
from ._maps._program import ProgramMap as ProgramMap
from ._maps._sources import load_map as load_map
from ._maps._sources import parse_master_map as parse_master_map
from ._maps._sun import CompiledEntry as CompiledEntry
from ._maps._sun import SunMap as SunMap
from ._maps._sun import parse_sun_map as parse_sun_map
from ._maps._types import MapEntry as MapEntry
from ._maps._types import MapWarning as MapWarning
from ._maps._types import MountSpec as MountSpec
from ._maps._types import OffsetMount as OffsetMount

# -- errors: the roots of bad input (FormatError) and broken peers (ProtocolError)
from ._proto._errors import FormatError as FormatError
from ._proto._errors import ProtocolError as ProtocolError
from ._sys._closefds import close_fds as close_fds

# -- the mode of an autofs mount (Automounter.add_mount(mode=), mount images)
from ._sys._mount import AutofsMode as AutofsMode

# -- fd passing (_sys._scm)
from ._sys._scm import FdPassError as FdPassError
from ._sys._scm import PeerCredentials as PeerCredentials
from ._sys._scm import peer_credentials as peer_credentials
from ._sys._scm import recv_fds as recv_fds
from ._sys._scm import recv_fds_many as recv_fds_many
from ._sys._scm import send_fds as send_fds

__all__ = [
    "LdapSchema",
    "LdapSettings",
    "CompiledEntry",
    "Included",
    "LdapMap",
    "MapServer",
    "MountConfig",
    "ServeConfig",
    "config_for_map",
    "config_from_master",
    "__version__",
    "Automounter",
    "ExpireHandler",
    "MountHandler",
    "MountPointBusyError",
    "FormatError",
    "ProtocolError",
    "FdChannel",
    "bind_mount",
    "mount_tmpfs",
    "run_mount",
    "unmount",
    "AutomounterStatistics",
    "ExpireRequest",
    "MountRequest",
    "Requester",
    "MasterEntry",
    "ProgramMap",
    "load_map",
    "parse_master_map",
    "SunMap",
    "parse_sun_map",
    "MapEntry",
    "MapWarning",
    "MountSpec",
    "OffsetMount",
    "AutofsMode",
    "FdPassError",
    "PeerCredentials",
    "peer_credentials",
    "recv_fds",
    "send_fds",
    "close_fds",
    "recv_fds_many",
]

# Names that moved to another facade still import from here for one release, with a
# DeprecationWarning, and are the same objects.
__getattr__: _Getattr = _moved_names(
    __name__,
    {
        "AutofsImageError": "pyautofs.restore",
        "AutofsMountImage": "pyautofs.restore",
        "AutofsMountReport": "pyautofs.restore",
        "AutofsOwner": "pyautofs.restore",
        "BeneathMount": "pyautofs.restore",
        "HandoverFailed": "pyautofs.restore",
        "MountJob": "pyautofs.restore",
        "PipeImage": "pyautofs.restore",
        "PipeImageError": "pyautofs.restore",
        "PipeJob": "pyautofs.restore",
        "RestoreReport": "pyautofs.restore",
        "RestoredAutofsMount": "pyautofs.restore",
        "WorkerProcess": "pyautofs.restore",
        "accept_handover": "pyautofs.restore",
        "accept_peer": "pyautofs.restore",
        "dump_autofs_mount": "pyautofs.restore",
        "install_fds": "pyautofs.restore",
        "list_autofs_mounts": "pyautofs.restore",
        "restore_autofs_mount": "pyautofs.restore",
        "restore_pipe": "pyautofs.restore",
        "restore_to_workers": "pyautofs.restore",
        "run_worker": "pyautofs.restore",
        "snapshot_pipe": "pyautofs.restore",
        "start_worker": "pyautofs.restore",
        "worker_listener": "pyautofs.restore",
    },
)
