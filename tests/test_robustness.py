"""Connection-level robustness of a real ``kefu serve``: peers that stop reading, stop
answering, or never get as far as a ``hello``.

- A slow consumer (a visitor whose socket is never read while its conversation is flooded)
  is closed with 4008 once its queue would pass the default ``outbound_limit_bytes`` (1 MiB),
  while other visitors' acks keep coming back quickly.
- A dead peer (a client process stopped with SIGSTOP: the kernel still ACKs its TCP, only the
  WebSocket pong never comes; and a raw socket that never answers pings) is closed within
  ``ping_interval_s + pong_timeout_s``.
- 1,000 TCP connections that never send an upgrade request and 1,000 upgraded connections that
  never send ``hello`` are all closed in time (the upgrade deadline, ``min(5 s,
  hello_timeout_s)``; the hello deadline, then the close handshake's 5 s), and the server's open
  file descriptors (``/proc/PID/fd``) come back to where they were.

The tests in this module measure server-side counters through ``/metrics`` and time every
close from the client's side; each waits with a deadline and fails with what it saw.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import (
    FAST_RATE,
    RECV_TIMEOUT,
    REPO_ROOT,
    ServerProcess,
    WsClient,
    agent,
    config,
    run,
    running,
)

pytestmark = pytest.mark.slow  # starts `kefu serve` processes

PING_INTERVAL_S = 0.5
PONG_TIMEOUT_S = 0.5
HELLO_TIMEOUT_S = 1.0
#: kefu.web.ws.CLOSE_TIMEOUT_S: a close the server starts waits this long for the client's.
CLOSE_TIMEOUT_S = 5.0
#: Scheduling slack on a loaded two-core machine, added to every deadline checked here.
SLACK_S = 2.0
IDLE_CONNECTIONS = 1_000


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Small heartbeat and hello deadlines."""
    cfg = config(
        [agent("alice")],
        ws={
            "ping_interval_s": PING_INTERVAL_S,
            "pong_timeout_s": PONG_TIMEOUT_S,
            "hello_timeout_s": HELLO_TIMEOUT_S,
            "rate": FAST_RATE,
        },
    )
    with running(tmp_path_factory.mktemp("robust"), cfg) as srv:
        yield srv


# -- helpers ----------------------------------------------------------------------------------


async def metrics(server: ServerProcess) -> dict[str, float]:
    """The unlabelled samples of ``/metrics`` (name -> value)."""
    async with server.rest() as api:
        assert api._session is not None
        async with api._session.get(server.http_url + "/metrics") as resp:
            assert resp.status == 200
            text = await resp.text()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, _, value = line.partition(" ")
            out[name] = float(value)
    return out


async def wait_metric(server: ServerProcess, name: str, pred: object, timeout: float) -> float:
    """Polls ``name`` until ``pred(value)``; the seconds it took."""
    t0 = time.monotonic()
    value = None
    while time.monotonic() - t0 < timeout:
        value = (await metrics(server)).get(name)
        if value is not None and pred(value):  # type: ignore[operator]
            return time.monotonic() - t0
        await asyncio.sleep(0.02)
    raise AssertionError(f"{name} stayed at {value} for {timeout} s")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def server_pid(server: ServerProcess) -> int:
    assert server.proc is not None
    return server.proc.pid


async def visitor_chat(server: ServerProcess) -> tuple[str, str]:
    async with server.rest() as api:
        chat = await api.create_chat()
    return chat["session_id"], chat["token"]


def masked_text(payload: bytes) -> bytes:
    """One client text frame (a zero mask key: masked as RFC 6455 requires, bytes unchanged)."""
    n = len(payload)
    head = bytes([0x81, 0x80 | n]) if n < 126 else bytes([0x81, 0x80 | 126]) + struct.pack("!H", n)
    return head + b"\0\0\0\0" + payload


def upgrade_request(port: int) -> bytes:
    return (
        f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


async def raw_connect(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port)), 30)
    return sock


