"""The layering rule of docs/design: imports go one way, downward."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "pyautofs"
ORDER = ["_sys", "_proto", "_restore", "_maps", "_engine", "_cli"]
# What each layer may import from the package (besides itself).
ALLOWED = {
    "_proto": set(),
    "_sys": {"_proto"},  # syscall drivers of pure protocols (_sys/_scm.py runs _proto/_fdmsg.py)
    "_restore": {"_sys", "_proto"},
    "_maps": {"_sys", "_proto"},
    "_engine": {"_sys", "_proto", "_maps", "_restore"},
    "_cli": {"_sys", "_proto", "_maps", "_restore", "_engine", "__init__"},
}


def _imports(path: Path) -> list[tuple[str, int]]:
    """(module, level) for every import in a file."""
    tree = ast.parse(path.read_text(), str(path))
    found: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((alias.name, 0) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.append((node.module or "", node.level))
    return found


def _package_target(layer: str, module: str, level: int) -> str | None:
    """The top-level package folder a relative or absolute import points to."""
    if level == 0:
        if module == "pyautofs":
            return "__init__"
        if module.startswith("pyautofs."):
            return module.split(".")[1]
        return None
    if level == 1:
        return layer
    head = module.split(".", maxsplit=1)[0] if module else "__init__"
    return head or "__init__"


def test_each_layer_imports_only_downward() -> None:
    problems = []
    for layer in ORDER:
        for path in sorted((PACKAGE / layer).glob("*.py")):
            for module, level in _imports(path):
                target = _package_target(layer, module, level)
                if target is None or target == layer:
                    continue
                if target not in ALLOWED[layer]:
                    problems.append(f"{path.relative_to(PACKAGE)} imports {target}")
    assert not problems, problems


def test_only_sys_imports_ctypes_and_only_engine_imports_trio() -> None:
    for path in sorted(PACKAGE.rglob("*.py")):
        layer = path.relative_to(PACKAGE).parts[0]
        roots = {m.split(".")[0] for m, level in _imports(path) if level == 0}
        if "ctypes" in roots:
            assert layer == "_sys", f"{path} imports ctypes"
        if "trio" in roots:
            assert layer == "_engine", f"{path} imports trio"


def test_facades_only_reexport() -> None:
    for name in ("__init__.py", "lowlevel.py", "restore.py"):
        tree = ast.parse((PACKAGE / name).read_text())
        for node in tree.body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
                continue  # docstring
            if isinstance(node, ast.Assign) and all(
                isinstance(t, ast.Name) and t.id in ("__version__", "__all__") for t in node.targets
            ):
                continue
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and node.target.id == "__getattr__"
                and isinstance(node.value, ast.Call)
                and isinstance(node.value.func, ast.Name)
                and node.value.func.id == "_moved_names"
            ):
                continue  # names that moved to another facade, re-exported with a warning
            raise AssertionError(f"{name} line {node.lineno} is not a re-export")


ENGINE_SPLIT = {
    "_proto": ["_ledger.py"],
    "_engine": [
        "_automounter.py",
        "_served.py",
        "_reader.py",
        "_requestlog.py",
        "_setup.py",
        "_expire.py",
        "_upgrade.py",
        "_takeover.py",
        "_lock.py",
        "_handover.py",
        "_requests.py",
        "_serve.py",
        "_serve_config.py",
        "_serve_lookup.py",
        "_serve_mounts.py",
        "_mapserver.py",
    ],
}


def test_the_engine_split_is_covered_and_the_ledger_does_no_io() -> None:
    for layer, names in ENGINE_SPLIT.items():
        for name in names:
            assert (PACKAGE / layer / name).is_file(), f"{layer}/{name} is missing"
    roots = {m.split(".")[0] for m, level in _imports(PACKAGE / "_proto" / "_ledger.py")}
    assert not roots & {"os", "socket", "trio", "ctypes", "time", "pyautofs"}, roots
