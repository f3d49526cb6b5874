"""Restore and dump: autofs mounts into a worker process and into an Automounter, pipes,
fd tables.

**Restoring mounts.** N autofs mount images (indirect, as a dump describes them) are
rebuilt, for N = 1, 10, 100, 1,000 and 10,000:

- *into a worker*: ``restore_to_workers`` hands them to one worker process (in its own
  session, started before the clock starts), in both owner styles: the write end *kept* by
  the owner (automount) or *closed* after mounting (systemd). The clock covers rebuilding
  each pipe and mount, one message with every fd, and the worker's ``install_fds`` +
  SETPIPEFD for each mount until it confirms;
- *into an Automounter*: ``restore_autofs_mount`` rebuilds each mount and its pipe for this
  process, and an ``Automounter`` serves every restored pipe as it is
  (``add_mount(pipe_fd=...)``). The clock stops when the Automounter says it is serving.

``owned`` counts the mounts that mountinfo then shows live and owned by the new owner's
process group.

**Dumping mounts.** ``dump_autofs_mounts`` of the N mounts a worker owns (mountinfo read and
/proc scanned once for the batch), against ``dump_autofs_mount`` called once per mount
(each call reads mountinfo and scans /proc again: quadratic; up to N = 1,000).

Each series gets a least-squares line ``total = fixed + per_mount * N`` over its N (the
``fit over`` rows, whose ``n`` is the largest N: ``per_item_us`` is the slope, ``total_ms``
the intercept, ``r2`` how straight it is); ``vs_fit`` on each row is its per-mount time
over the slope, 1.0 when linear.

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

from pyautofs import AutofsMode
from pyautofs.lowlevel import PacketType, autofs_mounts, encode_v5_packet
from pyautofs.restore import (
    AutofsMountImage,
    AutofsOwner,
    MountJob,
    PipeImage,
    dump_autofs_mount,
    dump_autofs_mounts,
    install_fds,
    restore_autofs_mount,
    restore_pipe,
    restore_to_workers,
    start_worker,
)

from ._autofs_common import (
    Workspace,
    check_environment,
    detach_under,
    enter_private_mount_namespace,
    make_catatonic_under,
    tidy,
)

TITLE = (
    "restoring N autofs mounts into a worker (both owner styles) and into an Automounter, "
    "dumping them, pipes and 1,000-fd tables; fit = least-squares line over N"
)

STYLES = (("write end kept", True), ("write end closed", False))
FD_BASE = 100
"""The owner's fd numbers in the images: read end at FD_BASE + 2i, write end at + 1."""
FD_LIMIT = 65536
"""10,000 mounts of the kept style are 20,000 fds in the worker, and as many in flight."""


def _sizes(quick: bool) -> dict[int, int]:
    """N -> repeats (the median is kept)."""
    if quick:
        return {1: 3, 10: 3, 100: 1}
    return {1: 10, 10: 5, 100: 3, 1000: 1, 10000: 1}


def _images(base: str, n: int, kept: bool) -> list[AutofsMountImage]:
    """Kept style: read end at FD_BASE + 2i, write end at + 1. Closed style: read end at
    FD_BASE + i, and no temporary place for the write end (``fd=-1``), so that 10,000
    mounts fit in 20,000 fds."""
    images = []
    for i in range(n):
        mount_point = os.path.join(base, f"m{i}")
        os.mkdir(mount_point)
        read_fd = FD_BASE + 2 * i if kept else FD_BASE + i
        write_fd = read_fd + 1 if kept else -1
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


