"""Checkpoint and restore: pipe images, autofs mount dump/restore, fd-table install, workers.

For people writing checkpoint/restore tools (CRIU-style migration, container restore,
daemon live upgrade). This module only re-exports; its building blocks (rebuilding a
mount, the handover messages) are here too; they take and return the raw bindings'
types, which :mod:`pyautofs.lowlevel` exports.
"""

from __future__ import annotations

from ._proto._moved import Getattr as _Getattr
from ._proto._moved import moved_names as _moved_names
from ._restore._autofs import AutofsMountReport as AutofsMountReport
from ._restore._autofs import dump_autofs_mount as dump_autofs_mount
from ._restore._autofs import dump_autofs_mounts as dump_autofs_mounts
from ._restore._autofs import list_autofs_mounts as list_autofs_mounts

# -- building blocks of a restore: rebuild, hand over, confirm (_restore)
from ._restore._autofs import recreate_autofs_mount as recreate_autofs_mount
from ._restore._autofs import take_over_autofs_mount as take_over_autofs_mount

# -- handing restored fds to their owner (_restore._handover)
from ._restore._handover import Adopted as Adopted
from ._restore._handover import AutofsHandover as AutofsHandover
from ._restore._handover import HandoverFailed as HandoverFailed
from ._restore._handover import PipeHandover as PipeHandover
from ._restore._handover import accept_handover as accept_handover
from ._restore._handover import adopt_handover as adopt_handover
from ._restore._handover import receive_handover as receive_handover
from ._restore._handover import send_confirmation as send_confirmation
from ._restore._handover import send_handover as send_handover
from ._restore._handover import wait_confirmation as wait_confirmation

# -- autofs mounts: inspect, dump (_restore._autofs); rebuild is below (_restore._rebuild)
from ._restore._image import AutofsImageError as AutofsImageError
from ._restore._image import AutofsMountImage as AutofsMountImage
from ._restore._image import AutofsOwner as AutofsOwner
from ._restore._image import BeneathMount as BeneathMount
from ._restore._image import autofs_images_from_bytes as autofs_images_from_bytes
from ._restore._image import autofs_images_to_bytes as autofs_images_to_bytes
from ._restore._image import read_autofs_images as read_autofs_images
from ._restore._image import write_autofs_images as write_autofs_images

# -- fd tables and pipes (_restore._install, _restore._pipeimage)
from ._restore._install import install_fds as install_fds
from ._restore._pipeimage import PipeImage as PipeImage
from ._restore._pipeimage import PipeImageError as PipeImageError
from ._restore._pipeimage import restore_pipe as restore_pipe
from ._restore._pipeimage import snapshot_pipe as snapshot_pipe
from ._restore._rebuild import RestoredAutofsMount as RestoredAutofsMount
from ._restore._rebuild import autofs_pipe_image as autofs_pipe_image
from ._restore._rebuild import handover_for as handover_for
from ._restore._rebuild import restore_autofs_mount as restore_autofs_mount

# -- a coordinator and its workers (_restore._sockets, _restore._workers)
from ._restore._sockets import accept_peer as accept_peer
from ._restore._sockets import worker_listener as worker_listener
from ._restore._workers import MountJob as MountJob
from ._restore._workers import PipeJob as PipeJob
from ._restore._workers import RestoreReport as RestoreReport
from ._restore._workers import WorkerFds as WorkerFds
from ._restore._workers import WorkerProcess as WorkerProcess
from ._restore._workers import restore_to_workers as restore_to_workers
from ._restore._workers import run_worker as run_worker
from ._restore._workers import start_worker as start_worker

__all__ = [
    "recreate_autofs_mount",
    "take_over_autofs_mount",
    "AutofsHandover",
    "PipeHandover",
    "adopt_handover",
    "receive_handover",
    "send_confirmation",
    "send_handover",
    "wait_confirmation",
    "autofs_pipe_image",
    "handover_for",
    "accept_peer",
    "worker_listener",
    "AutofsImageError",
    "AutofsMountImage",
    "AutofsMountReport",
    "AutofsOwner",
    "BeneathMount",
    "autofs_images_from_bytes",
    "autofs_images_to_bytes",
    "dump_autofs_mount",
    "dump_autofs_mounts",
    "list_autofs_mounts",
    "read_autofs_images",
    "write_autofs_images",
    "Adopted",
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
    "WorkerFds",
    "WorkerProcess",
    "restore_to_workers",
    "run_worker",
    "start_worker",
]

# Names that moved to another facade still import from here for one release, with a
# DeprecationWarning, and are the same objects.
__getattr__: _Getattr = _moved_names(
    __name__,
    {
        "AutofsMode": "pyautofs",
    },
)
