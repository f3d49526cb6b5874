"""Percentiles, computed one way everywhere: the nearest-rank method.

The ``q`` quantile of ``n`` sorted samples is the sample at rank ``ceil(q * n)`` (1-based):
the smallest value that at least ``q`` of the samples do not exceed. It is always a value
that was measured (no interpolation), p100 is the maximum and p50 of an even count is the
lower middle. ``int(q * n)`` as a 0-based index, a tempting shortcut, is one rank too high
whenever ``q * n`` is whole: p99 of 100 samples would be the maximum.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

__all__ = ["percentile"]


def percentile(values: Iterable[float], q: float) -> float:
    """The nearest-rank ``q`` quantile (``0 < q <= 1``) of ``values``; NaN when empty."""
    if not 0 < q <= 1:
        raise ValueError(f"quantile must be in (0, 1], not {q!r}")
    ordered = sorted(values)
    if not ordered:
        return math.nan
    # q * n carries float error both ways (0.07 * 100 == 7.000000000000001): a whole rank
    # must not round up to the next one.
    rank = math.ceil(q * len(ordered) - 1e-9)
    return ordered[min(len(ordered), max(1, rank)) - 1]
