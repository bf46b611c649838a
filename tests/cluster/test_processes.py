"""Three ``kefu serve --cluster`` processes and one real redis-server: visitors and agents
spread over the nodes; a node killed with SIGKILL during traffic; Redis stopped for 5 s during
traffic. Every acknowledged message must be in its conversation's history at the end, once,
in a gap-free sequence."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aredis
from websockets.exceptions import WebSocketException

from kefu.cluster.routing import ClusterRouting
from tests.cluster.redis_server import RedisServer
from tests.e2e.harness import (
    Closed,
    ServerProcess,
    WsClient,
    agent,
    config,
    run,
)

GRACE_S = 1.0


def cluster_config(url: str, agents: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return config(
        agents,
        cluster={"redis_url": url, "heartbeat_s": 0.2, "node_timeout_s": 2.0},
        routing={"agent_grace_s": GRACE_S},
        ws={"rate": {"per_second": 10_000.0, "burst": 10_000}},
        **extra,
    )


@pytest.fixture
def start_nodes(tmp_path: Path) -> Iterator[Any]:
    """``start_nodes(url, agents)``: three nodes of the cluster on Redis ``url``, with those
    agents (the same file on each); all stopped at the end of the test."""
    servers: list[ServerProcess] = []

    def start(url: str, agents: list[dict[str, Any]]) -> list[ServerProcess]:
        cfg = cluster_config(url, agents)
        for i in range(3):
            workdir = tmp_path / f"node{i}"
            workdir.mkdir()
            server = ServerProcess(workdir, cfg)
            servers.append(server)
            server.start()
        return servers

    try:
        yield start
    finally:
        for server in servers:
            server.close()


async def stats(url: str) -> dict[str, int]:
    client = aredis.Redis.from_url(url)
    try:
        return await ClusterRouting(client).stats(int(time.time() * 1000))
    finally:
        await client.aclose()


async def loads(url: str, agents: list[str]) -> dict[str, int]:
    client = aredis.Redis.from_url(url)
    try:
        routing = ClusterRouting(client)
        return {a: await routing.load(a) for a in agents}
    finally:
        await client.aclose()


async def _true(value: bool) -> bool:
    return value


async def until(check: Any, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"{what} not reached within {timeout}s"
        await asyncio.sleep(0.05)


def test_three_nodes_chat_route_and_resume(start_nodes: Any, redis_server: RedisServer) -> None:
    nodes = start_nodes(
        redis_server.url, [agent("alice", max_chats=3), agent("bob", max_chats=3, weight=2)]
    )

    async def body() -> None:
        n0, n1, n2 = nodes
        alice = await n0.agent("alice")
        bob = await n1.agent("bob")
        url = redis_server.url

        async def two_online() -> bool:
            return (await stats(url))["agents_available"] == 2

        await until(two_online, what="alice and bob online")
        # Concurrent creates from all three nodes: 9 conversations, 6 slots (3 + 3).
        made: list[tuple[ServerProcess, dict[str, Any]]] = []

        async def create(node: ServerProcess) -> None:
            async with node.rest() as api:
                made.append((node, await api.create_chat(name="v")))

        await asyncio.gather(*(create(n) for n in (n0, n1, n2) for _ in range(3)))
        statuses = sorted(m["status"] for _, m in made)
        assert statuses == ["assigned"] * 6 + ["queued"] * 3, statuses
        assert await loads(url, ["alice", "bob"]) == {"alice": 3, "bob": 3}
        held = {"alice": set(), "bob": set()}
        for name, ws in (("alice", alice), ("bob", bob)):
            for _ in range(3):
                held[name].add((await ws.recv("assigned"))["conv"])
        assigned = {m["session_id"] for _, m in made if m["status"] == "assigned"}
        assert held["alice"] | held["bob"] == assigned

        # Every visitor connects to a node that does not own its conversation, and chats.
        visitors: dict[str, WsClient] = {}
        tokens: dict[str, str] = {}
        for owner, m in made:
            other = nodes[(nodes.index(owner) + 1) % 3]
            client, welcome = await other.ws(m["token"])
            assert welcome["convs"][0]["conv"] == m["session_id"]
            visitors[m["session_id"]] = client
            tokens[m["session_id"]] = m["token"]
        for conv in sorted(assigned):
            v = visitors[conv]
            ack = await v.say(conv, "v-1", "hello")
            assert (ack["seq"], ack["dup"]) == (1, False)
            who = alice if conv in held["alice"] else bob
            got = await who.recv_match("msg", conv=conv)
            assert got["text"] == "hello"
            ack = await who.say(conv, f"a-{conv}", "hi")
            assert ack["seq"] == 2
            assert (await v.recv_match("msg", conv=conv, seq=2))["text"] == "hi"
            again = await v.say(conv, "v-1", "hello")
            assert (again["seq"], again["dup"]) == (1, True)

        # Resume through yet another node: what was missed, then live.
        conv = sorted(held["alice"])[0]
        await visitors[conv].close()
        ack = await alice.say(conv, "a-missed", "you missed this")
        assert ack["seq"] == 3
        third = nodes[(nodes.index(next(o for o, m in made if m["session_id"] == conv)) + 2) % 3]
        back, _ = await third.ws(tokens[conv], resume=[{"conv": conv, "epoch": 1, "last_seq": 2}])
        missed, resumed = await back.replay(conv)
        assert [m["seq"] for m in missed] == [3] and resumed["to_seq"] == 3
        # History through a node that does not own it.
        async with third.rest() as api:
            page = await api.history(conv, tokens[conv])
        assert [m["seq"] for m in page["messages"]] == [1, 2, 3]

        # Closing frees a slot: the oldest queued conversation (wherever it lives) takes it.
        queued = [m for _, m in made if m["status"] == "queued"]
        await back.send(type="close", conv=conv)
        await back.recv("closed")
        taken = await alice.recv("assigned")
        assert taken["conv"] in {m["session_id"] for m in queued}
        assert (await loads(url, ["alice", "bob"]))["alice"] == 3
        for client in [alice, bob, back, *visitors.values()]:
            await client.close()

    run(body)


class Visitor:
    """A visitor that keeps sending numbered messages, and after any failure reconnects to
    a live node, resumes and sends the unacknowledged one again (same client_msg_id)."""

    def __init__(self, conv: str, token: str, nodes: list[ServerProcess], seed: int) -> None:
        self.conv = conv
        self.token = token
        self.nodes = nodes
        self.rng = random.Random(seed)
        self.client: WsClient | None = None
        self.acked: dict[str, int] = {}  # client_msg_id -> seq
        self.retries = 0
        self.failures: list[str] = []
        self.last_seq = 0

    async def connect(self) -> None:
        live = [n for n in self.nodes if n.proc is not None]
        node = self.rng.choice(live)
        resume = [{"conv": self.conv, "epoch": 1, "last_seq": self.last_seq}]
        self.client, _ = await node.ws(self.token, resume=resume)

    async def send_one(self, n: int, deadline: float) -> None:
        cid = f"{self.conv}-{n}"
        while time.monotonic() < deadline:
            try:
                if self.client is None:
                    await self.connect()
                assert self.client is not None
                await self.client.send(type="send", conv=self.conv, client_msg_id=cid, text=cid)
                frame = await self.client.recv_until(
                    lambda f: (
                        (f["type"] == "ack" and f["client_msg_id"] == cid)
                        or (f["type"] == "error" and f.get("ref") == cid)
                    )
                )
                if frame["type"] == "ack":
                    self.acked[cid] = frame["seq"]
                    self.last_seq = max(self.last_seq, frame["seq"])
                    return
            except (Closed, OSError, AssertionError, TimeoutError, WebSocketException) as exc:
                # The node went away under the client (or refused: cluster_unavailable):
                # reconnect, resume, send the same message again.
                self.failures.append(repr(exc)[:200])
            self.retries += 1
            if self.client is not None:
                self.client.drop()
                self.client = None
            await asyncio.sleep(0.2)
        raise AssertionError(
            f"{cid} not acknowledged in time (retries {self.retries}: {self.failures[-3:]})"
        )


class Workbench:
    """An agent's connection kept up as the workbench keeps it: when the node closes it (1012
    after another node died, say), it reconnects and goes online again. It reads every frame:
    ``assigned`` conversations and ``ack`` frames are kept."""

    def __init__(self, node: ServerProcess, agent_id: str) -> None:
        self.node = node
        self.agent_id = agent_id
        self.client: WsClient | None = None
        self.reconnects = 0
        self.assigned: list[str] = []
        self.acks: dict[str, dict[str, Any]] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.client = await self.node.agent(self.agent_id)
        self._task = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        while True:
            client = self.client
            assert client is not None
            try:
                frame = await client.recv(timeout=3600)
            except (Closed, OSError, WebSocketException, TimeoutError):
                await asyncio.sleep(0.2)
                try:
                    self.client = await self.node.agent(self.agent_id)
                    self.reconnects += 1
                except (Closed, OSError, WebSocketException, AssertionError, TimeoutError):
                    pass
                continue
            if frame["type"] == "assigned":
                self.assigned.append(frame["conv"])
            elif frame["type"] == "ack":
                self.acks[frame["client_msg_id"]] = frame

    async def say(self, conv: str, cid: str, text: str) -> dict[str, Any]:
        for _ in range(50):
            client = self.client
            assert client is not None
            with contextlib.suppress(Closed, OSError, WebSocketException):
                await client.send(type="send", conv=conv, client_msg_id=cid, text=text)
            for _ in range(20):
                if cid in self.acks:
                    return self.acks[cid]
                await asyncio.sleep(0.05)
        raise AssertionError(f"{cid} not acknowledged")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self.client is not None:
            self.client.drop()


async def full_history(api: Any, conv: str, token: str) -> list[dict[str, Any]]:
    """Every message of ``conv`` through a node that may not own it: a 503
    ``cluster_unavailable`` (a call lost between nodes) is retried, as a client would."""
    out: list[dict[str, Any]] = []
    after = 0
    for _ in range(1_000):
        for _attempt in range(20):
            status, page = await api.call(
                "GET", f"/v1/chat/{conv}/messages?after={after}&limit=500", token=token
            )
            if status != 503:
                break
            assert page["error"]["code"] == "cluster_unavailable", page
            await asyncio.sleep(0.2)
        assert status == 200, (status, page)
        out += page["messages"]
        if not page["more"]:
            return out
        after = page["messages"][-1]["seq"]
    raise AssertionError("history did not end within 1,000 pages")


async def check_histories(node: ServerProcess, visitors: list[Visitor]) -> int:
    """Every acked message in its history, once, with its seq; seqs gap-free."""
    total = 0
    async with node.rest() as api:
        for v in visitors:
            messages = await full_history(api, v.conv, v.token)
            seqs = [m["seq"] for m in messages]
            assert seqs == list(range(1, len(seqs) + 1)), (v.conv, seqs)
            by_cid = {}
            for m in messages:
                cid = m.get("client_msg_id")
                if cid is not None:
                    assert cid not in by_cid, f"{cid} stored twice"
                    by_cid[cid] = m["seq"]
            for cid, seq in v.acked.items():
                assert by_cid.get(cid) == seq, (cid, seq, by_cid.get(cid))
            total += len(v.acked)
    return total


def test_a_node_killed_during_traffic(start_nodes: Any, redis_server: RedisServer) -> None:
    nodes = start_nodes(
        redis_server.url, [agent("alice", max_chats=10), agent("bob", max_chats=10)]
    )

    async def body() -> None:
        n0, n1, n2 = nodes
        url = redis_server.url
        alice = Workbench(n0, "alice")
        await alice.start()
        bob = await n1.agent("bob")  # on the node that dies

        async def two_online() -> bool:
            return (await stats(url))["agents_available"] == 2

        await until(two_online, what="alice and bob online")
        visitors: list[Visitor] = []
        for i, owner in enumerate([n1, n1, n2, n2]):  # two conversations owned by n1
            async with owner.rest() as api:
                m = await api.create_chat(name=f"v{i}")
            assert m["status"] == "assigned"
            visitors.append(Visitor(m["session_id"], m["token"], nodes, seed=i))
        assert await loads(url, ["alice", "bob"]) == {"alice": 2, "bob": 2}
        deadline = time.monotonic() + 60
        counter = itertools.count()

        async def traffic(v: Visitor, count: int) -> None:
            for _ in range(count):
                await v.send_one(next(counter), deadline)
                await asyncio.sleep(0.05)  # paced: the traffic outlasts the kill

        running = asyncio.gather(*(traffic(v, 40) for v in visitors))
        await asyncio.sleep(0.5)
        n1.kill()  # SIGKILL: no flush, no goodbye
        killed_at = time.monotonic()

        # Bob's only connection died with n1: offline after node_timeout + grace, and his
        # conversations go to alice, the one left.
        async def bob_gone() -> bool:
            got = await loads(url, ["alice", "bob"])
            return (await stats(url))["agents_available"] == 1 and got == {"alice": 4, "bob": 0}

        await until(bob_gone, timeout=30, what="bob offline and his chats with alice")
        assert time.monotonic() - killed_at >= GRACE_S
        async with n2.rest() as api:
            fresh = await api.create_chat(name="fresh")
        assert fresh["status"] == "assigned"
        await until(
            lambda: _true(fresh["session_id"] in alice.assigned), what="fresh assigned to alice"
        )
        assert alice.reconnects >= 1  # closed (1012) when n1 went: she followed its chats
        await asyncio.sleep(0.5)
        n1.start()  # its conversations are its own again (its RocksDB)
        await asyncio.wait_for(running, 90)
        total = await check_histories(n0, visitors)
        assert total == 160
        assert sum(v.retries for v in visitors) > 0  # the kill was felt
        # Every conversation is alice's now, on its owner too: she writes in one of n1's.
        conv = visitors[0].conv
        ack = await alice.say(conv, "after", "back again")
        assert ack["dup"] is False
        alice.stop()
        bob.drop()

    run(body, timeout=150)


@pytest.fixture
def durable_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server whose data survives its restart (append-only file, synced always)."""
    server = RedisServer(tmp_path / "redis-aof", persistent=True)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_redis_stopped_for_5s_during_traffic(start_nodes: Any, durable_redis: RedisServer) -> None:
    nodes = start_nodes(durable_redis.url, [agent("alice", max_chats=10)])

    async def body() -> None:
        n0, n1, n2 = nodes
        url = durable_redis.url
        alice = await n0.agent("alice")

        async def online() -> bool:
            return (await stats(url))["agents_available"] == 1

        await until(online, what="alice online")
        visitors: list[Visitor] = []
        for i, owner in enumerate([n0, n1, n2]):
            async with owner.rest() as api:
                m = await api.create_chat(name=f"v{i}")
            assert m["status"] == "assigned"
            visitors.append(Visitor(m["session_id"], m["token"], nodes, seed=10 + i))
        deadline = time.monotonic() + 60
        counter = itertools.count()

        async def traffic(v: Visitor, count: int) -> None:
            for _ in range(count):
                await v.send_one(next(counter), deadline)
                await asyncio.sleep(0.05)

        running = asyncio.gather(*(traffic(v, 100) for v in visitors))
        await asyncio.sleep(0.5)
        durable_redis.stop()
        down_at = time.monotonic()
        # Meanwhile: what needs the cluster is refused with a clear error...
        async with n1.rest() as api:
            status, out = await api.call("POST", "/v1/chat/create", {"name": "late"})
        assert status == 503 and out["error"]["code"] == "cluster_unavailable", out

        # ...and /healthz says so by the next heartbeat, while the node stays up (200).
        async def reported_down() -> bool:
            async with n1.rest() as api:
                status, health = await api.call("GET", "/healthz")
            assert status == 200, health
            return bool(health["checks"]["redis"] == "unavailable")

        await until(reported_down, timeout=4.0, what="redis reported unavailable")
        await asyncio.sleep(max(0.0, 5.0 - (time.monotonic() - down_at)))
        durable_redis.start()
        await asyncio.wait_for(running, 90)

        async def healthy() -> bool:
            async with n1.rest() as api:
                _, health = await api.call("GET", "/healthz")
            return bool(health["checks"].get("redis") == "ok")

        await until(healthy, what="redis ok again")
        total = await check_histories(n0, visitors)
        assert total == 300
        assert sum(v.retries for v in visitors) > 0  # the outage was felt
        # Alice's connection followed other nodes' conversations: it was closed (1012) when
        # Redis came back, and she reconnects, as the workbench does.
        code, _ = await alice.closed()
        assert code == 1012, code

        # Redis kept her as available from before the outage until n0 reports the close: wait
        # for that report, so that "online" below is her new connection's and not the old one.
        async def offline() -> bool:
            return (await stats(url))["agents_available"] == 0

        await until(offline, what="alice's closed connection reported")
        alice = await n0.agent("alice")
        await until(online, what="alice online again")
        # The cluster works again: a new conversation is routed to alice.
        async with n2.rest() as api:
            fresh = await api.create_chat(name="after")
        assert fresh["status"] == "assigned"
        alice.drop()

    run(body, timeout=150)
