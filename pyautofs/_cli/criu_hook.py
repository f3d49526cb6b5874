"""``pyautofs criu-hook``: CRIU's ``--action-script`` for a tree that runs ``pyautofs serve``."""

from __future__ import annotations

import argparse
import os
import sys

from .._restore._quiesce import ControlError, control_request, find_control_sockets
from ._options import positive_seconds, process_id

DESCRIPTION = """\
Run by CRIU (criu dump/restore --action-script) around a checkpoint of a process tree that
runs 'pyautofs serve'. CRIU cannot freeze a thread that waits inside the autofs EXPIRE
ioctl, so before the dump every serve in the tree pauses expiry and answers only once no
EXPIRE ioctl is in flight; after a restore (or after a dump that leaves the tree running)
expiry resumes. CRIU says what is happening in CRTOOLS_SCRIPT_ACTION and which tree in
CRTOOLS_INIT_PID; serve is reached through its control socket, found from that tree
(/proc/PID/net/unix, reached through /proc/PID/root). Actions:

  pre-dump, pre-stream     pause expiry, wait until it is paused (a failure aborts the dump)
  post-dump                resume expiry once the tree runs again (with --leave-running)
  post-restore             once the restored tree runs: follow the mounts' new device
                           numbers, then resume expiry
  post-resume              the same, and wait for the answer
  anything else            nothing

A pause lasts --lease seconds at most, for a dump that fails (CRIU then runs no post-dump).
CRIU runs the action script without arguments: point --action-script at a two-line wrapper,
'#!/bin/sh' and 'exec pyautofs criu-hook "$@"'."""

EXAMPLES = """\
examples:
  pyautofs criu-hook                          as CRIU runs it (reads CRTOOLS_SCRIPT_ACTION)
  pyautofs criu-hook --pid 1234 pause         pause expiry in every serve of tree 1234
  pyautofs criu-hook --pid 1234 resume        and resume it
  pyautofs criu-hook --pid 1234 status        what each serve of tree 1234 says
"""

_PAUSE = ("pre-dump", "pre-stream")


HELP = "CRIU action script: pause serve's expiry for a dump, resume it after"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``pyautofs criu-hook``."""
    p.add_argument(
        "action",
        nargs="?",
        choices=("pause", "resume", "status"),
        help="do this instead of what CRTOOLS_SCRIPT_ACTION says",
    )
    p.add_argument("--pid", type=process_id, help="the tree's root pid (default: CRTOOLS_INIT_PID)")
    p.add_argument(
        "--timeout",
        type=positive_seconds,
        default=30.0,
        help="seconds to wait for serve to pause (default 30)",
    )
    p.add_argument(
        "--lease",
        type=positive_seconds,
        default=300.0,
        help="seconds after which a pause ends by itself (default 300)",
    )


def main(args: argparse.Namespace) -> int:
    """Run ``pyautofs criu-hook``."""
    action = args.action or os.environ.get("CRTOOLS_SCRIPT_ACTION", "")
    if action in _PAUSE or action == "pause":
        request, wait = f"pause-expiry {args.lease:g}", True
    elif action == "post-dump":
        request, wait = "resume-expiry", False
    elif action == "post-restore":
        request, wait = "restored", False
    elif action == "post-resume":
        request, wait = "restored", True
    elif action == "resume":
        request, wait = "resume-expiry", True
    elif action == "status":
        request, wait = "status", True
    elif not action:
        print(
            "pyautofs criu-hook: no action: CRTOOLS_SCRIPT_ACTION is not set (CRIU sets it), "
            "and none was given",
            file=sys.stderr,
        )
        return 2
    else:
        return 0  # an action that does not concern serve
    pid = args.pid
    if pid is None:
        text = os.environ.get("CRTOOLS_INIT_PID", "")
        if not text.isdigit():
            print(
                "pyautofs criu-hook: no tree: CRTOOLS_INIT_PID is not set (give --pid)",
                file=sys.stderr,
            )
            return 2
        pid = int(text)
    found = find_control_sockets([pid])
    if not found:
        print(f"pyautofs criu-hook: {action}: no pyautofs serve in process tree {pid}")
        return 0
    status = 0
    for holder, path in found:
        try:
            reply = control_request(
                request, path, pid=holder, timeout=args.timeout, wait_reply=wait
            )
        except (ControlError, OSError) as exc:
            print(f"pyautofs criu-hook: {action}: serve pid {holder}: {exc}", file=sys.stderr)
            status = 1
            continue
        said = reply.removeprefix("ok ") if wait else f"{request} queued"
        print(f"pyautofs criu-hook: {action}: serve pid {holder}: {said}")
    return status
