"""open_dir_cached: resolves from the kernel's caches or says it cannot, never blocks."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import _harness
import pytest

from pyautofs._sys._resolve import open_dir_cached


def test_a_cached_directory_opens_as_o_path(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    os.stat(tmp_path / "d")  # now in the dentry cache
    fd = open_dir_cached(str(tmp_path / "d"))
    assert fd is not None
    try:
        assert os.readlink(f"/proc/self/fd/{fd}") == str(tmp_path / "d")
        assert os.O_PATH & int(
            Path(f"/proc/self/fdinfo/{fd}").read_text().split("flags:")[1].split()[0], 8
        )
    finally:
        os.close(fd)


def test_what_it_cannot_say_is_none(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    assert open_dir_cached(str(tmp_path / "f")) is None  # not a directory
    assert open_dir_cached(str(tmp_path / "missing")) is None


@pytest.fixture
def hung_autofs(tmp_path: Path) -> Iterator[Path]:
    """An autofs mount whose requests nobody ever answers (its pipe is never read)."""
    with _harness.hung_autofs(tmp_path / "hung") as path:
        yield path


@pytest.mark.kernel
def test_a_path_under_a_hung_autofs_mount_is_none_at_once(hung_autofs: Path) -> None:
    # From another session (the mount's own process group never triggers it), with a
    # deadline: a plain stat() there would sleep until the mount is made catatonic.
    code = (
        "import sys\nfrom pyautofs._sys._resolve import open_dir_cached\n"
        f"sys.exit(0 if open_dir_cached({str(hung_autofs / 'key' / 'sub')!r}) is None else 1)"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], start_new_session=True, timeout=10, check=False
    )
    assert r.returncode == 0
