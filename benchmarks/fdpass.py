"""fd passing: fds/s received over a socketpair between two processes, side by side.

Variants (the receiver is what is measured; every sender reuses one prebuilt message):

- ``c``: ``recvmsg`` in C (compiled now, in a fresh private directory; missing without a
  compiler);
- ``stdlib``: ``socket.recv_fds``; ``pyautofs``: ``pyautofs.recv_fds``;
  ``pyautofs-many``: ``pyautofs.recv_fds_many`` (every queued message per call);
- ``raw-trio``: trio's ``sock.recvmsg``; ``anyio-trio``: anyio's ``receive_fds`` on trio;
  ``pyautofs-trio``: ``FdChannel.receive``; ``pyautofs-trio-many``:
  ``FdChannel.receive_many``.

Every receiver checks ``MSG_CTRUNC`` (or its library does, or does not: anyio and stdlib
do not) and closes what it receives, with one of two sinks, for C and Python alike:
``close`` (one ``close()`` per fd) and ``close_range`` (one ``close_range()`` per contiguous
run of fd numbers: :func:`pyautofs.close_fds`, or the same loop in C). Batches beyond 253
fds exist only for pyautofs's own variants; the others cannot carry them in one call.

Each measurement forks a sender that waits on a gate; the receiver starts the clock and
opens the gate once it is set up (imports, ``trio.run`` and channel creation stay outside
the timed region). Repeats are interleaved across variants, and medians reported.
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
from collections.abc import Callable, Iterable
from pathlib import Path

import trio

import pyautofs
from pyautofs.lowlevel import (
    SAFE_PATH,
    UntrustedPathError,
    ancillary,
    check_trusted,
    encode_message,
    trusted_program,
)

TITLE = "fd passing over a socketpair: fds/s received (median of repeats), by sink"
BATCHES = (1, 16, 64, 253, 1000)
SINKS = ("close", "close_range")
VARIANTS = (
    "c",
    "stdlib",
    "pyautofs",
    "pyautofs-many",
    "raw-trio",
    "anyio-trio",
    "pyautofs-trio",
    "pyautofs-trio-many",
)
_OURS = ("pyautofs", "pyautofs-many", "pyautofs-trio", "pyautofs-trio-many")
_C_SOURCE = Path(__file__).with_name("fdpass_c.c")
_CTRUNC = int(socket.MSG_CTRUNC)
_MANY = 64  # messages per receive_many / recv_fds_many call, at most ...
_MANY_FDS = 4096  # ... and fds: a batch holds all its fds open at once


def _closer(sink: str) -> Callable[[Iterable[int]], None]:
    if sink == "close_range":
        return pyautofs.close_fds
    close = os.close

    def close_each(fds: Iterable[int]) -> None:
        for fd in fds:
            close(fd)

    return close_each


def _records(kind: str, fds: list[int]) -> list[tuple[list[bytes], list[tuple[int, int, bytes]]]]:
    """The prebuilt ``sendmsg`` calls of one message: the same loop sends every variant's."""
    if kind.startswith("pyautofs"):
        return [([bytes(p)], ancillary(f)) for p, f in encode_message(fds, b"", stream=True)]
    return [([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())])]


def _sender(
    sock: socket.socket,
    records: list[tuple[list[bytes], list[tuple[int, int, bytes]]]],
    messages: int,
) -> None:
    sendmsg = sock.sendmsg
    for _ in range(messages):
        for buffers, anc in records:
            sendmsg(buffers, anc)


