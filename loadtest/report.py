"""What a run leaves behind: a JSON report, a text summary and a PNG, headed by where it ran.

The header names the machine (host, kernel, CPU model, cores, memory), Python, the versions of
the packages that shape the numbers, the git commit of the checkout (``+dirty`` with
uncommitted changes) and the exact command. The text summary's first line says ``OK`` or
``LOSS`` (any message lost or duplicated, or a connection that did not come back), so a script
or a person reading one line knows. The PNG has the latency CDF (log scale) of every measured
path and the throughput per second with the server's CPU; without matplotlib (the ``loadtest``
extra) it is skipped with a message saying so.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from loadtest.hist import LatencyHistogram

PACKAGES = ("kefu", "picows", "uvloop", "msgspec", "numpy", "rocksdict", "aiohttp", "matplotlib")
LATENCY_NAMES = {
    "v2a": "visitor -> agent",
    "a2v": "agent -> visitor",
    "ack": "send -> ack",
    "bot": "question -> bot answer",
    "connect": "connect + hello -> welcome",
    "ping": "ping -> pong",
}


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _mem_total() -> int:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 0


def _git_commit() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head or "unknown") + ("+dirty" if dirty else "")


def environment() -> dict[str, Any]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "host": platform.node(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "memory_bytes": _mem_total(),
        "python": sys.version.split()[0],
        "packages": versions,
        "commit": _git_commit(),
        "command": "python -m loadtest " + " ".join(sys.argv[1:]),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def verdict(result: dict[str, Any]) -> tuple[bool, str]:
    """(ok, first line): ``LOSS`` when anything was lost, duplicated or never acknowledged,
    ``ERRORS`` when the server refused commands or clients could not connect or resume."""
    acc = result.get("accounting", {})
    lost = int(acc.get("lost", 0))
    dups = int(acc.get("duplicated", 0))
    unacked = int(acc.get("unacked", 0))
    problems = [f"{lost} lost"] if lost else []
    if dups:
        problems.append(f"{dups} duplicated")
    if unacked:
        problems.append(f"{unacked} never acknowledged")
    errors = []
    refused = int(acc.get("refused", 0))
    if refused:
        codes = ", ".join(f"{k} {v}" for k, v in result.get("errors", {}).items())
        errors.append(f"{refused} refused by the server ({codes})")
    keys = (
        "connect_failed",
        "create_failed",
        "not_recovered",
        "resume_timed_out",
        "probe_unanswered",
        "misplaced",
    )
    for key in keys:
        if result.get(key):
            errors.append(f"{key.replace('_', ' ')}: {result[key]}")
    head = result.get("headline", result.get("scenario", ""))
    if problems:
        return False, f"LOSS: {', '.join(problems + errors)} -- {head}"
    if errors:
        return False, f"ERRORS: 0 lost, 0 duplicated; {', '.join(errors)} -- {head}"
    return True, f"OK: 0 lost, 0 duplicated -- {head}"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.3f}" if abs(v) < 100 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def text_summary(report: dict[str, Any]) -> str:
    _ok, first = verdict(report["result"])
    env = report["environment"]
    lines = [first]
    lines.append(
        f"machine: {env['host']} {env['cpu']} x{env['cpus']}, "
        f"{env['memory_bytes'] / 2**30:.1f} GiB; {env['platform']}; Python {env['python']}"
    )
    lines.append("packages: " + ", ".join(f"{k} {v}" for k, v in env["packages"].items() if v))
    lines.append(f"commit: {env['commit']}")
    lines.append(f"command: {env['command']}")
    res = report["result"]
    lines += _cluster_lines(res)
    skip = ("latency", "series", "server_samples", "node_samples", "steps", "accounting")
    for key, value in res.items():
        if key in skip or key in (
            "headline",
            "nodes_cpu_rss",
            "redis",
            "server_log_tail",
            "server_internal",
        ):
            continue
        if isinstance(value, dict):
            value = ", ".join(f"{k} {_fmt(v)}" for k, v in value.items())
        lines.append(f"  {key:<28} {_fmt(value)}")
    if "accounting" in res:
        lines.append(
            "  accounting: " + ", ".join(f"{k} {_fmt(v)}" for k, v in res["accounting"].items())
        )
    for name, s in res.get("latency", {}).items():
        if s.get("count"):
            pct = " ".join(
                f"{p} {s[p + '_ms']}"
                for p in ("p50", "p90", "p99", "p99_9", "max")
                if s.get(p + "_ms") is not None
            )
            lines.append(
                f"  latency {LATENCY_NAMES.get(name, name):<26} n={s['count']:,}  ms: {pct}"
            )
    lines += _internal_lines(res.get("server_internal", {}))
    for node, tail in res.get("server_log_tail", {}).items():
        lines.append(f"  server {node} log (end):")
        lines += [f"    {line}" for line in tail.splitlines()[-20:]]
    for step in res.get("steps", []):
        lines.append(
            f"  step {step['offered_per_s']:>9,.0f}/s offered:"
            f" {step['delivered_per_s']:>9,.0f}/s delivered,"
            f" p50 {step['p50_ms']} p99 {step['p99_ms']} ms, lost {step['lost']}"
        )
    return "\n".join(lines) + "\n"


def _internal_lines(internal: dict[str, Any], indent: str = "  ") -> list[str]:
    """The server's own histograms over the run (``server_internal``), one line each."""
    lines: list[str] = []
    for name, row in internal.items():
        if "count" not in row:  # one block per node
            lines.append(f"{indent}{name}:")
            lines += _internal_lines(row, indent + "  ")
            continue
        short = name.removeprefix("kefu_").removesuffix("_seconds")
        if name.endswith("_seconds"):
            pct = ", ".join(
                f"{q} <= {row[q + '_le'] * 1000:g} ms"
                for q in ("p50", "p99", "p99.9")
                if row.get(q + "_le") is not None
            )
            lines.append(
                f"{indent}server {short}: n={row['count']:,}, mean {row['mean'] * 1000:.3f} ms,"
                f" {pct}; over 1 ms {row['over_1ms']:,}, over 5 ms {row['over_5ms']:,}"
            )
        else:
            lines.append(f"{indent}server {short}: n={row['count']:,}, mean {row['mean']:.1f}")
    return lines