async def raw_upgrade(port: int) -> tuple[socket.socket, bytes]:
    """An upgraded raw connection; what came after the 101 response's headers."""
    loop = asyncio.get_running_loop()
    sock = await raw_connect(port)
    await loop.sock_sendall(sock, upgrade_request(port))
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = await asyncio.wait_for(loop.sock_recv(sock, 4096), RECV_TIMEOUT)
        assert chunk, f"closed during the upgrade: {buf!r}"
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock, rest


async def until_eof(sock: socket.socket, first: bytes = b"", timeout: float = 30.0) -> bytes:
    """Reads until the server closes; everything read (a reset counts as the end)."""
    loop = asyncio.get_running_loop()
    got = bytearray(first)
    deadline = loop.time() + timeout
    while True:
        try:
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), deadline - loop.time())
        except ConnectionResetError:
            return bytes(got)
        except TimeoutError:
            raise AssertionError(f"not closed within {timeout} s") from None
        if not chunk:
            return bytes(got)
        got += chunk


def close_code(data: bytes) -> int | None:
    """The code of the first close frame in a stream of unmasked server frames."""
    i = 0
    while i + 2 <= len(data):
        opcode, n = data[i] & 0x0F, data[i + 1] & 0x7F
        i += 2
        if n == 126:
            n = struct.unpack("!H", data[i : i + 2])[0]
            i += 2
        elif n == 127:
            n = struct.unpack("!Q", data[i : i + 8])[0]
            i += 8
        if opcode == 0x8:
            return int(struct.unpack("!H", data[i : i + 2])[0]) if n >= 2 else None
        i += n
    return None


# -- dead peers -------------------------------------------------------------------------------

_STOPPABLE_CLIENT = """
import json, sys
from websockets.sync.client import connect
with connect(sys.argv[1], open_timeout=10) as ws:
    ws.send(json.dumps({"type": "hello", "token": sys.argv[2]}))
    print(json.loads(ws.recv(timeout=10))["type"], flush=True)
    for _ in range(120):  # at most about two minutes; the test ends it long before
        try:
            ws.recv(timeout=1)
        except TimeoutError:
            pass
        except Exception:  # closed by the server (after SIGCONT): what the test expects
            break
"""


def test_sigstopped_client_is_closed_within_ping_and_pong(server: ServerProcess) -> None:
    """A client process that answers pings (its library does) until it is stopped."""
    deadline = PING_INTERVAL_S + PONG_TIMEOUT_S

    async def body() -> None:
        _conv, token = await visitor_chat(server)
        before = await metrics(server)
        child = subprocess.Popen(
            [sys.executable, "-c", _STOPPABLE_CLIENT, server.ws_url, token],
            stdout=subprocess.PIPE,
            cwd=REPO_ROOT,
        )
        try:
            assert child.stdout is not None
            line = await asyncio.wait_for(asyncio.to_thread(child.stdout.readline), 30)
            assert line.strip() == b"welcome", line
            # alive: several heartbeats pass, answered, the connection stays
            await asyncio.sleep(4 * PING_INTERVAL_S)
            now = await metrics(server)
            assert now["kefu_ws_connections_open"] == before["kefu_ws_connections_open"] + 1
            assert now["kefu_ws_pong_timeouts_total"] == before["kefu_ws_pong_timeouts_total"]
            child.send_signal(signal.SIGSTOP)
            took = await wait_metric(
                server,
                "kefu_ws_connections_open",
                lambda v: v == before["kefu_ws_connections_open"],
                deadline + SLACK_S + 10,
            )
            after = await metrics(server)
            assert after["kefu_ws_pong_timeouts_total"] == before["kefu_ws_pong_timeouts_total"] + 1
            print(f"SIGSTOPped client closed {took:.2f} s after the stop")
            assert took <= deadline + SLACK_S, f"closed {took:.2f} s after SIGSTOP"
        finally:
            child.send_signal(signal.SIGCONT)
            child.kill()
            child.wait(10)

    run(body)


