"""Every program in docs/examples runs as the tutorials show, against the real kernel.

Each runs in a fresh process (it moves itself into a private mount namespace), under a
deadline, and must print what the tutorial says it prints.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from pyautofs._sys._mountinfo import read_mountinfo

pytestmark = pytest.mark.kernel

EXAMPLES = Path(__file__).resolve().parent.parent / "docs" / "examples"

EXPECTED = {
    "first_automounter.py": [
        "hello: hello from an automounted directory",
        "nosuch: failed (1)",
        "requests=2 ready=1 failed=1",
        "mounted after shutdown: False",
    ],
    "serve_maps.py": [
        "data/alpha: alpha.txt",
        "data/project: alpha.txt tools",
        "data/project/tools: tools.txt",
        "data/scratch: (an empty tmpfs)",
        "direct/beta: beta.txt",
        "No such file or directory",
        "after SIGHUP, data/renamed: beta.txt",
        "exit status: 0",
        "still mounted: False",
    ],
    "pass_fds.py": [
        "job 1: installed 3 fds at 100..102",
        "worker wrote to pipe 2",
        "snapshot: (b'first', b'second') | original still holds: b'first'",
        "restored copy reads: b'first' b'second'",
        "FdChannel: 400 fds -> received 400",
    ],
    "migrate_mount.py": [
        "dumped: mode=indirect timeout=600s",
        "re:owner pid=\\d+ read_fd=(\\d+) write_fd=None",
        "re:the worker \\(pid \\d+\\) holds the read end at fd \\d+: True",
    ],
    "upgrade.py": [
        "old process exited with 0",
        "the pipe is read by the successor: True",
        "before the upgrade (mounted before, still there) | after the upgrade (new key)",
        "autofs mounts left: []",
    ],
}


def test_every_example_is_checked() -> None:
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_runs_as_documented(name: str) -> None:
    before = {i.mount_point for i in read_mountinfo()}
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr and "Warning" not in done.stderr, done.stderr
    for line in EXPECTED[name]:
        if line.startswith("re:"):
            assert re.search(line[3:], done.stdout), f"{line!r} not in:\n{done.stdout}"
        else:
            assert line in done.stdout, f"{line!r} not in:\n{done.stdout}"
    assert {i.mount_point for i in read_mountinfo()} == before
