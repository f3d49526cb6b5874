"""Packaging: what `help(pyautofs)`, pip and PyPI see."""

from __future__ import annotations

import importlib
import pydoc
import re
import types
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


@pytest.mark.parametrize("facade", ["pyautofs", "pyautofs.lowlevel", "pyautofs.restore"])
def test_all_names_every_public_name_of_the_facade(facade: str) -> None:
    module = importlib.import_module(facade)
    public = {
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and not isinstance(value, types.ModuleType)
        and name != "annotations"
    }
    if facade == "pyautofs":
        public.add("__version__")
    assert len(module.__all__) == len(set(module.__all__)), "a name twice in __all__"
    assert set(module.__all__) == public
    for name in module.__all__:
        assert hasattr(module, name), name


def test_help_lists_the_api() -> None:
    import pyautofs

    text = re.sub(".\b", "", pydoc.render_doc(pyautofs, renderer=pydoc.TextDoc()))
    for name in ("Automounter", "MountRequest", "send_fds", "recv_fds", "FdChannel", "load_map"):
        assert name in text, name


def test_license_is_mit_spdx_with_the_file() -> None:
    project = PYPROJECT["project"]
    assert project["license"] == "MIT"  # an SPDX expression, not the deprecated table
    assert project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License\n") and "WITHOUT WARRANTY OF ANY KIND" in text
    assert not [c for c in project["classifiers"] if c.startswith("License ::")]


def test_project_urls_and_classifiers() -> None:
    project = PYPROJECT["project"]
    assert {"Homepage", "Documentation", "Source", "Issues"} <= set(project["urls"])
    assert all(u.startswith("https://") for u in project["urls"].values())
    classifiers = set(project["classifiers"])
    for c in (
        "Operating System :: POSIX :: Linux",
        "Framework :: Trio",
        "Typing :: Typed",
        "Topic :: System :: Filesystems",
        "Programming Language :: Python :: 3 :: Only",
    ):
        assert c in classifiers, c
    low = tuple(int(x) for x in project["requires-python"].removeprefix(">=").split("."))
    versions = {
        tuple(int(x) for x in c.rsplit(" ", 1)[1].split("."))
        for c in classifiers
        if c.startswith("Programming Language :: Python :: 3.")
    }
    assert min(versions) == low


def test_every_subpackage_and_the_benchmarks_are_packaged() -> None:
    setuptools = PYPROJECT["tool"]["setuptools"]
    on_disk = {
        ".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "pyautofs").rglob("__init__.py")
    }
    assert set(setuptools["packages"]) == on_disk | {"pyautofs._benchmarks"}
    assert setuptools["package-dir"] == {"pyautofs._benchmarks": "benchmarks"}
    data = PYPROJECT["tool"]["setuptools"]["package-data"]["pyautofs._benchmarks"]
    assert "*.c" in data  # fdpass's C reference


def test_security_page_is_linked_and_its_bounds_are_the_codes() -> None:
    from pyautofs._engine import _control, _serve
    from pyautofs._maps import _include, _program, _sources
    from pyautofs._proto import _ledger

    page = (ROOT / "docs" / "security.rst").read_text()
    flat = " ".join(page.split())
    assert "   security\n" in (ROOT / "docs" / "index.rst").read_text()
    for title in ("Who can trigger what", "What runs as root", "Files and sockets", "Bounds"):
        assert f"\n{title}\n" in page, title
    assert f"at most {_serve.FOREIGN_THREADS} at once" in flat
    assert f"{_ledger.NEGATIVE_MAX_ENTRIES:,} entries" in flat
    assert f"stdout {_program.MAX_PROGRAM_OUTPUT // 1024} KiB" in flat
    assert f"stderr: {_serve.MAX_PROGRAM_STDERR // 1024} KiB kept" in flat
    assert f"{_sources.MAX_MAP_BYTES // (1 << 20)} MiB" in flat
    assert f"{_include.MAX_INCLUDE_DEPTH} levels and {_include.MAX_INCLUDES} includes" in flat
    assert f"{_control._MAX_CLIENTS} clients, {_control._MAX_REQUEST}-byte requests" in flat
    assert f"{int(_serve.FAILURE_LOG_RATE)} a second (bursts of {_serve.FAILURE_LOG_BURST})" in flat
