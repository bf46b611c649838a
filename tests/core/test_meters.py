"""kefu._core.meters: the histogram series of kefu.metrics and the token bucket of
kefu.web.ratelimit, both on every message's path.

Every test runs over both implementations (``meters_impl``); ``meters_pair`` drives the twin and
the compiled module with the same calls and compares every answer.
"""

from __future__ import annotations

import math
import random
from types import ModuleType
from typing import Any

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


@pytest.mark.parametrize(
    ("kind", "make"),
    [
        ("live_histograms", lambda m: m.Histogram(BOUNDS)),
        ("live_ledgers", lambda m: m.Ledger(4)),
    ],
)
def test_debug_counters(meters_impl: ModuleType, kind: str, make: Any) -> None:
    counters = meters_impl.debug_counters()
    assert set(counters) == {"live_histograms", "live_ledgers"}
    before = counters[kind]
    held = [make(meters_impl) for _ in range(3)]
    during = meters_impl.debug_counters()[kind]
    del held
    assert meters_impl.debug_counters()[kind] == before
    assert during in (before, before + 3)  # +3 in a KEFU_DEBUG=1 build, else nothing counted


# -- Ledger ------------------------------------------------------------------------------------


def test_ledger_sums_charges_per_conversation_and_in_total(meters_impl: ModuleType) -> None:
    ledger = meters_impl.Ledger(10)
    ledger.charge(7, 100)
    ledger.charge(9, 5)
    ledger.charge(7, 20)
    assert ledger.get(7) == 120 and ledger.get(9) == 5
    assert ledger.get(8) == 0 and ledger.get(8, None) is None
    assert len(ledger) == 2 and ledger.total_ns == 125 and ledger.dropped == 0
    assert ledger.items() == [(9, 5), (7, 120)]  # 7 charged last


def test_ledger_drops_the_least_recently_charged_past_its_capacity(
    meters_impl: ModuleType,
) -> None:
    ledger = meters_impl.Ledger(3)
    for conv in (1, 2, 3):
        ledger.charge(conv, conv)
    ledger.charge(1, 10)  # 1 is now the most recent: 2 goes first
    ledger.charge(4, 4)
    assert ledger.items() == [(3, 3), (1, 11), (4, 4)]
    assert ledger.get(2) == 0 and ledger.dropped == 1 and len(ledger) == 3
    ledger.charge(5, 5)
    ledger.charge(2, 2)  # a dropped conversation comes back from 0
    assert ledger.items() == [(4, 4), (5, 5), (2, 2)]
    assert ledger.dropped == 3 and ledger.total_ns == 1 + 2 + 3 + 10 + 4 + 5 + 2


def test_ledger_of_one_and_refusals(meters_impl: ModuleType) -> None:
    ledger = meters_impl.Ledger(1)
    ledger.charge("a", 1)
    ledger.charge("a", 1)
    ledger.charge("b", 3)
    assert ledger.items() == [("b", 3)] and ledger.dropped == 1 and ledger.capacity == 1
    for bad in (0, -5):
        with pytest.raises(ValueError, match="capacity"):
            meters_impl.Ledger(bad)
    with pytest.raises(TypeError):
        ledger.charge(["unhashable"], 1)
    with pytest.raises(TypeError):
        ledger.charge("a", "1")
    assert ledger.items() == [("b", 3)] and ledger.total_ns == 5  # refusals change nothing


def test_ledger_twin_and_compiled_agree(meters_pair: tuple[ModuleType, ModuleType]) -> None:
    py, c = meters_pair
    rng = random.Random(11)
    lp, lc = py.Ledger(50), c.Ledger(50)
    for _ in range(20_000):
        conv = rng.randrange(80)  # more conversations than room: drops all along
        ns = rng.randrange(1, 10**9)
        lp.charge(conv, ns)
        lc.charge(conv, ns)
    assert lp.items() == lc.items()
    assert (lp.dropped, lp.total_ns, len(lp)) == (lc.dropped, lc.total_ns, len(lc))
    assert all(lp.get(k) == lc.get(k) for k in range(80))


