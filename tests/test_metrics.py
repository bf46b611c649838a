"""kefu.metrics: the registry, its bounds, collectors and the text exposition format.

Every rendering is parsed back with prometheus_client's parser (the reference reader of the
format) and compared with what was recorded; :func:`check_structure` adds the rules that parser
is lenient about (one TYPE per family before its samples, a final newline, no duplicate
series).
"""

from __future__ import annotations

import logging
import math
import os
import re
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from kefu import _core, metrics
from kefu._version import __version__
from kefu.metrics import CONTENT_TYPE, CollectedFamily, Registry

SeriesKey = tuple[str, frozenset[tuple[str, str]]]

_SAMPLE_LINE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})? (\S+)")


def parse(body: bytes) -> dict[SeriesKey, float]:
    """``{(sample name, labels): value}`` as prometheus_client reads ``body``."""
    check_structure(body)
    out: dict[SeriesKey, float] = {}
    for family in text_string_to_metric_families(body.decode("utf-8")):
        for s in family.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in out, f"series {key} twice"
            out[key] = s.value
    return out


def families(body: bytes) -> dict[str, tuple[str, str]]:
    """``{family name: (type, help)}``; the parser strips ``_total`` from counter names."""
    return {
        f.name: (f.type, f.documentation)
        for f in text_string_to_metric_families(body.decode("utf-8"))
    }


def check_structure(body: bytes) -> None:
    text = body.decode("utf-8")
    assert text.endswith("\n")
    typed: dict[str, str] = {}
    current = ""
    for line in text[:-1].split("\n"):  # the format's lines end in "\n" only
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert name not in typed, f"TYPE {name} twice"
            typed[name] = kind
            current = name
            continue
        m = _SAMPLE_LINE.fullmatch(line)
        assert m, f"not a sample line: {line!r}"
        sample = m.group(1)
        allowed = {current}
        if typed.get(current) == "histogram":
            allowed = {f"{current}_bucket", f"{current}_sum", f"{current}_count"}
        assert sample in allowed, f"{sample} outside its family {current}"


def key(name: str, **labels: str) -> SeriesKey:
    return (name, frozenset(labels.items()))


def bare() -> Registry:
    return Registry(process=False)


# -- rendering --------------------------------------------------------------------------------


def test_render_round_trips_what_was_recorded() -> None:
    reg = bare()
    sent = reg.counter("kefu_messages_total", "Messages accepted.", ["role"])
    sent.labels("visitor").inc()
    sent.labels("visitor").inc(2)
    sent.labels("agent").inc(0.5)
    frames = reg.counter("kefu_frames_total", "Frames.")
    frames.inc(7)
    conns = reg.gauge("kefu_connections", "Open connections.", ["kind"])
    conns.labels("ws").set(12)
    conns.labels("ws").dec(2)
    conns.labels("http").inc()
    up = reg.gauge("kefu_up", "Up.")
    up.set(1)
    body = reg.render()

    got = parse(body)
    assert got[key("kefu_messages_total", role="visitor")] == 3
    assert got[key("kefu_messages_total", role="agent")] == 0.5
    assert got[key("kefu_frames_total")] == 7
    assert got[key("kefu_connections", kind="ws")] == 10
    assert got[key("kefu_connections", kind="http")] == 1
    assert got[key("kefu_up")] == 1
    fams = families(body)
    assert fams["kefu_messages"] == ("counter", "Messages accepted.")
    assert fams["kefu_connections"] == ("gauge", "Open connections.")
    assert sent.labels("visitor").value == 3
    assert frames.value == 7


def test_series_stay_until_removed_and_labelled_family_renders_without_series() -> None:
    reg = bare()
    g = reg.gauge("kefu_agent_load", "Load.", ["agent"])
    assert families(reg.render())["kefu_agent_load"][0] == "gauge"  # HELP and TYPE, no samples
    g.labels("a1").set(3)
    g.labels("a2").set(4)
    g.remove("a1")
    g.remove("missing")
    got = parse(reg.render())
    assert key("kefu_agent_load", agent="a1") not in got
    assert got[key("kefu_agent_load", agent="a2")] == 4
    assert got[key("kefu_metrics_series", metric="kefu_agent_load")] == 1


