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
from ._engine._helpers import bind_mount as bind_mount
from ._engine._helpers import mount_tmpfs as mount_tmpfs
from ._engine._helpers import run_mount as run_mount
from ._engine._helpers import unmount as unmount
from ._engine._requests import AutomounterStatistics as AutomounterStatistics
from ._engine._requests import ExpireRequest as ExpireRequest
from ._engine._requests import MountRequest as MountRequest
from ._engine._requests import Requester as Requester

# -- checkpoint/restore (_restore)
from ._restore._install import install_fds as install_fds
from ._restore._pipeimage import PipeImage as PipeImage
from ._restore._pipeimage import PipeImageError as PipeImageError
from ._restore._pipeimage import restore_pipe as restore_pipe
from ._restore._pipeimage import snapshot_pipe as snapshot_pipe
from ._sys._mount import AutofsMode as AutofsMode
