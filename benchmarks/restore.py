"""Restore: autofs mounts with their pipes into a worker process, pipes, and fd tables.

**Mounts.** N autofs mount images (indirect, as a dump would describe them) are rebuilt by
``restore_to_workers`` and handed to one worker process (``python -m
pyautofs._restore._workers``, in its own session, started before the clock starts), in both
owner styles: the write end *kept* by the owner (automount) or *closed* after mounting
(systemd, which still travels as a temporary write end at mountinfo's ``fd=``). The clock
covers the whole call: rebuilding each pipe and mount (prepare), one message with every fd
(send), and the worker's ``install_fds`` + SETPIPEFD for each mount until it confirms
(confirm). ``owned`` counts the mounts that mountinfo then shows live and owned by the
worker's process group. ``vs_n10`` is the per-mount time over the per-mount time at N = 10:
1.0 means linear in N.

**Pipes.** ``restore_pipe`` of a pipe image holding 0 B, 64 KiB and 1 MiB, against doing it
by hand (``pipe2`` + ``F_SETPIPE_SZ`` + ``write``), and a 16-packet autofs request pipe.

**fd tables.** ``install_fds`` of 1,000 fds to free numbers, against a ``dup2`` loop (which is
what it does when nothing overlaps), and of a 1,000-fd rotation (one long cycle), which a
``dup2`` loop cannot do at all.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import resource
import statistics
import time
from collections.abc import Callable

from pyautofs._proto._packets import PacketType, encode_v5_packet
from pyautofs._restore._autofs import AutofsMountImage, AutofsOwner
from pyautofs._restore._install import install_fds
from pyautofs._restore._pipeimage import PipeImage, restore_pipe
from pyautofs._restore._workers import MountJob, restore_to_workers, start_worker
from pyautofs._sys._mount import AutofsMode
from pyautofs._sys._mountinfo import autofs_mounts

from ._autofs_common import (
    Workspace,
    check_environment,
    detach_under,
    enter_private_mount_namespace,
    make_catatonic_under,
    tidy,
)

TITLE = (
    "restoring N autofs mounts into a worker (both owner styles), pipes and 1,000-fd tables; "
    "vs_n10 = per-item time / per-item time at N=10"
)

STYLES = (("write end kept", True), ("write end closed", False))
FD_BASE = 100
"""The owner's fd numbers in the images: read end at FD_BASE + 2i, write end at + 1."""


def _repeats(quick: bool) -> dict[int, int]:
    if quick:
        return {1: 5, 10: 3, 100: 1}
    return {1: 20, 10: 10, 100: 5, 1000: 3}


def _images(base: str, n: int, kept: bool) -> list[AutofsMountImage]:
    images = []
    for i in range(n):
        mount_point = os.path.join(base, f"m{i}")
        os.mkdir(mount_point)
        read_fd, write_fd = FD_BASE + 2 * i, FD_BASE + 2 * i + 1
        owner = AutofsOwner(
            pid=1,
            pgrp=1,
            comm="automount" if kept else "systemd",
            read_fd=read_fd,
            write_fd=write_fd if kept else None,
            read_nonblock=not kept,
        )
        images.append(
            AutofsMountImage(
                mount_point=mount_point,
                mode=AutofsMode.INDIRECT,
                source="bench",
                timeout=300,
                fd=write_fd,
                pgrp=1,
                owner=owner,
            )
        )
    return images


def _restore_mounts(ws: Workspace, label: str, n: int, kept: bool) -> dict[str, float]:
    """Restore ``n`` mounts into a fresh worker once; the timings and what was verified."""
    base = ws.path(label)
    os.mkdir(base)
    images = _images(base, n, kept)
    worker = start_worker()
    ws.procs.append(worker.proc)
    try:
        t0 = time.perf_counter()
        report = restore_to_workers([(worker.sock, [MountJob(im) for im in images])], timeout=120)
        total = time.perf_counter() - t0
        owned = sum(
            1
            for m in autofs_mounts()
            if m.mount_point.startswith(base + "/") and m.pgrp == worker.pid and not m.catatonic
        )
        if len(report.mounts) != n:
            raise RuntimeError(f"restored {len(report.mounts)} mounts of {n}")
    finally:
        worker.close(30)
        make_catatonic_under(base)
        detach_under(base)
    return {
        "total": total,
        "prepare": report.prepare_seconds,
        "send": report.send_seconds,
        "confirm": report.confirm_seconds,
        "owned": owned,
    }


def _mount_rows(
    ws: Workspace, quick: bool, progress: Callable[[str], None]
) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for style, kept in STYLES:
        style_rows = []
        for n, repeats in _repeats(quick).items():
            progress(f"restoring {n} mounts ({style}) x{repeats}")
            runs = [
                _restore_mounts(ws, f"{'kept' if kept else 'closed'}-{n}-{i}", n, kept)
                for i in range(repeats)
            ]

            def med(key: str, runs: list[dict[str, float]] = runs) -> float:
                return statistics.median(r[key] for r in runs)

            style_rows.append(
                {
                    "variant": f"mounts, {style}",
                    "n": n,
                    "total_ms": med("total") * 1e3,
                    "per_item_us": med("total") * 1e6 / n,
                    "prepare_ms": med("prepare") * 1e3,
                    "send_ms": med("send") * 1e3,
                    "confirm_ms": med("confirm") * 1e3,
                    "owned": min(int(r["owned"]) for r in runs),
                }
            )
        per10 = next(r["per_item_us"] for r in style_rows if r["n"] == 10)
        for row in style_rows:
            per = row["per_item_us"]
            assert isinstance(per, float) and isinstance(per10, float)
            row["vs_n10"] = per / per10
        rows += style_rows
    return rows


