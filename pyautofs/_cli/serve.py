"""``pyautofs serve``: serve autofs maps, as automount(8) does, in the foreground."""

from __future__ import annotations

import argparse
import math
import os
import stat
import sys
from collections.abc import Sequence

import attrs

from .._engine._handover import HANDOVER_ENV
from .._engine._notify import Notifier
from .._engine._serve import (
    MountConfig,
    ServeConfig,
    config_for_map,
    config_from_master,
    run_serve,
)
from .._maps._ldap import is_ldap_name
from .._restore._image import AutofsImageError, read_autofs_images
from .._restore._rebuild import restore_autofs_mounts
from .._sys._mountinfo import AutofsMount, live_readers, top_autofs_mounts
from ._errors import describe, environment_problem
from ._logging import LOG_TARGETS, setup_logging
from ._options import fd_number, seconds, whole_seconds, writable_fd_problem

EXAMPLES = """\
examples:
  pyautofs serve /mnt/auto /etc/auto.data             one indirect mount from a sun-format map
  pyautofs serve /mnt/auto /etc/auto.data --timeout 60
  pyautofs serve --master /etc/auto.master            every mount the master map names (/- too)
  pyautofs serve -v /mnt/auto ./auto.prog             an executable map is a program map
  pyautofs serve --takeover /mnt/auto /etc/auto.data  take the mount over from a live server
  pyautofs serve --restore auto.img /mnt/auto /etc/auto.data  rebuild from pyautofs dump, serve
  pyautofs serve --negative-timeout 2 --request-timeout 30 /mnt/auto /etc/auto.data
  pyautofs serve --log-target syslog --master /etc/auto.master
  pyautofs serve --ready-fd 3 /mnt/auto /etc/auto.data  writes READY=1 to fd 3 once serving

signals:
  SIGTERM, SIGINT  answer what is pending, unmount what was mounted, remove the mounts, exit 0;
                   a second one forces the exit at once, after logging what is left
  SIGHUP           re-read the maps (and the master map's list of mount points) and forget
                   failed lookups
  SIGUSR2          hand every mount to a fresh pyautofs started from the code on disk,
                   without failing a lookup (zero-downtime upgrade)

durations: 0 turns the limit off (never expire, no negative cache, no deadline); negative
values are refused.

under systemd: Type=notify works (READY=1 once every mount is live, STATUS= with counts,
RELOADING=1, STOPPING=1, WATCHDOG=1 when WatchdogSec= is set), and logs go to the journal
when stderr is the journal (JOURNAL_STREAM). See docs/howto/systemd.rst for a unit file.

A mount point left by a crashed server, or by automount(8), is adopted: keys mounted
before keep working. A mount served by a live automounter is refused unless --takeover.
A bad map line is reported as FILE:LINE with the reason and skipped; the other lines are
served. Needs root (CAP_SYS_ADMIN) and /dev/autofs (CONFIG_AUTOFS_FS).
"""


