"""Node-to-node requests and events over a real redis-server."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from kefu.cluster import bus as bus_module
from kefu.cluster.bus import Bus, RemoteError
from kefu.cluster.link import ClusterUnavailable, Link
from kefu.errors import KefuError
from tests import aio
from tests.cluster.redis_server import RedisServer

TIMEOUT = 30.0


def run(test: Callable[[], Awaitable[None]]) -> None:
    aio.run(test, TIMEOUT)


async def pair(url: str, timeout_s: float = 1.0) -> tuple[Bus, Bus]:
    buses = []
    for name in ("a", "b"):
        link = Link(url, name, heartbeat_s=0.1)
        await link.start()
        bus = Bus(link, timeout_s=timeout_s, max_pending=4, max_handling=2)
        await bus.start()
        buses.append(bus)
    return buses[0], buses[1]


async def close(*buses: Bus) -> None:
    for bus in buses:
        await bus.stop()
        await bus.link.stop()


class Refused(KefuError):
    code = "forbidden"


def test_request_reply_error_and_event(redis_server: RedisServer) -> None:
    async def body() -> None:
        a, b = await pair(redis_server.url)
        try:
            seen: list[tuple[str, Any]] = []

            async def echo(sender: str, payload: Any) -> Any:
                return {"from": sender, "got": payload}

            async def refuse(sender: str, payload: Any) -> Any:
                raise Refused("not you")

            b.on_request("echo", echo)
            b.on_request("refuse", refuse)
            b.on_event("note", lambda sender, payload: seen.append((sender, payload)))
            assert await a.request("b", "echo", [1, "x"]) == {"from": "a", "got": [1, "x"]}
            with pytest.raises(RemoteError) as refused:
                await a.request("b", "refuse", None)
            assert refused.value.code == "forbidden" and str(refused.value) == "not you"
            assert isinstance(refused.value, KefuError)  # answered as the owner's own refusal
            with pytest.raises(RemoteError) as unknown:
                await a.request("b", "nothing", None)
            assert unknown.value.code == "unsupported"
            assert await a.tell("b", "note", {"n": 1}) is True
            for _ in range(200):
                if seen:
                    break
                await asyncio.sleep(0.01)
            assert seen == [("a", {"n": 1})]
            assert a.pending == 0
        finally:
            await close(a, b)

    run(body)


def test_nobody_listening_and_timeouts(redis_server: RedisServer) -> None:
    async def body() -> None:
        a, b = await pair(redis_server.url, timeout_s=0.3)
        try:
            with pytest.raises(ClusterUnavailable):
                await a.request("ghost", "echo", None)  # no subscriber on that channel
            assert await a.tell("ghost", "note", None) is False

            release = asyncio.Event()

            async def slow(sender: str, payload: Any) -> Any:
                await release.wait()
                return "late"

            b.on_request("slow", slow)
            with pytest.raises(ClusterUnavailable):
                await a.request("b", "slow", None)
            assert a.timeouts_total == 1 and a.pending == 0
            release.set()  # b finishes the timed-out one (its late reply is dropped by a)
            await asyncio.sleep(0.05)
            release.clear()
            a.timeout_s = 20.0  # from here on no reply is late
            # b handles at most 2 at once (max_handling): a third is answered busy at once.
            calls = [asyncio.ensure_future(a.request("b", "slow", i)) for i in range(3)]
            done, _ = await asyncio.wait(calls, timeout=10, return_when=asyncio.FIRST_COMPLETED)
            await asyncio.sleep(0.2)  # a second answer would have come by now
            done = {c for c in calls if c.done()}
            busy = [c for c in done if isinstance(c.exception(), RemoteError)]
            assert len(done) == 1 and len(busy) == 1 and busy[0].exception().code == "busy"  # type: ignore[union-attr]
            release.set()
            results = await asyncio.gather(*calls, return_exceptions=True)
            assert sorted(r for r in results if r == "late") == ["late", "late"]
            # a waits for at most 4 replies at once (max_pending).
            release.clear()
            b.max_handling = 10
            waiting = [asyncio.ensure_future(a.request("b", "slow", i)) for i in range(4)]
            await asyncio.sleep(0.05)
            with pytest.raises(ClusterUnavailable, match="pending"):
                await a.request("b", "slow", None)
            release.set()
            await asyncio.gather(*waiting, return_exceptions=True)
        finally:
            await close(a, b)

    run(body)


def test_the_bus_comes_back_after_redis_restarts(redis_server: RedisServer) -> None:
    async def body() -> None:
        a, b = await pair(redis_server.url, timeout_s=0.5)
        try:

            async def echo(sender: str, payload: Any) -> Any:
                return payload

            b.on_request("echo", echo)
            assert await a.request("b", "echo", 1) == 1
            redis_server.stop()
            with pytest.raises(ClusterUnavailable):
                await a.request("b", "echo", 2)
            redis_server.start()
            result = None
            for _ in range(100):  # both listeners subscribe again by themselves
                try:
                    result = await a.request("b", "echo", 3)
                    break
                except ClusterUnavailable:
                    await asyncio.sleep(0.1)
            assert result == 3
        finally:
            await close(a, b)

    run(body)


def test_what_one_node_sends_another_arrives_in_order(redis_server: RedisServer) -> None:
    """Events emitted without waiting, interleaved with requests answered by events before
    their reply: b sees a's events in a's order, and every reply after the events before it."""

    async def body() -> None:
        a, b = await pair(redis_server.url, timeout_s=5.0)
        try:
            seen_by_b: list[int] = []
            seen_by_a: list[int] = []
            b.on_event("n", lambda sender, n: seen_by_b.append(n))
            a.on_event("m", lambda sender, n: seen_by_a.append(n))

            async def mark(sender: str, n: int) -> int:
                for i in range(3):  # events first, then (by returning) the reply
                    b.emit(sender, "m", n * 3 + i)
                return n

            b.on_request("mark", mark)
            replies = []
            for n in range(50):
                for i in range(20):
                    a.emit("b", "n", n * 20 + i)
                replies.append(await a.request("b", "mark", n))
                assert seen_by_a[-3:] == [n * 3, n * 3 + 1, n * 3 + 2]  # before the reply
            assert replies == list(range(50))
            for _ in range(200):
                if len(seen_by_b) == 1000:
                    break
                await asyncio.sleep(0.01)
            assert seen_by_b == list(range(1000))
            assert seen_by_a == list(range(150))
        finally:
            await close(a, b)

    run(body)


def test_envelopes_to_one_node_travel_bundled_and_in_order(redis_server: RedisServer) -> None:
    """Events emitted in one go to b arrive in order, several per Pub/Sub message; a bundle
    stops at BUNDLE_BYTES; a bundle inside a bundle (never made) is dropped."""

    async def body() -> None:
        a, b = await pair(redis_server.url)
        try:
            seen: list[int] = []
            b.on_event("n", lambda sender, payload: seen.append(payload))
            for i in range(500):
                a.emit("b", "n", i)
            big = "x" * (bus_module.BUNDLE_BYTES // 3)
            b.on_event("big", lambda sender, payload: seen.append(len(payload)))
            for _ in range(4):  # four of a third each: two bundles at least
                a.emit("b", "big", big)
            for _ in range(500):
                if len(seen) == 504:
                    break
                await asyncio.sleep(0.01)
            assert seen == [*range(500), *[len(big)] * 4]
            stats = a.stats()
            assert stats["bundled_total"] >= 500 - stats["published_total"]
            assert stats["published_total"] < 100  # 504 envelopes, a few messages
            assert stats["published_total"] >= 2 + 500 // bus_module.WRITE_BATCH

            # A nested bundle is dropped; the envelopes around it are not.
            inner = bus_module._ENCODE(bus_module.Envelope(bus_module.EVENT, "n", 0, "a", 7))
            nested = bus_module._ENCODE(bus_module.Envelope(bus_module.BUNDLE, "", 0, "a", [inner]))
            outer = bus_module.Envelope(bus_module.BUNDLE, "", 0, "a", [inner, nested, inner])
            dropped = b.dropped_total
            seen.clear()
            b._received(bus_module._ENCODE(outer))
            assert seen == [7, 7]
            assert b.dropped_total == dropped + 1
        finally:
            await close(a, b)

    run(body)
