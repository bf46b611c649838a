"""kefu._core.meters: the histogram series of kefu.metrics and the token bucket of
kefu.web.ratelimit, both on every message's path.

Every test runs over both implementations (``meters_impl``); ``meters_pair`` drives the twin and
the compiled module with the same calls and compares every answer.
"""

from __future__ import annotations

import math
import random
from types import ModuleType

import pytest

BOUNDS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0)


def test_histogram_counts_each_value_in_the_first_bucket_whose_bound_holds_it(
    meters_impl: ModuleType,
) -> None:
    h = meters_impl.Histogram(BOUNDS)
    for v in (0.0, 0.001, 0.0011, 0.005, 0.7, 1.0, 1.0000001, 50, -3, math.inf, -math.inf):
        h.observe(v)
    #                    <=.001 <=.005 <=.01 <=.05 <=.1 <=.5 <=1 +Inf
    assert h.counts() == [4, 2, 0, 0, 0, 0, 2, 3]
    assert h.count == 11
    assert h.cumulative() == [
        (0.001, 4),
        (0.005, 6),
        (0.01, 6),
        (0.05, 6),
        (0.1, 6),
        (0.5, 6),
        (1.0, 8),
        (math.inf, 11),
    ]
    assert math.isnan(h.sum)  # inf + -inf: the caller's values, summed as given
    finite = meters_impl.Histogram(BOUNDS)
    for v in (0.25, 0.5, 2):
        finite.observe(v)
    assert finite.sum == 2.75 and finite.count == 3
    assert finite.bounds == BOUNDS


def test_histogram_ignores_nan_and_takes_ints(meters_impl: ModuleType) -> None:
    h = meters_impl.Histogram(BOUNDS)
    h.observe(float("nan"))
    assert h.count == 0 and h.sum == 0.0 and h.counts() == [0] * 8
    h.observe(1)
    assert h.counts()[6] == 1 and h.sum == 1.0
    with pytest.raises(TypeError):
        h.observe("1")


def test_histogram_without_bounds_has_only_the_inf_bucket(meters_impl: ModuleType) -> None:
    h = meters_impl.Histogram(())
    h.observe(-1e300)
    h.observe(7)
    assert h.counts() == [2] and h.cumulative() == [(math.inf, 2)]


@pytest.mark.parametrize(
    "bounds",
    [(1.0, 1.0), (2.0, 1.0), (1.0, math.inf), (math.nan,), (-math.inf, 0.0)],
)
def test_histogram_refuses_bounds_that_are_not_finite_and_increasing(
    meters_impl: ModuleType, bounds: tuple[float, ...]
) -> None:
    with pytest.raises(ValueError):
        meters_impl.Histogram(bounds)


def test_histograms_are_independent(meters_impl: ModuleType) -> None:
    a, b = meters_impl.Histogram(BOUNDS), meters_impl.Histogram(BOUNDS)
    a.observe(0.002)
    assert b.count == 0 and a.counts()[1] == 1


def test_bucket_starts_full_spends_and_refills_at_its_rate(meters_impl: ModuleType) -> None:
    b = meters_impl.TokenBucket(2.0, 3, 100.0)
    assert (b.per_second, b.burst, b.tokens) == (2.0, 3, 3.0)
    assert [b.take(100.0) for _ in range(4)] == [True, True, True, False]
    assert b.wait_s() == pytest.approx(0.5)
    assert not b.take(100.25)  # half a token
    assert b.take(100.5)  # one
    assert b.tokens == pytest.approx(0.0)
    assert b.refill(200.0) == 3.0  # never past the burst
    b.give_back()
    assert b.tokens == 3.0  # nor by a give_back
    assert b.take(200.0) and b.tokens == 2.0
    b.give_back()
    assert b.tokens == 3.0 and b.wait_s() == 0.0


@pytest.mark.parametrize("rate, burst", [(0, 1), (-1, 5), (1, 0), (math.nan, 3)])
def test_bucket_refuses_a_rate_that_admits_nothing(
    meters_impl: ModuleType, rate: float, burst: int
) -> None:
    with pytest.raises(ValueError):
        meters_impl.TokenBucket(rate, burst, 0.0)


def test_twin_and_compiled_answer_alike(meters_pair: tuple[ModuleType, ModuleType]) -> None:
    py, c = meters_pair
    rng = random.Random(7)
    bounds = tuple(sorted({round(rng.uniform(-5, 5), 3) for _ in range(40)}))
    hp, hc = py.Histogram(bounds), c.Histogram(bounds)
    for _ in range(20_000):
        v = rng.choice([rng.uniform(-6, 6), rng.choice(bounds), float(rng.randint(-6, 6))])
        hp.observe(v)
        hc.observe(v)
    assert hp.counts() == hc.counts() and hp.sum == hc.sum and hp.count == hc.count == 20_000
    assert hp.cumulative() == hc.cumulative()
    bp, bc = py.TokenBucket(7.5, 4, 0.0), c.TokenBucket(7.5, 4, 0.0)
    now = 0.0
    for _ in range(20_000):
        now += rng.expovariate(10.0)
        op = rng.random()
        if op < 0.8:
            assert bp.take(now) == bc.take(now)
        elif op < 0.9:
            assert bp.refill(now) == bc.refill(now)
        else:
            bp.give_back()
            bc.give_back()
        assert bp.tokens == bc.tokens and bp.wait_s() == bc.wait_s()


def test_debug_counters(meters_impl: ModuleType) -> None:
    counters = meters_impl.debug_counters()
    assert set(counters) == {"live_histograms"}
    before = counters["live_histograms"]
    held = [meters_impl.Histogram(BOUNDS) for _ in range(3)]
    during = meters_impl.debug_counters()["live_histograms"]
    del held
    assert meters_impl.debug_counters()["live_histograms"] == before
    assert during in (before, before + 3)  # +3 in a KEFU_DEBUG=1 build, else nothing counted