def _fits(n: int, kept: bool | None) -> bool:
    """Whether ``n`` mounts' fds fit this machine's RLIMIT_NOFILE: in a worker, the targets
    (two per mount when the write end is kept, one when closed); in an Automounter (``kept``
    is then None), its pipe's read end and an ioctl fd per indirect mount."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    top = FD_BASE + (n if kept is False else 2 * n) + 64
    return hard == resource.RLIM_INFINITY or top <= hard


def _not_run(variant: str, n: int, fds: int) -> dict[str, object]:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return {
        "variant": f"{variant}: not run",
        "n": n,
        "skipped": f"needs about {fds} fds; RLIMIT_NOFILE hard limit {hard}",
    }


def _owned_by(base: str, pgrp: int) -> int:
    return sum(
        1
        for m in autofs_mounts()
        if m.mount_point.startswith(base + "/") and m.pgrp == pgrp and not m.catatonic
    )


def _into_worker(ws: Workspace, base: str, n: int, kept: bool) -> dict[str, float]:
    """Restore ``n`` mounts into a fresh worker once, then dump them (both ways)."""
    images = _images(base, n, kept)
    worker = start_worker()
    ws.procs.append(worker.proc)
    out: dict[str, float] = {}
    try:
        t0 = time.perf_counter()
        report = restore_to_workers([(worker.sock, [MountJob(im) for im in images])], timeout=600)
        out["total"] = time.perf_counter() - t0
        out["owned"] = _owned_by(base, worker.pid)
        if len(report.mounts) != n:
            raise RuntimeError(f"restored {len(report.mounts)} mounts of {n}")
        if kept:  # dump what the worker now owns
            paths = [im.mount_point for im in images]
            t0 = time.perf_counter()
            dumped = dump_autofs_mounts(paths)
            out["dump_batch"] = time.perf_counter() - t0
            if sum(1 for d in dumped if d.owner and d.owner.pid == worker.pid) != n:
                raise RuntimeError("the batch dump did not find the worker as owner")
            if n <= 1000:
                t0 = time.perf_counter()
                for path in paths:
                    dump_autofs_mount(path)
                out["dump_single"] = time.perf_counter() - t0
    finally:
        worker.close(60)
        make_catatonic_under(base)
        detach_under(base)
    return out


def _into_automounter(base: str, n: int) -> dict[str, float]:
    """Rebuild ``n`` mounts for this process and serve each restored pipe as it is."""
    import trio

    from pyautofs import Automounter, MountRequest

    images = _images(base, n, kept=False)
    locks = os.path.join(base, "locks")
    os.mkdir(locks, 0o700)
    out: dict[str, float] = {}

    async def on_missing(request: MountRequest) -> None:
        raise FileNotFoundError

    async def main() -> None:
        t0 = time.perf_counter()
        am = Automounter(lock_dir=locks)
        for image in images:
            restored = restore_autofs_mount(image)
            assert restored.read_fd is not None
            am.add_mount(
                image.mount_point, on_missing, timeout=image.timeout, pipe_fd=restored.read_fd
            )
        async with trio.open_nursery() as nursery:
            await nursery.start(am.run)
            out["total"] = time.perf_counter() - t0
            out["owned"] = _owned_by(base, os.getpgrp())
            am.stop()

    try:
        trio.run(main)
    finally:
        make_catatonic_under(base)
        detach_under(base)
    return out


def _fit(points: list[tuple[int, float]]) -> tuple[float, float, float]:
    """Least squares ``y = a + b * n``: (a, b, r^2)."""
    k = len(points)
    mx = sum(n for n, _ in points) / k
    my = sum(y for _, y in points) / k
    sxx = sum((n - mx) ** 2 for n, _ in points)
    sxy = sum((n - mx) * (y - my) for n, y in points)
    b = sxy / sxx if sxx else 0.0
    a = my - b * mx
    ss_tot = sum((y - my) ** 2 for _, y in points)
    ss_res = sum((y - a - b * n) ** 2 for n, y in points)
    return a, b, 1.0 - ss_res / ss_tot if ss_tot else 1.0


def _series(
    variant: str, runs: dict[int, list[dict[str, float]]], key: str
) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    points = []
    for n, samples in runs.items():
        values = [r[key] for r in samples if key in r]
        if not values:
            continue
        total = statistics.median(values)
        points.append((n, total))
        row: dict[str, object] = {
            "variant": variant,
            "n": n,
            "total_ms": total * 1e3,
            "per_item_us": total * 1e6 / n,
        }
        if key == "total":
            row["owned"] = min(int(r["owned"]) for r in samples)
        rows.append(row)
    if len(points) >= 2:
        a, b, r2 = _fit(points)
        for row in rows:
            per = row["per_item_us"]
            assert isinstance(per, float)
            row["vs_fit"] = per / (b * 1e6) if b > 0 else None
        rows.append(
            {
                "variant": f"{variant}: fit over N = {points[0][0]}..{points[-1][0]}",
                "n": points[-1][0],
                "total_ms": a * 1e3,
                "per_item_us": b * 1e6,
                "r2": r2,
            }
        )
    return rows


def _mount_rows(
    ws: Workspace, quick: bool, progress: Callable[[str], None]
) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    sizes = _sizes(quick)
    worker_runs: dict[bool, dict[int, list[dict[str, float]]]] = {True: {}, False: {}}
    engine_runs: dict[int, list[dict[str, float]]] = {}
    # Interleaved: for each N, each way in turn, so drift hits them alike.
    for n, repeats in sizes.items():
        for i in range(repeats):
            for style, kept in STYLES:
                if not _fits(n, kept):
                    continue
                progress(f"restoring {n} mounts into a worker ({style}), run {i + 1}/{repeats}")
                base = ws.path(f"w{int(kept)}-{n}-{i}")
                os.mkdir(base)
                worker_runs[kept].setdefault(n, []).append(_into_worker(ws, base, n, kept))
            if not _fits(n, None):
                continue
            progress(f"restoring {n} mounts into an Automounter, run {i + 1}/{repeats}")
            base = ws.path(f"a-{n}-{i}")
            os.mkdir(base)
            engine_runs.setdefault(n, []).append(_into_automounter(base, n))
    for style, kept in STYLES:
        rows += _series(f"into a worker, {style}", worker_runs[kept], "total")
        rows += [
            _not_run(f"into a worker, {style}", n, FD_BASE + (2 if kept else 1) * n)
            for n in sizes
            if not _fits(n, kept)
        ]
    rows += _series("into an Automounter", engine_runs, "total")
    rows += [_not_run("into an Automounter", n, 2 * n) for n in sizes if not _fits(n, None)]
    rows += _series("dump_autofs_mounts, one batch", worker_runs[True], "dump_batch")
    rows += _series("dump_autofs_mount, one by one", worker_runs[True], "dump_single")
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
    """Raise RLIMIT_NOFILE to ``need`` (root may raise the hard limit too)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= need:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, max(need, hard)))
    except (ValueError, OSError):
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
    _raise_fd_limit(FD_LIMIT)  # workers inherit it: 10,000 kept-style mounts are 20,000 fds
    rows: list[dict[str, object]] = []
    with Workspace() as ws:
        rows += _mount_rows(ws, quick, progress)
    rows += _pipe_rows(quick, progress)
    rows += _install_rows(quick, progress)
    return [tidy(row) for row in rows]


