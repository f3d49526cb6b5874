"""``pyautofs serve``: serve autofs maps, as automount(8) does, in the foreground."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from .._engine._serve import ServeConfig, config_for_map, config_from_master, run_serve

_EXAMPLES = """\
examples:
  pyautofs serve /mnt/auto /etc/auto.data            one indirect mount from a sun-format map
  pyautofs serve /mnt/auto /etc/auto.data --timeout 60
  pyautofs serve --master /etc/auto.master           every mount the master map names (/- too)
  pyautofs serve -v /mnt/auto ./auto.prog            an executable map is a program map

signals:
  SIGTERM, SIGINT  answer what is pending, unmount what was mounted, remove the mounts, exit 0
  SIGHUP           re-read the maps (and the master map's list of mount points)
  SIGUSR2          hand every mount to a fresh pyautofs started from the code on disk,
                   without failing a lookup (zero-downtime upgrade)

A mount point left by a crashed server, or by automount(8), is adopted: keys mounted
before keep working. A mount served by a live automounter is refused unless --takeover.
"""


def add_parser(sub: Any) -> None:
    """Register ``pyautofs serve``."""
    p = sub.add_parser(
        "serve",
        help="serve autofs maps (a faster, restartable automount(8))",
        description="Serve autofs mounts from sun-format or program maps, in the foreground.",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("mountpoint", nargs="?", help="the indirect mount point")
    p.add_argument("mapfile", nargs="?", help="the map: a sun-format file or an executable")
    p.add_argument("--master", metavar="FILE", help="serve every mount of this master map")
    p.add_argument(
        "--timeout",
        type=int,
        default=600,
        metavar="SECONDS",
        help="expire idle keys after this (0: never; default 600)",
    )
    p.add_argument(
        "--negative-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="how long a missing key keeps failing at once (default 10)",
    )
    p.add_argument(
        "--request-timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="deadline of one mount (default 60)",
    )
    p.add_argument(
        "--takeover", action="store_true", help="take over a mount a live automounter serves"
    )
    p.add_argument("--lock-dir", default="/run/pyautofs", help=argparse.SUPPRESS)
    p.add_argument("-v", "--verbose", action="store_true", help="one log line per request")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """Run the server; returns the exit status."""
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="pyautofs[%(process)d] %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    if os.geteuid() != 0:
        print("pyautofs serve needs root: autofs mounts need CAP_SYS_ADMIN.", file=sys.stderr)
        return 1
    if not os.path.exists("/dev/autofs"):
        print(
            "pyautofs serve needs /dev/autofs: CONFIG_AUTOFS_FS=y, or 'modprobe autofs4'.",
            file=sys.stderr,
        )
        return 1
    if args.master:
        if args.mountpoint or args.mapfile:
            print(
                "pyautofs serve: give either --master FILE or MOUNTPOINT MAPFILE", file=sys.stderr
            )
            return 2
        mounts = config_from_master(args.master, args.timeout)
    elif args.mountpoint and args.mapfile:
        mounts = config_for_map(args.mountpoint, args.mapfile, args.timeout)
    else:
        print("pyautofs serve: MOUNTPOINT MAPFILE or --master FILE is needed", file=sys.stderr)
        return 2
    config = ServeConfig(
        tuple(mounts),
        master=os.path.abspath(args.master) if args.master else None,
        takeover=args.takeover,
        negative_timeout=args.negative_timeout,
        request_timeout=args.request_timeout,
        lock_dir=args.lock_dir,
    )
    argv = [a for a in sys.argv[1:] if a != "--takeover"]
    try:
        return run_serve(config, argv)
    except OSError as exc:
        print(f"pyautofs serve: {exc}", file=sys.stderr)
        return 1
