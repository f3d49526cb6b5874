"""``pyautofs bench``: run the benchmarks in ``benchmarks/`` and print their tables."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from .._sys._mount import unshare_mount_namespace
from .._sys._trust import check_trusted

_EXAMPLES = """\
examples:
  pyautofs bench list                        the benchmarks there are
  pyautofs bench fdpass --quick              a short run
  pyautofs bench trigger --json out.json     also keep the results as JSON
  pyautofs bench shutdown --plot shutdown.png
  pyautofs bench all --quick --dir ./benchmarks

The benchmarks live in the repository's benchmarks/ folder, found next to the installed
package (an editable install) or in ./benchmarks; --dir names another. Each runs in a
private mount namespace. Figures are ratios against references measured in the same run.
"""


def add_parser(sub: Any) -> None:
    """Register ``pyautofs bench``."""
    p = sub.add_parser(
        "bench",
        help="run a benchmark from benchmarks/ and print its table",
        description=(
            "Run a benchmark side by side with its alternatives and print a table.\n"
            "The autofs benchmarks need root and /dev/autofs; fdpass needs neither."
        ),
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("name", help="a benchmark name, 'list', or 'all'")
    p.add_argument("--quick", action="store_true", help="fewer repeats and smaller sizes")
    p.add_argument("--json", metavar="FILE", help="also write results as JSON ('-' for stdout)")
    p.add_argument("--dir", help="the benchmarks folder (default: found as below)")
    p.add_argument(
        "--plot",
        metavar="FILE.png",
        help="draw the comparison (needs the 'plot' extra: matplotlib)",
    )
    p.set_defaults(func=main)


def _bench_dir(explicit: str | None) -> Path | None:
    candidates = [Path(explicit)] if explicit else []
    candidates += [Path(__file__).resolve().parents[2] / "benchmarks", Path.cwd() / "benchmarks"]
    for c in candidates:
        if (c / "README.md").exists() or any(c.glob("*.py")):
            return c
    return None


def _check_folder(folder: Path) -> None:
    """Refuse a benchmarks folder that another user could have written: its modules are
    imported and its C sources compiled and run, often as root. The folder, its parents,
    its sources and its ``__pycache__`` must pass :func:`check_trusted`."""
    check_trusted(folder)
    for path in sorted(folder.iterdir()):
        if path.suffix in (".py", ".c") or path.name == "__pycache__":
            check_trusted(path)
    cache = folder / "__pycache__"
    if cache.is_dir():
        for path in sorted(cache.iterdir()):
            check_trusted(path)


def _available(folder: Path) -> list[str]:
    return sorted(p.stem for p in folder.glob("*.py") if not p.stem.startswith("_"))


def _load(folder: Path, name: str) -> ModuleType:
    # Load the folder as a package, so benchmark modules can share helpers by relative import.
    package = "pyautofs_benchmarks"
    if package not in sys.modules:
        module = ModuleType(package)
        module.__path__ = [str(folder)]
        sys.modules[package] = module
    # ... and also as plain modules on sys.path, for absolute imports of shared helpers.
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    return importlib.import_module(f"{package}.{name}")


def _machine() -> dict[str, object]:
    return {
        "kernel": platform.release(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }


def _table(rows: list[dict[str, object]]) -> str:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    cells = [[str(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def _plot(name: str, rows: list[dict[str, object]], path: str) -> None:
    """A grouped bar chart of the first numeric metric, per variant, by batch or n."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    skip = {"variant", "batch", "n", "phase"}
    metric = next(
        (k for r in rows for k, v in r.items() if k not in skip and isinstance(v, (int, float))),
        None,
    )
    if metric is None:
        raise ValueError(f"{name}: no numeric metric to plot")
    groups: list[str] = []
    variants: list[str] = []
    values: dict[tuple[str, str], float] = {}
    for r in rows:
        value = r.get(metric)
        if not isinstance(value, (int, float)):
            continue
        group = str(r.get("batch", r.get("n", r.get("phase", ""))))
        variant = str(r.get("variant", ""))
        groups += [group] if group not in groups else []
        variants += [variant] if variant not in variants else []
        values[(group, variant)] = float(value)
    axis = next((k for k in ("batch", "n", "phase") if any(k in r for r in rows)), "")
    fig, ax = plt.subplots(figsize=(max(6, len(groups) * 1.6), 4))
    width = 0.8 / max(1, len(variants))
    cmap = plt.get_cmap("tab10" if len(variants) <= 10 else "tab20")
    for i, variant in enumerate(variants):
        xs = [g + i * width for g in range(len(groups))]
        ax.bar(
            xs,
            [values.get((grp, variant), 0.0) for grp in groups],
            width,
            label=variant,
            color=cmap(i % cmap.N),
        )
    ax.set_xticks([g + width * (len(variants) - 1) / 2 for g in range(len(groups))], groups)
    ax.set_xlabel(axis)
    positive = [v for v in values.values() if v > 0]
    if positive and max(positive) / min(positive) > 30:  # values span decades
        ax.set_yscale("log")
        metric += " (log scale)"
    ax.set_ylabel(metric)
    ax.set_title(f"pyautofs bench {name}")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _progress(message: str) -> None:
    if sys.stderr.isatty():
        print(f"\r\033[K... {message}", end="", file=sys.stderr, flush=True)
    else:
        print(f"... {message}", file=sys.stderr, flush=True)


def main(args: argparse.Namespace) -> int:
    """Run the benchmark(s); returns the exit status."""
    folder = _bench_dir(args.dir)
    if folder is None:
        print("pyautofs bench: no benchmarks/ folder found (use --dir)", file=sys.stderr)
        return 2
    try:
        _check_folder(folder)
    except OSError as exc:
        print(f"pyautofs bench: {exc.strerror or exc}", file=sys.stderr)
        return 2
    names = _available(folder)
    if args.name == "list":
        for name in names:
            print(f"{name:<10} {getattr(_load(folder, name), 'TITLE', '')}")
        return 0
    chosen = names if args.name == "all" else [args.name]
    unknown = [n for n in chosen if n not in names]
    if unknown:
        print(
            f"pyautofs bench: no benchmark {unknown[0]!r}; there are: {', '.join(names)}",
            file=sys.stderr,
        )
        return 2
    if os.geteuid() == 0:
        unshare_mount_namespace()  # nothing a benchmark mounts can leak onto the machine
    documents = []
    for name in chosen:
        module = _load(folder, name)
        rows = module.run(args.quick, _progress)
        if sys.stderr.isatty():
            print("\r\033[K", end="", file=sys.stderr)
        # With --json -, stdout carries the JSON alone; the table goes to stderr.
        table_out = sys.stderr if args.json == "-" else sys.stdout
        print(f"{name}: {getattr(module, 'TITLE', '')}\n{_table(rows)}\n", file=table_out)
        documents.append({"benchmark": name, "machine": _machine(), "results": rows})
        if args.plot:
            try:
                # A benchmark may draw its own figure; the generic bar chart otherwise.
                draw = getattr(module, "plot", None)
                draw(rows, args.plot) if draw else _plot(name, rows, args.plot)
            except ImportError:
                print(
                    "pyautofs bench: --plot needs matplotlib: pip install 'pyautofs[plot]'",
                    file=sys.stderr,
                )
                return 2
    if args.json:
        text = json.dumps(documents[0] if len(documents) == 1 else documents, indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    return 0
