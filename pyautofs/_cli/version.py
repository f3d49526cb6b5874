"""``pyautofs version``: the package version and what this kernel's autofs speaks."""

from __future__ import annotations

import argparse
import os
import platform

from .. import __version__
from .._sys._autofs import AUTOFS_DEVICE, AutofsControl

EXAMPLES = """\
examples:
  pyautofs version    the pyautofs version, the kernel release, the /dev/autofs interface

exit status: 1 when /dev/autofs is missing or cannot be used, else 0.
"""


HELP = "show the pyautofs version and the kernel's autofs interface version"
DESCRIPTION = (
    "Show the pyautofs version, the kernel release, and the version of the\n"
    "/dev/autofs control interface (no root needed)."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``pyautofs version`` takes no arguments."""


def main(args: argparse.Namespace) -> int:
    """Print versions; returns the exit status."""
    print(f"pyautofs {__version__}")
    print(f"kernel {platform.release()}")
    if not os.path.exists(AUTOFS_DEVICE):
        print(f"{AUTOFS_DEVICE}: missing (CONFIG_AUTOFS_FS=y, or 'modprobe autofs4')")
        return 1
    try:
        with AutofsControl.open() as ctl:
            major, minor = ctl.version()
    except OSError as exc:
        print(f"{AUTOFS_DEVICE}: {exc.strerror}")
        return 1
    print(f"{AUTOFS_DEVICE}: control interface {major}.{minor}")
    return 0
