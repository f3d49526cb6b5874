"""Code outside the package uses only the public facades.

The benchmarks, the programs the tests run and the documentation's examples are what users
copy: they import ``pyautofs``, ``pyautofs.restore`` and ``pyautofs.lowlevel`` and nothing
else of the package (the benchmarks' floor uses ``lowlevel``). A private module they need is
a name the facades are missing.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("benchmarks", "tests/programs", "docs/examples")
PUBLIC = {"pyautofs", "pyautofs.restore", "pyautofs.lowlevel"}

# Files that still import private modules, each with who moves it. Shrink only.
NOT_YET: dict[str, str] = {}


def _files() -> list[Path]:
    found = [p for folder in FOLDERS for p in sorted((ROOT / folder).rglob("*.py"))]
    assert found, "no files found: the folders moved?"
    return found


def _package_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every absolute import of pyautofs or a module below it."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        out += [(node.lineno, n) for n in names if n.split(".")[0] == "pyautofs"]
    return out


@pytest.mark.parametrize("path", _files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_only_the_facades(path: Path) -> None:
    name = str(path.relative_to(ROOT))
    private = [
        f"{name}:{line} imports {module}"
        for line, module in _package_imports(path)
        if module not in PUBLIC
    ]
    if name in NOT_YET:
        assert private, f"{name} imports only the facades now: take it off NOT_YET"
        pytest.xfail(f"not moved yet: {NOT_YET[name]}")
    assert not private, private


def test_the_check_sees_a_private_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import pyautofs.lowlevel\nfrom pyautofs._sys._mount import mount\n"
        "def f():\n    import pyautofs._restore._install\n"
    )
    assert _package_imports(bad) == [
        (1, "pyautofs.lowlevel"),
        (2, "pyautofs._sys._mount"),
        (4, "pyautofs._restore._install"),
    ]
