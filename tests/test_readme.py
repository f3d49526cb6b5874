"""Every command and code block in README.md runs as shown.

Each fenced block is one test. A block preceded by ``<!-- test: skip (installs packages) -->``
is skipped here (CI runs those steps itself). Python blocks run with this interpreter (the
venv's); sh blocks run with bash, with the venv's ``bin`` first in PATH so ``pyautofs`` is
the package's console script.

Two kinds of block serve mounts on fixed paths until stopped, so they run in a mount
namespace of their own, which a holder process keeps alive, with tmpfs over ``/srv``,
``/mnt`` and ``/run`` and an overlay over ``/etc``, so that nothing they do (mounts, map
files, lock files) reaches the machine:

- the custom automounter (it sleeps forever): it gets ``/srv/exports/hello/f``, a lookup of
  ``/mnt/auto/hello/f`` from another session must read it, then SIGINT must stop it with
  nothing left mounted;
- each ``pyautofs serve`` line, against ``/etc/auto.data`` and ``/etc/auto.master`` written
  in the overlay: same lookup, then SIGTERM must stop it with status 0 and nothing mounted.

Every process gets a deadline and is killed (and reaped) if it overruns.
"""

from __future__ import annotations

import os
import re
import select
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import attrs
import pytest

pytestmark = pytest.mark.kernel

README = Path(__file__).resolve().parent.parent / "README.md"
SKIP_MARK = "<!-- test: skip (installs packages) -->"
VENV_BIN = Path(sys.executable).parent
DEADLINE = 30.0  # seconds, for any one step
CONTENT = "hello from /srv/exports/hello"

# The namespace a long-running block gets. /etc stays as it is but writable in the namespace
# only (an overlay whose upper layer is on the namespace's /run tmpfs).
NAMESPACE_SETUP = f"""
set -eu
mount -t tmpfs pyautofs-readme-run /run
mount -t tmpfs pyautofs-readme-srv /srv
mount -t tmpfs pyautofs-readme-mnt /mnt
mkdir -p /run/etc-upper /run/etc-work
mount -t overlay pyautofs-readme-etc \
    -o lowerdir=/etc,upperdir=/run/etc-upper,workdir=/run/etc-work /etc
mkdir -p /srv/exports/hello
printf '%s' {shlex.quote(CONTENT)} > /srv/exports/hello/f
printf '%s\\n' '* -fstype=bind :/srv/exports/&' > /etc/auto.data
printf '%s\\n' '/mnt/auto /etc/auto.data' > /etc/auto.master
echo ready
exec sleep 3600
"""


@attrs.frozen
class Block:
    """One fenced code block of the README."""

    line: int
    lang: str
    text: str
    skip: bool


def readme_blocks() -> list[Block]:
    lines = README.read_text().splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        m = re.match(r"^```(\w*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        start = i
        end = start + 1
        while not lines[end].startswith("```"):
            end += 1
        previous = next((x for x in reversed(lines[:start]) if x.strip()), "")
        blocks.append(
            Block(
                start + 1,
                m.group(1),
                "\n".join(lines[start + 1 : end]) + "\n",
                previous.strip() == SKIP_MARK,
            )
        )
        i = end + 1
    return blocks


BLOCKS = readme_blocks()


def env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}


def kill(proc: subprocess.Popen[bytes], *, group: bool = False) -> None:
    """Kill a process (its group, if it leads one) and reap it."""
    if proc.poll() is None:
        try:
            if group:
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.kill()
        except ProcessLookupError:
            pass
    proc.wait(timeout=DEADLINE)


# -- a private mount namespace kept by a holder process ---------------------------------


@attrs.frozen
class Namespace:
    holder: subprocess.Popen[bytes]

    @property
    def enter(self) -> list[str]:
        """The argv prefix that runs a command in this namespace."""
        return ["nsenter", f"--mount=/proc/{self.holder.pid}/ns/mnt", "--"]

    def mounts(self) -> list[tuple[str, str]]:
        """(mount point, fstype) of every mount in the namespace."""
        out = []
        with open(f"/proc/{self.holder.pid}/mountinfo") as f:
            for line in f:
                fields, _, rest = line.partition(" - ")
                out.append((fields.split()[4], rest.split()[0]))
        return out

    def lookup(self, path: str) -> subprocess.CompletedProcess[str]:
        """Read ``path`` from a process in its own session (so it triggers mounts)."""
        return subprocess.run(
            [*self.enter, "cat", path],
            capture_output=True,
            text=True,
            timeout=DEADLINE,
            check=False,
            start_new_session=True,
        )


@contextmanager
def private_namespace() -> Iterator[Namespace]:
    holder = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "bash", "-c", NAMESPACE_SETUP],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    try:
        assert holder.stdout is not None
        ready, _, _ = select.select([holder.stdout], [], [], DEADLINE)
        assert ready, "the namespace was not set up in time"
        assert holder.stdout.readline() == b"ready\n", "the namespace set-up failed"
        yield Namespace(holder)
    finally:
        kill(holder)
        if holder.stdout is not None:
            holder.stdout.close()


def wait_for(
    condition: str, check: Callable[[], bool], proc: subprocess.Popen[bytes], log: Path
) -> None:
    deadline = time.monotonic() + DEADLINE
    while not check():
        assert proc.poll() is None, (
            f"exited ({proc.returncode}) before {condition}:\n{log_text(log)}"
        )
        assert time.monotonic() < deadline, f"no {condition} in {DEADLINE}s:\n{log_text(log)}"
        time.sleep(0.02)


def log_text(log: Path) -> str:
    return log.read_text(errors="replace") if log.exists() else ""


