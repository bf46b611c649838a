"""The cluster link against a real redis-server: indexes, heartbeats, reaping a dead node once,
Redis going away and coming back."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from kefu.cluster.link import ClusterUnavailable, Link
from tests import aio
from tests.cluster.redis_server import RedisServer

TIMEOUT = 30.0


def run(test: Callable[[], Awaitable[None]]) -> None:
    aio.run(test, TIMEOUT)


async def until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


def test_indexes_are_unique_and_kept_across_restarts(redis_server: RedisServer) -> None:
    async def body() -> None:
        links = [Link(redis_server.url, f"node{i}", heartbeat_s=0.1) for i in range(3)]
        await asyncio.gather(*(link.start() for link in links))
        try:
            assert sorted(link.index for link in links) == [1, 2, 3]
            await until(lambda: all(len(link.live_nodes) == 3 for link in links))
            cards = await links[0].node_cards()
            assert sorted(c.id for c in cards) == ["node0", "node1", "node2"]
        finally:
            for link in links:
                await link.stop()
        again = Link(redis_server.url, "node1", heartbeat_s=0.1)
        await again.start()
        try:
            assert again.index == links[1].index  # the same node, the same index
        finally:
            await again.stop()
        fresh = Link(redis_server.url, "node9", heartbeat_s=0.1)
        await fresh.start()
        try:
            assert fresh.index == 4
        finally:
            await fresh.stop()

    run(body)


def test_a_dead_node_is_reaped_once(redis_server: RedisServer) -> None:
    async def body() -> None:
        deaths: list[tuple[str, str]] = []

        def watcher(name: str) -> Callable[[str], Awaitable[None]]:
            async def dead(node: str) -> None:
                deaths.append((name, node))

            return dead

        links = [
            Link(
                redis_server.url,
                f"node{i}",
                heartbeat_s=0.1,
                node_timeout_s=1.5,
                on_node_dead=watcher(f"node{i}"),
            )
            for i in range(3)
        ]
        for link in links:
            await link.start()
        try:
            await until(lambda: all(len(link.live_nodes) == 3 for link in links))
            # node2 stops beating without leaving (as after kill -9).
            task = links[2]._task
            assert task is not None
            links[2]._closing = True  # its loop ends at its next turn
            task.cancel()
            await until(lambda: bool(deaths))
            await asyncio.sleep(2.0)  # time for a second reaping, which must not come
            assert [node for _, node in deaths] == ["node2"], deaths
            assert deaths[0][0] in ("node0", "node1")
            await until(
                lambda: all(sorted(link.live_nodes) == ["node0", "node1"] for link in links[:2])
            )
        finally:
            for link in links:
                await link.stop()

    run(body)


def test_redis_down_and_back(redis_server: RedisServer) -> None:
    async def body() -> None:
        reconnected = asyncio.Event()

        async def on_reconnect() -> None:
            reconnected.set()

        link = Link(redis_server.url, "node0", heartbeat_s=0.1, on_reconnect=on_reconnect)
        await link.start()
        try:
            assert link.up
            redis_server.stop()
            with pytest.raises(ClusterUnavailable):
                await link.call(lambda r: r.ping())
            assert link.errors_total >= 1
            await until(lambda: link.state == "down")  # the next heartbeat judges
            await asyncio.sleep(0.5)  # heartbeats fail meanwhile; nothing raises out of them
            assert link.state == "down"
            redis_server.start()
            await asyncio.wait_for(reconnected.wait(), 10)
            assert link.up and link.reconnects_total == 1
            assert await link.call(lambda r: r.ping()) is True
            # Redis lost everything (no persistence): the heartbeat registers the node again.
            await until(lambda: link.live_nodes == ["node0"])
        finally:
            await link.stop()

    run(body)


def test_start_without_redis_is_refused(tmp_path: object) -> None:
    async def body() -> None:
        from tests.cluster.redis_server import free_port

        link = Link(f"redis://127.0.0.1:{free_port()}/0", "node0")
        with pytest.raises(ClusterUnavailable):
            await link.start()
        await link.stop()
        assert link.state == "closed"

    run(body)
