"""Handing a live automounter over: lookups failed and worst lookup latency meanwhile.

Clients in their own sessions look up new keys continuously while the automounter changes
hands, three ways:

- ``pyautofs-sigusr2``: SIGUSR2 to ``pyautofs serve``; the successor is its child, in the
  same process group, and gets the pipes over SCM_RIGHTS. No catatonic window.
- ``pyautofs-takeover``: a second ``pyautofs serve --takeover`` in another session takes the
  mount with CATATONIC + SETPIPEFD; lookups in between fail with ENOENT.
- ``automount-restart``: automount 5.1.8 is SIGKILLed and started again; it reconnects with
  the same catatonic recipe, after its start-up.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from pyautofs.lowlevel import SAFE_PATH, trusted_program

TITLE = "lookups during a handover: failures (target 0) and worst latency, 3 ways"

_LOAD = """
import json, os, sys, time
mp, prefix, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
ok, failures, worst, i = 0, 0, 0.0, 0
end = time.monotonic() + seconds
while time.monotonic() < end:
    t0 = time.perf_counter()
    try:
        os.stat(f"{mp}/{prefix}-{i}/marker")
        ok += 1
    except OSError:
        failures += 1
    worst = max(worst, time.perf_counter() - t0)
    i += 1
    time.sleep(0.002)
print(json.dumps([ok, failures, worst]))
"""


def _wait_for(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def _is_autofs(path: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path) and " - autofs " in line for line in f)


def _clients(mnt: Path, seconds: float, count: int) -> list[subprocess.Popen[bytes]]:
    return [
        subprocess.Popen(
            [sys.executable, "-c", _LOAD, str(mnt), f"c{i}", str(seconds)],
            stdout=subprocess.PIPE,
            start_new_session=True,
        )
        for i in range(count)
    ]


def _collect(clients: list[subprocess.Popen[bytes]]) -> tuple[int, int, float]:
    ok = failed = 0
    worst = 0.0
    for c in clients:
        out, _ = c.communicate(timeout=60)
        o, f, w = json.loads(out)
        ok, failed, worst = ok + o, failed + f, max(worst, w)
    return ok, failed, worst


def _kill_tree(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _serve(mnt: Path, amap: Path, locks: Path, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pyautofs",
            "serve",
            "--lock-dir",
            str(locks),
            *extra,
            str(mnt),
            str(amap),
        ],
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def _pids_reading(mnt: Path) -> list[int]:
    from pyautofs.restore import list_autofs_mounts

    return [
        h.pid for r in list_autofs_mounts() if r.mount.mount_point == str(mnt) for h in r.readers
    ]


def _program(name: str) -> str:
    """A program this benchmark runs (as root): from a fixed system PATH, owner and mode
    checked (see pyautofs._sys._trust), by its resolved path."""
    path = trusted_program(name)
    if path is None:
        raise FileNotFoundError(f"{name} is not installed in {SAFE_PATH}")
    return path


def _cleanup(mnt: Path) -> None:
    for _ in range(4):
        subprocess.run([_program("umount"), "-R", "-l", str(mnt)], capture_output=True, check=False)
    # A killed automount(8) leaves its per-mount log-priority fifo behind.
    fifo = Path("/run") / ("autofs.fifo-" + str(mnt).strip("/").replace("/", "-"))
    fifo.unlink(missing_ok=True)


def _variant(name: str, work: Path, seconds: float, nclients: int) -> dict[str, object]:
    src = work / "src"
    src.mkdir(exist_ok=True)
    (src / "marker").write_text("x")
    amap = work / "auto.map"
    amap.write_text(f"* -fstype=bind :{src}\n")
    mnt = work / f"mnt-{name}"
    locks = work / "locks"
    procs: list[int] = []
    try:
        if name.startswith("pyautofs"):
            first = _serve(mnt, amap, locks)
            procs.append(first.pid)
        else:
            # automount(8) runs once per machine: let any other instance finish first.
            _wait_for(
                lambda: (
                    subprocess.run(
                        [_program("pgrep"), "-x", "automount"], capture_output=True, check=False
                    ).returncode
                    != 0
                ),
                120,
            )
            master = work / "auto.master"
            master.write_text(f"{mnt} {amap}\n")
            first = subprocess.Popen(
                [_program("setsid"), _program("automount"), "-f", "-t", "0", str(master)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        if not _wait_for(lambda: _is_autofs(mnt) and bool(_pids_reading(mnt)), 20):
            return {"variant": name, "missing": "server did not start"}
        procs += _pids_reading(mnt)
        clients = _clients(mnt, seconds, nclients)
        time.sleep(seconds / 3)
        old = set(procs)
        t0 = time.perf_counter()
        if name == "pyautofs-sigusr2":
            first.send_signal(signal.SIGUSR2)
            first.wait(timeout=30)
        elif name == "pyautofs-takeover":
            second = _serve(mnt, amap, locks, "--takeover")
            procs.append(second.pid)
        else:
            first.kill()
            first.wait()
            again = subprocess.Popen(
                [
                    _program("setsid"),
                    _program("automount"),
                    "-f",
                    "-t",
                    "0",
                    str(work / "auto.master"),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            procs.append(again.pid)
        _wait_for(lambda: bool(set(_pids_reading(mnt)) - old), 30)
        switch_ms = (time.perf_counter() - t0) * 1e3
        procs += _pids_reading(mnt)
        ok, failed, worst = _collect(clients)
        return {
            "variant": name,
            "lookups": ok + failed,
            "failed": failed,
            "worst_ms": round(worst * 1e3, 2),
            "switch_ms": round(switch_ms, 1),
        }
    finally:
        _kill_tree(procs)
        time.sleep(0.2)
        _cleanup(mnt)


def run(quick: bool, progress: Callable[[str], None]) -> list[dict[str, object]]:
    """Measure each way of changing hands; return result rows."""
    seconds = 1.5 if quick else 4.0
    nclients = 3 if quick else 6
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="pyautofs-bench-handover-") as tmp:
        for name in ("pyautofs-sigusr2", "pyautofs-takeover", "automount-restart"):
            if name.startswith("automount") and trusted_program("automount") is None:
                rows.append({"variant": name, "missing": "automount(8) is not installed"})
                continue
            progress(f"handover {name}")
            work = Path(tmp) / name
            work.mkdir()
            rows.append(_variant(name, work, seconds, nclients))
    return rows
