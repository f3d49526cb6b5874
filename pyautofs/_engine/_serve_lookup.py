"""What a lookup needs besides its map: the substitution variables of a requester, and a
map program run under a deadline, its output bounded.
"""

from __future__ import annotations

import errno
import grp
import logging
import os
import platform
import pwd
import signal
import subprocess
from collections.abc import Iterator, Mapping, Sequence

import attrs
import trio

from .._maps._program import MAX_PROGRAM_OUTPUT
from .._proto._escape import printable
from ._requests import Requester

__all__ = [
    "MAX_PROGRAM_STDERR",
    "ProgramMapError",
    "ProgramRun",
    "Variables",
    "describe_run",
    "exec_problem",
    "run_program",
]

log = logging.getLogger("pyautofs")


MAX_PROGRAM_STDERR = 4096
"""Bytes of a map program's stderr kept for the log; the rest is read and dropped."""


_UNAME = platform.uname()
_HOST_VARIABLES = {
    "HOST": _UNAME.node,
    "SHOST": _UNAME.node.split(".")[0],
    "ARCH": _UNAME.machine,
    "CPU": _UNAME.machine,
    "OSNAME": _UNAME.system,
    "OSREL": _UNAME.release,
    "OSVERS": _UNAME.version,
}


class Variables(Mapping[str, str]):
    """The macros automount provides, for one requester, computed only when a map uses one.

    Most maps use none, and a passwd lookup per request would cost more than the mount.
    """

    __slots__ = ("_requester", "_values")

    def __init__(self, requester: Requester) -> None:
        self._requester = requester
        self._values: dict[str, str] | None = None

    def _all(self) -> dict[str, str]:
        if self._values is None:
            r = self._requester
            values = {"UID": str(r.uid), "GID": str(r.gid), **_HOST_VARIABLES}
            try:
                pw = pwd.getpwuid(r.uid)
                values["USER"], values["HOME"] = pw.pw_name, pw.pw_dir
            except KeyError:
                pass
            try:
                values["GROUP"] = grp.getgrgid(r.gid).gr_name
            except KeyError:
                pass
            self._values = values
        return self._values

    def __getitem__(self, name: str) -> str:
        return self._all()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())


class ProgramMapError(OSError):
    """A map program failed (exit status, signal, deadline, exec error): not "no such key".

    Its errno is ENOENT, so the requester sees what automount(8) gives it; the message and
    the log say what went wrong.
    """


async def read_bounded(stream: trio.abc.ReceiveStream, limit: int) -> tuple[bytes, int]:
    """Up to ``limit`` bytes of ``stream`` (read to its end); and how many there were."""
    kept = bytearray()
    total = 0
    while True:
        chunk = await stream.receive_some(65536)
        if not chunk:
            return bytes(kept), total
        total += len(chunk)
        if len(kept) < limit:
            kept += chunk[: limit - len(kept)]


@attrs.frozen
class ProgramRun:
    """What one run of a map program did."""

    returncode: int | None
    """Exit status (negative: killed by that signal); None when it missed its deadline."""
    stdout: bytes
    stdout_total: int
    stderr: bytes
    stderr_total: int


async def run_program(argv: Sequence[str], env: Mapping[str, str], timeout: float) -> ProgramRun:
    """Run a map program with bounded output capture and a deadline (then SIGKILL).

    It runs in the engine's process group (so its path walks never trigger our own mounts)
    with stdin from /dev/null. An exec failure raises ``OSError``.
    """
    proc = await trio.lowlevel.open_process(
        list(argv),
        env=dict(env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out: tuple[bytes, int] = (b"", 0)
    err: tuple[bytes, int] = (b"", 0)
    try:
        assert proc.stdout is not None and proc.stderr is not None
        with trio.move_on_after(timeout) as scope:

            async def read_out() -> None:
                nonlocal out
                out = await read_bounded(proc.stdout, MAX_PROGRAM_OUTPUT + 1)  # type: ignore[arg-type]

            async def read_err() -> None:
                nonlocal err
                err = await read_bounded(proc.stderr, MAX_PROGRAM_STDERR)  # type: ignore[arg-type]

            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_out)
                nursery.start_soon(read_err)
            await proc.wait()
    finally:
        with trio.CancelScope(shield=True):
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    await stream.aclose()
    returncode = None if scope.cancelled_caught else proc.returncode
    return ProgramRun(returncode, out[0], out[1], err[0], err[1])


def exec_problem(path: str, exc: OSError) -> str:
    """Why a map program could not be started, in words (a missing ``#!`` interpreter...)."""
    if exc.errno == errno.ENOENT and os.path.exists(path):
        try:
            with open(path, "rb") as f:
                first = f.readline(512)
        except OSError:
            first = b""
        if first.startswith(b"#!"):
            words = first[2:].split()
            interpreter = words[0] if words else b""
            return f"its interpreter {printable(interpreter)} (from the #! line) " + (
                "does not exist" if interpreter else "is missing from the #! line"
            )
    if exc.errno == errno.ENOEXEC:
        return "not a valid executable (a script needs a #! line)"
    return exc.strerror or str(exc)


def describe_run(run: ProgramRun, timeout: float) -> str:
    if run.returncode is None:
        what = f"no answer within {timeout:g} s; killed"
    elif run.returncode < 0:
        try:
            what = f"killed by {signal.Signals(-run.returncode).name}"
        except ValueError:
            what = f"killed by signal {-run.returncode}"
    elif run.stdout_total > MAX_PROGRAM_OUTPUT:
        what = f"printed {run.stdout_total} bytes, over the {MAX_PROGRAM_OUTPUT}-byte limit"
    else:
        what = f"exit status {run.returncode}"
    if run.stderr_total:
        cut = f" (of {run.stderr_total} bytes)" if run.stderr_total > len(run.stderr) else ""
        what += f"; stderr{cut}: {printable(run.stderr.strip(), 1024)}"
    return what
