"""What every benchmark module shares: a result row, a timer, and the table printer.

A benchmark module ``bench/bench_<name>.py`` exposes ``run(quick: bool) -> list[Row]``. Rows
with the same ``case`` form one table, sorted best first, each row with its speed relative to
the compiled kefu row (``kefu c``) of that case.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field


@dataclass
class Row:
    case: str  # what is measured, e.g. "ringbuf append+popleft"
    impl: str  # "kefu c", "kefu py", or the alternative: "collections.deque", "numpy.dot", ...
    value: float
    unit: str  # "Mops/s", "µs", "GFLOP/s", "ms", "queries/s"
    higher_is_better: bool = True
    extra: dict[str, float | str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def best_seconds(fn: Callable[[], object], *, repeat: int = 5, min_time: float = 0.05) -> float:
    """Best wall time of one call of ``fn`` over ``repeat`` rounds (GC off while timing).

    Each round calls ``fn`` as often as needed to last ``min_time``, which keeps timer
    resolution out of the result.
    """
    calls = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        if time.perf_counter() - t0 >= min_time or calls >= 1 << 20:
            break
        calls *= 2
    best = float("inf")
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeat):
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            best = min(best, (time.perf_counter() - t0) / calls)
    finally:
        if gc_was_enabled:
            gc.enable()
    return best


def rate(fn: Callable[[], object], ops_per_call: int, *, quick: bool = False) -> float:
    """Operations per second of ``fn`` (which performs ``ops_per_call`` operations)."""
    secs = best_seconds(fn, repeat=2 if quick else 5, min_time=0.02 if quick else 0.1)
    return ops_per_call / secs


def percentiles(samples_s: list[float], pcts: tuple[float, ...] = (50, 99)) -> list[float]:
    """Percentiles of a list of durations in seconds, returned in microseconds."""
    import numpy as np

    arr = np.asarray(samples_s) * 1e6
    return [float(np.percentile(arr, p)) for p in pcts]
