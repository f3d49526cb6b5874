"""Checkpoint and restore: pipe images, autofs mount dump/restore, fd-table install, workers.

For people writing checkpoint/restore tools (CRIU-style migration, container restore,
daemon live upgrade). This module only re-exports; the raw kernel steps
(:func:`~pyautofs.lowlevel.recreate_autofs_mount`, the handover messages) are in
:mod:`pyautofs.lowlevel`.
"""

from __future__ import annotations

from ._restore._autofs import AutofsMountReport as AutofsMountReport
from ._restore._autofs import dump_autofs_mount as dump_autofs_mount
from ._restore._autofs import dump_autofs_mounts as dump_autofs_mounts
from ._restore._autofs import list_autofs_mounts as list_autofs_mounts

# -- handing restored fds to their owner (_restore._handover)
from ._restore._handover import Adopted as Adopted
from ._restore._handover import HandoverFailed as HandoverFailed
from ._restore._handover import accept_handover as accept_handover

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
from ._restore._rebuild import restore_autofs_mount as restore_autofs_mount

# -- a coordinator and its workers (_restore._workers)
from ._restore._workers import MountJob as MountJob
from ._restore._workers import PipeJob as PipeJob
from ._restore._workers import RestoreReport as RestoreReport
from ._restore._workers import WorkerFds as WorkerFds
from ._restore._workers import WorkerProcess as WorkerProcess
from ._restore._workers import restore_to_workers as restore_to_workers
from ._restore._workers import run_worker as run_worker
from ._restore._workers import start_worker as start_worker
from ._sys._mount import AutofsMode as AutofsMode

__all__ = [
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
    "AutofsMode",
]
