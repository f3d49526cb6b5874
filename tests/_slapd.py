"""The tests' slapd: the helper the ldap benchmark uses too (``benchmarks/_slapd.py``, in
the wheel as ``pyautofs._benchmarks._slapd``), so there is one definition of it."""

from __future__ import annotations

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)  # the repository's benchmarks package

from benchmarks._slapd import (  # noqa: E402
    SLAPD,
    SUFFIX,
    Slapd,
    automount_map_ldif,
    free_port,
    ldif_entry,
    make_ca,
)

__all__ = ["SLAPD", "SUFFIX", "Slapd", "automount_map_ldif", "free_port", "ldif_entry", "make_ca"]