HELP = "serve autofs maps (a faster, restartable automount(8))"
DESCRIPTION = (
    "Serve autofs mounts from sun-format or program maps, in the foreground, as\n"
    "automount(8) does. One log line per mount, unmount and failed lookup."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``pyautofs serve``."""
    p.add_argument(
        "mountpoint",
        nargs="?",
        help="the indirect mount point (created if missing, and then removed again at exit)",
    )
    p.add_argument("mapfile", nargs="?", help="the map: a sun-format file or an executable")
    p.add_argument("--master", metavar="FILE", help="serve every mount of this master map")
    p.add_argument(
        "--timeout",
        type=whole_seconds,
        default=600,
        metavar="SECONDS",
        help="expire idle keys after this (0: never expire; default 600)",
    )
    p.add_argument(
        "--negative-timeout",
        type=seconds,
        default=10.0,
        metavar="SECONDS",
        help="how long a failed key keeps failing at once (0: no negative cache; default 10)",
    )
    p.add_argument(
        "--request-timeout",
        type=seconds,
        default=60.0,
        metavar="SECONDS",
        help="deadline of one lookup and mount; then the requester gets ETIMEDOUT "
        "(0: no deadline, a hung mount holds its requester until shutdown; default 60)",
    )
    p.add_argument(
        "--takeover", action="store_true", help="take over a mount a live automounter serves"
    )
    p.add_argument(
        "--restore",
        metavar="IMAGE",
        help="rebuild the mounts an image of 'pyautofs dump' holds, and serve each through "
        "its rebuilt pipe",
    )
    p.add_argument(
        "--lock-dir",
        default="/run/pyautofs",
        metavar="DIR",
        help="where the locks that keep two engines off one mount point live "
        "(default /run/pyautofs)",
    )
    p.add_argument(
        "--log-target",
        choices=LOG_TARGETS,
        default=None,
        help="where log lines go (default: the journal when stderr is the journal, "
        "as under systemd; else stderr)",
    )
    p.add_argument(
        "--ready-fd",
        type=fd_number,
        default=None,
        metavar="N",
        help="write READY=1 and a newline to fd N, then close it, once every mount is live",
    )
    p.add_argument(
        "-v", "--verbose", action="store_true", help="debug lines too (every request, expire)"
    )


def _kind(path: str) -> str:
    """What is at ``path``, for a message: "a regular file", "a symbolic link to X"..."""
    try:
        st = os.lstat(path)
    except OSError:
        return "nothing"
    if stat.S_ISLNK(st.st_mode):
        return f"a symbolic link to {os.readlink(path)!r} that is not a directory"
    if stat.S_ISREG(st.st_mode):
        return "a regular file"
    return "not a directory"


def _mount_point_problem(path: str) -> str | None:
    """Why an autofs mount cannot go on ``path`` (absolute), or None.

    The engine creates a missing mount point (and removes it again at exit), so only check
    here that it could, without creating anything.
    """
    if os.path.isdir(path):
        return None
    if os.path.lexists(path):
        return (
            f"mount point {path} is {_kind(path)}: an autofs mount needs a directory. "
            f"Choose another mount point, or remove {path}."
        )
    parent = os.path.dirname(path)
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return (
            f"cannot create mount point {path}: {parent} is {_kind(parent)}. "
            "Choose a mount point under a directory."
        )
    if not os.access(parent, os.W_OK):
        why = "is not writable"
        try:
            if os.statvfs(parent).f_flag & os.ST_RDONLY:
                why = "is on a read-only file system"
        except OSError:
            pass
        return (
            f"cannot create mount point {path}: {parent} {why}. Create {path} beforehand, "
            "or choose a mount point on a writable file system."
        )
    return None


def _map_problem(path: str, what: str) -> str | None:
    """Why the map file at ``path`` cannot be read, or None (LDAP maps: read when served)."""
    if is_ldap_name(path):
        return None
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return f"{what} {path} does not exist. Give the path of an existing map file."
    except OSError as exc:
        return f"{what} {path} cannot be read: {exc.strerror}."
    if stat.S_ISDIR(st.st_mode):
        return f"{what} {path} is a directory. Give the path of a map file."
    if not os.access(path, os.R_OK):
        return f"{what} {path} is not readable."
    return None


def _served_by(
    mount_point: str, table: dict[str, AutofsMount] | None = None
) -> tuple[str, list[int]] | None:
    """Who serves a live autofs mount at ``mount_point`` (a description and the pids).

    None when nobody does. A mount whose pipe no live process reads (its server was killed,
    or it is catatonic) is not refused: serving it again adopts it, keys mounted included.
    """
    if table is None:
        table = top_autofs_mounts()
    top = table.get(mount_point)
    readers = [] if top is None else live_readers(top, exclude_pid=os.getpid())
    if not readers:
        return None
    pids = sorted({h.pid for h in readers})
    if any(_is_pyautofs(pid) for pid in pids):
        who = "another pyautofs engine"
    else:
        who = "a live automounter (" + ", ".join(sorted({h.comm for h in readers})) + ")"
    return f"{who}, pid {', '.join(map(str, pids))}", pids


def _is_pyautofs(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"pyautofs" in f.read()
    except OSError:
        return False


def _preflight(mounts: list[MountConfig], takeover: bool) -> str | None:
    """The first reason the mounts cannot be served, checked before the engine starts."""
    table = None if takeover else top_autofs_mounts()  # read once
    for mc in mounts:
        problem = _mount_point_problem(mc.mount_point)
        if problem:
            return problem
        served = None if takeover else _served_by(mc.mount_point, table)
        if served:
            who, pids = served
            return (
                f"{mc.mount_point} is already served by {who}. Stop it first "
                f"('kill -TERM {' '.join(map(str, pids))}'), or take the mount over without "
                "failing a lookup: run this command again with --takeover."
            )
    return None


def main(args: argparse.Namespace) -> int:
    """Run the server; returns the exit status."""
    try:
        setup_logging(args.log_target, verbose=args.verbose)
    except OSError as exc:
        print(
            f"pyautofs serve: cannot log to {args.log_target} ({exc.filename or '/dev/log'}): "
            f"{exc.strerror} "
            "(is a syslog daemon running? or use --log-target stderr)",
            file=sys.stderr,
        )
        return 1
    if args.ready_fd is not None:
        problem = writable_fd_problem(args.ready_fd)
        if problem:
            print(f"pyautofs serve: --ready-fd {args.ready_fd}: {problem}", file=sys.stderr)
            return 2
    problem = environment_problem("serve")
    if problem:
        print(problem, file=sys.stderr)
        return 1
    if args.master:
        if args.mountpoint or args.mapfile:
            print(
                "pyautofs serve: give either --master FILE or MOUNTPOINT MAPFILE, not both "
                "(see 'pyautofs serve --help')",
                file=sys.stderr,
            )
            return 2
        problem = _map_problem(args.master, "master map")
        if problem:
            print(f"pyautofs serve: {problem}", file=sys.stderr)
            return 1
        mounts = config_from_master(args.master, args.timeout)
        if not mounts:
            print(
                f"pyautofs serve: master map {args.master} names no mount that can be served "
                "(see the warnings above, if any)",
                file=sys.stderr,
            )
            return 1
    elif args.mountpoint and args.mapfile:
        problem = _map_problem(args.mapfile, "map")
        if problem:
            print(f"pyautofs serve: {problem}", file=sys.stderr)
            return 1
        mounts = config_for_map(args.mountpoint, args.mapfile, args.timeout)
    else:
        print(
            "pyautofs serve: MOUNTPOINT MAPFILE or --master FILE is needed "
            "(see 'pyautofs serve --help')",
            file=sys.stderr,
        )
        return 2
    # A successor that a SIGUSR2 handover started takes its mounts from the live engine
    # that started it: that one serving them is the point, not a conflict.
    problem = _preflight(mounts, args.takeover or HANDOVER_ENV in os.environ)
    if problem:
        print(f"pyautofs serve: {problem}", file=sys.stderr)
        return 1
    config = ServeConfig(
        tuple(mounts),
        master=(
            args.master
            if args.master is None or is_ldap_name(args.master)
            else os.path.abspath(args.master)
        ),
        takeover=args.takeover,
        negative_timeout=args.negative_timeout,
        request_timeout=args.request_timeout or math.inf,
        lock_dir=args.lock_dir,
    )
    argv = _successor_argv(sys.argv[1:])
    if HANDOVER_ENV not in os.environ and os.getsid(0) == 0:
        # Our session was made outside our pid namespace (unshare --pid --fork, run from a
        # script), so it is invisible here, and CRIU refuses to dump a tree whose session
        # leader is outside its pid namespace: lead a session (and group) of our own.
        os.setsid()
    elif HANDOVER_ENV not in os.environ and os.getpgrp() != os.getpid():
        # Lead a process group of our own: lookups from our old group (a script that
        # started us) would not trigger, and CRIU dumps only a process-group leader.
        # (A SIGUSR2 successor stays in its predecessor's group: that is how it answers.)
        os.setpgid(0, 0)
    if args.restore:  # after setpgid: SETPIPEFD makes our group the mounts' owner
        restored = _restore(args.restore, mounts)
        if isinstance(restored, str):
            print(f"pyautofs serve: --restore {args.restore}: {restored}", file=sys.stderr)
            return 1
        config = attrs.evolve(config, restored=restored)
    # An OSError the engine raises (say, the kernel refusing the mount) becomes one line
    # with its path in main.py.
    return run_serve(config, argv, notifier=Notifier.from_environment(ready_fd=args.ready_fd))


def _restore(image_path: str, mounts: Sequence[MountConfig]) -> dict[str, int] | str:
    """Rebuild the image's mounts for this process: mount point -> read end, or a problem.

    Run after this process leads its own group: SETPIPEFD makes the caller's group the
    owner. Every mount of the image must be one the map serves.
    """
    try:
        images = read_autofs_images(image_path)
    except (OSError, AutofsImageError) as exc:
        return str(exc.strerror if isinstance(exc, OSError) and exc.strerror else exc)
    served = {mc.mount_point for mc in mounts}
    strangers = [im.mount_point for im in images if im.mount_point not in served]
    if strangers:
        return f"{strangers[0]} is in the image but not in the map(s) given"
    try:
        rebuilt = restore_autofs_mounts(images)
    except OSError as exc:
        return describe(exc)
    return {r.mount_point: r.read_fd for r in rebuilt if r.read_fd is not None}


def _successor_argv(argv: list[str]) -> list[str]:
    """This command line, for the successor of an upgrade: without --takeover, --ready-fd or
    --restore.

    The readiness fd was used (and closed) by this process; the successor reports to
    systemd (MAINPID=) instead. The successor takes its mounts from this process, not from
    an image.
    """
    out: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
        elif a == "--takeover":
            continue
        elif a in ("--ready-fd", "--restore"):
            skip = True
        elif not a.startswith(("--ready-fd=", "--restore=")):
            out.append(a)
    return out
