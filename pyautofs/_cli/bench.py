"""``pyautofs bench``: run the benchmarks in ``benchmarks/`` and print their tables."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import os
import platform
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

from .._sys._mount import unshare_mount_namespace
from .._sys._trust import check_trusted

EXAMPLES = """\
examples:
  pyautofs bench list                        the benchmarks there are
  pyautofs bench fdpass --quick              a short run
  pyautofs bench trigger --json out.json     also keep the results as JSON
  pyautofs bench shutdown --plot shutdown.png
  pyautofs bench direct --quick              N direct mounts up, looked up, down
  pyautofs bench all --quick --dir ./benchmarks

The benchmarks ship with the package (pyautofs._benchmarks, from the repository's
benchmarks/ folder); --dir runs those of another folder. Each runs in a private mount
namespace. Figures are ratios against references measured in the same run. A comparison
that cannot run here (automount(8), root, anyio) is skipped with a one-line note.
With --json -, stdout carries only the JSON; tables and notes go to stderr.
"""


HELP = "run a benchmark from benchmarks/ and print its table"
DESCRIPTION = (
    "Run a benchmark side by side with its alternatives and print a table.\n"
    "The autofs benchmarks need root and /dev/autofs; fdpass needs neither."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``pyautofs bench``."""
    p.add_argument("name", help="a benchmark name, 'list', or 'all'")
    p.add_argument("--quick", action="store_true", help="fewer repeats and smaller sizes")
    p.add_argument("--json", metavar="FILE", help="also write results as JSON ('-' for stdout)")
    p.add_argument("--dir", help="the benchmarks folder (default: found as below)")
    p.add_argument(
        "--plot",
        metavar="FILE.png",
        help="draw the comparison (needs the 'plot' extra: matplotlib)",
    )


# The Python packages a comparison may need that pyautofs itself does not.
_OPTIONAL_PACKAGES = {
    "anyio": "anyio",
    "ldap": "python-ldap (the 'ldap' extra)",
    "matplotlib": "matplotlib (the 'plot' extra)",
}


def _installed_benchmarks() -> Path | None:
    """The benchmarks folder shipped with the package (pyautofs._benchmarks), if any."""
    try:
        spec = importlib.util.find_spec("pyautofs._benchmarks")
    except ImportError:
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _bench_dir(explicit: str | None) -> Path | None:
    if explicit:
        candidates = [Path(explicit)]
    else:
        candidates = [Path(__file__).resolve().parents[2] / "benchmarks"]
        installed = _installed_benchmarks()
        candidates += [installed] if installed is not None else []
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


def plot_colors(n: int) -> list[Any]:
    """``n`` colours that stay apart: tab10, then tab20, then evenly spaced on turbo."""
    import matplotlib

    if n <= 10:
        cmap = matplotlib.colormaps["tab10"]
        return [cmap(i) for i in range(n)]
    if n <= 20:
        cmap = matplotlib.colormaps["tab20"]
        return [cmap(i) for i in range(n)]
    cmap = matplotlib.colormaps["turbo"]
    return [cmap(0.05 + 0.9 * i / (n - 1)) for i in range(n)]


def spans_decades(values: list[float], ratio: float = 100.0) -> bool:
    """Whether positive ``values`` span ``ratio`` or more (then a log scale shows them all)."""
    positive = [v for v in values if v > 0]
    return len(positive) >= 2 and max(positive) / min(positive) >= ratio