HOSTILE = [
    "",
    "\\",
    '"',
    "\n",
    "\\n",
    '\\"',
    'a"b\\c\nd',
    "}",
    '",x="y',
    "a=b,c",
    "\r\t\x00\x7f",
    "# TYPE x counter",
    "中文客服 🙂",
    " leading and trailing ",
]


@pytest.mark.parametrize("value", HOSTILE, ids=repr)
def test_hostile_label_values_round_trip(value: str) -> None:
    reg = bare()
    reg.counter("kefu_x_total", "x", ["a", "b"]).labels(value, "after").inc(3)
    reg.register_collector(
        lambda: [CollectedFamily("kefu_y", "gauge", "y", [({"v": value}, 5)])], name="y"
    )
    body = reg.render()
    sample_lines = [ln for ln in body.split(b"\n") if ln.startswith((b"kefu_x_total{", b"kefu_y{"))]
    assert len(sample_lines) == 2  # each sample on one line: no raw newline in a value
    got = parse(body)
    assert got[key("kefu_x_total", a=value, b="after")] == 3
    assert got[key("kefu_y", v=value)] == 5


def test_help_is_escaped() -> None:
    reg = bare()
    text = 'back\\slash\nnew line "quoted" \\n'
    reg.gauge("kefu_g", text).set(1)
    body = reg.render()
    assert b'# HELP kefu_g back\\\\slash\\nnew line "quoted" \\\\n\n' in body
    assert families(body)["kefu_g"] == ("gauge", text)


def test_lone_surrogate_does_not_fail_the_scrape() -> None:
    reg = bare()
    reg.counter("kefu_x_total", "x", ["a"]).labels("bad\udcffvalue").inc()
    got = parse(reg.render())
    assert got[key("kefu_x_total", a="bad?value")] == 1


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0, "0"),
        (3, "3"),
        (-3, "-3"),
        (0.25, "0.25"),
        (1e20, "1e+20"),
        (1e-7, "1e-07"),
        (2.0**60, "1.152921504606847e+18"),
        (math.inf, "+Inf"),
        (-math.inf, "-Inf"),
        (math.nan, "NaN"),
    ],
)
def test_float_formatting(value: float, text: str) -> None:
    reg = bare()
    reg.gauge("kefu_g", "g").set(value)
    body = reg.render()
    assert f"\nkefu_g {text}\n".encode() in body
    got = parse(body)[key("kefu_g")]
    assert got == value or (math.isnan(got) and math.isnan(value))


def test_content_type() -> None:
    assert CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"


# -- histograms -------------------------------------------------------------------------------


def test_histogram_buckets_are_cumulative_with_inf_equal_to_count() -> None:
    reg = bare()
    h = reg.histogram("kefu_latency_seconds", "Latency.", [0.1, 0.5, 1], ["op"])
    obs = [0.05, 0.1, 0.1000001, 0.5, 0.7, 1.0, 3.0, math.inf, -1.0]
    for v in obs:
        h.labels("write").observe(v)
    h.labels("write").observe(math.nan)  # ignored
    h.labels("idle")
    got = parse(reg.render())

    def bucket(op: str, le: str) -> float:
        return got[key("kefu_latency_seconds_bucket", op=op, le=le)]

    # le is "less than or equal": 0.1 and 1.0 land in their own bucket
    assert [bucket("write", le) for le in ("0.1", "0.5", "1", "+Inf")] == [3, 5, 7, 9]
    for le, bound in (("0.1", 0.1), ("0.5", 0.5), ("1", 1.0), ("+Inf", math.inf)):
        assert bucket("write", le) == sum(1 for v in obs if v <= bound)
    assert got[key("kefu_latency_seconds_count", op="write")] == len(obs)
    assert got[key("kefu_latency_seconds_sum", op="write")] == sum(obs)
    assert [bucket("idle", le) for le in ("0.1", "0.5", "1", "+Inf")] == [0, 0, 0, 0]
    assert got[key("kefu_latency_seconds_count", op="idle")] == 0
    child = h.labels("write")
    assert child.count == len(obs)
    assert child.cumulative() == [(0.1, 3), (0.5, 5), (1.0, 7), (math.inf, 9)]


