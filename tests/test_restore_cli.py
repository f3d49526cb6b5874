"""``pyautofs dump`` and ``pyautofs criu-hook`` as a user runs them, on the real kernel."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from _harness import DEADLINE, Server, lookup, remove_mounts_under
from test_restore_workers import mount_image

from pyautofs._restore._workers import MountJob, WorkerProcess, restore_to_workers, start_worker
from pyautofs._sys._mountinfo import autofs_mounts, read_mountinfo
from pyautofs.restore import (
    AutofsImageError,
    dump_autofs_mounts,
    read_autofs_images,
    write_autofs_images,
)

pytestmark = pytest.mark.kernel


def pyautofs(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pyautofs", *args],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        check=False,
    )


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[WorkerProcess, list[str]]]:
    """Three mounts owned by a worker process (two automount style, one systemd style)."""
    w = start_worker()
    try:
        images = [mount_image(tmp_path / f"m{i}", 40 + 2 * i, 41 + 2 * i) for i in range(2)]
        images.append(mount_image(tmp_path / "s", 60, None))
        restore_to_workers([(w.sock, [MountJob(im) for im in images])], timeout=DEADLINE)
        yield w, [im.mount_point for im in images]
    finally:
        remove_mounts_under(tmp_path)
        w.close(DEADLINE)


def test_dump_writes_an_image_file(tmp_path: Path, served: tuple[WorkerProcess, list[str]]) -> None:
    w, paths = served
    out = tmp_path / "auto.img"
    r = pyautofs("dump", *paths, "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert f"owner pid {w.pid}" in r.stdout and "3 mounts written" in r.stdout
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    images = read_autofs_images(out)
    assert [im.mount_point for im in images] == paths
    assert [im.owner.read_fd if im.owner else None for im in images] == [40, 42, 60]
    assert images == dump_autofs_mounts(paths)
    # --pid: every mount of that process; nothing else is in the file.
    r = pyautofs("dump", "--pid", str(w.pid), "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert [im.mount_point for im in read_autofs_images(out)] == paths


def test_dump_errors_are_one_line(tmp_path: Path, served: tuple[WorkerProcess, list[str]]) -> None:
    out = tmp_path / "x.img"
    r = pyautofs("dump", str(tmp_path), "-o", str(out))
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "no autofs mount" in r.stderr
    assert not out.exists()
    r = pyautofs("dump", "-o", str(out))
    assert r.returncode == 2 and "MOUNTPOINT" in r.stderr
    r = pyautofs("dump", "--pid", "1", "-o", str(out))  # init owns no mount in this namespace
    assert r.returncode == 1 and "owns no autofs mount" in r.stderr
    assert not out.exists()


def test_image_files_refuse_what_is_not_one(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(OSError, match="not a regular file"):
        read_autofs_images(fifo)  # and does not block opening it
    junk = tmp_path / "junk"
    junk.write_bytes(b'{"format": "something else"}')
    with pytest.raises(AutofsImageError, match="not a pyautofs autofs image"):
        read_autofs_images(junk)
    write_autofs_images(tmp_path / "empty.img", [])
    assert read_autofs_images(tmp_path / "empty.img") == []
    assert sorted(os.listdir(tmp_path)) == ["empty.img", "fifo", "junk"]  # no temporary left


def test_serve_restores_a_dumped_mount_and_serves_it(tmp_path: Path) -> None:
    (tmp_path / "exports" / "k").mkdir(parents=True)
    (tmp_path / "exports" / "k" / "f").write_text("k")
    amap = tmp_path / "auto.map"
    amap.write_text(f"* -fstype=bind :{tmp_path}/exports/&\n")
    auto, image = tmp_path / "auto", tmp_path / "auto.img"
    first = Server(tmp_path, "--timeout", "77", str(auto), str(amap))
    try:
        assert lookup(auto / "k" / "f") == (0, "k")
        r = pyautofs("dump", str(auto), "-o", str(image))
        assert r.returncode == 0, r.stderr
        assert f"owner pid {first.proc.pid}" in r.stdout
    finally:
        assert first.stop() == 0
    assert str(auto) not in {m.mount_point for m in autofs_mounts()}
    # A mount point the map does not serve, and a missing image: one line each, nothing left.
    other = tmp_path / "other"
    r = pyautofs("serve", "--restore", str(image), str(other), str(amap))
    assert r.returncode == 1 and "is in the image but not in the map" in r.stderr
    r = pyautofs("serve", "--restore", str(tmp_path / "nope.img"), str(auto), str(amap))
    assert r.returncode == 1 and "No such file" in r.stderr, r.stderr
    assert str(auto) not in {m.mount_point for m in autofs_mounts()}
    second = Server(tmp_path, "--restore", str(image), "--timeout", "77", str(auto), str(amap))
    try:
        assert "serving a restored indirect mount through its restored pipe" in second.log()
        m = {m.mount_point: m for m in autofs_mounts()}[str(auto)]
        assert (m.pgrp, m.timeout, m.catatonic) == (second.proc.pid, 77, False)
        assert lookup(auto / "k" / "f") == (0, "k")  # a new lookup, through the rebuilt pipe
        assert "k" in {os.path.basename(i.mount_point) for i in read_mountinfo()}
    finally:
        assert second.stop() == 0
    assert str(auto) not in {m.mount_point for m in autofs_mounts()}
