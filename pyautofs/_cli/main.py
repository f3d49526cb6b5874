"""The ``pyautofs`` command: argument parsing and dispatch to one module per subcommand.

Each subcommand module in this package provides ``add_parser(subparsers)``, which registers
its parser and sets ``func`` (a ``Callable[[argparse.Namespace], int]``) as a default.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Subcommand modules, in the order ``--help`` lists them.
_SUBCOMMANDS = ("demo", "serve", "inspect", "bench", "version")


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser of the ``pyautofs`` command."""
    parser = argparse.ArgumentParser(
        prog="pyautofs",
        description="The Linux autofs protocol and file-descriptor passing.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _SUBCOMMANDS:
        try:
            module = importlib.import_module(f"pyautofs._cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"pyautofs._cli.{name}":
                raise
            continue
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    status: int = args.func(args)
    return status
