"""fd passing: fds/s over a socketpair between two processes, side by side.

Variants: pyautofs (send_fds/recv_fds), pyautofs-trio (FdChannel), stdlib
(socket.send_fds/recv_fds), raw-trio (trio sendmsg/recvmsg), anyio-trio (anyio's
send_fds/receive_fds on trio), and c (sendmsg/recvmsg in C, compiled now with the system
compiler; reported missing when there is none). The receiver closes what it receives, in
every variant. Batches beyond 253 fds exist only for pyautofs's own variants; the others
cannot carry them in one call.
"""

from __future__ import annotations

import array
import importlib.util
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import trio

import pyautofs
from pyautofs._sys._trust import SAFE_PATH, UntrustedPathError, check_trusted, trusted_program

TITLE = "fd passing over a socketpair: fds/s (median of repeats), ratios to stdlib and C"
BATCHES = (1, 16, 64, 253, 1000)
_C_SOURCE = Path(__file__).with_name("fdpass_c.c")


def _sender(kind: str, sock: socket.socket, fds: list[int], messages: int) -> None:
    if kind in ("pyautofs", "pyautofs-trio"):
        for _ in range(messages):
            pyautofs.send_fds(sock, fds)
    else:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
        for _ in range(messages):
            sock.sendmsg([b"x"], anc)


def _receive_sync(kind: str, sock: socket.socket, batch: int, messages: int) -> None:
    close = os.close
    if kind == "pyautofs":
        for _ in range(messages):
            for fd in pyautofs.recv_fds(sock)[1]:
                close(fd)
    else:
        for _ in range(messages):
            for fd in socket.recv_fds(sock, 1, batch)[1]:
                close(fd)


async def _receive_async(kind: str, sock: socket.socket, batch: int, messages: int) -> None:
    close = os.close
    if kind == "pyautofs-trio":
        chan = pyautofs.FdChannel(sock)
        for _ in range(messages):
            for fd in (await chan.receive())[1]:
                close(fd)
        return
    if kind == "raw-trio":
        tsock = trio.socket.from_stdlib_socket(sock)
        space = socket.CMSG_SPACE(batch * 4)
        for _ in range(messages):
            _, anc, _, _ = await tsock.recvmsg(1, space, socket.MSG_CMSG_CLOEXEC)
            for fd in array.array("i", anc[0][2]):
                close(fd)
        return
    raise ValueError(f"unknown async variant {kind!r}")


async def _anyio_receive(sock: socket.socket, batch: int, messages: int) -> None:
    import anyio.abc

    stream = await anyio.abc.UNIXSocketStream.from_socket(sock)
    close = os.close
    for _ in range(messages):
        _, fds = await stream.receive_fds(1, batch)
        for fd in fds:
            close(fd)


def _measure_python(kind: str, batch: int, messages: int) -> float:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    r, w = os.pipe()
    fds = ([r, w] * ((batch + 1) // 2))[:batch]
    pid = os.fork()
    if pid == 0:
        a.close()
        try:
            _sender(kind, b, fds, messages)
        finally:
            os._exit(0)
    b.close()
    t0 = time.perf_counter()
    if kind in ("pyautofs", "stdlib"):
        _receive_sync(kind, a, batch, messages)
    elif kind == "anyio-trio":
        trio.run(_anyio_receive, a, batch, messages)
    else:
        trio.run(_receive_async, kind, a, batch, messages)
    elapsed = time.perf_counter() - t0
    os.waitpid(pid, 0)
    os.close(r)
    os.close(w)
    if a.fileno() >= 0:
        a.close()
    return batch * messages / elapsed


def _compile_c(workdir: str) -> str | None:
    """Build the C reference into ``workdir`` (a fresh 0700 directory of this run).

    Never a cached binary at a fixed path: anyone may create ``$TMPDIR/anything`` first, and
    this benchmark runs as root. The compiler and the source must pass
    :func:`~pyautofs._sys._trust.check_trusted` too, and the compiler runs with a fixed PATH
    and its temporaries in ``workdir``.
    """
    cc = trusted_program("cc") or trusted_program("gcc")
    if cc is None:
        return None
    source = check_trusted(_C_SOURCE)
    out = os.path.join(workdir, "fdpass_c")
    env = {"PATH": SAFE_PATH, "TMPDIR": workdir, "LC_ALL": "C"}
    subprocess.run([cc, "-O2", "-o", out, source], check=True, env=env, cwd=workdir, timeout=120)
    return out


def _measure_c(binary: str, batch: int, messages: int) -> float:
    out = subprocess.run(
        [binary, str(batch), str(messages)], capture_output=True, text=True, check=True, timeout=300
    )
    return batch * messages / float(out.stdout.strip())


def run(quick: bool, progress: Callable[..., None]) -> list[dict[str, object]]:
    """Measure every variant at every batch size; return result rows."""
    workdir = tempfile.mkdtemp(prefix="pyautofs-bench-fdpass-")  # 0700, new every run
    try:
        try:
            check_trusted(workdir)  # and $TMPDIR above it: nobody else can swap it
            c_binary = _compile_c(workdir)
            c_missing = "no C compiler"
        except UntrustedPathError as exc:
            c_binary, c_missing = None, str(exc.strerror)
        return _run(quick, progress, c_binary, c_missing)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _run(
    quick: bool, progress: Callable[..., None], c_binary: str | None, c_missing: str
) -> list[dict[str, object]]:
    repeats = 3 if quick else 7
    budget = 20_000 if quick else 200_000  # fds per measurement
    rows: list[dict[str, object]] = []
    variants = ["c", "stdlib", "pyautofs", "raw-trio", "anyio-trio", "pyautofs-trio"]
    anyio_missing = importlib.util.find_spec("anyio") is None
    if anyio_missing:
        variants.remove("anyio-trio")
    steps = [
        (batch, variant)
        for batch in BATCHES
        for variant in variants
        if not (batch > 253 and variant not in ("pyautofs", "pyautofs-trio", "c"))
        and not (variant == "c" and (c_binary is None or batch > 253))
    ]
    for batch in BATCHES:
        messages = max(50, budget // batch)
        medians: dict[str, float] = {}
        for variant in variants:
            if batch > 253 and variant not in ("pyautofs", "pyautofs-trio", "c"):
                continue
            if variant == "c" and (c_binary is None or batch > 253):
                continue
            progress(f"{variant} batch {batch}", steps.index((batch, variant)), len(steps))
            samples = []
            for _ in range(repeats):
                if variant == "c":
                    assert c_binary is not None
                    samples.append(_measure_c(c_binary, batch, messages))
                else:
                    samples.append(_measure_python(variant, batch, messages))
            medians[variant] = statistics.median(samples)
        for variant, fds_per_s in medians.items():
            row: dict[str, object] = {
                "variant": variant,
                "batch": batch,
                "fds_per_s": round(fds_per_s),
                "messages_per_s": round(fds_per_s / batch),
            }
            if "stdlib" in medians:
                row["vs_stdlib"] = round(fds_per_s / medians["stdlib"], 2)
            if "c" in medians:
                row["vs_c"] = round(fds_per_s / medians["c"], 2)
            rows.append(row)
        if c_binary is None:
            rows.append({"variant": "c", "batch": batch, "missing": c_missing})
        if anyio_missing and batch <= 253:
            rows.append({"variant": "anyio-trio", "batch": batch, "missing": "anyio not installed"})
    return rows