def assert_nothing_left(ns: Namespace) -> None:
    left = [(mp, t) for mp, t in ns.mounts() if t == "autofs" or mp.startswith("/mnt/auto")]
    assert not left, left
    assert not os.path.exists(f"/proc/{ns.holder.pid}/root/mnt/auto"), "mount point left"


# -- the block kinds --------------------------------------------------------------------


def run_automounter(block: Block, tmp_path: Path) -> None:
    """The custom automounter: serve /mnt/auto from /srv/exports until SIGINT."""
    script = tmp_path / "automounter.py"
    script.write_text(block.text)
    log = tmp_path / "automounter.log"
    with private_namespace() as ns, log.open("wb") as err:
        proc = subprocess.Popen(
            [*ns.enter, sys.executable, str(script)],
            stdout=err,
            stderr=err,
            stdin=subprocess.DEVNULL,
            env=env(),
        )
        try:
            # nsenter execs the interpreter: proc.pid is the automounter's pid.
            def mounted() -> bool:
                with open(f"/proc/{proc.pid}/mountinfo") as f:
                    return any(
                        line.split()[4] == "/mnt/auto" and line.partition(" - ")[2][:7] == "autofs "
                        for line in f
                    )

            wait_for("autofs mount on /mnt/auto", mounted, proc, log)
            r = ns.lookup("/mnt/auto/hello/f")
            assert (r.returncode, r.stdout) == (0, CONTENT), r.stderr + log_text(log)
            r = ns.lookup("/mnt/auto/nosuch/f")
            assert r.returncode != 0 and "No such file" in r.stderr, r
            proc.send_signal(signal.SIGINT)
            status = proc.wait(timeout=DEADLINE)
            # The example turns SIGINT into a graceful shutdown: status 0, no traceback.
            assert status == 0, log_text(log)
            assert "Traceback" not in log_text(log), log_text(log)
            assert_nothing_left(ns)
        finally:
            kill(proc)


def wait_ready(notify: socket.socket, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Wait for READY=1 on the NOTIFY_SOCKET the test bound (sd_notify, as under systemd)."""
    deadline = time.monotonic() + DEADLINE
    while True:
        assert proc.poll() is None, f"exited ({proc.returncode}) before READY:\n{log_text(log)}"
        left = deadline - time.monotonic()
        assert left > 0, f"no READY=1 in {DEADLINE}s:\n{log_text(log)}"
        readable = select.select([notify], [], [], min(left, 0.2))[0]
        if readable and b"READY=1" in notify.recv(4096).split(b"\n"):
            return


def run_serve_line(line: str, tmp_path: Path) -> None:
    """One ``pyautofs serve`` command: serve, look up, SIGTERM, exit 0, nothing left.

    The command runs exactly as written; readiness comes from sd_notify (NOTIFY_SOCKET),
    as a supervisor would get it, not from the log."""
    log = tmp_path / "serve.log"
    notify_path = tmp_path / "notify"
    with (
        private_namespace() as ns,
        log.open("wb") as err,
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as notify,
    ):
        notify.bind(str(notify_path))
        proc = subprocess.Popen(
            [*ns.enter, "bash", "-c", line],
            stdout=err,
            stderr=err,
            stdin=subprocess.DEVNULL,
            env={**env(), "NOTIFY_SOCKET": str(notify_path)},
            start_new_session=True,
        )
        try:
            wait_ready(notify, proc, log)
            r = ns.lookup("/mnt/auto/hello/f")
            assert (r.returncode, r.stdout) == (0, CONTENT), r.stderr + log_text(log)
            os.killpg(proc.pid, signal.SIGTERM)
            assert proc.wait(timeout=DEADLINE) == 0, log_text(log)
            assert_nothing_left(ns)
        finally:
            kill(proc, group=True)


def run_plain(block: Block, tmp_path: Path) -> None:
    """Any other block: it must finish in time with status 0."""
    if block.lang == "python":
        argv = [sys.executable, "-"]
    elif block.lang == "sh":
        argv = ["bash", "-euo", "pipefail", "-s"]
    else:
        pytest.fail(f"README.md line {block.line}: no way to run a {block.lang!r} block")
    r = subprocess.run(
        argv,
        input=block.text,
        capture_output=True,
        text=True,
        timeout=DEADLINE * 2,
        check=False,
        env=env(),
        cwd=tmp_path,
        start_new_session=True,
    )
    assert r.returncode == 0, f"README.md line {block.line}:\n{r.stdout}{r.stderr}"


# -- the tests ---------------------------------------------------------------------------


def test_readme_has_the_blocks_this_test_knows() -> None:
    kinds = [b.lang for b in BLOCKS]
    assert kinds.count("python") >= 2 and kinds.count("sh") >= 4, kinds
    assert any("automounter.run" in b.text for b in BLOCKS)
    assert any(line.startswith("pyautofs serve") for b in BLOCKS for line in b.text.splitlines())


@pytest.mark.parametrize("block", BLOCKS, ids=[f"line{b.line}-{b.lang}" for b in BLOCKS])
def test_readme_block_runs_as_shown(block: Block, tmp_path: Path) -> None:
    if block.skip:
        pytest.skip(f"README.md line {block.line}: installs packages (CI runs it)")
    if block.lang == "python" and "automounter.run" in block.text:
        run_automounter(block, tmp_path)
        return
    lines = [x for x in block.text.splitlines() if x.strip()]
    if block.lang == "sh" and all(x.startswith("pyautofs serve ") for x in lines):
        for i, line in enumerate(lines):
            (tmp_path / str(i)).mkdir()
            run_serve_line(line, tmp_path / str(i))
        return
    run_plain(block, tmp_path)
