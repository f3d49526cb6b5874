"""scripts/test: the policy-rc.d it makes for package installs never outlives it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.kernel,  # root, and a private mount namespace for the tmpfs over /usr/sbin
    pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare"),
]

# In a namespace of its own: a tmpfs over /usr/sbin (so the real policy-rc.d is never
# touched and automount(8) is "missing"), and a fake apt-get first in PATH that records
# whether services were blocked while it ran, then fails as a broken mirror would.
SETUP = """
set -u
mount -t tmpfs test-sbin /usr/sbin
{preexisting}
mkdir -p "$FAKE"
cat > "$FAKE/apt-get" <<'X'
#!/bin/sh
if [ -x /usr/sbin/policy-rc.d ]; then /usr/sbin/policy-rc.d; echo "policy $?" >> "$FAKE/seen"; fi
exit 100
X
chmod +x "$FAKE/apt-get"
PATH="$FAKE:/usr/bin:/bin" bash "$SCRIPT" >/dev/null 2>&1
echo "status $?" >> "$FAKE/seen"
if [ -e /usr/sbin/policy-rc.d ]; then cat /usr/sbin/policy-rc.d >> "$FAKE/seen"; fi
"""


def run_script(tmp_path: Path, preexisting: str = "") -> list[str]:
    fake = tmp_path / "fake"
    r = subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "bash",
            "-c",
            SETUP.format(preexisting=preexisting),
        ],
        env={"FAKE": str(fake), "SCRIPT": str(ROOT / "scripts" / "test"), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert r.returncode == 0, r
    return (fake / "seen").read_text().splitlines()


def test_policy_rc_d_is_removed_when_the_install_fails(tmp_path: Path) -> None:
    seen = run_script(tmp_path)
    # Services were blocked (exit 101) during apt-get, the script failed with apt-get's
    # status, and no policy-rc.d was left behind.
    assert seen == ["policy 101", "status 100"], seen


def test_a_policy_rc_d_that_was_there_before_is_kept(tmp_path: Path) -> None:
    mine = (
        "echo '#!/bin/sh' > /usr/sbin/policy-rc.d; echo 'exit 0' >> /usr/sbin/policy-rc.d; "
        "chmod +x /usr/sbin/policy-rc.d"
    )
    seen = run_script(tmp_path, mine)
    assert seen == ["policy 0", "status 100", "#!/bin/sh", "exit 0"], seen
