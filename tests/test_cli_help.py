"""``pyautofs --help`` and every subcommand's ``--help`` are complete and show examples."""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys

import pytest

from pyautofs._cli.main import build_parser


def subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("pyautofs has no subcommands")


SUBCOMMANDS = subparsers()


def help_text(*args: str) -> str:
    """``pyautofs ARGS --help`` as a user runs it."""
    r = subprocess.run(
        [sys.executable, "-m", "pyautofs", *args, "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert r.returncode == 0 and not r.stderr, r
    return r.stdout


def examples(text: str) -> list[str]:
    """The commands of the "examples:" section (the part of a line before its comment)."""
    section = text.split("\nexamples:\n", 1)[1].split("\n\n", 1)[0]
    return [re.split(r"\s{2,}", line.strip())[0] for line in section.splitlines()]


def test_every_subcommand_is_there() -> None:
    assert set(SUBCOMMANDS) == {
        "demo",
        "serve",
        "inspect",
        "dump",
        "criu-hook",
        "bench",
        "version",
    }


def test_top_level_help_lists_commands_and_examples() -> None:
    text = help_text()
    assert "\nexamples:\n" in text
    for name in SUBCOMMANDS:
        # In the command list, with its summary (argparse puts a long name's on the next line).
        assert re.search(rf"^    {re.escape(name)}\s", text, re.M), name
        assert f"pyautofs {name}" in text, name  # and in an example
    assert "pyautofs COMMAND --help" in text


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_subcommand_help_has_examples_and_every_option(name: str) -> None:
    text = help_text(name)
    assert "\nexamples:\n" in text, text
    for action in SUBCOMMANDS[name]._actions:
        if action.help == argparse.SUPPRESS:
            continue
        if action.option_strings:
            for option in action.option_strings:
                assert re.search(rf"(^|[\s\[,]){re.escape(option)}\b", text), (name, option)
        else:
            assert str(action.metavar or action.dest) in text, (name, action.dest)
        assert action.help and action.help.split()[0] in text, (name, action.help)


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_every_example_parses(name: str) -> None:
    parser = build_parser()
    commands = examples(help_text(name))
    assert commands, name
    for command in commands:
        argv = shlex.split(command)
        assert argv[:2] == ["pyautofs", name], command
        args = parser.parse_args(argv[1:])
        assert args.command == name and callable(args.func), command


def test_top_level_examples_parse() -> None:
    parser = build_parser()
    for command in examples(help_text()):
        if command == "pyautofs --version":
            with pytest.raises(SystemExit) as exited:
                parser.parse_args(["--version"])
            assert exited.value.code == 0
            continue
        args = parser.parse_args(shlex.split(command)[1:])
        assert callable(args.func), command