def test_raw_peer_that_never_answers_pings_is_dropped(server: ServerProcess) -> None:
    deadline = PING_INTERVAL_S + PONG_TIMEOUT_S

    async def body() -> None:
        _conv, token = await visitor_chat(server)
        loop = asyncio.get_running_loop()
        sock, rest = await raw_upgrade(server.ws_port)
        with sock:
            await loop.sock_sendall(
                sock, masked_text(json.dumps({"type": "hello", "token": token}).encode())
            )
            t0 = time.monotonic()
            data = await until_eof(sock, rest, timeout=deadline + SLACK_S + 10)
            took = time.monotonic() - t0
        assert b'"welcome"' in data
        assert b"\x89\x00" in data, "no ping came"  # an empty ping frame
        assert close_code(data) == 1011, data[-40:]
        assert took <= deadline + SLACK_S, f"dropped {took:.2f} s after the hello"

    run(body)


# -- slow consumer ----------------------------------------------------------------------------

#: Visitors that keep sending (one message in flight each) while the slow one is flooded.
OTHERS = 5
FLOOD_MESSAGES = 600  # of 16,000 characters: 9.6 MB pushed to a socket nobody reads


def test_slow_consumer_cut_before_1_mib_others_unaffected(tmp_path: Path) -> None:
    """A server of its own: the default heartbeat (the slow socket answers no ping, and must
    be cut as a slow consumer, not as a dead peer) and 1 MiB outbound limit; info logs, where
    the slow-consumer line says how much was queued."""
    cfg = config([agent("alice")], ws={"rate": FAST_RATE}, log_level="info")
    with running(tmp_path, cfg) as server:
        run(lambda: _slow_consumer(server), timeout=180)