@given(st.lists(st.floats(min_value=-10, max_value=10), max_size=50))
@settings(max_examples=100, deadline=None)
def test_histogram_matches_a_direct_count(values: list[float]) -> None:
    reg = bare()
    bounds = [-1.0, 0.0, 0.5, 2.0, 7.5]
    h = reg.histogram("kefu_h", "h", bounds)
    for v in values:
        h.observe(v)
    got = parse(reg.render())
    previous = 0.0
    for b in [*bounds, math.inf]:
        le = "+Inf" if b == math.inf else metrics._format_value(b)
        n = got[key("kefu_h_bucket", le=le)]
        assert n == sum(1 for v in values if v <= b)
        assert n >= previous
        previous = n
    assert got[key("kefu_h_count")] == len(values)
    assert got[key("kefu_h_sum")] == pytest.approx(math.fsum(values), abs=1e-9)


@pytest.mark.parametrize(
    ("buckets", "labels"),
    [
        ([], ()),
        ([math.inf], ()),
        ([1, 1], ()),
        ([2, 1], ()),
        ([0, math.nan], ()),
        ([-math.inf, 1], ()),
        ([float(i) for i in range(metrics.MAX_BUCKETS + 1)], ()),
        ([1], ("le",)),
    ],
)
def test_histogram_rejects_bad_buckets(buckets: list[float], labels: tuple[str, ...]) -> None:
    with pytest.raises(ValueError):
        bare().histogram("kefu_h", "h", buckets, labels)


def test_histogram_accepts_a_trailing_inf_and_max_buckets() -> None:
    reg = bare()
    reg.histogram("kefu_a", "a", [1, 2, math.inf]).observe(5)
    reg.histogram("kefu_b", "b", [float(i) for i in range(metrics.MAX_BUCKETS)])
    got = parse(reg.render())
    assert got[key("kefu_a_bucket", le="2")] == 0
    assert got[key("kefu_a_bucket", le="+Inf")] == 1
    assert key("kefu_b_bucket", le=str(metrics.MAX_BUCKETS - 1)) in got


# -- misuse -----------------------------------------------------------------------------------


def test_labelled_family_cannot_be_updated_directly() -> None:
    reg = bare()
    c = reg.counter("kefu_c_total", "c", ["x"])
    g = reg.gauge("kefu_g", "g", ["x"])
    h = reg.histogram("kefu_h", "h", [1], ["x"])
    updates: list[Callable[[], None]] = [
        c.inc,
        g.inc,
        g.dec,
        lambda: g.set(1),
        lambda: h.observe(1),
    ]
    for update in updates:
        with pytest.raises(ValueError, match=r"use \.labels"):
            update()


def test_label_value_count_and_type_are_checked() -> None:
    reg = bare()
    c = reg.counter("kefu_c_total", "c", ["x", "y"])
    with pytest.raises(ValueError):
        c.labels("only one")
    with pytest.raises(ValueError):
        c.labels("a", "b", "c")
    with pytest.raises(TypeError):
        c.labels("a", 1)  # type: ignore[arg-type]
    u = reg.counter("kefu_u_total", "u")
    assert u.labels() is u.labels()  # the one child of an unlabelled family
    u.labels().inc()
    assert u.value == 1
    with pytest.raises(ValueError):
        u.labels("x")
    with pytest.raises(ValueError):
        u.remove()


def test_counter_only_goes_up() -> None:
    reg = bare()
    c = reg.counter("kefu_c_total", "c")
    with pytest.raises(ValueError):
        c.inc(-1)
    c.inc(0)
    assert c.value == 0


@pytest.mark.parametrize("name", ["", "1abc", "a-b", "a b", "é", "a.b", "kefu_x\n"])
def test_invalid_metric_names_are_refused(name: str) -> None:
    reg = bare()
    with pytest.raises(ValueError):
        reg.gauge(name, "x")
    with pytest.raises(ValueError):
        reg.histogram(name, "x", [1])
    with pytest.raises(ValueError):
        reg.counter(name, "x")
    if name:  # "" + "_total" is a valid name
        with pytest.raises(ValueError):
            reg.counter(name + "_total", "x")


