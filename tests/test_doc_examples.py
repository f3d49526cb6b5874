"""Every program in docs/examples runs as the tutorials show, against the real kernel.

Each runs as a fresh process in its own session (so its lookups are never made from an
automounter's process group), under a deadline, and must print what proves it worked:
file contents read through an automount, the fd numbers a worker ended up with, the pid
that serves a pipe. Each example moves itself into a private mount namespace before it
mounts anything and says, at the end, that nothing is left mounted.
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

# Lines each example must print; "re:" marks a regular expression searched in the output.
EXPECTED = {
    "first_automounter.py": [
        "re:mounted /tmp/first-automounter-\\S+/exports/hello for pid \\d+",
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
        "data/nosuch: ls: cannot access '$ROOT/data/nosuch': No such file or directory",
        "$ROOT/data  (indirect, active, source pyautofs)",
        "$ROOT/direct/beta  (direct, active, source pyautofs)",
        "$ROOT/data/project/tools  (offset, active, source pyautofs)",
        "re:served by pid (\\d+) \\(python[0-9.]*\\), read end on fd \\d+, pgrp \\1",
        "  beneath   $ROOT/data/scratch  tmpfs tmpfs",
        "after SIGHUP, data/renamed: beta.txt",
        "exit status: 0",
        "  serving 2 autofs mount(s); pid",
        "  maps re-read",
        "  SIGTERM: shutting down",
        "still mounted: False",
    ],
    "pass_fds.py": [
        "snapshot: (b'first', b'second') | the pipe still holds: b'first'",
        "worker: fds [100, 101] installed, fd 100 reads [b'first', b'second']",
        "the restored pipe now holds: b'written by the worker'",
        "send_fds: 600 fds -> received 600, all close-on-exec: True",
    ],
    "migrate_mount.py": [
        "before: hello through the automount",
        "re:pipe_ino=(\\d+) is read by pid \\d+ on fd (\\d+)\n"
        "dumped: indirect, timeout 600 s, owner fd \\2, 0 queued request\\(s\\), \\d+ bytes",
        "old owner killed, mount removed: True",
        "re:rebuilt: pipe_ino=\\d+, taken over by the new owner: True",
        "re:restored owner: serving /tmp/migrate-\\S+/mnt, reading its pipe on fd \\d+",
        "after: hello through the automount",
        "re:restored owner: mounted 'data' for pid \\d+, read from fd \\d+",
        "same fd as the old owner: True",
        "autofs mounts left: []",
    ],
    "upgrade.py": [
        "before: read through the automount",
        "old process exited with 0",
        "slow: read through the automount (exit status 0)",
        "after: read through the automount",
        "the pipe is now read by the successor: True",
        # The request in flight at SIGUSR2 was finished and answered by the old process.
        "re:(?s)old started slow\n.*old mounted slow\n.*old handed over to new",
        "new serving",
        "new mounted after",
        "autofs mounts left: []",
    ],
}


def test_every_example_is_checked() -> None:
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_runs_as_documented(name: str) -> None:
    before = [i.mount_point for i in read_mountinfo()]
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        capture_output=True,
        text=True,
        timeout=60,
        start_new_session=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr and "Warning" not in done.stderr, done.stderr
    for line in EXPECTED[name]:
        if line.startswith("re:"):
            assert re.search(line[3:], done.stdout), f"{line!r} not in:\n{done.stdout}"
        else:
            assert line in done.stdout, f"{line!r} not in:\n{done.stdout}"
    # The examples mount in namespaces of their own: nothing reaches the test's.
    assert [i.mount_point for i in read_mountinfo()] == before
