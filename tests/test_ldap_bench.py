"""``pyautofs bench ldap --quick`` through the real command: every variant, every lookup
worked, nothing left behind. Figures are never asserted (they belong in the report)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.automount,
    pytest.mark.skipif(shutil.which("automount") is None, reason="needs Debian's automount(8)"),
    pytest.mark.skipif(
        not Path("/usr/sbin/slapd").exists(), reason="needs OpenLDAP's slapd (package slapd)"
    ),
]


def test_ldap_bench_quick(tmp_path: Path) -> None:
    pytest.importorskip("ldap", reason="needs python-ldap (the 'ldap' extra)")
    out = tmp_path / "ldap.json"
    result = subprocess.run(
        [sys.executable, "-m", "pyautofs", "bench", "ldap", "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())["results"]
    variants = {
        "pyautofs ldapi",
        "pyautofs ldap",
        "pyautofs file",
        "automount ldap",
        "pyautofs ldap 1ms",
        "automount ldap 1ms",
    }
    phases = {r["phase"] for r in rows}
    assert phases == {"new key", "single client", "concurrent x100"}
    for phase in phases:
        by_variant = {r["variant"]: r for r in rows if r["phase"] == phase}
        assert set(by_variant) == variants
        for row in by_variant.values():
            assert row["n"] > 0 and row["failed"] == 0, row
            assert 0 < row["median_us"] <= row["p90_us"] <= row["p99_us"]
    assert all(r["keys_per_s"] > 0 for r in rows if r["phase"] != "new key")
    assert "ldap:" in result.stdout and "vs_automount" in result.stdout
