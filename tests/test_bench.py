"""The benchmarks run through the real command in --quick mode and give the documented shape.

Figures are not asserted: speed belongs in the benchmark report, not in a timed test.
"""

from __future__ import annotations

import json
import shutil
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


# -- running it as a new user would ------------------------------------------------------

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
BLOCK_ANYIO = (
    "import sys\n"
    "class NoAnyio:\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name == 'anyio' or name.startswith('anyio.'):\n"
    "            return None\n"
    "        return None\n"
    "    def find_module(self, name, path=None):\n"
    "        return None\n"
    "sys.meta_path.insert(0, NoAnyio())\n"
    "import importlib.machinery\n"
    "orig = importlib.machinery.PathFinder.find_spec\n"
    "def find_spec(name, path=None, target=None):\n"
    "    return None if name.split('.')[0] == 'anyio' else orig(name, path, target)\n"
    "importlib.machinery.PathFinder.find_spec = staticmethod(find_spec)\n"
    "from pyautofs._cli.main import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def test_a_missing_optional_comparison_is_a_one_line_note() -> None:
    """Without anyio, fdpass runs every other variant and says in one line what it left out."""
    r = subprocess.run(
        [sys.executable, "-c", BLOCK_ANYIO, "bench", "fdpass", "--quick", "--json", "-"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    notes = [line for line in r.stderr.splitlines() if line.startswith("pyautofs bench fdpass:")]
    assert notes == ["pyautofs bench fdpass: anyio-trio skipped: anyio not installed"], notes
    rows = json.loads(r.stdout)["results"]
    assert not [x for x in rows if x["variant"] == "anyio-trio" and "fds_per_s" in x]
    assert [x for x in rows if x["variant"] == "pyautofs-trio" and "fds_per_s" in x]


@pytest.mark.kernel
def test_a_benchmark_that_needs_root_is_skipped_with_a_note_not_a_traceback() -> None:
    r = subprocess.run(
        [*NOBODY, sys.executable, "-m", "pyautofs", "bench", "trigger", "--quick"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd="/",
    )
    assert r.returncode == 0, r
    assert r.stderr.strip().splitlines() == [
        "pyautofs bench trigger: skipped: needs root: autofs mounts need CAP_SYS_ADMIN"
    ], r.stderr


def test_progress_shows_count_percentage_and_eta() -> None:
    import io

    from pyautofs._cli.bench import Progress

    out = io.StringIO()
    p = Progress("fdpass", out, tty=True)
    p.t0 -= 10  # 10 s so far
    p("stdlib batch 1", 1, 4)
    assert out.getvalue() == "\r\x1b[Kfdpass [1/4  25% ETA 0:30] stdlib batch 1"
    p("x")
    assert out.getvalue().endswith("fdpass [step 2, 0:10 elapsed] x")
    p.clear()
    assert out.getvalue().endswith("\r\x1b[K")
    plain = io.StringIO()
    Progress("fdpass", plain, tty=False)("y", 0, 3)
    assert plain.getvalue() == "... fdpass [0/3   0% ETA ?] y\n"


def test_bench_works_outside_the_repository(tmp_path: Path) -> None:
    """A wheel installed in a fresh venv, run from elsewhere: the benchmarks ship with it."""
    root = Path(__file__).resolve().parent.parent
    source = tmp_path / "source"  # a copy: building must not write into the worktree
    shutil.copytree(
        root,
        source,
        ignore=shutil.ignore_patterns(
            ".venv", ".git", "build", "_build", "*.egg-info", "__pycache__"
        ),
    )
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(source)],
        check=True,
        timeout=300,
        capture_output=True,
    )
    venv = tmp_path / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--system-site-packages", str(venv)],
        check=True,
        timeout=120,
    )
    (wheel,) = wheels.glob("pyautofs-*.whl")
    subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", "--no-deps", "--force-reinstall", str(wheel)],
        check=True,
        timeout=300,
        capture_output=True,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = subprocess.run(
        [str(venv / "bin" / "pyautofs"), "bench", "list"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=elsewhere,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert r.returncode == 0, r.stderr
    assert "fdpass" in r.stdout and "trigger" in r.stdout
    where = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import pyautofs._benchmarks as b; print(b.__path__[0])",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd=elsewhere,
    ).stdout.strip()
    assert where.startswith(str(venv)), where
    assert (Path(where) / "fdpass_c.c").exists()


PLOT_CHECK = """
import matplotlib.pyplot as plt
from pyautofs._cli.bench import figure

# 12 variants (more than tab10 has), values from 0.2 to 2,000: four decades.
rows = [
    {"variant": f"v{i}", "n": n, "ms": (0.2 if i % 2 else 200.0) * (10 if n == 100 else 1)}
    for i in range(12)
    for n in (10, 100)
]
fig = figure("restore", rows)
(ax,) = fig.axes
assert ax.get_xlabel() == "n", ax.get_xlabel()
assert ax.get_ylabel() == "ms (log scale)" and ax.get_yscale() == "log"
assert len({tuple(p.get_facecolor()) for p in ax.patches}) == 12
fig.canvas.draw()
# The legend is beside the bars, never over them.
assert ax.get_legend().get_window_extent().x0 >= ax.get_window_extent().x1
flat = figure("x", [{"variant": "a", "batch": 1, "fds_per_s": 5.0},
                    {"variant": "b", "batch": 1, "fds_per_s": 9.0}])
assert flat.axes[0].get_yscale() == "linear"
assert flat.axes[0].get_xlabel() == "batch"
print("ok")
"""


def test_shared_plot_labels_axes_colours_apart_log_scale_legend_outside() -> None:
    # In a child: matplotlib keeps its font files open for the life of the process.
    pytest.importorskip("matplotlib")
    r = subprocess.run(
        [sys.executable, "-c", PLOT_CHECK], capture_output=True, text=True, timeout=120, check=False
    )
    assert (r.returncode, r.stdout) == (0, "ok\n"), r.stderr


@pytest.mark.kernel
def test_trigger_without_automount_runs_the_rest_and_says_so() -> None:
    """automount(8) hidden (a tmpfs over /usr/sbin in a namespace of its own): the floor and
    pyautofs are still measured; automount's absence is a one-line note and a row."""
    setup = 'mount -t tmpfs hide-sbin /usr/sbin && exec "$@"'
    r = subprocess.run(
        [
            *("unshare", "--mount", "--propagation", "private", "sh", "-c", setup, "-"),
            *(sys.executable, "-m", "pyautofs", "bench", "trigger", "--quick", "--json", "-"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    notes = [x for x in r.stderr.splitlines() if x.startswith("pyautofs bench trigger:")]
    assert notes == [
        "pyautofs bench trigger: automount skipped: needs automount(8) at /usr/sbin/automount "
        "(apt-get install autofs)"
    ], notes
    rows = json.loads(r.stdout)["results"]
    measured = {x["variant"] for x in rows if "median_us" in x}
    assert measured == {"floor", "pyautofs"}
    assert {"variant": "automount", "missing": notes[0].split("skipped: ")[1]} in rows