def _mib(b: Any) -> str:
    return f"{int(b) / 2**20:,.1f} MiB" if b is not None else "?"


def _cluster_lines(res: dict[str, Any]) -> list[str]:
    """The head of a cluster run: nodes, placement, each node's CPU and RSS, Redis."""
    if not res.get("nodes_cpu_rss"):
        return []
    lines = [f"cluster: {res.get('nodes')} nodes, placement {res.get('placement')}"]
    for row in res["nodes_cpu_rss"]:
        extra = ""
        if "rss_per_connection_kib" in row:
            extra = (
                f", {row.get('connections_up', 0):,} up at the end,"
                f" {row['rss_per_connection_kib']} KiB/connection"
            )
        lines.append(
            f"  node {row['node']} (pid {row['pid']}, {row['connections']:,} connections):"
            f" cpu mean {row.get('cpu_mean_pct')} % max {row.get('cpu_max_pct')} %,"
            f" rss max {_mib(row.get('rss_max_bytes'))}{extra}"
        )
    total = res.get("server_cpu_rss", {})
    if total:
        lines.append(
            f"  all nodes: cpu mean {total.get('cpu_mean_pct')} % (sum),"
            f" rss max {_mib(total.get('rss_max_bytes'))}"
        )
    r = res.get("redis", {})
    mem = ", ".join(f"{k} {_mib(v)}" for k, v in r.get("used_memory_bytes", {}).items())
    lines.append(
        f"  redis: cpu mean {r.get('cpu_mean_pct')} % max {r.get('cpu_max_pct')} %,"
        f" rss max {_mib(r.get('rss_max_bytes'))}, clients {r.get('connected_clients')};"
        f" used_memory: {mem}"
    )
    return lines


