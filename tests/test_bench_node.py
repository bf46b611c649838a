"""``bench.bench_node``'s numbers are of the real path: every send offered as a frame's bytes
is acked and delivered as bytes through the node's WebSocket front, or the bench raises."""

from __future__ import annotations

from pathlib import Path

import pytest
import uvloop

import kefu.node
from bench import bench_node

REAL_LAND = kefu.node.Node._land


def test_the_front_bench_acks_and_delivers_every_send_through_real_connections() -> None:
    cpu, wall, sends, writes, per_round = uvloop.run(bench_node._measure_ws(40, 3, None))
    assert len(per_round) == 3 and sum(per_round) <= cpu
    assert sends == 120
    assert cpu > 0 and wall > 0
    # An ack a send, to its own visitor; the deliveries of a round coalesced per agent (one).
    assert 1.0 < writes <= 1.0 + 3 / 120


def test_the_front_bench_refuses_a_run_where_a_send_is_not_answered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Acks it cannot see (as if the front dropped them): the bench waits its bounded while,
    # then says so rather than report a number.
    monkeypatch.setattr(bench_node, "_ACK", b"never written")
    with pytest.raises(RuntimeError, match="0 acks, 5 deliveries, 5 sends"):
        uvloop.run(bench_node._measure_ws(5, 1, None))


def test_pair_alternates_the_two_versions_round_by_round(tmp_path: Path) -> None:
    """``--pair``: each round runs with the version installed before it, first, second, first,
    ...; the second version here delivers every message twice as slowly as the first."""
    (tmp_path / "pair.py").write_text(
        """
import time
import kefu.node

REAL = kefu.node.Node._land

def slow(self, run):
    t = time.process_time() + 40e-6 * len(run)
    while time.process_time() < t:
        pass
    return REAL(self, run)

def install(fn):
    kefu.node.Node._land = fn

VARIANTS = {"fast": lambda: install(REAL), "slow": lambda: install(slow)}
""",
        encoding="utf-8",
    )
    try:
        got = bench_node.paired(str(tmp_path / "pair.py"), conversations=30, rounds=5)
    finally:
        kefu.node.Node._land = REAL_LAND
    assert set(got) == {"fast", "slow", "paired_median_ratio"}
    assert got["slow"] > got["fast"] + 20  # 40 µs of busy work a message, against a few µs
    assert got["paired_median_ratio"] > 2