def _time(fn: Callable[[], object], cleanup: Callable[[object], None], repeats: int) -> float:
    """The median seconds of ``fn()``; ``cleanup(result)`` runs after each, untimed."""
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        samples.append(time.perf_counter() - t0)
        cleanup(result)
    return statistics.median(samples)


def _close_pair(result: object) -> None:
    assert isinstance(result, tuple)
    for fd in result:
        os.close(fd)


def _pipe_by_hand(size: int, data: bytes) -> tuple[int, int]:
    r, w = os.pipe2(os.O_CLOEXEC)
    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, size)
    view = memoryview(data)
    while view:
        view = view[os.write(w, view) :]
    return r, w


def _pipe_rows(quick: bool, progress: Callable[[str], None]) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for label, nbytes in (("0 B", 0), ("64 KiB", 64 << 10), ("1 MiB", 1 << 20)):
        progress(f"restoring a pipe of {label}")
        data = os.urandom(nbytes)
        size = max(64 << 10, nbytes)
        image = PipeImage(size=size, data=data)
        repeats = (20 if quick else 200) if nbytes < (1 << 20) else (5 if quick else 50)
        ours = _time(functools.partial(restore_pipe, image), _close_pair, repeats)
        hand = _time(functools.partial(_pipe_by_hand, size, data), _close_pair, repeats)
        rows.append(
            {
                "variant": f"restore_pipe {label}",
                "n": 1,
                "total_ms": ours * 1e3,
                "per_item_us": ours * 1e6,
                "vs_by_hand": ours / hand,
            }
        )
        rows.append(
            {
                "variant": f"by hand {label}",
                "n": 1,
                "total_ms": hand * 1e3,
                "per_item_us": hand * 1e6,
                "vs_by_hand": 1.0,
            }
        )
    packets = tuple(
        encode_v5_packet(PacketType.MISSING_INDIRECT, 1000 + i, f"key{i}".encode())
        for i in range(16)
    )
    image = PipeImage(size=64 << 10, packet_mode=True, packets=packets)
    ours = _time(lambda: restore_pipe(image), _close_pair, 20 if quick else 200)
    rows.append(
        {
            "variant": "restore_pipe 16 autofs packets",
            "n": 1,
            "total_ms": ours * 1e3,
            "per_item_us": ours * 1e6,
        }
    )
    return rows


def _raise_fd_limit(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))


def _install_rows(quick: bool, progress: Callable[[str], None]) -> list[dict[str, object]]:
    n = 1000
    repeats = 5 if quick else 30
    _raise_fd_limit(16384)
    progress(f"install_fds of {n} fds")
    base = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    sources = [fcntl.fcntl(base, fcntl.F_DUPFD_CLOEXEC, 1000) for _ in range(n)]
    top = max(sources) + 1000
    disjoint = {top + i: s for i, s in enumerate(sources)}
    rotation = {s: sources[(i + 1) % n] for i, s in enumerate(sources)}

    def close_targets(_: object) -> None:
        for t in disjoint:
            os.close(t)

    def dup2_loop() -> None:
        dup2 = os.dup2
        for t, s in disjoint.items():
            dup2(s, t)

    try:
        ours = _time(lambda: install_fds(disjoint), close_targets, repeats)
        loop = _time(dup2_loop, close_targets, repeats)
        cycle = _time(lambda: install_fds(rotation), lambda _: None, repeats)
    finally:
        for fd in (base, *sources):
            with contextlib.suppress(OSError):
                os.close(fd)
    return [
        {
            "variant": "install_fds, free targets",
            "n": n,
            "total_ms": ours * 1e3,
            "per_item_us": ours * 1e6 / n,
            "vs_dup2_loop": ours / loop,
        },
        {
            "variant": "dup2 loop, free targets",
            "n": n,
            "total_ms": loop * 1e3,
            "per_item_us": loop * 1e6 / n,
            "vs_dup2_loop": 1.0,
        },
        {
            "variant": "install_fds, one 1000-cycle",
            "n": n,
            "total_ms": cycle * 1e3,
            "per_item_us": cycle * 1e6 / n,
            "vs_dup2_loop": cycle / loop,
        },
    ]


def run(quick: bool, progress: Callable[[str], None]) -> list[dict[str, object]]:
    """Run the benchmark and return its result rows."""
    problem = check_environment()
    if problem:
        raise RuntimeError(f"the restore benchmark {problem}")
    enter_private_mount_namespace()
    _raise_fd_limit(16384)  # workers inherit it: 1,000 kept-style mounts are 2,000 fds
    rows: list[dict[str, object]] = []
    with Workspace() as ws:
        rows += _mount_rows(ws, quick, progress)
    rows += _pipe_rows(quick, progress)
    rows += _install_rows(quick, progress)
    return [tidy(row) for row in rows]