@pytest.mark.parametrize("label", ["", "__reserved", "1a", "a-b", "a:b", "é"])
def test_invalid_label_names_are_refused(label: str) -> None:
    with pytest.raises(ValueError):
        bare().gauge("kefu_g", "g", [label])


def test_valid_names_are_accepted() -> None:
    reg = bare()
    reg.gauge("kefu:ratio_5m", "colon is allowed in metric names", ["_private", "A9"])
    reg.counter("_x_total", "x")


def test_names_must_be_unique_and_counters_end_in_total() -> None:
    reg = bare()
    reg.histogram("kefu_lat", "h", [1])
    with pytest.raises(ValueError, match="_total"):
        reg.counter("kefu_requests", "c")
    with pytest.raises(ValueError, match="in use"):
        reg.gauge("kefu_lat", "g")
    with pytest.raises(ValueError, match="in use"):
        reg.gauge("kefu_lat_count", "clashes with the histogram's _count")
    with pytest.raises(ValueError, match="in use"):
        reg.counter("kefu_metrics_series_dropped_total", "the registry's own")
    with pytest.raises(ValueError, match="duplicate"):
        reg.gauge("kefu_g", "g", ["a", "a"])
    with pytest.raises(ValueError):
        Registry(max_series=0, process=False)
    with pytest.raises(ValueError):
        reg.gauge("kefu_g2", "g", ["a"], max_series=0)


# -- the series bound -------------------------------------------------------------------------


def test_series_bound_drops_new_label_sets_and_counts_them() -> None:
    reg = Registry(max_series=3, process=False)
    c = reg.counter("kefu_c_total", "c", ["user"])
    h = reg.histogram("kefu_h", "h", [1], ["user"], max_series=1)
    for i in range(5):
        c.labels(f"u{i}").inc(10)
        h.labels(f"u{i}").observe(0.5)
    c.labels("u4").inc()  # still refused: one more
    c.labels("u0").inc()  # existing series keep counting
    got = parse(reg.render())
    assert got[key("kefu_c_total", user="u0")] == 11
    assert got[key("kefu_c_total", user="u2")] == 10
    assert key("kefu_c_total", user="u3") not in got
    assert key("kefu_c_total", user="u4") not in got
    assert got[key("kefu_metrics_series_dropped_total", metric="kefu_c_total")] == 3
    assert got[key("kefu_metrics_series", metric="kefu_c_total")] == 3
    assert got[key("kefu_h_count", user="u0")] == 1
    assert key("kefu_h_count", user="u1") not in got
    assert got[key("kefu_metrics_series_dropped_total", metric="kefu_h")] == 4
    assert c.series_count == 3

    c.remove("u1")  # frees a slot
    c.labels("u9").inc()
    got = parse(reg.render())
    assert got[key("kefu_c_total", user="u9")] == 1
    assert got[key("kefu_metrics_series", metric="kefu_c_total")] == 3


def test_collected_family_is_bounded_too() -> None:
    reg = Registry(max_series=2, process=False)
    reg.register_collector(
        lambda: [
            CollectedFamily(
                "kefu_refused_total", "counter", "r", [({"r": str(i)}, i) for i in range(5)]
            )
        ],
        name="ws",
    )
    got = parse(reg.render())
    assert [k for k in got if k[0] == "kefu_refused_total"] == [
        key("kefu_refused_total", r="0"),
        key("kefu_refused_total", r="1"),
    ]
    assert got[key("kefu_metrics_series_dropped_total", metric="kefu_refused_total")] == 3
    assert got[key("kefu_metrics_collector_errors_total", collector="ws")] == 0


# -- collectors -------------------------------------------------------------------------------


