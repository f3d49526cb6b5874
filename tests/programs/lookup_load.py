"""Look up new keys of an autofs mount continuously; print a JSON summary.

Usage: lookup_load.py MOUNTPOINT PREFIX SECONDS

Run it in its own session: lookups from the automounter's process group never trigger.
Each lookup stats ``MOUNTPOINT/PREFIX-<i>/marker`` (a file in the bind-mount source), so a
success proves the key was really mounted.
"""

from __future__ import annotations

import json
import os
import sys
import time


def main() -> None:
    mountpoint, prefix, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
    failures: list[tuple[str, int]] = []
    worst = 0.0
    ok = 0
    i = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        key = f"{prefix}-{i}"
        i += 1
        t0 = time.perf_counter()
        try:
            os.stat(f"{mountpoint}/{key}/marker")
            ok += 1
        except OSError as exc:
            failures.append((key, exc.errno or 0))
        worst = max(worst, time.perf_counter() - t0)
        time.sleep(0.002)
    print(json.dumps({"ok": ok, "failures": failures, "worst_s": worst}))


if __name__ == "__main__":
    main()