def plot(rows: list[dict[str, object]], path: str) -> None:
    """Two panels: per-mount time against N for every restore and dump series (log-log,
    one colour each), and the single-N rows (pipes, fd tables) as bars on a log scale. The
    legends sit beside the panels, off the data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[int, float]]] = {}
    bars: list[tuple[str, float]] = []
    for row in rows:
        variant, n, per = str(row.get("variant")), row.get("n"), row.get("per_item_us")
        if not isinstance(per, (int, float)) or ": fit over" in variant:
            continue
        if variant.startswith(("into ", "dump")) and isinstance(n, int):
            series.setdefault(variant, []).append((n, float(per)))
        else:
            label = variant if n == 1 else f"{variant} (per fd)"
            bars.append((label, float(per)))
    # tab20 in the order dark hues first, then their light partners: 20 distinct colours.
    cmap = plt.get_cmap("tab20")
    colours = [cmap(i) for i in [*range(0, 20, 2), *range(1, 20, 2)]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 5.5), width_ratios=(1.1, 1))
    for i, (variant, points) in enumerate(series.items()):
        xs, ys = zip(*sorted(points), strict=True)
        left.plot(xs, ys, marker="o", color=colours[i % 20], label=variant)
    left.set_xscale("log")
    left.set_yscale("log")
    left.set_xlabel("N (mounts)")
    left.set_ylabel("µs per mount (log)")
    left.set_title("restore and dump of N autofs mounts")
    left.grid(True, which="both", alpha=0.3)
    left.legend(fontsize="small", loc="upper left", bbox_to_anchor=(0, -0.14), ncol=2)
    offset = len(series)
    slots = list(range(len(bars)))
    right.barh(slots, [v for _, v in bars], color=[colours[(offset + i) % 20] for i in slots])
    right.set_yticks(slots, [label for label, _ in bars], fontsize="small")
    right.set_xscale("log")
    right.set_xlabel("µs (log)")
    right.set_title("pipes and fd tables")
    right.invert_yaxis()
    for y, (_, v) in zip(slots, bars, strict=True):
        right.annotate(f"{v:.3g}", (v, y), xytext=(3, 0), textcoords="offset points", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
