"""Prometheus metrics of one node: a small registry and the text exposition format 0.0.4.

The node keeps one :class:`Registry`. Code that counts something per message holds a child
(``registry.counter(...).labels("visitor")``) and updates it; numbers a component already
keeps (``store.stats()``, ``ws.stats()``, ``routing.stats(now_ms)``) are read at scrape time by
a collector, so nothing is counted twice. ``registry.render()`` is the body of ``GET
/metrics``, served with :data:`CONTENT_TYPE`.

Use::

    registry = Registry()
    sent = registry.counter("kefu_messages_total", "Messages stored.", ["role"])
    sent_by_visitor = sent.labels("visitor")        # once
    sent_by_visitor.inc()                           # per message
    ack = registry.histogram("kefu_ack_seconds", "Send to ack.", LATENCY_BUCKETS)
    ack.observe(0.0012)

    def store_metrics() -> list[CollectedFamily]:
        stats = store.stats()
        return [
            CollectedFamily("kefu_store_pending", "gauge", "Writes queued.",
                            [({}, stats["pending_count"])]),
            CollectedFamily("kefu_store_busy_total", "counter", "Writes refused: busy.",
                            [({}, stats["busy_rejections"])]),
        ]

    registry.register_collector(store_metrics, name="store")
    body = registry.render()                        # GET /metrics, CONTENT_TYPE

Decisions
---------
- **Our own code, not prometheus_client.** What kefu needs is three metric types, labels, a
  bound on series and one output format: about as much code as the glue to a client library
  would be, with the hot path under our control. prometheus_client's parser is the test
  oracle: every rendering is parsed back by it in the tests.
- **Cheap hot path.** ``labels(*values)`` is one dict lookup on the tuple of values; the
  child's ``inc``/``set`` is an attribute update; a histogram's ``observe`` is compiled
  (``kefu._core.meters``: a binary search over a C array of bounds). Measured here on
  CPython 3.11: ``child.inc()`` 42 ns, ``family.labels("v").inc()`` 104 ns; on a slower day
  (``child.inc()`` 64 ns) ``child.observe(x)`` over 17 buckets took 27 ns compiled, 191 ns
  in the pure-Python twin. Hold the
  child when the label values are fixed. An unlabelled family is used directly
  (``counter.inc()``, 87 ns) or through its one child, ``counter.labels()``. Updates come from
  the event loop's thread only; nothing here takes a lock.
- **Counters only go up**: ``inc`` with a negative amount is a ``ValueError``. Counter names
  must end in ``_total`` (checked at registration, for collected counters at each scrape).
- **A histogram ignores NaN**: a NaN observation would land in no bucket yet poison ``_sum``;
  it is a bug of the caller, and dropping it keeps the histogram valid. Buckets are cumulative
  in the output (``le`` is "less than or equal"), ``+Inf`` is always last and equals
  ``_count``.
- **Collectors**: ``register_collector(fn)``; at each scrape ``fn()`` returns an iterable of
  :class:`CollectedFamily` (name, ``"counter"`` or ``"gauge"``, help, samples as ``(labels,
  value)`` pairs). Its output is taken whole or not at all: a collector that raises, or yields
  something invalid (a bad name, a name already in use, a duplicate label set, a value that is
  not a number), loses its output for that scrape, and only that: the scrape still answers,
  ``kefu_metrics_collector_errors_total{collector}`` counts the failure and the first failure
  of a run is logged (with its traceback) on ``kefu.metrics``; a run ends at the collector's
  next good scrape. Logging each failure would write a line per scrape for as long as the
  fault lasts.
- **Process metrics** (:func:`collect_process`, on by default): the standard
  ``process_*`` names of the official clients, so existing dashboards work. CPU time is
  :func:`time.process_time` (all threads, nanosecond clock, any OS); memory and start time come
  from ``/proc`` on Linux and are left out elsewhere. Open fds: Linux 6.2 and later report
  the count as the size of ``/proc/self/fd``, read in constant time; older kernels and other
  systems list the directory, which costs the loop about 0.8 ms per 1,000 open fds (measured
  here; 80 ms per scrape at 100,000 connections). :func:`collect_build_info` adds
  ``kefu_build_info{version, native, simd}`` (the SIMD kernel is read at each scrape: it can
  be switched at run time) and ``python_info``.
- **Output**: label values are escaped (backslash, double quote, newline) and HELP texts too
  (backslash, newline); the body is UTF-8, a lone surrogate in a label value becomes ``?``
  instead of failing the scrape. Integral values print without a fraction (``3``), others with
  ``repr`` (``0.25``, ``1e+20``), and ``+Inf``, ``-Inf``, ``NaN``. ``le`` uses the same format,
  so it matches the Go client's (``le="1"``).
- **Names** are checked at registration against the Prometheus regexes (``ValueError``);
  label names beginning with ``__`` are reserved, ``le`` is reserved in histograms. A name
  that would collide with one already registered (a histogram ``x`` owns ``x_bucket``,
  ``x_sum`` and ``x_count``) is refused.

Bounds
------
======================  =============================  =========================  ==================
what                    limit                          metric                     when full
======================  =============================  =========================  ==================
series of one labelled  ``max_series`` (per family,    ``kefu_metrics_series``,   ``labels()`` of a
family                  default the registry's,        ``kefu_metrics_series_     new label set
                        :data:`DEFAULT_MAX_SERIES`)    dropped_total``, both      returns a detached
                                                       ``{metric}``               child: its updates
                                                                                  go nowhere; each
                                                                                  such call counts 1
samples of one          the same ``max_series``        the same dropped counter   the samples past
collected family                                                                  it are left out,
                                                                                  each counts 1
buckets of a histogram  :data:`MAX_BUCKETS`            (none)                     ``ValueError`` at
                                                                                  registration
families, collectors    those the code registers       (none)                     (by construction)
======================  =============================  =========================  ==================

``remove(*values)`` frees a series (an agent deleted, a group gone). A series is never freed
by age: the label values in use come from bounded sets (roles, frame types, error codes,
groups), and the bound is the backstop for a mistake.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import logging
import math
import os
import platform
import re
import resource
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, Generic, Literal, NamedTuple, TypeVar

from kefu import _core

__all__ = [
    "CONTENT_TYPE",
    "DEFAULT_MAX_SERIES",
    "LATENCY_BUCKETS",
    "MAX_BUCKETS",
    "CollectedFamily",
    "Collector",
    "Counter",
    "CounterChild",
    "Gauge",
    "GaugeChild",
    "Histogram",
    "HistogramChild",
    "Registry",
    "collect_build_info",
    "collect_process",
]

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
DEFAULT_MAX_SERIES: Final = 1_000
MAX_BUCKETS: Final = 64
# Seconds, for latencies from a RocksDB write (tens of µs) to an LLM answer (seconds).
LATENCY_BUCKETS: Final[tuple[float, ...]] = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)

log = logging.getLogger("kefu.metrics")

_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_INF = math.inf

Kind = Literal["counter", "gauge"]


# -- formatting ------------------------------------------------------------------------------


def _format_value(value: float) -> str:
    """A sample value as Prometheus parses it (Go's ``ParseFloat`` plus ``+Inf``/``NaN``)."""
    v = float(value)
    if math.isfinite(v):
        if v.is_integer() and -1e15 < v < 1e15:
            return str(int(v))
        return repr(v)
    if v != v:
        return "NaN"
    return "+Inf" if v > 0 else "-Inf"


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _label_pairs(names: Sequence[str], values: Sequence[str]) -> str:
    """``a="x",b="y"``: the inside of the braces, rendered once per series."""
    return ",".join(f'{n}="{_escape_label_value(v)}"' for n, v in zip(names, values, strict=True))


def _braces(pairs: str) -> str:
    return "{" + pairs + "}" if pairs else ""


def _check_metric_name(name: str) -> None:
    if not isinstance(name, str) or not _METRIC_NAME.fullmatch(name):
        raise ValueError(f"invalid metric name {name!r}")


def _check_label_name(name: str) -> None:
    if not isinstance(name, str) or not _LABEL_NAME.fullmatch(name):
        raise ValueError(f"invalid label name {name!r}")
    if name.startswith("__"):
        raise ValueError(f"label name {name!r} is reserved (leading '__')")


# -- children: the hot path ------------------------------------------------------------------


class CounterChild:
    """One counter series."""

    __slots__ = ("_value",)

    def __init__(self) -> None:
        self._value = 0.0

    def inc(self, n: float = 1.0) -> None:
        if n < 0:
            raise ValueError(f"a counter only goes up (inc({n!r}))")
        self._value += n

    @property
    def value(self) -> float:
        return self._value


class GaugeChild:
    """One gauge series."""

    __slots__ = ("_value",)

    def __init__(self) -> None:
        self._value = 0.0

    def set(self, v: float) -> None:
        self._value = v

    def inc(self, n: float = 1.0) -> None:
        self._value += n

    def dec(self, n: float = 1.0) -> None:
        self._value -= n

    @property
    def value(self) -> float:
        return self._value


if TYPE_CHECKING:
    from kefu._core.meters import Histogram as HistogramChild
else:
    #: One histogram series: a count per bucket (not cumulative) and the sum; compiled
    #: (``kefu._core.meters``) unless the extensions are off.
    HistogramChild = _core.meters.Histogram


_C = TypeVar("_C", CounterChild, GaugeChild, HistogramChild)


# -- families --------------------------------------------------------------------------------


class _Family(Generic[_C]):
    """What the three metric types share: the children by label values, and the bound."""

    kind: str = ""

    def __init__(self, name: str, help: str, labelnames: Sequence[str], max_series: int) -> None:
        self.name = name
        self.help = help
        self.labelnames = tuple(labelnames)
        self.max_series = max_series
        self._children: dict[tuple[str, ...], _C] = {}
        self._pairs: dict[tuple[str, ...], str] = {}  # label values -> 'a="x",b="y"'
        self.dropped = 0
        self._detached: _C = self._new_child()
        self._only: _C | None = None
        if not self.labelnames:
            self._only = self._new_child()
            self._children[()] = self._only
            self._pairs[()] = ""

    def _new_child(self) -> _C:
        raise NotImplementedError

    def only(self) -> _C:
        """The one series of a family without labels (a hot path keeps the child's bound
        method: one call less per observation)."""
        only = self._only
        if only is None:
            raise self._labelled_error()
        return only

    def labels(self, *values: str) -> _C:
        """The child of this label set, created on first use (see the bound)."""
        child = self._children.get(values)
        if child is not None:
            return child
        return self._add(values)

    def _add(self, values: tuple[str, ...]) -> _C:
        if len(values) != len(self.labelnames) or not self.labelnames:
            raise ValueError(
                f"{self.name} takes {len(self.labelnames)} label values "
                f"{self.labelnames}, got {values!r}"
            )
        for v in values:
            if not isinstance(v, str):
                raise TypeError(f"label values of {self.name} must be str, got {v!r}")
        if len(self._children) >= self.max_series:
            self.dropped += 1
            return self._detached
        child = self._new_child()
        self._children[values] = child
        self._pairs[values] = _label_pairs(self.labelnames, values)
        return child

    def remove(self, *values: str) -> None:
        """Forget one series (no error if it does not exist).

        A child still held elsewhere keeps taking updates that are no longer rendered; a
        later ``labels()`` of the same values starts a new series from zero (a counter reset,
        which ``rate()`` handles).
        """
        if not self.labelnames:
            raise ValueError(f"{self.name} has no labels")
        self._children.pop(values, None)
        self._pairs.pop(values, None)

    @property
    def series_count(self) -> int:
        return len(self._children)

    def _labelled_error(self) -> ValueError:
        return ValueError(f"{self.name} has labels {self.labelnames}: use .labels(...)")

    def _unlabelled(self) -> _C:
        only = self._only
        if only is None:
            raise self._labelled_error()
        return only

    def sample_names(self) -> tuple[str, ...]:
        return (self.name,)

    def _header(self, out: list[str]) -> None:
        out.append(f"# HELP {self.name} {_escape_help(self.help)}\n")
        out.append(f"# TYPE {self.name} {self.kind}\n")

    def render(self, out: list[str]) -> None:
        raise NotImplementedError

    def _render_values(self, out: list[str], values: Iterable[tuple[str, float]]) -> None:
        self._header(out)
        name = self.name
        for pairs, value in values:
            out.append(f"{name}{_braces(pairs)} {_format_value(value)}\n")


class Counter(_Family[CounterChild]):
    """A counter family; ``inc`` on the family itself when it has no labels."""

    kind = "counter"

    def _new_child(self) -> CounterChild:
        return CounterChild()

    def render(self, out: list[str]) -> None:
        pairs = self._pairs
        self._render_values(out, ((pairs[k], c.value) for k, c in self._children.items()))

    def inc(self, n: float = 1.0) -> None:
        only = self._only
        if only is None:
            raise self._labelled_error()
        only.inc(n)

    @property
    def value(self) -> float:
        return self._unlabelled().value


class Gauge(_Family[GaugeChild]):
    """A gauge family; ``set``/``inc``/``dec`` on the family itself when it has no labels."""

    kind = "gauge"

    def _new_child(self) -> GaugeChild:
        return GaugeChild()

    def render(self, out: list[str]) -> None:
        pairs = self._pairs
        self._render_values(out, ((pairs[k], c.value) for k, c in self._children.items()))

    def set(self, v: float) -> None:
        only = self._only
        if only is None:
            raise self._labelled_error()
        only.set(v)

    def inc(self, n: float = 1.0) -> None:
        only = self._only
        if only is None:
            raise self._labelled_error()
        only.inc(n)

    def dec(self, n: float = 1.0) -> None:
        only = self._only
        if only is None:
            raise self._labelled_error()
        only.dec(n)

    @property
    def value(self) -> float:
        return self._unlabelled().value


class Histogram(_Family[HistogramChild]):
    """A histogram family; ``observe`` on the family itself when it has no labels."""

    kind = "histogram"

    def __init__(
        self,
        name: str,
        help: str,
        buckets: Sequence[float],
        labelnames: Sequence[str],
        max_series: int,
    ) -> None:
        bounds = [float(b) for b in buckets]
        if bounds and bounds[-1] == _INF:
            bounds.pop()
        if not bounds:
            raise ValueError(f"{name}: a histogram needs at least one finite bucket bound")
        if len(bounds) > MAX_BUCKETS:
            raise ValueError(f"{name}: {len(bounds)} buckets, at most {MAX_BUCKETS}")
        if not all(math.isfinite(b) for b in bounds):
            raise ValueError(f"{name}: bucket bounds must be finite (+Inf is added), {buckets}")
        if any(a >= b for a, b in itertools.pairwise(bounds)):
            raise ValueError(f"{name}: bucket bounds must increase strictly, {buckets}")
        if "le" in labelnames:
            raise ValueError(f"{name}: 'le' is reserved in a histogram")
        self.bounds = tuple(bounds)
        super().__init__(name, help, labelnames, max_series)

    def _new_child(self) -> HistogramChild:
        return HistogramChild(self.bounds)

    def observe(self, v: float) -> None:
        only = self._only
        if only is None:
            raise self._labelled_error()
        only.observe(v)

    def sample_names(self) -> tuple[str, ...]:
        return (f"{self.name}_bucket", f"{self.name}_sum", f"{self.name}_count")

    def render(self, out: list[str]) -> None:
        self._header(out)
        name = self.name
        les = [f'le="{_format_value(b)}"' for b in (*self.bounds, _INF)]
        for key, child in self._children.items():
            pairs = self._pairs[key]
            prefix = pairs + "," if pairs else ""
            total = 0
            for le, c in zip(les, child.counts(), strict=True):
                total += c
                out.append(f"{name}_bucket{{{prefix}{le}}} {total}\n")
            braces = _braces(pairs)
            out.append(f"{name}_sum{braces} {_format_value(child.sum)}\n")
            out.append(f"{name}_count{braces} {total}\n")


# -- collectors ------------------------------------------------------------------------------


class CollectedFamily(NamedTuple):
    """One family produced by a collector at scrape time.

    ``samples`` are ``(labels, value)`` pairs; ``{}`` for a family without labels, e.g.
    ``CollectedFamily("kefu_store_pending", "gauge", "Writes queued.", [({}, n)])``.
    """

    name: str
    kind: Kind
    help: str
    samples: Sequence[tuple[Mapping[str, str], float]]


Collector = Callable[[], Iterable[CollectedFamily]]


class _CollectorEntry:
    __slots__ = ("errors", "failing", "fn", "name")

    def __init__(self, name: str, fn: Collector) -> None:
        self.name = name
        self.fn = fn
        self.errors = 0
        self.failing = False


class _InvalidFamily(ValueError):
    pass


def _render_collected(
    family: CollectedFamily, max_series: int, taken: set[str], out: list[str]
) -> int:
    """Render one collected family into ``out``; returns the samples left out by the bound.

    Raises :class:`_InvalidFamily` (and writes nothing) when the family is not valid.
    """
    name, kind, help, samples = family
    try:
        _check_metric_name(name)
    except ValueError as exc:
        raise _InvalidFamily(str(exc)) from None
    if kind not in ("counter", "gauge"):
        raise _InvalidFamily(f"{name}: type {kind!r}, expected 'counter' or 'gauge'")
    if kind == "counter" and not name.endswith("_total"):
        raise _InvalidFamily(f"counter {name!r} must end in '_total'")
    if name in taken:
        raise _InvalidFamily(f"{name}: name already in use")
    if not isinstance(help, str):
        raise _InvalidFamily(f"{name}: help must be a str")
    lines = [f"# HELP {name} {_escape_help(help)}\n", f"# TYPE {name} {kind}\n"]
    seen: set[tuple[tuple[str, str], ...]] = set()
    dropped = 0
    for labels, value in samples:
        if len(seen) >= max_series:
            dropped += 1
            continue
        key = tuple(sorted(labels.items()))
        if key in seen:
            raise _InvalidFamily(f"{name}: label set {dict(key)} twice")
        seen.add(key)
        for ln, lv in key:
            try:
                _check_label_name(ln)
            except ValueError as exc:
                raise _InvalidFamily(f"{name}: {exc}") from None
            if not isinstance(lv, str):
                raise _InvalidFamily(f"{name}: label value {lv!r} is not a str")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _InvalidFamily(f"{name}: value {value!r} is not a number")
        try:
            text = _format_value(value)
        except OverflowError:
            raise _InvalidFamily(f"{name}: value {value!r} is out of range") from None
        pairs = ",".join(f'{ln}="{_escape_label_value(lv)}"' for ln, lv in key)
        lines.append(f"{name}{_braces(pairs)} {text}\n")
    taken.add(name)
    out.extend(lines)
    return dropped


# -- the registry ----------------------------------------------------------------------------


_F = TypeVar("_F", Counter, Gauge, Histogram)


class Registry:
    """All metric families and collectors of one node, rendered by :meth:`render`.

    ``process=True`` registers :func:`collect_process` and :func:`collect_build_info`.
    """

    def __init__(self, *, max_series: int = DEFAULT_MAX_SERIES, process: bool = True) -> None:
        if max_series < 1:
            raise ValueError(f"max_series must be >= 1, got {max_series}")
        self.max_series = max_series
        self._families: dict[str, Counter | Gauge | Histogram] = {}
        self._taken: set[str] = set()  # every sample name in use, histogram suffixes included
        self._collectors: dict[str, _CollectorEntry] = {}
        # Samples left out of collected families, by family name: bounded by the names in code.
        self._collected_dropped: dict[str, int] = {}
        for meta in _META_NAMES:
            self._taken.add(meta)
        if process:
            self.register_collector(collect_process, name="process")
            self.register_collector(collect_build_info, name="build_info")

    # registration

    def counter(
        self,
        name: str,
        help: str,
        labelnames: Sequence[str] = (),
        *,
        max_series: int | None = None,
    ) -> Counter:
        if isinstance(name, str) and not name.endswith("_total"):
            raise ValueError(f"counter {name!r} must end in '_total'")
        return self._register(Counter(name, help, labelnames, self._bound(max_series)))

    def gauge(
        self,
        name: str,
        help: str,
        labelnames: Sequence[str] = (),
        *,
        max_series: int | None = None,
    ) -> Gauge:
        return self._register(Gauge(name, help, labelnames, self._bound(max_series)))

    def histogram(
        self,
        name: str,
        help: str,
        buckets: Sequence[float],
        labelnames: Sequence[str] = (),
        *,
        max_series: int | None = None,
    ) -> Histogram:
        _check_metric_name(name)
        return self._register(Histogram(name, help, buckets, labelnames, self._bound(max_series)))

    def _bound(self, max_series: int | None) -> int:
        if max_series is None:
            return self.max_series
        if max_series < 1:
            raise ValueError(f"max_series must be >= 1, got {max_series}")
        return max_series

    def _register(self, family: _F) -> _F:
        _check_metric_name(family.name)
        if not isinstance(family.help, str):
            raise TypeError(f"{family.name}: help must be a str")
        if len(set(family.labelnames)) != len(family.labelnames):
            raise ValueError(f"{family.name}: duplicate label names {family.labelnames}")
        for ln in family.labelnames:
            _check_label_name(ln)
        names: tuple[str, ...] = family.sample_names()
        clash = [n for n in (family.name, *names) if n in self._taken]
        if clash:
            raise ValueError(f"{family.name}: metric name {clash[0]!r} is already in use")
        self._taken.update((family.name, *names))
        self._families[family.name] = family
        return family

    def register_collector(self, fn: Collector, *, name: str | None = None) -> None:
        """Call ``fn()`` at every scrape and render what it returns.

        ``name`` (default: the function's qualified name) labels its failures and must be
        unique. A collector should be cheap: it runs on the event loop.
        """
        key = name if name is not None else getattr(fn, "__qualname__", repr(fn))
        if key in self._collectors:
            raise ValueError(f"a collector named {key!r} exists: pass another name=")
        self._collectors[key] = _CollectorEntry(key, fn)

    # exposition

    def render(self) -> bytes:
        """The whole exposition, text format 0.0.4, UTF-8."""
        out: list[str] = []
        for family in self._families.values():
            family.render(out)
        taken = set(self._taken)
        for entry in self._collectors.values():
            self._run_collector(entry, taken, out)
        self._render_meta(out)
        return "".join(out).encode("utf-8", "replace")

    def _run_collector(self, entry: _CollectorEntry, taken: set[str], out: list[str]) -> None:
        mine: list[str] = []
        mine_taken = set(taken)
        dropped: dict[str, int] = {}
        try:
            for family in entry.fn():
                d = _render_collected(family, self.max_series, mine_taken, mine)
                if d:
                    dropped[family.name] = d
        except Exception:
            entry.errors += 1
            if not entry.failing:
                entry.failing = True
                log.warning(
                    "metrics collector %r failed; its metrics are left out of this scrape "
                    "(further failures are counted, not logged, until it succeeds)",
                    entry.name,
                    exc_info=True,
                )
            return
        entry.failing = False
        out.extend(mine)
        taken |= mine_taken
        for fname, d in dropped.items():
            self._collected_dropped[fname] = self._collected_dropped.get(fname, 0) + d

    def _render_meta(self, out: list[str]) -> None:
        labelled = [f for f in self._families.values() if f.labelnames]
        out.append(
            "# HELP kefu_metrics_series Series of a labelled metric family.\n"
            "# TYPE kefu_metrics_series gauge\n"
        )
        for f in labelled:
            out.append(f'kefu_metrics_series{{metric="{f.name}"}} {f.series_count}\n')
        out.append(
            "# HELP kefu_metrics_series_dropped_total New series refused because the metric "
            "was at max_series (labels() calls, collected samples left out).\n"
            "# TYPE kefu_metrics_series_dropped_total counter\n"
        )
        for f in labelled:
            out.append(f'kefu_metrics_series_dropped_total{{metric="{f.name}"}} {f.dropped}\n')
        for fname, d in self._collected_dropped.items():
            out.append(f'kefu_metrics_series_dropped_total{{metric="{fname}"}} {d}\n')
        out.append(
            "# HELP kefu_metrics_collector_errors_total Scrapes whose collector failed "
            "(its metrics were left out).\n"
            "# TYPE kefu_metrics_collector_errors_total counter\n"
        )
        for entry in self._collectors.values():
            label = _escape_label_value(entry.name)
            out.append(
                f'kefu_metrics_collector_errors_total{{collector="{label}"}} {entry.errors}\n'
            )

    # read access, for tests and health checks

    def get(self, name: str) -> Counter | Gauge | Histogram:
        return self._families[name]


_META_NAMES: Final = (
    "kefu_metrics_series",
    "kefu_metrics_series_dropped_total",
    "kefu_metrics_collector_errors_total",
)


# -- process and build collectors ------------------------------------------------------------

_IMPORTED_AT: Final = time.time()
_start_time: float | None = None


def _process_start_time() -> float:
    """Seconds since the epoch at which this process started (read once)."""
    global _start_time
    if _start_time is None:
        try:
            with open("/proc/self/stat", encoding="ascii") as f:
                stat = f.read()
            # Field 22 (starttime, clock ticks since boot); the command name in field 2 may
            # hold spaces and parentheses, so count from the last ')'.
            ticks = int(stat[stat.rindex(")") + 2 :].split()[19])
            with open("/proc/stat", encoding="ascii") as f:
                btime = next(int(line.split()[1]) for line in f if line.startswith("btime "))
            _start_time = btime + ticks / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError, StopIteration):
            _start_time = _IMPORTED_AT
    return _start_time


