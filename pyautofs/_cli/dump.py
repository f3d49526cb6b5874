"""``pyautofs dump``: capture autofs mounts and their pipes into an image file."""

from __future__ import annotations

import argparse
import sys

from .._restore._autofs import dump_autofs_mounts
from .._restore._image import AutofsImageError, AutofsMountImage, write_autofs_images
from ._options import process_id

DESCRIPTION = """\
Capture autofs mounts into an image file, without changing them: each mount's options and
timeout, the process that owns its request pipe (found by the kernel's pipe_ino= option,
never by fd=), whether that owner kept a write end, and what the pipe holds (pending
requests, captured without consuming them). 'pyautofs serve --restore IMAGE' rebuilds the
mounts from the file and serves them; the restore functions of pyautofs.restore read it too.
The file is written mode 0600 and replaced atomically. Needs root to see the owner's fds."""

EXAMPLES = """\
examples:
  pyautofs dump /mnt/auto -o auto.img             one mount
  pyautofs dump /mnt/a /mnt/b -o maps.img         several, in one file
  pyautofs dump --pid 1234 -o serve.img           every mount whose pipe process 1234 reads
  pyautofs dump --all -o everything.img           every autofs mount in this namespace
"""


HELP = "capture autofs mounts and their request pipes into an image file"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``pyautofs dump``."""
    p.add_argument("mount_points", nargs="*", metavar="MOUNTPOINT", help="autofs mounts to dump")
    p.add_argument("-o", "--output", required=True, metavar="IMAGE", help="the file to write")
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--pid",
        type=process_id,
        help="with no MOUNTPOINT: every mount whose read end this process holds; with "
        "MOUNTPOINTs: the owner to record when several processes hold a read end",
    )
    which.add_argument("--all", action="store_true", help="every autofs mount visible here")


def describe(image: AutofsMountImage) -> str:
    """One line about a dumped mount."""
    if image.owner is None:
        return f"{image.mount_point}: {image.mode.value}, catatonic (no owner)"
    o = image.owner
    write = f"write end fd {o.write_fd}" if o.write_fd is not None else "write end closed"
    return (
        f"{image.mount_point}: {image.mode.value}, timeout {image.timeout} s, owner pid {o.pid} "
        f"({o.comm}) read end fd {o.read_fd}, {write}, {image.pending_requests} pending"
    )


def main(args: argparse.Namespace) -> int:
    """Run ``pyautofs dump``."""
    if args.all and args.mount_points:
        print("pyautofs dump: give MOUNTPOINTs or --all, not both", file=sys.stderr)
        return 2
    if not args.mount_points and not args.all and args.pid is None:
        print("pyautofs dump: give MOUNTPOINTs, --pid PID or --all", file=sys.stderr)
        return 2
    paths = args.mount_points or None
    try:
        images = dump_autofs_mounts(paths, owner_pid=args.pid)
    except ProcessLookupError as exc:
        print(f"pyautofs dump: {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 1
    if not images:
        print(f"pyautofs dump: process {args.pid} owns no autofs mount here", file=sys.stderr)
        return 1
    try:
        write_autofs_images(args.output, images)
    except AutofsImageError as exc:  # pragma: no cover - our own images always serialise
        print(f"pyautofs dump: {exc}", file=sys.stderr)
        return 1
    for image in images:
        print(describe(image))
    print(f"{len(images)} mount{'s' if len(images) != 1 else ''} written to {args.output}")
    return 0
