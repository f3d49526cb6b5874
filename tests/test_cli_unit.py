"""The systemd unit in contrib/ (and in the docs): parsed and checked against the command."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pyautofs._cli.main import build_parser

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "contrib" / "pyautofs.service"


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """systemd's unit syntax: [Section], Key=Value (keys may repeat), # and ; comments."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"a setting outside a section: {raw!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not Key=Value: {raw!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def one(unit: dict[str, dict[str, list[str]]], section: str, key: str) -> str:
    (value,) = unit[section][key]
    return value


def test_unit_type_execstart_killmode() -> None:
    unit = parse_unit(UNIT.read_text())
    assert set(unit) == {"Unit", "Service", "Install"}
    assert one(unit, "Service", "Type") == "notify"
    assert one(unit, "Service", "NotifyAccess") == "all"  # the upgrade's successor reports
    assert one(unit, "Service", "KillMode") == "mixed"  # SIGTERM to pyautofs, not mount(8)
    assert one(unit, "Service", "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert one(unit, "Unit", "Conflicts") == "autofs.service"
    assert one(unit, "Install", "WantedBy") == "multi-user.target"
    assert int(one(unit, "Service", "WatchdogSec")) > 0
    argv = shlex.split(one(unit, "Service", "ExecStart"))
    assert Path(argv[0]).name == "pyautofs" and Path(argv[0]).is_absolute()
    args = build_parser().parse_args(argv[1:])
    assert args.command == "serve" and args.master == "/etc/auto.master"
    # Under systemd the journal is found from JOURNAL_STREAM: no --log-target needed.
    assert args.log_target is None and args.ready_fd is None


def test_the_docs_show_this_very_unit() -> None:
    page = (ROOT / "docs" / "howto" / "systemd.rst").read_text()
    assert ".. literalinclude:: ../../contrib/pyautofs.service" in page
    assert "systemd" in (ROOT / "docs" / "howto" / "index.rst").read_text()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_systemd_analyze_verify_accepts_it(tmp_path: Path) -> None:
    pyautofs = Path(sys.executable).parent / "pyautofs"
    unit = tmp_path / "pyautofs.service"
    unit.write_text(UNIT.read_text().replace("/opt/pyautofs/bin/pyautofs", str(pyautofs)))
    r = subprocess.run(
        ["systemd-analyze", "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (r.returncode, r.stderr, r.stdout) == (0, "", ""), r