def _plot(name: str, rows: list[dict[str, object]], path: str) -> None:
    """Draw :func:`figure` to ``path`` (a PNG)."""
    import matplotlib.pyplot as plt

    fig = figure(name, rows)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def figure(name: str, rows: list[dict[str, object]]) -> Any:
    """A grouped bar chart of the first numeric metric, per variant, by batch, n or phase.

    Every benchmark without a ``plot(rows, path)`` of its own gets this one: labelled axes,
    a distinct colour per variant, a log scale when values span two decades or more (so
    that small bars stay visible), and the legend outside the bars.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    skip = {"variant", "batch", "n", "phase"}
    metric = next(
        (
            k
            for r in rows
            for k, v in r.items()
            if k not in skip and isinstance(v, (int, float)) and not isinstance(v, bool)
        ),
        None,
    )
    if metric is None:
        raise ValueError(f"{name}: no numeric metric to plot")
    group_key = next((k for k in ("batch", "n", "phase") if any(k in r for r in rows)), "")
    groups: list[str] = []
    variants: list[str] = []
    values: dict[tuple[str, str], float] = {}
    for r in rows:
        value = r.get(metric)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        group = str(r.get(group_key, "")) if group_key else ""
        variant = str(r.get("variant", ""))
        groups += [group] if group not in groups else []
        variants += [variant] if variant not in variants else []
        values[(group, variant)] = float(value)
    fig, ax = plt.subplots(figsize=(max(6.0, len(groups) * 0.5 * max(2, len(variants))), 4.5))
    width = 0.8 / max(1, len(variants))
    colors = plot_colors(len(variants))
    for i, variant in enumerate(variants):
        xs = [g + i * width for g in range(len(groups)) if (groups[g], variant) in values]
        ys = [values[(grp, variant)] for grp in groups if (grp, variant) in values]
        ax.bar(xs, ys, width, label=variant, color=colors[i], edgecolor="black", linewidth=0.4)
    ax.set_xticks([g + width * (len(variants) - 1) / 2 for g in range(len(groups))], groups)
    ax.set_xlabel(group_key or "variant")
    if spans_decades(list(values.values())):
        ax.set_yscale("log")
        ax.set_ylabel(f"{metric} (log scale)")
    else:
        ax.set_ylabel(metric)
    ax.set_title(f"pyautofs bench {name}")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    return fig


class Progress:
    """The ``progress`` callback a benchmark gets: one status line on stderr.

    ``progress(message, done=None, total=None)``: with ``done`` and ``total`` (steps), a
    terminal shows ``[done/total pct% ETA m:ss]``, the ETA from the pace so far; without
    them, the step count and the elapsed time. Not a terminal: one plain line per call.
    """

    def __init__(self, name: str, stream: Any = None, *, tty: bool | None = None) -> None:
        self.name = name
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.t0 = time.monotonic()
        self.calls = 0
        self.active = False

    def line(self, message: str, done: int | None = None, total: int | None = None) -> str:
        """The status text for one call (without the terminal's control codes)."""
        elapsed = time.monotonic() - self.t0
        if done is not None and total:
            pct = 100 * done / total
            eta = "?" if done <= 0 else _clock(elapsed * (total - done) / done)
            where = f"[{done}/{total} {pct:3.0f}% ETA {eta}]"
        else:
            where = f"[step {self.calls}, {_clock(elapsed)} elapsed]"
        return f"{self.name} {where} {message}"

    def __call__(self, message: str, done: int | None = None, total: int | None = None) -> None:
        self.calls += 1
        text = self.line(message, done, total)
        if self.tty:
            self.active = True
            print(f"\r\033[K{text}", end="", file=self.stream, flush=True)
        else:
            print(f"... {text}", file=self.stream, flush=True)

    def clear(self) -> None:
        """Erase the status line (a terminal only)."""
        if self.active:
            print("\r\033[K", end="", file=self.stream, flush=True)
            self.active = False


def _clock(seconds: float) -> str:
    seconds = max(0, int(seconds + 0.5))
    return (
        f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
        if seconds >= 3600
        else f"{seconds // 60}:{seconds % 60:02d}"
    )


def _skip_reason(name: str, exc: BaseException) -> str | None:
    """The one-line note for a benchmark that cannot run here, or None for a real failure."""
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        top = exc.name.split(".")[0]
        if top in _OPTIONAL_PACKAGES:
            return f"needs the Python package {_OPTIONAL_PACKAGES[top]}: pip install {top}"
    if isinstance(exc, RuntimeError):
        # The benchmarks' environment checks say "the NAME benchmark needs ...".
        prefix = f"the {name} benchmark "
        text = str(exc)
        if text.startswith(prefix) and "\n" not in text:
            return text[len(prefix) :]
    return None


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Send fd 1 (this process's and its children's) to stderr for a while."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def main(args: argparse.Namespace) -> int:
    """Run the benchmark(s); returns the exit status."""
    folder = _bench_dir(args.dir)
    if folder is None:
        where = f"{args.dir} holds no benchmarks" if args.dir else "no benchmarks were found"
        print(
            f"pyautofs bench: {where}. They ship with the package as pyautofs._benchmarks "
            "(this install lacks them); get them from the source: the benchmarks/ folder of "
            "a clone or of the sdist ('pip download --no-binary :all: --no-deps pyautofs'), "
            "then 'pyautofs bench NAME --dir PATH/benchmarks'",
            file=sys.stderr,
        )
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
    # With --json -, stdout carries the JSON alone; tables, notes and anything a benchmark
    # or its child processes print go to stderr.
    json_only = args.json == "-"
    table_out = sys.stderr if json_only else sys.stdout
    for name in chosen:
        progress = Progress(name)
        try:
            with _stdout_to_stderr() if json_only else contextlib.nullcontext():
                module = _load(folder, name)
                rows = module.run(args.quick, progress)
        except (ModuleNotFoundError, RuntimeError) as exc:
            reason = _skip_reason(name, exc)
            if reason is None:
                raise
            progress.clear()
            print(f"pyautofs bench {name}: skipped: {reason}", file=sys.stderr)
            continue
        progress.clear()
        notes = dict.fromkeys(
            f"pyautofs bench {name}: {row.get('variant')} skipped: {row['missing']}"
            for row in rows
            if "missing" in row
        )
        for note in notes:
            print(note, file=sys.stderr)
        print(f"{name}: {getattr(module, 'TITLE', '')}\n{_table(rows)}\n", file=table_out)
        documents.append({"benchmark": name, "machine": _machine(), "results": rows})
        if args.plot:
            try:
                # A benchmark may draw its own figure (plot(rows, path)); else a bar chart.
                plotter = getattr(module, "plot", None)
                if callable(plotter):
                    plotter(rows, args.plot)
                else:
                    _plot(name, rows, args.plot)
            except ImportError:
                print(
                    "pyautofs bench: --plot needs matplotlib: pip install 'pyautofs[plot]'",
                    file=sys.stderr,
                )
                return 2
    if args.json:
        text = json.dumps(
            documents[0] if len(documents) == 1 and args.name != "all" else documents, indent=2
        )
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    return 0