def test_collector_is_read_at_each_scrape() -> None:
    stats = {"pending_count": 0, "busy_rejections": 0}
    refused = {"origin": 1, "capacity": 2}

    def store_metrics() -> Iterable[CollectedFamily]:
        yield CollectedFamily(
            "kefu_store_pending", "gauge", "Writes queued.", [({}, stats["pending_count"])]
        )
        yield CollectedFamily(
            "kefu_store_busy_total", "counter", "Busy.", [({}, stats["busy_rejections"])]
        )
        yield CollectedFamily(
            "kefu_ws_refused_total",
            "counter",
            "Upgrades refused.",
            [({"reason": r}, n) for r, n in refused.items()],
        )

    reg = bare()
    reg.register_collector(store_metrics)
    got = parse(reg.render())
    assert got[key("kefu_store_pending")] == 0
    assert got[key("kefu_ws_refused_total", reason="capacity")] == 2
    stats["pending_count"] = 17
    stats["busy_rejections"] = 4
    refused["capacity"] = 9
    body = reg.render()
    got = parse(body)
    assert got[key("kefu_store_pending")] == 17
    assert got[key("kefu_store_busy_total")] == 4
    assert got[key("kefu_ws_refused_total", reason="capacity")] == 9
    assert families(body)["kefu_ws_refused"] == ("counter", "Upgrades refused.")
    qualname = store_metrics.__qualname__
    assert got[key("kefu_metrics_collector_errors_total", collector=qualname)] == 0


def test_collector_names_are_unique() -> None:
    reg = bare()
    reg.register_collector(list, name="a")
    with pytest.raises(ValueError, match="name="):
        reg.register_collector(list, name="a")


def test_failing_collector_costs_only_its_own_output(caplog: pytest.LogCaptureFixture) -> None:
    reg = bare()
    reg.gauge("kefu_up", "up").set(1)
    healthy = True

    def flaky() -> list[CollectedFamily]:
        if not healthy:
            raise RuntimeError("store closed")
        return [CollectedFamily("kefu_flaky", "gauge", "f", [({}, 1)])]

    def half_then_raise() -> Iterable[CollectedFamily]:
        yield CollectedFamily("kefu_half", "gauge", "h", [({}, 1)])
        raise KeyError("missing stat")

    reg.register_collector(flaky, name="flaky")
    reg.register_collector(half_then_raise, name="half")
    reg.register_collector(
        lambda: [CollectedFamily("kefu_fine", "gauge", "f", [({}, 2)])], name="fine"
    )
    caplog.set_level(logging.WARNING, logger="kefu.metrics")

    got = parse(reg.render())
    assert got[key("kefu_flaky")] == 1
    assert key("kefu_half") not in got  # all of a failing collector's output or none of it
    assert got[key("kefu_fine")] == 2
    assert got[key("kefu_up")] == 1
    assert got[key("kefu_metrics_collector_errors_total", collector="half")] == 1
    assert got[key("kefu_metrics_collector_errors_total", collector="flaky")] == 0

    healthy = False
    for _ in range(3):
        got = parse(reg.render())
    assert key("kefu_flaky") not in got
    assert got[key("kefu_fine")] == 2
    assert got[key("kefu_metrics_collector_errors_total", collector="flaky")] == 3
    assert got[key("kefu_metrics_collector_errors_total", collector="half")] == 4
    flaky_logs = [r for r in caplog.records if "'flaky'" in r.getMessage()]
    assert len(flaky_logs) == 1  # the first failure of a run is logged, the rest counted
    assert flaky_logs[0].exc_info is not None
    assert "store closed" in caplog.text
    assert len([r for r in caplog.records if "'half'" in r.getMessage()]) == 1

    healthy = True
    assert key("kefu_flaky") in parse(reg.render())
    healthy = False
    reg.render()
    assert len([r for r in caplog.records if "'flaky'" in r.getMessage()]) == 2  # a new run