def _count_fds() -> int | None:
    """Open file descriptors, not counting a transient one of our own."""
    for path in ("/proc/self/fd", "/dev/fd"):
        try:
            # Linux 6.2+ gives the count as the directory's size: constant time.
            size = os.stat(path).st_size
            if size > 0 and path == "/proc/self/fd":
                return size
            with os.scandir(path) as it:
                return sum(1 for _ in it) - 1  # the scan's own fd
        except OSError:
            continue
    return None


def _gauge(name: str, help: str, value: float) -> CollectedFamily:
    return CollectedFamily(name, "gauge", help, [({}, value)])


def collect_process() -> list[CollectedFamily]:
    """The standard ``process_*`` metrics; those this OS cannot give are left out."""
    out = [
        CollectedFamily(
            "process_cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent in seconds.",
            [({}, time.process_time())],
        ),
        _gauge(
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds.",
            _process_start_time(),
        ),
        _gauge(
            "process_max_fds",
            "Maximum number of open file descriptors.",
            resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        ),
    ]
    fds = _count_fds()
    if fds is not None:
        out.append(_gauge("process_open_fds", "Number of open file descriptors.", fds))
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            size, resident = f.read().split()[:2]
    except OSError:
        return out
    page = os.sysconf("SC_PAGE_SIZE")
    out.append(
        _gauge(
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes.",
            int(size) * page,
        )
    )
    out.append(
        _gauge(
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
            int(resident) * page,
        )
    )
    return out


