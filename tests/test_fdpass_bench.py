"""The fdpass benchmark runs nothing another user could have planted, and its JSON is clean.

``pyautofs bench fdpass`` runs as root. It once ran whatever binary sat at
``$TMPDIR/pyautofs-bench/fdpass_c`` if that was newer than the C source. These tests plant
files as uid 65534 where an attacker could, and check that nothing planted runs: the planted
program would create a marker file.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pyautofs._sys._trust import UntrustedPathError, check_trusted, trusted_program

NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another uid")


def as_nobody(script: str, *args: str) -> None:
    """Run a shell script as uid/gid 65534, the way a local attacker would."""
    setpriv = trusted_program("setpriv")
    assert setpriv is not None, "setpriv (util-linux) is needed"
    ids = [f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    subprocess.run(
        [setpriv, *ids, "/bin/sh", "-c", script, "sh", *args],
        check=True,
        timeout=30,
        env={"PATH": "/usr/bin:/bin"},
    )


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A fresh directory like /tmp (root-owned, 1777), which uid 65534 can reach."""
    path = Path(tempfile.mkdtemp(prefix="pyautofs-test-shared-", dir="/tmp"))
    os.chmod(path, 0o1777)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def bench_fdpass(
    *extra: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pyautofs", "bench", "fdpass", "--quick", "--json", "-", *extra],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env={**os.environ, **(env or {})},
    )


PLANT = """
set -e
mkdir -p "$1/pyautofs-bench"
printf '#!/bin/sh\\ntouch "%s"\\necho 0.001\\n' "$2" > "$1/pyautofs-bench/fdpass_c"
chmod 755 "$1/pyautofs-bench/fdpass_c"
touch -d '2099-01-01' "$1/pyautofs-bench/fdpass_c"
"""


@needs_root
def test_a_binary_planted_at_the_old_fixed_path_never_runs(shared_tmp: Path) -> None:
    marker = shared_tmp / "planted-program-ran"
    as_nobody(PLANT, str(shared_tmp), str(marker))
    planted = shared_tmp / "pyautofs-bench" / "fdpass_c"
    assert planted.stat().st_uid == NOBODY
    # The planted program works: run by hand, it makes the marker (so the test can fail).
    as_nobody(f'"{planted}" >/dev/null && rm "{marker}"')
    result = bench_fdpass(env={"TMPDIR": str(shared_tmp)})
    assert result.returncode == 0, result.stderr
    assert not marker.exists(), "the benchmark ran a binary planted by uid 65534"
    doc: dict[str, Any] = json.loads(result.stdout)  # stdout is the JSON alone
    c_rows = [r for r in doc["results"] if r["variant"] == "c" and "fds_per_s" in r]
    assert c_rows, "the C reference was not built and measured in a private directory"
    # The private build directory is gone; only the attacker's files remain.
    assert sorted(p.name for p in shared_tmp.iterdir()) == ["pyautofs-bench"]


@needs_root
def test_an_untrusted_tmpdir_is_refused_and_nothing_runs(shared_tmp: Path) -> None:
    marker = shared_tmp / "planted-program-ran"
    evil = shared_tmp / "evil"
    as_nobody('mkdir -m 0777 "$1"', str(evil))
    result = bench_fdpass(env={"TMPDIR": str(evil)})
    assert result.returncode == 0, result.stderr
    assert not marker.exists()
    doc: dict[str, Any] = json.loads(result.stdout)
    c_rows = [r for r in doc["results"] if r["variant"] == "c"]
    assert c_rows and all("missing" in r for r in c_rows), c_rows
    assert "refusing" in c_rows[0]["missing"] and str(evil) in c_rows[0]["missing"]
    assert list(evil.iterdir()) == []  # the build directory it made there was removed


@needs_root
def test_a_benchmarks_folder_another_user_wrote_is_never_imported(shared_tmp: Path) -> None:
    marker = shared_tmp / "planted-module-ran"
    folder = shared_tmp / "benchmarks"
    as_nobody(
        'mkdir "$1" && printf \'open("%s", "w").close()\\n\' "$2" > "$1/fdpass.py"',
        str(folder),
        str(marker),
    )
    result = bench_fdpass("--dir", str(folder))
    assert not marker.exists(), "pyautofs bench imported a module planted by uid 65534"
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "refusing" in result.stderr, result.stderr
    assert f"owned by uid {NOBODY}" in result.stderr


def test_check_trusted_rules(tmp_path: Path) -> None:
    ours = tmp_path / "ours"
    ours.write_text("x")
    assert check_trusted(ours) == str(ours)
    link = tmp_path / "link"
    link.symlink_to(ours)
    assert check_trusted(link) == str(ours)  # the resolved path is what gets used
    ours.chmod(0o666)
    with pytest.raises(UntrustedPathError, match="mode 0666"):
        check_trusted(ours)
    ours.chmod(0o644)
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    (open_dir / "f").write_text("x")
    with pytest.raises(UntrustedPathError, match=f"refusing {open_dir}: mode 0777"):
        check_trusted(open_dir / "f")
    with pytest.raises(FileNotFoundError):
        check_trusted(tmp_path / "missing")


@needs_root
def test_check_trusted_refuses_other_owners_but_allows_a_sticky_root_dir(
    shared_tmp: Path,
) -> None:
    mine = shared_tmp / "mine"
    mine.write_text("x")
    assert check_trusted(mine) == str(mine)  # 1777 root dir above: entries cannot be swapped
    theirs = shared_tmp / "theirs"
    as_nobody('echo x > "$1"', str(theirs))
    with pytest.raises(UntrustedPathError, match=f"owned by uid {NOBODY}"):
        check_trusted(theirs)
    os.chmod(shared_tmp, 0o777)  # without the sticky bit, anyone may swap "mine"
    with pytest.raises(UntrustedPathError, match="mode 0777"):
        check_trusted(mine)
    os.chmod(shared_tmp, 0o1777)
