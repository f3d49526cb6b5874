"""The engine's request log: its own formatting writes what :mod:`logging` would write."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import trio

from pyautofs._cli._logging import StderrFormatter
from pyautofs._engine._requestlog import RequestLog

LINES = [
    ("mounted", "/mnt/auto", "k\nx\u00e9", 12.4),
    ("failed (ENOENT)", "/mnt/auto", "bad", 3.0),
    ("unmounted", "/mnt/auto", "k", 0.0),
]


def _write_all(rl: RequestLog) -> None:
    for what, path, key, latency in LINES:
        rl.add(what, path, key, 0 if what == "unmounted" else os.getpid(), latency, 1.0)


def _log_to(path: Path, *, with_filter: bool) -> tuple[str, bool]:
    """Write LINES through a fresh RequestLog into ``path``; the text and whether it was fast."""
    logger = logging.getLogger("pyautofs")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    with path.open("w") as stream:
        handler = logging.StreamHandler(stream)
        handler.setFormatter(StderrFormatter())
        if with_filter:
            handler.addFilter(lambda record: True)
        logger.handlers[:] = [handler]
        logger.setLevel(logging.INFO)
        logger.propagate = False
        try:

            async def main() -> bool:
                rl = RequestLog(quiet=0.0)
                _write_all(rl)
                return rl._fd >= 0

            fast = trio.run(main)
        finally:
            logger.handlers[:], logger.level, logger.propagate = saved
    return path.read_text(), fast


def _strip_time(text: str) -> list[str]:
    return [line.split(" ", 1)[1] for line in text.splitlines()]


def test_the_fast_path_writes_what_logging_writes(tmp_path: Path) -> None:
    fast_text, fast = _log_to(tmp_path / "fast.log", with_filter=False)
    slow_text, slow_fast = _log_to(tmp_path / "slow.log", with_filter=True)
    assert fast and not slow_fast  # a filter on the handler takes the ordinary path
    assert len(fast_text.splitlines()) == len(LINES)
    assert _strip_time(fast_text) == _strip_time(slow_text)
    pid = os.getpid()
    first = _strip_time(fast_text)[0]
    assert first.startswith(
        f"pyautofs[{pid}] INFO mounted /mnt/auto key='k\\nx\\xe9' pid={pid} cmd="
    )
    assert first.endswith(" 12us")
    assert all("\n" not in line for line in fast_text.splitlines())


def test_a_burst_is_queued_and_flushed_in_order(tmp_path: Path) -> None:
    logger = logging.getLogger("pyautofs")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    out = tmp_path / "burst.log"
    with out.open("w") as stream:
        handler = logging.StreamHandler(stream)
        handler.setFormatter(StderrFormatter())
        logger.handlers[:] = [handler]
        logger.setLevel(logging.INFO)
        logger.propagate = False
        try:

            async def main() -> None:
                rl = RequestLog(quiet=10.0, batch=1000)
                for i in range(50):
                    rl.add("mounted", "/m", f"k{i}", 0, 1.0, 100.0 + i * 1e-4)
                assert len(rl._queue) == 49  # the first went at once, the burst waits
                rl.flush()

            trio.run(main)
        finally:
            logger.handlers[:], logger.level, logger.propagate = saved
    keys = [line.rsplit("key=", 1)[1] for line in out.read_text().splitlines()]
    assert keys == [f"'k{i}'" for i in range(50)]
