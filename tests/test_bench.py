"""The benchmarks run through the real command in --quick mode and give the documented shape.

Figures are not asserted: speed belongs in the benchmark report, not in a timed test.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest


def bench(name: str, *extra: str) -> tuple[str, dict[str, Any]]:
    result = subprocess.run(
        [sys.executable, "-m", "pyautofs", "bench", name, "--quick", "--json", "-", *extra],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    # With --json -, stdout is the JSON document alone; the table is on stderr.
    return result.stderr, json.loads(result.stdout)


def test_bench_list_names_the_benchmarks() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pyautofs", "bench", "list"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "fdpass" in out and "handover" in out


def test_fdpass_quick_has_every_variant_and_ratio(tmp_path: Path) -> None:
    table, doc = bench("fdpass", "--plot", str(tmp_path / "fdpass.png"))
    assert (tmp_path / "fdpass.png").read_bytes().startswith(b"\x89PNG")
    assert doc["benchmark"] == "fdpass"
    assert {"kernel", "python", "cpus"} <= set(doc["machine"])
    rows = doc["results"]
    assert isinstance(rows, list)
    variants = {(r["variant"], r["batch"]) for r in rows if "fds_per_s" in r}
    for v in ("stdlib", "pyautofs", "pyautofs-trio", "raw-trio", "anyio-trio"):
        assert (v, 1) in variants and (v, 253) in variants
    assert ("pyautofs", 1000) in variants
    assert all(r["vs_stdlib"] for r in rows if "vs_stdlib" in r)
    assert "variant" in table and "fds_per_s" in table


@pytest.mark.kernel
def test_handover_quick_reports_each_way() -> None:
    _, doc = bench("handover")
    rows = {r["variant"]: r for r in doc["results"]}
    assert set(rows) == {"pyautofs-sigusr2", "pyautofs-takeover", "automount-restart"}
    for row in rows.values():
        assert "missing" in row or {"lookups", "failed", "worst_ms"} <= set(row)
