"""Rebuild an autofs mount from its image, for this process or for an owner process.

See :mod:`pyautofs._restore._autofs` for the two kernel steps and for what cannot be carried
over, and :mod:`pyautofs._restore._handover` for how an owner process receives its pipe.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Sequence

import attrs

from .._sys._autofs import AutofsControl
from .._sys._mount import UmountFlags, umount2
from .._sys._mountinfo import autofs_mounts
from ._autofs import recreate_autofs_mount, take_over_autofs_mount
from ._handover import AutofsHandover, send_handover, wait_confirmation
from ._image import AutofsMountImage
from ._pipeimage import PipeImage, restore_pipe

__all__ = [
    "RestoredAutofsMount",
    "restore_autofs_mount",
    "restore_autofs_mounts",
    "autofs_pipe_image",
    "handover_for",
]

_DEFAULT_PIPE = PipeImage(size=65536, packet_mode=True)


@attrs.frozen
class RestoredAutofsMount:
    """The result of :func:`restore_autofs_mount`."""

    mount_point: str
    dev: int
    """The new superblock's ``st_dev`` (allocated afresh; it may equal the dumped one)."""
    catatonic: bool
    read_fd: int | None = None
    """The pipe's read end, when this process became the owner (``owner=None``)."""
    write_fd: int | None = None
    """The write end kept by this process (automount style, ``owner=None``)."""
    owner_pid: int | None = None
    """The owner process that confirmed the takeover (``owner=socket``)."""
    pipe_ino: int | None = None


def autofs_pipe_image(image: AutofsMountImage, *, keep_pending: bool = False) -> PipeImage:
    """The pipe to rebuild for ``image``: its size and mode, and its packets if asked.

    Queued packets are requests of the *old* superblock: their tokens mean nothing to the
    new one (READY/FAIL with them answer EINVAL) and their processes are released when the
    old mount goes away. So by default the new pipe starts empty; ``keep_pending=True``
    restores them byte for byte anyway (for an owner that wants to see what was asked).
    """
    pipe = image.pipe if image.pipe is not None else _DEFAULT_PIPE
    pipe = attrs.evolve(pipe, packet_mode=True)
    return pipe if keep_pending else pipe.without_contents()


def handover_for(image: AutofsMountImage, mount_point: str, dev: int) -> AutofsHandover:
    """The handover item that puts the pipe at the dumped owner's fd numbers."""
    if image.owner is None:
        raise ValueError(f"{image.mount_point} was dumped without an owner (catatonic)")
    temp = image.fd if image.fd >= 0 and image.fd != image.owner.read_fd else None
    return AutofsHandover(
        mount_point=mount_point,
        dev=dev,
        read_target=image.owner.read_fd,
        write_target=image.owner.write_fd,
        temp_write_target=temp if image.owner.write_fd is None else None,
    )


def restore_autofs_mount(
    image: AutofsMountImage,
    *,
    mount_point: str | os.PathLike[str] | None = None,
    owner: socket.socket | None = None,
    keep_pending: bool = False,
    control: AutofsControl | None = None,
    timeout: float | None = 30.0,
) -> RestoredAutofsMount:
    """Rebuild the autofs mount ``image`` describes, at ``mount_point`` (default: its own).

    The mount is recreated catatonic with the saved options and timeout. A catatonic image
    (or one dumped without an owner) stays catatonic. Otherwise a new pipe is made (the
    saved size; see :func:`autofs_pipe_image` for ``keep_pending``) and handed to its owner:

    - ``owner=None``: this process takes the mount over with SETPIPEFD (so this process's
      group becomes the owner) and gets ``read_fd`` and, for an image whose owner kept its
      write end, ``write_fd`` (close-on-exec, at whatever numbers they got: use
      :func:`~pyautofs.restore.install_fds` to move them).
    - ``owner=<unix socket>``: the pipe's ends go to the process at the other end, which
      runs :func:`~pyautofs._restore._handover.accept_handover` (installs them at the dumped
      owner's fd numbers and issues SETPIPEFD itself); this waits up to ``timeout`` seconds
      for its confirmation. This process keeps no end of the pipe.

    If anything fails, the new mount is detached again and the error raised.
    """
    target = os.path.abspath(
        os.fspath(mount_point if mount_point is not None else image.mount_point)
    )
    own = control if control is not None else AutofsControl.open()
    try:
        dev = recreate_autofs_mount(image, mount_point=target, control=own)
        if image.catatonic or image.owner is None:
            return RestoredAutofsMount(mount_point=target, dev=dev, catatonic=True)
        try:
            return _hand_over(
                image,
                target,
                dev,
                owner=owner,
                keep_pending=keep_pending,
                control=own,
                timeout=timeout,
            )
        except BaseException:
            umount2(target, UmountFlags.DETACH)
            raise
    finally:
        if control is None:
            own.close()


def restore_autofs_mounts(
    images: Sequence[AutofsMountImage], *, control: AutofsControl | None = None
) -> list[RestoredAutofsMount]:
    """Rebuild several mounts for this process (``owner=None``), all or none.

    Each mount point must hold no autofs mount (``FileExistsError`` otherwise: a live or
    orphaned mount there is adopted, not restored); a missing mount point directory is
    made (mode 0755, parents too) and left in place. Every result has ``read_fd`` (for an
    owner image) and no ``write_fd``: the write ends are closed, so the kernel's own one is
    the last. If one fails, the mounts already rebuilt are detached and their fds closed.
    """
    own = control if control is not None else AutofsControl.open()
    done: list[RestoredAutofsMount] = []
    try:
        live = {m.mount_point for m in autofs_mounts()}
        for image in images:
            target = os.path.abspath(image.mount_point)
            if target in live:
                raise FileExistsError(
                    errno.EEXIST,
                    "an autofs mount is already there (serve adopts it: no image needed)",
                    target,
                )
            # A new machine (or an owner that removed it at exit) may lack the directory.
            os.makedirs(target, mode=0o755, exist_ok=True)
            closed = attrs.evolve(image.owner, write_fd=None) if image.owner else None
            r = restore_autofs_mount(attrs.evolve(image, owner=closed), control=own)
            done.append(r)
    except BaseException:
        for r in done:
            if r.read_fd is not None:
                os.close(r.read_fd)
            umount2(r.mount_point, UmountFlags.DETACH)
        raise
    finally:
        if control is None:
            own.close()
    return done


def _hand_over(
    image: AutofsMountImage,
    target: str,
    dev: int,
    *,
    owner: socket.socket | None,
    keep_pending: bool,
    control: AutofsControl,
    timeout: float | None,
) -> RestoredAutofsMount:
    assert image.owner is not None
    r, w = restore_pipe(autofs_pipe_image(image, keep_pending=keep_pending))
    if owner is None:
        try:
            take_over_autofs_mount(target, dev, w, control=control)
        except BaseException:
            os.close(r)
            os.close(w)
            raise
        ino = os.fstat(r).st_ino
        if not image.owner.keeps_write_end:
            os.close(w)
            w = -1
        return RestoredAutofsMount(
            mount_point=target,
            dev=dev,
            catatonic=False,
            read_fd=r,
            write_fd=None if w < 0 else w,
            owner_pid=os.getpid(),
            pipe_ino=ino,
        )
    try:
        send_handover(owner, [handover_for(image, target, dev)], [r, w])
    finally:
        os.close(r)
        os.close(w)
    reply = wait_confirmation(owner, timeout)
    return RestoredAutofsMount(
        mount_point=target,
        dev=dev,
        catatonic=False,
        owner_pid=reply.get("pid"),
        pipe_ino=reply["items"][0]["pipe_ino"],
    )