def write(
    report: dict[str, Any], hists: dict[str, LatencyHistogram], directory: Path
) -> list[Path]:
    """Writes the three files; returns their paths (the PNG only with matplotlib)."""
    directory.mkdir(parents=True, exist_ok=True)
    stem = f"{report['result']['scenario']}-{time.strftime('%Y%m%d-%H%M%S')}"
    paths = [directory / f"{stem}.json", directory / f"{stem}.txt"]
    paths[0].write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    paths[1].write_text(text_summary(report), encoding="utf-8")
    png = directory / f"{stem}.png"
    if plot(report, hists, png):
        paths.append(png)
    return paths


def plot(report: dict[str, Any], hists: dict[str, LatencyHistogram], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        print("no PNG: matplotlib is not installed (pip install 'kefu[loadtest]')", file=sys.stderr)
        return False
    res = report["result"]
    env = report["environment"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    cluster = ""
    if res.get("nodes_cpu_rss"):
        redis_end = res.get("redis", {}).get("used_memory_bytes", {}).get("end")
        cluster = (
            f"{res.get('nodes')} nodes, placement {res.get('placement')}, Redis used_memory"
            f" {_mib(redis_end)}; "
        )
    fig.suptitle(
        f"kefu loadtest {res['scenario']}: {res.get('headline', '')}\n{cluster}"
        f"{env['cpu']} x{env['cpus']}, Python {env['python']}, picows "
        f"{env['packages'].get('picows')}, commit {env['commit'][:12]}",
        fontsize=9,
    )
    drew = False
    for name, h in hists.items():
        x, y = h.cdf()
        if len(x):
            ax1.plot(x, y, label=f"{LATENCY_NAMES.get(name, name)} (n={h.total:,})")
            drew = True
    ax1.set_xscale("log")
    # Milliseconds as numbers at 1, 2 and 5 of each decade, and no labels on the minor ticks:
    # over less than two decades matplotlib labels those too, and they overlap.
    ax1.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax1.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax1.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax1.set_xlabel("latency (ms)")
    ax1.set_ylabel("fraction at or below")
    ax1.set_title("latency CDF")
    ax1.grid(True, which="both", alpha=0.3)
    if drew:
        ax1.legend(fontsize=8)
    series = res.get("series", {})
    # The traffic window's whole seconds, as the rates in the report (scenarios._rate_in):
    # what lands after the window, the last sends' answers, is a fraction of a second and
    # would draw as a collapse.
    whole = int(res["duration_s"]) if res.get("duration_s") else None
    for name, values in series.items():
        values = values[:whole]
        if values:
            # Markers too: a run of a second or two has a point or two, which a line alone
            # would not show.
            ax2.plot(range(len(values)), values, label=name, marker="o", markersize=3)
    ax2.set_xlabel("s since traffic start")
    ax2.set_ylabel("visitor messages/s")
    ax2.set_ylim(bottom=0)
    ax2.set_title("throughput")
    ax2.grid(True, alpha=0.3)
    cpu_series = dict(res.get("node_samples") or {})
    if res.get("server_samples"):
        cpu_series["server"] = res["server_samples"]
    if any(cpu_series.values()):
        ax3 = ax2.twinx()
        t0 = res.get("traffic_start_s", 0.0)
        for name, samples in cpu_series.items():
            ax3.plot(
                [s[0] - t0 for s in samples],
                [s[1] for s in samples],
                alpha=0.5,
                linestyle="--",
                label=f"{name} CPU %",
            )
        ax3.set_ylabel("CPU % (dashed)")
        ax3.set_ylim(bottom=0)  # from zero, as the throughput: 2 % must not look like 100
        if len(cpu_series) > 1:
            ax3.legend(fontsize=7, loc="lower right")
    if series:
        ax2.legend(fontsize=8, loc="lower left")  # the rate runs along the top
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
