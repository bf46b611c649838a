"""How much the machine itself stalls during a run: ``machine_stalls`` in the ``chat`` reports.

A latency tail is kefu's only if the machine would not have produced it anyway. On a shared
virtual machine a thread that does nothing but wait can still be held off its core for several
milliseconds (a spinner pinned to an idle core of the reference machine saw 28 gaps over 1 ms
in 10 s, the longest 17.9 ms), and every message in flight then waits as long. This probe
measures that beside the run, so that a report says how much of its tail the machine gave:

    python -m loadtest.stalls --seconds 10 [--cpus 0] [--start-ns T]

It sleeps 1 ms at a time (in its own process, pinned to ``--cpus`` when given: with ``--pin``
the server's core) from ``--start-ns`` (``time.monotonic_ns``) for ``--seconds``, and counts
how late each wake-up was. It asks for the real-time policy ``SCHED_FIFO`` (allowed to root or
with ``CAP_SYS_NICE``), under which a wake-up preempts the server at once, so that what is left
is the machine's own stalls (the hypervisor, interrupts); without it (``policy: normal``) a
wake-up may also wait for the busy server's time slice. Its own cost is a wake-up per
millisecond, about 0.5 % of a core. It prints one JSON object: ``wakeups``, ``late_over_1ms``,
``late_over_5ms``, ``late_max_ms``, ``late_total_ms`` (the time the probe waited beyond its
sleep, over 1 ms each), ``policy`` and ``cpus``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any, Final

#: The probe's sleep; a wake-up later than this plus LATE_NS counts as a stall.
SLEEP_S: Final = 0.001
LATE_NS: Final = 1_000_000
LONG_NS: Final = 5_000_000
#: Slack for the probe's own start and exit when its parent waits for it.
EXIT_GRACE_S: Final = 10.0


def probe(seconds: float, start_ns: int | None = None) -> dict[str, Any]:
    """Sleep ``SLEEP_S`` at a time for ``seconds`` from ``start_ns`` (default: now); how late
    the wake-ups were. Bounded: at most ``seconds / SLEEP_S`` sleeps."""
    if start_ns is not None:
        wait = (start_ns - time.monotonic_ns()) / 1e9
        if wait > 0:
            time.sleep(wait)
    end = time.perf_counter_ns() + int(seconds * 1e9)
    sleep_ns = int(SLEEP_S * 1e9)
    wakeups = over1 = over5 = 0
    late_max = late_total = 0
    for _ in range(int(seconds / SLEEP_S) + 1):
        t0 = time.perf_counter_ns()
        if t0 >= end:
            break
        time.sleep(SLEEP_S)
        late = time.perf_counter_ns() - t0 - sleep_ns
        wakeups += 1
        if late > LATE_NS:
            over1 += 1
            late_total += late
            late_max = max(late_max, late)
            if late > LONG_NS:
                over5 += 1
    return {
        "wakeups": wakeups,
        "late_over_1ms": over1,
        "late_over_5ms": over5,
        "late_max_ms": round(late_max / 1e6, 2),
        "late_total_ms": round(late_total / 1e6, 2),
    }


class StallProbe:
    """:func:`probe` in a child process (pinned to ``cpus`` when given), for a run's traffic."""

    def __init__(self, cpus: set[int] | None = None) -> None:
        self.cpus = cpus
        self._proc: subprocess.Popen[str] | None = None
        self._seconds = 0.0

    def start(self, start_ns: int, seconds: float) -> None:
        cmd = [sys.executable, "-m", "loadtest.stalls", "--seconds", str(seconds)]
        cmd += ["--start-ns", str(start_ns)]
        if self.cpus:
            cmd += ["--cpus", ",".join(str(c) for c in sorted(self.cpus))]
        self._seconds = seconds
        self._proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True
        )

    def result(self, timeout: float | None = None) -> dict[str, Any]:
        """The probe's figures (``cpus`` added); ``{"error": ...}`` if it failed."""
        proc = self._proc
        if proc is None:
            return {"error": "not started"}
        self._proc = None
        try:
            out, err = proc.communicate(timeout=timeout or self._seconds + EXIT_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            return {"error": "the probe did not finish"}
        if proc.returncode != 0:
            return {"error": f"exit {proc.returncode}: {err.strip()[-300:]}"}
        res: dict[str, Any] = json.loads(out)
        res["cpus"] = sorted(self.cpus) if self.cpus else "any"
        return res

    def stop(self) -> None:
        """Kill a probe still running (a run that failed before reading it)."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.communicate()
            self._proc = None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.stalls", description=__doc__)
    p.add_argument("--seconds", type=float, required=True, help="how long to probe")
    p.add_argument("--cpus", default="", help="CPUs to pin the probe to, comma-separated")
    p.add_argument("--start-ns", type=int, default=None, help="time.monotonic_ns() to start at")
    args = p.parse_args(argv)
    if not 0 < args.seconds <= 3600:
        p.error("--seconds must be in (0, 3600]")
    if args.cpus:
        os.sched_setaffinity(0, {int(c) for c in args.cpus.split(",")})
    policy = "normal"
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
        policy = "fifo"
    except (OSError, AttributeError):
        pass
    print(json.dumps({**probe(args.seconds, args.start_ns), "policy": policy}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