@pytest.mark.parametrize(
    "bad",
    [
        CollectedFamily("kefu bad", "gauge", "h", [({}, 1)]),
        CollectedFamily("kefu_up", "gauge", "clashes with a registered family", [({}, 1)]),
        CollectedFamily("kefu_h_sum", "gauge", "clashes with a histogram's sample", [({}, 1)]),
        CollectedFamily("kefu_requests", "counter", "no _total", [({}, 1)]),
        CollectedFamily("kefu_x", "histogram", "unsupported type", [({}, 1)]),  # type: ignore[arg-type]
        CollectedFamily("kefu_x", "gauge", "h", [({"a": "1"}, 1), ({"a": "1"}, 2)]),
        CollectedFamily("kefu_x", "gauge", "h", [({"__a": "1"}, 1)]),
        CollectedFamily("kefu_x", "gauge", "h", [({"a": 1}, 1)]),  # type: ignore[dict-item]
        CollectedFamily("kefu_x", "gauge", "h", [({}, "1")]),  # type: ignore[list-item]
        CollectedFamily("kefu_x", "gauge", "h", [({}, 10**400)]),
        ("kefu_x", "gauge"),  # not a family at all
    ],
    ids=repr,
)
def test_invalid_collected_family_is_a_collector_failure(bad: CollectedFamily) -> None:
    reg = bare()
    reg.gauge("kefu_up", "up").set(1)
    reg.histogram("kefu_h", "h", [1])
    reg.register_collector(
        lambda: [CollectedFamily("kefu_before", "gauge", "b", [({}, 1)]), bad], name="bad"
    )
    reg.register_collector(
        lambda: [CollectedFamily("kefu_other", "gauge", "o", [({}, 3)])], name="other"
    )
    got = parse(reg.render())
    assert key("kefu_before") not in got
    assert got[key("kefu_other")] == 3
    assert got[key("kefu_up")] == 1
    assert got[key("kefu_metrics_collector_errors_total", collector="bad")] == 1


def test_two_collectors_cannot_emit_the_same_family() -> None:
    fam = CollectedFamily("kefu_same", "gauge", "s", [({}, 1)])
    reg = bare()
    reg.register_collector(lambda: [fam], name="first")
    reg.register_collector(lambda: [fam], name="second")
    got = parse(reg.render())
    assert got[key("kefu_same")] == 1
    assert got[key("kefu_metrics_collector_errors_total", collector="first")] == 0
    assert got[key("kefu_metrics_collector_errors_total", collector="second")] == 1


# -- process and build info -------------------------------------------------------------------


def _busy(cpu_seconds: float) -> None:
    start = time.process_time()
    x = 0
    while time.process_time() - start < cpu_seconds:
        x += sum(range(1000))


def test_process_metrics_are_present_and_plausible() -> None:
    reg = Registry()
    before = parse(reg.render())
    cpu0 = before[key("process_cpu_seconds_total")]
    _busy(0.05)
    fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(20)]
    try:
        after = parse(reg.render())
    finally:
        for fd in fds:
            os.close(fd)
    assert after[key("process_cpu_seconds_total")] - cpu0 >= 0.05
    rss = after[key("process_resident_memory_bytes")]
    vms = after[key("process_virtual_memory_bytes")]
    assert 1 << 20 < rss <= vms
    assert after[key("process_open_fds")] - before[key("process_open_fds")] == 20
    assert after[key("process_max_fds")] == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    start = after[key("process_start_time_seconds")]
    assert start <= time.time()
    assert families(reg.render())["process_cpu_seconds"][0] == "counter"


def test_process_start_time_is_when_the_process_started() -> None:
    t0 = time.time()
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "from kefu.metrics import _process_start_time; print(_process_start_time())",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    t1 = time.time()
    # /proc gives whole seconds of boot time and 1/100 s ticks since
    assert t0 - 1.01 <= float(out) <= t1


def test_process_metrics_degrade_without_proc(monkeypatch: pytest.MonkeyPatch) -> None:
    real_open = open

    def no_proc(path: str, *args: object, **kwargs: object) -> object:
        if str(path).startswith("/proc"):
            raise FileNotFoundError(path)
        return real_open(path, *args, **kwargs)  # type: ignore[call-overload]

    real_stat, real_scandir = os.stat, os.scandir

    def no_proc_stat(path: str, *args: object, **kwargs: object) -> os.stat_result:
        if str(path).startswith("/proc"):
            raise FileNotFoundError(path)
        return real_stat(path, *args, **kwargs)  # type: ignore[arg-type]

    def no_proc_scandir(path: str) -> object:
        if str(path).startswith("/proc"):
            raise FileNotFoundError(path)
        return real_scandir(path)

    monkeypatch.setattr(metrics, "open", no_proc, raising=False)
    monkeypatch.setattr(os, "stat", no_proc_stat)
    monkeypatch.setattr(os, "scandir", no_proc_scandir)
    monkeypatch.setattr(metrics, "_start_time", None)
    reg = Registry()
    got = parse(reg.render())
    assert got[key("process_cpu_seconds_total")] > 0
    assert got[key("process_start_time_seconds")] == metrics._IMPORTED_AT
    assert key("process_resident_memory_bytes") not in got
    assert got[key("process_open_fds")] == len(os.listdir("/dev/fd")) - 1
    assert got[key("kefu_metrics_collector_errors_total", collector="process")] == 0


