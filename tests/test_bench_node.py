"""``bench.bench_node``'s numbers are of the real path: every send offered as a frame's bytes
is acked and delivered as bytes through the node's WebSocket front, or the bench raises."""

from __future__ import annotations

import pytest
import uvloop

from bench import bench_node


def test_the_front_bench_acks_and_delivers_every_send_through_real_connections() -> None:
    cpu, wall, sends, writes = uvloop.run(bench_node._measure_ws(40, 3, None))
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
