"""``pyautofs inspect``: every autofs mount on the machine, and who serves it."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from .._restore._autofs import AutofsMountReport, list_autofs_mounts
from .._sys._mountinfo import hidden_processes
from ._options import pid_or_self

DESCRIPTION = """\
List every autofs mount: mount point, type, options, state (active or catatonic), pipe_ino,
the processes that hold the request pipe's read end (found by matching the kernel's
pipe_ino= option against /proc/*/fd), whether a write end is still held outside the kernel
(automount keeps one; systemd and pyautofs close theirs), and what is mounted beneath.
Needs no root, but run it as root to see every process's fds."""

EXAMPLES = """\
examples:
  pyautofs inspect                     a readable listing
  pyautofs inspect --json              one JSON object: {"mounts": [...]} (stable keys)
  pyautofs inspect --pid 1234          the mounts that process 1234 sees (its mount namespace)
  pyautofs inspect --pid 1234 --json
"""


HELP = "list every autofs mount with its state, pipe owner and what is mounted beneath"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``pyautofs inspect``."""
    p.add_argument("--json", action="store_true", help="print JSON instead of a listing")
    p.add_argument(
        "--pid",
        default="self",
        type=pid_or_self,
        help="look through this process's mount namespace (default: this one's)",
    )


def _comm(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return None


def report_to_json(r: AutofsMountReport, hidden: int = 0) -> dict[str, Any]:
    """The stable JSON form of one mount (``hidden``: processes whose fds were unseen)."""
    m = r.mount
    return {
        "mount_point": m.mount_point,
        "type": m.mode.value,
        "state": r.state,
        "source": m.source,
        "options": {
            "fd": m.fd,
            "pgrp": m.pgrp,
            "timeout": m.timeout,
            "minproto": m.minproto,
            "maxproto": m.maxproto,
            "uid": m.uid,
            "gid": m.gid,
            "strictexpire": m.strictexpire,
            "ignore": m.ignore,
            "mount_options": list(m.mount_options),
        },
        "dev": m.dev,
        "pipe_ino": m.pipe_ino,
        "readers": [
            {"pid": h.pid, "command": h.comm, "fd": h.fd, "pgrp": h.pgrp} for h in r.readers
        ],
        "write_end_held": r.write_end_held,
        "readers_complete": hidden == 0,
        "writers": [{"pid": h.pid, "command": h.comm, "fd": h.fd} for h in r.writers],
        "beneath": [
            {"mount_point": b.mount_point, "fstype": b.fstype, "source": b.source}
            for b in r.beneath
        ],
    }


def main(args: argparse.Namespace) -> int:
    """Print the listing; returns the exit status."""
    try:
        reports = list_autofs_mounts(args.pid)
    except FileNotFoundError:
        print(f"pyautofs: no process {args.pid}", file=sys.stderr)
        return 1
    hidden = len(hidden_processes())
    if args.json:
        json.dump({"mounts": [report_to_json(r, hidden) for r in reports]}, sys.stdout, indent=2)
        print()
        return 0
    if hidden:
        print(
            f"note: running as uid {os.geteuid()}, the fds of {hidden} process(es) are hidden "
            "from this user, so who serves a mount may not show; run as root to see it\n"
        )
    if not reports:
        print("no autofs mounts")
        return 0
    for r in reports:
        m = r.mount
        print(f"{m.mount_point}  ({m.mode.value}, {r.state}, source {m.source})")
        print(
            f"  options   fd={m.fd} pgrp={m.pgrp} timeout={m.timeout} "
            f"proto={m.minproto}-{m.maxproto}"
            + (" strictexpire" if m.strictexpire else "")
            + (" ignore" if m.ignore else "")
        )
        ino = "(no pipe_ino: kernel without CONFIG_CHECKPOINT_RESTORE)"
        print(f"  pipe_ino  {m.pipe_ino if m.pipe_ino is not None else ino}")
        if r.readers:
            for h in r.readers:
                print(f"  served by pid {h.pid} ({h.comm}), read end on fd {h.fd}, pgrp {h.pgrp}")
        elif r.state == "active" and hidden:
            owner = _comm(m.pgrp) if m.pgrp else None
            print(
                f"  served by (cannot tell as uid {os.geteuid()}: the read end is not among "
                "the fds this user can see; run as root)"
                + (f"; owner process group {m.pgrp}: {owner}" if owner else "")
            )
        elif r.state == "active":
            print("  served by nobody: no process holds the read end (next lookup: catatonic)")
        if r.writers:
            ends = ", ".join(f"pid {h.pid} fd {h.fd}" for h in r.writers)
            print(f"  write end also held by {ends} (automount style)")
        elif r.state == "active" and not hidden:
            print("  write end held only by the kernel (systemd/pyautofs style)")
        for b in r.beneath:
            print(f"  beneath   {b.mount_point}  {b.fstype} {b.source}")
    return 0