def _receive_sync(kind: str, sock: socket.socket, batch: int, messages: int, sink: str) -> None:
    close = _closer(sink)
    if kind == "pyautofs":
        recv = pyautofs.recv_fds
        for _ in range(messages):
            close(recv(sock)[1])
    elif kind == "pyautofs-many":
        recv_many = pyautofs.recv_fds_many
        left = messages
        while left:
            got = recv_many(sock, min(left, _MANY, max(1, _MANY_FDS // batch)))
            for _, fds in got:
                close(fds)
            left -= len(got)
    else:
        recv_fds = socket.recv_fds
        for _ in range(messages):
            close(recv_fds(sock, 1, batch)[1])


async def _receive_async(
    kind: str, sock: socket.socket, batch: int, messages: int, sink: str, start: Callable[[], None]
) -> None:
    close = _closer(sink)
    if kind in ("pyautofs-trio", "pyautofs-trio-many"):
        chan = pyautofs.FdChannel(sock)
        start()
        if kind == "pyautofs-trio":
            receive = chan.receive
            for _ in range(messages):
                close((await receive())[1])
        else:
            left = messages
            while left:
                got = await chan.receive_many(min(left, _MANY, max(1, _MANY_FDS // batch)))
                for _, fds in got:
                    close(fds)
                left -= len(got)
    elif kind == "raw-trio":
        tsock = trio.socket.from_stdlib_socket(sock)
        space = socket.CMSG_SPACE(batch * 4)
        start()
        for _ in range(messages):
            _, anc, flags, _ = await tsock.recvmsg(1, space, socket.MSG_CMSG_CLOEXEC)
            if flags & _CTRUNC:
                raise RuntimeError("MSG_CTRUNC")
            close(array.array("i", anc[0][2]))
    elif kind == "anyio-trio":
        import anyio.abc

        stream = await anyio.abc.UNIXSocketStream.from_socket(sock)
        start()
        for _ in range(messages):
            close((await stream.receive_fds(1, batch))[1])
    else:
        raise ValueError(f"unknown async variant {kind!r}")


def _measure_python(kind: str, batch: int, messages: int, sink: str) -> float:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    r, w = os.pipe()
    gate_r, gate_w = os.pipe()
    fds = ([r, w] * ((batch + 1) // 2))[:batch]
    records = _records(kind, fds)
    pid = os.fork()
    if pid == 0:
        try:
            a.close()
            os.close(gate_w)
            os.read(gate_r, 1)
            _sender(b, records, messages)
        finally:
            os._exit(0)
    b.close()
    os.close(gate_r)
    t0 = 0.0

    def start() -> None:
        nonlocal t0
        t0 = time.perf_counter()
        os.write(gate_w, b"g")

    try:
        if kind in ("stdlib", "pyautofs", "pyautofs-many"):
            start()
            _receive_sync(kind, a, batch, messages, sink)
        else:
            trio.run(_receive_async, kind, a, batch, messages, sink, start)
        elapsed = time.perf_counter() - t0
    finally:
        os.close(gate_w)
        if a.fileno() >= 0:
            a.close()  # a receiver that failed early must not leave the sender blocked
        os.waitpid(pid, 0)
        os.close(r)
        os.close(w)
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


def _measure_c(binary: str, batch: int, messages: int, sink: str) -> float:
    out = subprocess.run(
        [binary, str(batch), str(messages), sink],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    return batch * messages / float(out.stdout.strip())


def run(quick: bool, progress: Callable[..., None]) -> list[dict[str, object]]:
    """Measure every variant at every batch size with both sinks; return result rows."""
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


def _applies(variant: str, batch: int) -> bool:
    return batch <= 253 or variant in _OURS


def _run(
    quick: bool, progress: Callable[..., None], c_binary: str | None, c_missing: str
) -> list[dict[str, object]]:
    repeats = 3 if quick else 7
    budget = 20_000 if quick else 150_000  # fds per measurement
    rows: list[dict[str, object]] = []
    missing = {"c": c_missing} if c_binary is None else {}
    if importlib.util.find_spec("anyio") is None:
        missing["anyio-trio"] = "anyio not installed"
    plan = {
        (batch, sink): [v for v in VARIANTS if _applies(v, batch) and v not in missing]
        for batch in BATCHES
        for sink in SINKS
    }
    total = sum(len(v) for v in plan.values()) * repeats
    done = 0
    for batch in BATCHES:
        messages = max(200, budget // batch)
        for sink in SINKS:
            variants = plan[(batch, sink)]
            samples: dict[str, list[float]] = {v: [] for v in variants}
            for rep in range(repeats):  # interleaved: each repeat runs every variant once
                for variant in variants:
                    progress(
                        f"batch {batch} sink {sink} {variant} ({rep + 1}/{repeats})", done, total
                    )
                    done += 1
                    if variant == "c":
                        assert c_binary is not None
                        samples[variant].append(_measure_c(c_binary, batch, messages, sink))
                    else:
                        samples[variant].append(_measure_python(variant, batch, messages, sink))
            medians = {v: statistics.median(s) for v, s in samples.items()}
            for variant, fds_per_s in medians.items():
                row: dict[str, object] = {
                    "variant": variant,
                    "batch": batch,
                    "sink": sink,
                    "fds_per_s": round(fds_per_s),
                    "messages_per_s": round(fds_per_s / batch),
                }
                for ref in ("c", "stdlib", "raw-trio", "anyio-trio"):
                    if ref in medians and ref != variant:
                        row[f"vs_{ref.replace('-', '_')}"] = round(fds_per_s / medians[ref], 2)
                rows.append(row)
            for variant, why in missing.items():
                if _applies(variant, batch):
                    rows.append({"variant": variant, "batch": batch, "sink": sink, "missing": why})
    return rows


def plot(rows: list[dict[str, object]], path: str) -> None:
    """fdpass.png: one panel per sink, bars per variant by batch, fds/s on a log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in rows if isinstance(r.get("fds_per_s"), int)]
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in measured)]
    batches = [b for b in BATCHES if any(r["batch"] == b for r in measured)]
    cmap = plt.get_cmap("tab10")
    fig, axes = plt.subplots(1, len(SINKS), figsize=(15, 5), sharey=True)
    width = 0.8 / max(1, len(variants))
    for ax, sink in zip(axes, SINKS, strict=True):
        for i, variant in enumerate(variants):
            xs, ys = [], []
            for g, batch in enumerate(batches):
                for r in measured:
                    if (r["variant"], r["batch"], r["sink"]) == (variant, batch, sink):
                        xs.append(g + (i - (len(variants) - 1) / 2) * width)
                        value = r["fds_per_s"]
                        assert isinstance(value, int)
                        ys.append(value)
            ax.bar(xs, ys, width, label=variant, color=cmap(i % cmap.N))
        ax.set_xticks(range(len(batches)), [str(b) for b in batches])
        ax.set_xlabel("fds per message (batch)")
        ax.set_yscale("log")  # 1-fd trio variants and 253-fd C differ by two decades
        ax.set_title(f"sink: {'close() per fd' if sink == 'close' else 'close_range() per run'}")
        ax.grid(axis="y", which="both", alpha=0.3)
    axes[0].set_ylabel("fds received per second (log scale)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(variants), fontsize="small")
    fig.suptitle("pyautofs bench fdpass: higher is better")
    fig.tight_layout(rect=(0, 0.06, 1, 1))  # room for the legend below the panels
    fig.savefig(path)
    plt.close(fig)
