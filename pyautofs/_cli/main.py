"""The ``pyautofs`` command: argument parsing and dispatch to one module per subcommand.

Each subcommand module in this package provides ``HELP`` (its line in ``pyautofs --help``),
``DESCRIPTION`` and ``EXAMPLES`` (the text of its ``--help``), ``add_arguments(parser)`` and
``main(args) -> int``; the command is the module's name with ``-`` for ``_``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import NoReturn

from .. import __version__
from ._errors import describe, os_errors

# Subcommand modules, in the order ``--help`` lists them.
_SUBCOMMANDS = ("demo", "serve", "inspect", "dump", "criu_hook", "bench", "version")

_DESCRIPTION = """\
The Linux autofs protocol and file-descriptor passing: serve autofs maps, see every autofs
mount and who serves it, and watch an automounter work. Mounting needs root
(CAP_SYS_ADMIN) and /dev/autofs (CONFIG_AUTOFS_FS); inspect and version need neither."""

_EXAMPLES = """\
examples:
  pyautofs demo                                  an automounter at work, in a private namespace
  pyautofs serve /mnt/auto /etc/auto.data        serve one indirect map, in the foreground
  pyautofs serve --master /etc/auto.master       serve every mount the master map names
  pyautofs inspect                               every autofs mount and the process serving it
  pyautofs dump /mnt/auto -o auto.img            capture a mount and its pipe into an image
  pyautofs criu-hook --pid 1234 pause            pause expiry of a serve before a checkpoint
  pyautofs bench list                            the benchmarks there are
  pyautofs version                               versions of pyautofs and the kernel interface
  pyautofs --version                             the pyautofs version only

'pyautofs COMMAND --help' shows a command's options and more examples.
"""


class Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line: what is wrong, and where to look.

    Subcommand parsers are of this class too (``add_subparsers`` uses the parent's class).
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser of the ``pyautofs`` command."""
    parser = Parser(
        prog="pyautofs",
        description=_DESCRIPTION,
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--version", action="version", version=f"pyautofs {__version__}", help="print the version"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _SUBCOMMANDS:
        try:
            module = importlib.import_module(f"pyautofs._cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"pyautofs._cli.{name}":
                raise
            continue
        p = sub.add_parser(
            name.replace("_", "-"),
            help=module.HELP,
            description=module.DESCRIPTION,
            epilog=module.EXAMPLES,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(p)
        p.set_defaults(func=module.main)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        status: int = args.func(args)
    except KeyboardInterrupt:
        print(f"pyautofs {args.command}: interrupted", file=sys.stderr)
        return 130
    except BaseException as exc:
        # An OSError (alone, or all of an exception group's) is about this machine, not a
        # bug: say what and where, without a traceback. Anything else is a bug: re-raise.
        errors = os_errors(exc)
        if errors is None:
            raise
        for error in dict.fromkeys(describe(e) for e in errors):
            print(f"pyautofs {args.command}: {error}", file=sys.stderr)
        return 1
    return status
