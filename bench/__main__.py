"""Run kefu's microbenchmarks and print one table per case.

    python -m bench                 # everything, human-readable tables
    python -m bench --json          # the same rows as JSON (for CI artefacts and the README)
    python -m bench --quick         # fewer rounds, for a smoke run
    python -m bench --only tfidf    # one module (ringbuf, mq, router, tfidf, kb, bot)

Numbers are wall-clock on whatever machine runs them; each table says how the compiled module
compares with its pure-Python twin and with what a user would reach for instead. Run on an idle
machine, and read the ratios rather than the absolute figures.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
from collections import defaultdict

from bench._harness import Row

MODULES = ("ringbuf", "mq", "router", "tfidf", "kb", "bot")


def _machine() -> dict[str, str]:
    import numpy

    from kefu import __version__, _core

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "kefu": __version__,
        "native": str(_core.USING_EXTENSIONS),
        "simd": _core.tfidf.simd_impl(),
        "python": sys.version.split()[0],
        "numpy": numpy.__version__,
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "platform": platform.platform(),
    }


def _fmt(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def _print_tables(rows: list[Row]) -> None:
    by_case: dict[str, list[Row]] = defaultdict(list)
    for row in rows:
        by_case[row.case].append(row)
    for case, case_rows in by_case.items():
        hib = case_rows[0].higher_is_better
        case_rows.sort(key=lambda r: r.value, reverse=hib)
        ref = next((r for r in case_rows if r.impl == "kefu c"), None)
        unit = case_rows[0].unit
        print(f"\n{case}  [{unit}, {'higher' if hib else 'lower'} is better]")
        width = max(len(r.impl) for r in case_rows)
        for r in case_rows:
            rel = ""
            if ref is not None and r is not ref and r.value > 0 and ref.value > 0:
                times = ref.value / r.value if hib else r.value / ref.value
                rel = f"  kefu c is {times:.1f}x {'faster' if times >= 1 else 'slower'}"
            extra = "  ".join(
                f"{k}={_fmt(v) if isinstance(v, float) else v}" for k, v in r.extra.items()
            )
            print(f"  {r.impl:<{width}}  {_fmt(r.value):>12}{rel}{'  ' + extra if extra else ''}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print rows as JSON")
    parser.add_argument("--quick", action="store_true", help="fewer rounds (smoke run)")
    parser.add_argument("--only", nargs="+", choices=MODULES, help="run only these modules")
    args = parser.parse_args(argv)

    rows: list[Row] = []
    for name in args.only or MODULES:
        module = importlib.import_module(f"bench.bench_{name}")
        if not args.json:
            print(f"running {name} ...", file=sys.stderr, flush=True)
        rows.extend(module.run(quick=args.quick))

    machine = _machine()
    if args.json:
        print(json.dumps({"machine": machine, "rows": [r.as_dict() for r in rows]}, indent=2))
    else:
        print("  ".join(f"{k}: {v}" for k, v in machine.items()))
        _print_tables(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