def test_build_info() -> None:
    got = parse(Registry().render())
    labels = {
        "version": __version__,
        "native": "true" if _core.USING_EXTENSIONS else "false",
        "simd": _core.tfidf.simd_impl(),
    }
    assert got[key("kefu_build_info", **labels)] == 1
    assert next(k for k in got if k[0] == "python_info")[1] >= {
        ("implementation", sys.implementation.name.replace("cpython", "CPython")),
        ("major", str(sys.version_info.major)),
    }


# -- property: any label value survives render and parse --------------------------------------

_label_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=30)


@given(st.lists(st.tuples(_label_text, _label_text), max_size=8), _label_text)
@settings(max_examples=200, deadline=None)
def test_label_values_round_trip(pairs: list[tuple[str, str]], help_text: str) -> None:
    # The parsers strip the HELP text's ends (it follows a separating space); ours are code
    # constants without such ends.
    help_text = help_text.strip()
    reg = bare()
    c = reg.counter("kefu_p_total", help_text, ["a", "b"])
    expected: dict[tuple[str, str], float] = {}
    for i, (a, b) in enumerate(pairs):
        c.labels(a, b).inc(i + 1)
        expected[(a, b)] = expected.get((a, b), 0) + i + 1
    body = reg.render()
    got = {
        (dict(k[1])["a"], dict(k[1])["b"]): v
        for k, v in parse(body).items()
        if k[0] == "kefu_p_total"
    }
    assert got == expected
    assert families(body)["kefu_p"] == ("counter", help_text)


# -- the loop's lag and the collector's pauses ------------------------------------------------


def test_loop_lag_monitor_sees_a_blocked_loop() -> None:
    import asyncio

    from kefu.metrics import LoopLagMonitor

    seen: list[float] = []

    async def main() -> None:
        monitor = LoopLagMonitor(asyncio.get_running_loop(), seen.append, interval_s=0.01)
        monitor.start()
        monitor.start()  # a second start keeps the one timer
        await asyncio.sleep(0.1)
        quiet = list(seen)
        time.sleep(0.08)  # the loop's thread busy: the due timer waits
        await asyncio.sleep(0.03)
        monitor.stop()
        count = len(seen)
        await asyncio.sleep(0.05)
        assert len(seen) == count  # stopped: nothing more
        assert len(quiet) >= 5 and min(quiet) < 0.01
        assert max(seen) >= 0.06 and monitor.max_lag_s == max(seen)

    asyncio.run(main())
    with pytest.raises(ValueError):
        LoopLagMonitor(None, seen.append, interval_s=0)


def test_gc_pause_monitor_times_each_generation() -> None:
    import gc

    from kefu.metrics import GcPauseMonitor

    seen: dict[int, list[float]] = {0: [], 1: [], 2: []}
    monitor = GcPauseMonitor([seen[0].append, seen[1].append, seen[2].append])
    monitor.start()
    monitor.start()  # registered once
    try:
        assert gc.callbacks.count(monitor._callback) == 1
        junk = [[i] for i in range(200_000)]  # something for a full collection to walk
        gc.collect(2)
        gc.collect(1)
        gc.collect(0)
        del junk
    finally:
        monitor.stop()
    assert monitor._callback not in gc.callbacks
    assert len(seen[2]) >= 1 and len(seen[1]) >= 1 and len(seen[0]) >= 1
    assert all(0 <= t < 5 for ts in seen.values() for t in ts)
    assert max(seen[2]) > min(seen[0])  # walking 200,000 lists is not free
    before = sum(len(ts) for ts in seen.values())
    gc.collect(2)
    assert sum(len(ts) for ts in seen.values()) == before  # stopped: not observed
    monitor.stop()  # idempotent
    with pytest.raises(ValueError):
        GcPauseMonitor([seen[0].append])
