"""pyautofs: the Linux autofs protocol and file-descriptor passing.

This module is the everyday API; it only re-exports. The raw kernel bindings are in
:mod:`pyautofs.lowlevel`.
"""

from __future__ import annotations

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

# -- autofs maps (_maps)
from ._maps._master import MasterEntry as MasterEntry
from ._maps._program import ProgramMap as ProgramMap
from ._maps._sources import load_map as load_map
from ._maps._sources import parse_master_map as parse_master_map
from ._maps._sun import SunMap as SunMap
from ._maps._sun import parse_sun_map as parse_sun_map
from ._maps._types import MapEntry as MapEntry
from ._maps._types import MapWarning as MapWarning
from ._maps._types import MountSpec as MountSpec
from ._maps._types import OffsetMount as OffsetMount

# -- errors: the roots of bad input (FormatError) and broken peers (ProtocolError)
from ._proto._errors import FormatError as FormatError
from ._proto._errors import ProtocolError as ProtocolError
from ._restore._autofs import AutofsMountReport as AutofsMountReport
from ._restore._autofs import dump_autofs_mount as dump_autofs_mount
from ._restore._autofs import list_autofs_mounts as list_autofs_mounts
from ._restore._handover import HandoverFailed as HandoverFailed
from ._restore._handover import accept_handover as accept_handover

# -- checkpoint/restore (_restore)
from ._restore._image import AutofsImageError as AutofsImageError
from ._restore._image import AutofsMountImage as AutofsMountImage
from ._restore._image import AutofsOwner as AutofsOwner
from ._restore._image import BeneathMount as BeneathMount
from ._restore._install import install_fds as install_fds
from ._restore._pipeimage import PipeImage as PipeImage
from ._restore._pipeimage import PipeImageError as PipeImageError
from ._restore._pipeimage import restore_pipe as restore_pipe
from ._restore._pipeimage import snapshot_pipe as snapshot_pipe
from ._restore._rebuild import RestoredAutofsMount as RestoredAutofsMount
from ._restore._rebuild import restore_autofs_mount as restore_autofs_mount
from ._restore._sockets import accept_peer as accept_peer
from ._restore._sockets import worker_listener as worker_listener
from ._restore._workers import MountJob as MountJob
from ._restore._workers import PipeJob as PipeJob
from ._restore._workers import RestoreReport as RestoreReport
from ._restore._workers import WorkerProcess as WorkerProcess
from ._restore._workers import restore_to_workers as restore_to_workers
from ._restore._workers import run_worker as run_worker
from ._restore._workers import start_worker as start_worker
from ._sys._mount import AutofsMode as AutofsMode

# -- fd passing (_sys._scm)
from ._sys._scm import FdPassError as FdPassError
from ._sys._scm import PeerCredentials as PeerCredentials
from ._sys._scm import close_fds as close_fds
from ._sys._scm import peer_credentials as peer_credentials
from ._sys._scm import recv_fds as recv_fds
from ._sys._scm import recv_fds_many as recv_fds_many
from ._sys._scm import send_fds as send_fds

__all__ = [
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
    "AutofsImageError",
    "AutofsMountImage",
    "AutofsMountReport",
    "AutofsOwner",
    "BeneathMount",
    "dump_autofs_mount",
    "list_autofs_mounts",
    "HandoverFailed",
    "accept_handover",
    "install_fds",
    "PipeImage",
    "PipeImageError",
    "restore_pipe",
    "snapshot_pipe",
    "RestoredAutofsMount",
    "restore_autofs_mount",
    "MountJob",
    "PipeJob",
    "RestoreReport",
    "WorkerProcess",
    "restore_to_workers",
    "run_worker",
    "start_worker",
    "AutofsMode",
    "FdPassError",
    "PeerCredentials",
    "accept_peer",
    "peer_credentials",
    "recv_fds",
    "send_fds",
    "worker_listener",
    "close_fds",
    "recv_fds_many",
]
