"""Percentiles: the nearest-rank method, one implementation (``pyautofs._proto._stats``)."""

from __future__ import annotations

import math
import random

import pytest

from pyautofs._proto._stats import percentile


def test_p99_of_100_is_the_99th_value_not_the_maximum() -> None:
    # The old demo helper (index int(q * n)) answered 100 here: one rank too high.
    values = list(range(1, 101))
    random.Random(1).shuffle(values)
    assert percentile(values, 0.99) == 99
    assert percentile(values, 0.90) == 90
    assert percentile(values, 0.50) == 50
    assert percentile(values, 1.0) == 100
    assert percentile(values, 0.001) == 1


def test_whole_ranks_survive_float_error() -> None:
    # 0.07 * 100 == 7.000000000000001: still the 7th value.
    assert 0.07 * 100 > 7
    assert percentile(range(1, 101), 0.07) == 7
    assert percentile(range(1, 11), 0.3) == 3


def test_small_samples() -> None:
    assert percentile([5.0], 0.5) == 5.0
    assert percentile([1, 2], 0.5) == 1  # the lower middle: a measured value
    assert percentile([1, 2], 0.51) == 2
    assert math.isnan(percentile([], 0.5))


def test_matches_the_definition() -> None:
    rng = random.Random(7)
    for _ in range(200):
        values = [rng.random() for _ in range(rng.randint(1, 50))]
        q = rng.choice([0.5, 0.9, 0.95, 0.99, rng.random() or 0.5])
        got = percentile(values, q)
        # The smallest sample that at least q of the samples do not exceed.
        below = sum(v <= got for v in values)
        assert below >= q * len(values) - 1e-9
        assert all(sum(v <= x for v in values) < q * len(values) - 1e-9 for x in values if x < got)


@pytest.mark.parametrize("q", [0, -0.1, 1.01, math.nan])
def test_refuses_a_quantile_out_of_range(q: float) -> None:
    with pytest.raises(ValueError, match="quantile"):
        percentile([1.0], q)
