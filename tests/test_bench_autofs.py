"""The autofs benchmarks (trigger, shutdown, restore, memory) through the real command.

Each runs as ``pyautofs bench NAME --quick --json FILE`` and is checked for the shape of its
table and of its JSON document, and for correctness (every lookup worked, nothing was left
mounted, every restored mount was owned). Figures are never asserted: speed belongs in the
benchmark report, not in a timed test.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.automount,
    pytest.mark.skipif(shutil.which("automount") is None, reason="needs Debian's automount(8)"),
]

DEADLINE = 600


def bench(name: str, tmp_path: Path) -> tuple[str, list[dict[str, Any]]]:
    out = tmp_path / f"{name}.json"
    result = subprocess.run(
        [sys.executable, "-m", "pyautofs", "bench", name, "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == name
    assert {"kernel", "python", "cpus"} <= set(doc["machine"])
    rows = doc["results"]
    assert isinstance(rows, list) and rows
    for row in rows:
        assert isinstance(row["variant"], str)
        assert isinstance(row.get("n", row.get("batch")), int)
    table = result.stdout
    assert f"{name}:" in table and "variant" in table
    return table, rows


def test_trigger_quick(tmp_path: Path) -> None:
    table, rows = bench("trigger", tmp_path)
    for column in ("median_us", "p90_us", "p99_us", "vs_pyautofs", "vs_floor", "keys_per_s"):
        assert column in table
    phases = {r["phase"] for r in rows}
    sequential = {"new key", "already mounted", "new key, same CPU"}
    assert sequential <= phases
    (concurrent,) = phases - sequential
    assert concurrent.startswith("concurrent")
    for phase in phases:
        by_variant = {r["variant"]: r for r in rows if r["phase"] == phase}
        assert set(by_variant) == {"floor", "pyautofs", "automount"}
        for row in by_variant.values():
            assert row["n"] > 0 and row["failed"] == 0
            assert 0 < row["median_us"] <= row["p90_us"] <= row["p99_us"]
            assert row["vs_pyautofs"] > 0 and row["vs_floor"] > 0
        assert by_variant["pyautofs"]["vs_pyautofs"] == 1.0
    assert all(r["keys_per_s"] > 0 for r in rows if r["phase"] == concurrent)


def test_shutdown_quick(tmp_path: Path) -> None:
    table, rows = bench("shutdown", tmp_path)
    assert "seconds" in table and "skipped in --quick" in table
    measured = [r for r in rows if "seconds" in r]
    assert {(r["variant"], r["n"]) for r in measured} >= {("pyautofs", 20), ("automount", 20)}
    for row in measured:
        assert row["mounted"] == row["n"] and row["failed"] == 0
        assert row["seconds"] > 0 and row["exit"] == 0 and row["left"] == 0
    skipped = {(r["variant"], r["n"]) for r in rows if "note" in r}
    assert skipped == {("automount", 100), ("automount", 400)}


def test_restore_quick(tmp_path: Path) -> None:
    table, rows = bench("restore", tmp_path)
    for column in ("total_ms", "per_item_us", "vs_fit", "r2", "vs_by_hand", "vs_dup2_loop"):
        assert column in table
    ways = (
        "into a worker, write end kept",
        "into a worker, write end closed",
        "into an Automounter",
    )
    mounts = [r for r in rows if r["variant"] in ways]
    assert {(r["variant"], r["n"]) for r in mounts} == {(w, n) for w in ways for n in (1, 10, 100)}
    for row in mounts:
        assert row["owned"] == row["n"]
        assert row["total_ms"] > 0 and row["per_item_us"] > 0
        # No ratio when noise made the fitted slope zero or less (a loaded machine, N <= 100).
        assert row.get("vs_fit") is None or row["vs_fit"] > 0
    fits = {r["variant"]: r for r in rows if ": fit over N = 1..100" in r["variant"]}
    assert {v.split(":")[0] for v in fits} == {
        *ways,
        "dump_autofs_mounts, one batch",
        "dump_autofs_mount, one by one",
    }
    assert all(isinstance(r["per_item_us"], (int, float)) and r["r2"] <= 1 for r in fits.values())
    variants = {r["variant"] for r in rows}
    for size in ("0 B", "64 KiB", "1 MiB"):
        assert {f"restore_pipe {size}", f"by hand {size}"} <= variants
    fds = [r for r in rows if "vs_dup2_loop" in r]
    assert len(fds) == 3 and all(r["n"] == 1000 for r in fds)


def test_memory_quick(tmp_path: Path) -> None:
    table, rows = bench("memory", tmp_path)
    assert "idle_mib" in table and "rss_mib" in table
    by_variant = {r["variant"]: r for r in rows}
    assert set(by_variant) == {"floor", "pyautofs", "automount"}
    for row in by_variant.values():
        assert row["mounted"] == row["n"] and row["failed"] == 0
        assert 0 < row["idle_mib"] <= row["peak_mib"] and 0 < row["rss_mib"] <= row["peak_mib"]
