"""`pyautofs demo`, run as a user runs it."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest


@pytest.mark.kernel
def test_demo_runs_and_leaves_nothing() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pyautofs", "demo", "-n", "50"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "alpha" in out and "ready" in out and "ENOENT" in out
    assert "answered from the negative cache" in out
    assert "50 new keys, 0 failed" in out
    assert "autofs mounts left behind: 0" in out
    # The demo ran in its own mount namespace: nothing of it is visible here.
    with open("/proc/self/mountinfo") as f:
        assert "pyautofs-demo" not in f.read()


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1)")
def test_demo_says_root_is_needed() -> None:
    # In a fresh user namespace the process sees itself as uid 65534 (not root) while the
    # kernel still lets it read the interpreter's files.
    result = subprocess.run(
        ["unshare", "--user", sys.executable, "-m", "pyautofs", "demo"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "needs root" in result.stderr