# -- MessageMeter --------------------------------------------------------------------------------


class _Clock:
    def __init__(self, now: int) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


def _meter(m: ModuleType, clock: _Clock) -> tuple[Any, Any, Any, Any, Any]:
    persist, rp, rd = (m.Histogram(BOUNDS) for _ in range(3))
    ledger = m.Ledger(100)
    meter = m.MessageMeter(persist, rp, rd, ledger, ("visitor", "agent"), clock)
    return meter, persist, rp, rd, ledger


def test_message_meter_measures_a_run(meters_impl: ModuleType) -> None:
    clock = _Clock(10 * 10**9)  # the run's write answered at 10 s
    meter, persist, rp, rd, ledger = _meter(meters_impl, clock)
    assert meter.counts() == {"visitor": 0, "agent": 0} and meter.messages_total == 0
    meter.start_run()
    # Queued at 9.998 s, read at 9.990 s: 2 ms to persist, 10 ms from its frame.
    meter.persisted(9.998, 9_990_000_000, "visitor")
    clock.now += 300_000  # 0.3 ms of acking and fan-out
    meter.delivered(42, 9_990_000_000, 5_000)
    meter.persisted(9.9995, 0, "bot")  # not from a frame: no receive-time measure
    clock.now += 100_000
    meter.delivered(43, 0, 7_000)
    assert persist.count == 2 and persist.sum == pytest.approx(0.0025)
    assert rp.count == 1 and rp.sum == pytest.approx(0.010)
    assert rd.count == 1 and rd.sum == pytest.approx(0.0103)
    # Each conversation: its CPU before the write, and the time since the run's last delivery.
    assert ledger.items() == [(42, 5_000 + 300_000), (43, 7_000 + 100_000)]
    assert meter.counts() == {"visitor": 1, "agent": 0, "bot": 1}
    assert meter.messages_total == 2
    clock.now += 5 * 10**9
    meter.start_run()  # a later run: the time in between is nobody's
    clock.now += 1_000
    meter.delivered(42, 0, 0)
    assert ledger.get(42) == 305_000 + 1_000
    assert meter.ledger is ledger


def test_message_meter_refusals(meters_impl: ModuleType) -> None:
    clock = _Clock(1)
    meter, persist, *_ = _meter(meters_impl, clock)
    with pytest.raises(TypeError):
        meters_impl.MessageMeter(persist, persist, persist, "no ledger", (), clock)
    with pytest.raises(TypeError):
        meter.persisted("soon", 0, "visitor")
    with pytest.raises(TypeError):
        meter.delivered(["unhashable"], 0, 0)
    assert meter.messages_total == 0 and persist.count == 0


def test_message_meter_twin_and_compiled_agree(meters_pair: tuple[ModuleType, ModuleType]) -> None:
    py, c = meters_pair
    cp, cc = _Clock(10**12), _Clock(10**12)
    mp, *hp = _meter(py, cp)
    mc, *hc = _meter(c, cc)
    rng = random.Random(5)
    for _ in range(200):
        for clock in (cp, cc):
            clock.now += 7_000_000
        mp.start_run()
        mc.start_run()
        for _ in range(rng.randrange(1, 20)):
            w0 = cp.now / 1e9 - rng.random() / 100
            received = rng.choice((0, cp.now - rng.randrange(10**7)))
            role = rng.choice(("visitor", "agent", "bot"))
            conv = rng.randrange(150)
            t_sync = rng.randrange(10**5)
            mp.persisted(w0, received, role)
            mc.persisted(w0, received, role)
            step = rng.randrange(10**5)
            cp.now += step
            cc.now += step
            mp.delivered(conv, received, t_sync)
            mc.delivered(conv, received, t_sync)
    assert mp.counts() == mc.counts() and mp.messages_total == mc.messages_total
    for a, b in zip(hp[:3], hc[:3], strict=True):
        assert a.counts() == b.counts() and a.sum == b.sum
    assert hp[3].items() == hc[3].items() and hp[3].dropped == hc[3].dropped > 0
