"""`pyautofs serve --takeover` from another session: the owner drains first, then lets go."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from _harness import Server, lookup

from pyautofs._sys._mountinfo import autofs_mounts, find_pipe_holders, read_mountinfo

pytestmark = pytest.mark.kernel


def readers(mount_point: Path) -> set[int]:
    (am,) = [m for m in autofs_mounts() if m.mount_point == str(mount_point)]
    assert am.pipe_ino is not None and not am.catatonic
    return {h.pid for h in find_pipe_holders(am.pipe_ino) if h.end in ("read", "both")}


def test_takeover_drains_the_owner_first(tmp_path: Path) -> None:
    exports = tmp_path / "exports"
    for name in ("alpha", "beta", "slow"):
        (exports / name).mkdir(parents=True)
        (exports / name / "f").write_text(name)
    prog = tmp_path / "auto.prog"
    prog.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = slow ]; then sleep 1.5; fi\n'
        f'[ -d "{exports}/$1" ] && echo ":{exports}/$1"\n'
    )
    prog.chmod(0o755)
    mnt = tmp_path / "mnt"
    old = Server(tmp_path, str(mnt), str(prog), "--timeout", "0")
    new: Server | None = None
    slow: subprocess.Popen[str] | None = None
    try:
        assert lookup(mnt / "alpha" / "f") == (0, "alpha")
        assert readers(mnt) == {old.proc.pid}
        # A request the old owner is still serving when the takeover starts...
        slow = subprocess.Popen(
            [sys.executable, "-c", f"print(open({str(mnt / 'slow' / 'f')!r}).read(), end='')"],
            start_new_session=True,
            stdout=subprocess.PIPE,
            text=True,
        )
        time.sleep(0.5)
        new = Server(tmp_path, "--takeover", str(mnt), str(prog), "--timeout", "0")
        # ...is answered by it: the lookup succeeds instead of failing at CATATONIC.
        out, _ = slow.communicate(timeout=30)
        assert (slow.returncode, out) == (0, "slow")
        assert old.proc.wait(timeout=30) == 0
        assert "released to another engine" in old.log()
        assert "every mount was taken over" in old.log()
        assert "asked pyautofs pid" in new.log()
        assert "without its lock" not in new.log()
        # The new engine reads the pipe now; everything mounted before still works.
        assert readers(mnt) == {new.proc.pid}
        assert lookup(mnt / "alpha" / "f") == (0, "alpha")
        assert lookup(mnt / "slow" / "f") == (0, "slow")
        assert lookup(mnt / "beta" / "f") == (0, "beta")
        assert lookup(mnt / "nosuch")[0] == 2
        assert new.stop() == 0
    finally:
        if slow is not None and slow.poll() is None:
            slow.kill()
            slow.wait()
        old.stop()
        if new is not None:
            new.stop()
    assert not [i for i in read_mountinfo() if i.mount_point.startswith(str(mnt))]
