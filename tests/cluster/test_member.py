"""A node joining a cluster: its name kept across restarts, its index in conversation ids, one
token secret for all nodes, Redis in /healthz and /metrics."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from kefu.cluster.link import ClusterUnavailable
from kefu.cluster.member import REPORT_ATTEMPTS, owner_index
from kefu.config import AgentConfig, BotConfig, ClusterConfig, Config, WsConfig
from kefu.node import Node
from kefu.store import parse_conv_id
from tests import aio
from tests.cluster.redis_server import RedisServer, free_port


def run(test: Callable[[], Awaitable[None]]) -> None:
    aio.run(test, 30.0)


def cluster_config(data_dir: Path, url: str, node_id: str | None = None) -> Config:
    return Config(
        data_dir=str(data_dir),
        ws=WsConfig(host="127.0.0.1", port=0),
        bot=BotConfig(enabled=False),
        cluster=ClusterConfig(redis_url=url, node_id=node_id, heartbeat_s=0.1),
    )


def test_nodes_share_the_secret_and_own_their_ids(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    async def body() -> None:
        a = Node(cluster_config(tmp_path / "a", redis_server.url))
        b = Node(cluster_config(tmp_path / "b", redis_server.url))
        await a.start()
        await b.start()
        try:
            assert a.member is not None and b.member is not None
            assert {a.member.index, b.member.index} == {1, 2}
            conv, _visitor, token, _status, _created = await a.create_chat(name="Bob")
            assert owner_index(parse_conv_id(conv)) == a.member.index
            assert await b.member.owner_of(parse_conv_id(conv)) == a.member.node_id
            # B verifies what A signed: one secret for the cluster.
            found = b.visitor_of_token(token)
            assert found is not None and found[1] == conv
            health = a.health()
            assert health.status == "ok" and health.checks["redis"] == "ok"
            for _ in range(100):  # a's next heartbeat sees b
                if len(a.member.link.live_nodes) == 2:
                    break
                await asyncio.sleep(0.05)
            text = a.metrics_text().decode()
            assert "\nkefu_cluster_redis_up 1\n" in text
            assert "\nkefu_cluster_nodes 2\n" in text
            name = a.member.node_id
        finally:
            await b.stop()
            await a.stop()
        # The same data directory is the same node: same name, same index.
        again = Node(cluster_config(tmp_path / "a", redis_server.url))
        await again.start()
        try:
            assert again.member is not None and again.member.node_id == name
            assert again.member.index == 1
        finally:
            await again.stop()

    run(body)


def test_redis_down_is_reported_not_fatal(tmp_path: Path, redis_server: RedisServer) -> None:
    async def body() -> None:
        node = Node(cluster_config(tmp_path / "a", redis_server.url, node_id="alpha"))
        await node.start()
        try:
            assert node.member is not None and node.member.node_id == "alpha"
            redis_server.stop()
            with pytest.raises(ClusterUnavailable):
                await node.member.link.call(lambda r: r.ping())
            for _ in range(100):  # the next heartbeat (0.1 s) judges
                if node.health().checks["redis"] != "ok":
                    break
                await asyncio.sleep(0.05)
            health = node.health()
            assert health.status == "ok" and health.checks["redis"] == "unavailable"
            assert "\nkefu_cluster_redis_up 0\n" in node.metrics_text().decode()
            redis_server.start()
            for _ in range(100):
                if node.health().checks["redis"] == "ok":
                    break
                await asyncio.sleep(0.05)
            assert node.health().checks["redis"] == "ok"
        finally:
            await node.stop()

    run(body)


def test_a_node_without_its_redis_does_not_start(tmp_path: Path) -> None:
    async def body() -> None:
        node = Node(cluster_config(tmp_path / "a", f"redis://127.0.0.1:{free_port()}/0"))
        with pytest.raises(ClusterUnavailable):
            await node.start()
        assert node.member is None

    run(body)


def test_an_agent_report_refused_as_unreachable_is_tried_again(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """Right after Redis comes back a pooled connection that died with it fails once more: the
    report made then (an agent's connection closed) is tried again a heartbeat later and
    reaches the cluster's routing; one that keeps failing stops after REPORT_ATTEMPTS."""
    import msgspec

    config = msgspec.structs.replace(
        cluster_config(tmp_path / "a", redis_server.url),
        agents=[AgentConfig(id="alice", name="Alice", token="alice-token-0001", max_chats=3)],
    )

    async def body() -> None:
        node = Node(config)
        await node.start()
        try:
            member = node.member
            assert member is not None
            real = member.routing.agent_state
            failures = {"left": 1}
            states: list[str] = []

            def flaky(agent_id: str, **kw: object) -> object:
                if failures["left"]:
                    failures["left"] -= 1

                    async def cut() -> None:
                        raise ClusterUnavailable("connection reset by peer")

                    return cut()
                states.append(str(kw["status"]))
                return real(agent_id, **kw)  # type: ignore[arg-type]

            member.routing.agent_state = flaky  # type: ignore[method-assign]
            node.pool.set_status("alice", "online")
            await asyncio.wait_for(member.report_agent("alice"), 10)
            assert member.report_retries_total == 1 and states == ["online"]
            assert "\nkefu_cluster_report_retries_total 1\n" in node.metrics_text().decode()
            # Redis has it: the cluster counts alice available.
            ranked = await member.presence(["alice"])
            assert [p.id for p in ranked] == ["alice"]

            failures["left"] = REPORT_ATTEMPTS  # down for good: the report gives up
            failed_before = member.routing_failures_total
            await asyncio.wait_for(member.report_agent("alice"), 10)
            assert member.report_retries_total == REPORT_ATTEMPTS
            assert member.routing_failures_total == failed_before + 1
        finally:
            await node.stop()

    run(body)