async def _slow_consumer(server: ServerProcess) -> None:
    loop = asyncio.get_running_loop()
    conv, token = await visitor_chat(server)
    slow = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.setblocking(False)
    await loop.sock_connect(slow, ("127.0.0.1", server.ws_port))
    await loop.sock_sendall(slow, upgrade_request(server.ws_port))
    await loop.sock_sendall(
        slow, masked_text(json.dumps({"type": "hello", "token": token}).encode())
    )
    # from here the slow socket is never read until the end
    others: list[tuple[WsClient, str]] = []
    for _ in range(OTHERS):
        c, t = await visitor_chat(server)
        client, _welcome = await server.ws(t)
        await client.ping()
        others.append((client, c))
    before = await metrics(server)
    stop = asyncio.Event()
    latencies: list[list[float]] = [[] for _ in others]

    async def keep_sending(i: int) -> None:
        client, c = others[i]
        n = 0
        while not stop.is_set():
            n += 1
            t0 = time.monotonic()
            await client.say(c, f"o{i}.{n}", "still here")
            latencies[i].append(time.monotonic() - t0)

    senders = [asyncio.ensure_future(keep_sending(i)) for i in range(OTHERS)]
    text = "z" * 16_000
    async with server.rest() as api:
        sem = asyncio.Semaphore(8)

        async def push(i: int) -> None:
            async with sem:
                await api.send(conv, token, text, client_msg_id=f"flood{i}")

        await asyncio.gather(*(push(i) for i in range(FLOOD_MESSAGES)))
    await wait_metric(
        server,
        "kefu_ws_slow_consumer_closes_total",
        lambda v: v == before["kefu_ws_slow_consumer_closes_total"] + 1,
        RECV_TIMEOUT,
    )
    await asyncio.sleep(0.5)  # the others go on a little after the close
    stop.set()
    await asyncio.wait_for(asyncio.gather(*senders), RECV_TIMEOUT * 2)
    # the slow one reads at last: what was queued, then 4008
    with slow:
        data = await until_eof(slow, timeout=60)
    assert close_code(data.partition(b"\r\n\r\n")[2]) == 4008
    queued = [int(m[1]) for m in re.finditer(r"slow consumer, (\d+) bytes queued", server.stderr())]
    assert queued and queued[-1] <= 1 << 20, queued
    print(f"slow consumer cut with {queued[-1]:,} bytes queued")
    every = sorted(x for lat in latencies for x in lat)
    assert all(len(lat) >= 5 for lat in latencies), [len(lat) for lat in latencies]
    worst = every[-1]
    p50 = every[len(every) // 2]
    print(f"others: {len(every)} acks, p50 {p50 * 1000:.1f} ms, max {worst * 1000:.1f} ms")
    assert worst < 1.0, f"an ack of another visitor took {worst:.2f} s during the flood"
    for client, _c in others:
        await client.close()


# -- idle connections -------------------------------------------------------------------------


def test_idle_connections_closed_in_time_and_fds_back(server: ServerProcess) -> None:
    """1,000 never upgrade, 1,000 never say hello: all closed within their deadlines."""
    upgrade_deadline = min(5.0, HELLO_TIMEOUT_S)
    hello_deadline = HELLO_TIMEOUT_S + CLOSE_TIMEOUT_S
    pid = server_pid(server)

    async def body() -> None:
        # warm up (lazily opened files: the store's, the loop's) and take the baseline
        _conv, token = await visitor_chat(server)
        client, _ = await server.ws(token)
        await client.close()
        await asyncio.sleep(0.5)
        baseline = fd_count(pid)
        before = await metrics(server)
        sem = asyncio.Semaphore(200)

        async def never_upgrade() -> tuple[float, bytes]:
            async with sem:
                sock = await raw_connect(server.ws_port)
            with sock:
                t0 = time.monotonic()
                data = await until_eof(sock, timeout=upgrade_deadline + SLACK_S + 30)
                return time.monotonic() - t0, data

        async def never_hello() -> tuple[float, bytes]:
            async with sem:
                sock, rest = await raw_upgrade(server.ws_port)
            with sock:
                t0 = time.monotonic()
                data = await until_eof(sock, rest, timeout=hello_deadline + SLACK_S + 30)
                return time.monotonic() - t0, data

        tasks = [asyncio.ensure_future(never_upgrade()) for _ in range(IDLE_CONNECTIONS)]
        tasks += [asyncio.ensure_future(never_hello()) for _ in range(IDLE_CONNECTIONS)]
        peak = baseline
        while not all(t.done() for t in tasks):
            peak = max(peak, fd_count(pid))
            await asyncio.wait(tasks, timeout=0.05)
        results = [t.result() for t in tasks]
        raw, upgraded = results[:IDLE_CONNECTIONS], results[IDLE_CONNECTIONS:]
        worst_raw = max(t for t, _ in raw)
        worst_upgraded = max(t for t, _ in upgraded)
        print(
            f"fds: baseline {baseline}, peak {peak}; never upgraded: closed within "
            f"{worst_raw:.2f} s; never said hello: within {worst_upgraded:.2f} s"
        )
        assert peak >= baseline + IDLE_CONNECTIONS, (baseline, peak)  # they were all held
        assert all(data == b"" for _t, data in raw), "a never-upgraded connection got bytes"
        assert worst_raw <= upgrade_deadline + SLACK_S
        assert {close_code(data) for _t, data in upgraded} == {1008}
        assert worst_upgraded <= hello_deadline + SLACK_S
        after = await metrics(server)
        hello_timeouts = (
            after["kefu_ws_hello_timeouts_total"] - before["kefu_ws_hello_timeouts_total"]
        )
        assert hello_timeouts == IDLE_CONNECTIONS
        # the server's descriptors come back to the baseline
        t0 = time.monotonic()
        while fd_count(pid) > baseline and time.monotonic() - t0 < 30:
            await asyncio.sleep(0.05)
        assert fd_count(pid) <= baseline, (baseline, fd_count(pid))
        assert after["kefu_ws_connections_open"] == 0

    run(body, timeout=180)
