"""install_fds, run in child processes whose fd tables the test reads from /proc/<pid>/fd.

Each child makes one distinct pipe per fd number it is asked for (so every fd has its own
identity, ``pipe:[ino]``), stops so the test can record its whole fd table, runs
``install_fds`` and stops again. The test then checks every fd: targets hold their sources'
files, nothing else changed, no temporary is left behind.
"""

from __future__ import annotations

import errno
import json
import os
import random
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from pyautofs._restore._install import install_fds

DEADLINE = 20.0
O_CLOEXEC_OCTAL = 0o2000000

CHILD = r"""
import json, os, resource, sys
from pyautofs._restore._install import install_fds

spec = json.loads(sys.stdin.readline())
if spec.get("nofile"):
    resource.setrlimit(resource.RLIMIT_NOFILE, (spec["nofile"], spec["nofile"]))
for fd in spec["open"]:
    r, w = os.pipe()
    os.dup2(r, fd)
    os.close(r)
    os.close(w)
def ident(fd):
    st = os.fstat(fd)
    return [st.st_dev, st.st_ino]
before = {fd: ident(fd) for fd in spec["open"]}
print(json.dumps({"ready": True}), flush=True)
sys.stdin.readline()
plan = {int(t): s for t, s in spec["plan"].items()}
try:
    install_fds(plan, **spec.get("options", {}))
    result = {"ok": True}
except Exception as exc:
    result = {"ok": False, "type": type(exc).__name__, "errno": getattr(exc, "errno", None),
              "message": str(exc)}
after = {}
for fd in plan:
    try:
        after[fd] = ident(fd)
    except OSError:
        after[fd] = None
result["before"] = before
result["after"] = after
print(json.dumps(result), flush=True)
sys.stdin.readline()
"""


def _readline(proc: subprocess.Popen[str]) -> dict[str, Any]:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], DEADLINE)
    if not ready:
        raise TimeoutError("child did not answer in time")
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"child exited early: {proc.wait(DEADLINE)}")
    out: dict[str, Any] = json.loads(line)
    return out


def fd_table(pid: int) -> dict[int, tuple[str, int]]:
    """{fd: (what it points at, its fdinfo flags)} for every fd of ``pid``."""
    table = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        fd = int(name)
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                flags = next(int(ln.split()[1], 8) for ln in f if ln.startswith("flags:"))
        except (OSError, StopIteration):
            continue
        table[fd] = (link, flags)
    return table


class Child:
    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc

    def send(self, obj: object) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(obj) + "\n")
        self.proc.stdin.flush()