def collect_build_info() -> list[CollectedFamily]:
    """``kefu_build_info{version, native, simd}`` and ``python_info``, both always 1."""
    from kefu import _core
    from kefu._version import __version__

    major, minor, patch = platform.python_version_tuple()
    return [
        CollectedFamily(
            "kefu_build_info",
            "gauge",
            "kefu's version, whether the compiled core is in use, the dense SIMD kernel.",
            [
                (
                    {
                        "version": __version__,
                        "native": "true" if _core.USING_EXTENSIONS else "false",
                        "simd": str(_core.tfidf.simd_impl()),
                    },
                    1,
                )
            ],
        ),
        CollectedFamily(
            "python_info",
            "gauge",
            "Python platform information.",
            [
                (
                    {
                        "implementation": platform.python_implementation(),
                        "major": major,
                        "minor": minor,
                        "patchlevel": patch,
                        "version": platform.python_version(),
                    },
                    1,
                )
            ],
        ),
    ]


# ---------------------------------------------------------------------------------------------
# The loop's responsiveness and the garbage collector's pauses


#: How often :class:`LoopLagMonitor` looks at the loop (20 callbacks a second).
LOOP_LAG_INTERVAL_S: Final = 0.05


class LoopLagMonitor:
    """How late the event loop runs a callback that is due: the time a ready frame can wait in
    its socket because the loop's one thread is busy with other work (a long batch, a garbage
    collection, a slow callback). Every ``interval_s`` a timer is scheduled; when it runs,
    ``observe(seconds late)`` is called (uvloop's timers have millisecond resolution, so under
    about 1 ms is resolution, not lag). ``stop`` cancels it; one timer at a time, no state."""

    def __init__(
        self,
        loop: Any,
        observe: Callable[[float], None],
        interval_s: float = LOOP_LAG_INTERVAL_S,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self._loop = loop
        self._observe = observe
        self.interval_s = interval_s
        self._handle: Any = None
        self._due = 0.0
        self.max_lag_s = 0.0

    def start(self) -> None:
        if self._handle is None:
            self._schedule()

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _schedule(self) -> None:
        self._due = time.perf_counter() + self.interval_s
        self._handle = self._loop.call_later(self.interval_s, self._fire)

    def _fire(self) -> None:
        lag = max(0.0, time.perf_counter() - self._due)
        self.max_lag_s = max(self.max_lag_s, lag)
        self._schedule()
        self._observe(lag)


class GcPauseMonitor:
    """The duration of every garbage collection, by generation, through ``gc.callbacks``:
    ``observe[generation](seconds)``. While it runs the loop runs nothing else. ``stop``
    removes the callback (the process keeps one list for everything in it)."""

    def __init__(self, observe: Sequence[Callable[[float], None]]) -> None:
        if len(observe) != 3:
            raise ValueError("one observer per generation (0, 1, 2)")
        self._observe = tuple(observe)
        self._t0 = 0.0
        self._on = False

    def start(self) -> None:
        if not self._on:
            gc.callbacks.append(self._callback)
            self._on = True

    def stop(self) -> None:
        if self._on:
            with contextlib.suppress(ValueError):
                gc.callbacks.remove(self._callback)
            self._on = False

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
            return
        generation = info.get("generation", 2)
        if 0 <= generation <= 2 and self._t0:
            self._observe[generation](time.perf_counter() - self._t0)
        self._t0 = 0.0