@pytest.fixture
def child() -> Iterator[Child]:
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        yield Child(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(DEADLINE)
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.close()
        proc.stdout.close()


def run_plan(
    child: Child,
    open_fds: list[int],
    plan: dict[int, int],
    nofile: int | None = None,
    **options: bool,
) -> tuple[dict[str, Any], dict[int, tuple[str, int]], dict[int, tuple[str, int]]]:
    """Run install_fds in the child; return its result and its fd table before and after."""
    child.send({"open": open_fds, "plan": plan, "options": options, "nofile": nofile})
    assert _readline(child.proc) == {"ready": True}
    pid = child.proc.pid
    before = fd_table(pid)
    child.send("go")
    result = _readline(child.proc)
    after = fd_table(pid)
    child.send("exit")
    child.proc.wait(DEADLINE)
    return result, before, after


def check_installed(
    plan: dict[int, int],
    before: dict[int, tuple[str, int]],
    after: dict[int, tuple[str, int]],
    result: dict[str, Any],
    *,
    cloexec: bool = True,
    close_sources: bool = False,
) -> None:
    assert result["ok"], result
    for target, source in plan.items():
        link, flags = after[target]
        assert link == before[source][0], (target, source)
        assert bool(flags & O_CLOEXEC_OCTAL) == cloexec, target
        # fstat identity in the child agrees with /proc.
        assert result["after"][str(target)] == result["before"][str(source)]
    closed = set(plan.values()) - plan.keys() if close_sources else set()
    for fd, entry in before.items():
        if fd in plan:
            continue
        if fd in closed:
            assert fd not in after, f"source {fd} should be closed"
        else:
            assert after.get(fd) == entry, f"fd {fd} outside the plan changed"
    extra = set(after) - set(before) - set(plan)
    assert not extra, f"temporaries left open: {extra}"


@pytest.mark.parametrize(
    ("open_fds", "plan"),
    [
        pytest.param([10, 11], {10: 11, 11: 10}, id="swap"),
        pytest.param([10, 11, 12], {10: 11, 11: 12, 12: 10}, id="3-cycle"),
        pytest.param([11, 12], {10: 11, 11: 12}, id="chain"),
        pytest.param([10, 11, 12, 13], {10: 11, 11: 12, 12: 13, 20: 10}, id="chain-into-free"),
        pytest.param([10], {20: 10, 21: 10, 22: 10}, id="shared-source"),
        pytest.param([10, 11], {10: 10, 11: 11}, id="identity"),
        pytest.param(
            [10, 11, 12, 13, 14, 15],
            {10: 11, 11: 10, 12: 13, 13: 14, 14: 12, 30: 15, 31: 12},
            id="two-cycles-and-readers",
        ),
    ],
)
def test_plans(child: Child, open_fds: list[int], plan: dict[int, int]) -> None:
    result, before, after = run_plan(child, open_fds, plan)
    check_installed(plan, before, after, result)


def test_random_permutation_with_extras(child: Child) -> None:
    rng = random.Random(5)
    fds = list(range(100, 400))
    shuffled = fds[:]
    rng.shuffle(shuffled)
    plan = dict(zip(fds, shuffled, strict=True))
    for t in range(500, 540):  # plus free targets reading some of the same fds
        plan[t] = rng.choice(fds)
    result, before, after = run_plan(child, fds, plan)
    check_installed(plan, before, after, result)


def test_inheritable_targets(child: Child) -> None:
    plan = {10: 11, 11: 10, 12: 12, 20: 11}
    result, before, after = run_plan(child, [10, 11, 12], plan, cloexec=False)
    check_installed(plan, before, after, result, cloexec=False)


def test_close_sources(child: Child) -> None:
    plan = {10: 11, 11: 10, 20: 12, 21: 13, 22: 13}
    result, before, after = run_plan(child, [10, 11, 12, 13], plan, close_sources=True)
    check_installed(plan, before, after, result, close_sources=True)


def test_busy_target_is_refused_and_nothing_changes(child: Child) -> None:
    plan = {10: 11, 11: 10, 15: 12}
    result, before, after = run_plan(child, [10, 11, 12, 15], plan)
    assert not result["ok"]
    assert result["errno"] == errno.EBUSY
    assert "15" in result["message"] and "replace=True" in result["message"]
    assert after == before


def test_busy_target_with_replace(child: Child) -> None:
    plan = {10: 11, 11: 10, 15: 12}
    result, before, after = run_plan(child, [10, 11, 12, 15], plan, replace=True)
    check_installed(plan, before, after, result)


def test_cycle_with_no_room_above(child: Child) -> None:
    """The targets sit at the very top of RLIMIT_NOFILE: the temporary goes below them."""
    plan = {61: 62, 62: 63, 63: 61}
    result, before, after = run_plan(child, [61, 62, 63], plan, nofile=64)
    check_installed(plan, before, after, result)


def test_target_above_rlimit(child: Child) -> None:
    result, before, after = run_plan(child, [10], {100: 10}, nofile=64)
    assert not result["ok"]
    assert result["errno"] == errno.EBADF
    assert "RLIMIT_NOFILE" in result["message"]
    assert after == before


def test_source_not_open() -> None:
    r, w = os.pipe()
    os.close(w)
    try:
        with pytest.raises(OSError, match=f"source fd {w} .* is not open") as exc:
            install_fds({r: w})
        assert exc.value.errno == errno.EBADF
    finally:
        os.close(r)


@pytest.mark.parametrize("plan", [{-1: 3}, {3: -1}])
def test_negative_numbers(plan: dict[int, int]) -> None:
    with pytest.raises(ValueError, match="negative"):
        install_fds(plan)


def test_empty_plan() -> None:
    install_fds({})
    before = set(os.listdir("/proc/self/fd"))
    install_fds({})
    assert set(os.listdir("/proc/self/fd")) == before


def test_thousand_fds_in_process() -> None:
    """1,000 sources onto 1,000 fresh targets, then the same fds permuted in place."""
    srcs = []
    try:
        for _ in range(500):
            r, w = os.pipe2(os.O_CLOEXEC)
            srcs += [r, w]
        idents = {fd: os.fstat(fd).st_ino for fd in srcs}
        base = max(srcs) + 1000
        plan = {base + i: s for i, s in enumerate(srcs)}
        started = time.perf_counter()
        install_fds(plan, close_sources=True)
        elapsed = time.perf_counter() - started
        for t, s in plan.items():
            assert os.fstat(t).st_ino == idents[s]
        srcs = list(plan)
        rng = random.Random(1)
        perm = srcs[:]
        rng.shuffle(perm)
        plan2 = dict(zip(srcs, perm, strict=True))
        snapshot = {fd: os.fstat(fd).st_ino for fd in srcs}
        install_fds(plan2)
        for t, s in plan2.items():
            assert os.fstat(t).st_ino == snapshot[s]
        print(f"install_fds of 1,000 fresh targets: {elapsed * 1e3:.2f} ms")
    finally:
        for fd in srcs:
            os.close(fd)
