"""The client side: one worker process holds many WebSocket clients (picows on uvloop).

A worker is told what to do over a pipe by the coordinating process (:mod:`loadtest.runner`)
and answers each command with one reply; once a second it also sends a ``progress`` snapshot
of its counters. Commands: ``agents`` (connect the agents of a group, status online),
``create`` (REST ``/v1/chat/create`` on a node for its visitors), ``visitors`` (connect them),
``run`` (send traffic),
``counts``, ``storm`` (drop every connection at once and resume), ``probe`` (ping a sample),
``report`` (histograms and per-conversation counts) and ``close``.

Accounting (what makes "0 lost" mean something)
-----------------------------------------------
Every ``send`` is kept in its connection's ``pending`` map under its ``client_msg_id`` until its
``ack`` (or an ``error`` naming it) arrives; one left at the end was never acknowledged. Every
client follows each of its conversations with a :class:`Track`: the highest ``seq`` up to which
it has seen every message, and the few seen beyond it. A ``msg`` whose ``seq`` was seen already
is a duplicate. Per conversation, a worker counts the acks its senders got and the messages its
receivers got from the other side; the coordinator adds them up over workers and compares, per
conversation: acknowledged but never received is lost. After a storm a client resumes each
conversation from its Track (``last_seq``), and re-sends what was not acknowledged with the same
``client_msg_id`` (the server's dedup answers ``dup: true`` with the same ``seq``). A
conversation it cannot name in ``hello.resume`` (an agent knows a conversation's epoch only
from its messages: ``assigned`` carries none), or one answered ``recovered: false``, is paged
with ``sync`` after the welcome, at most :data:`SYNCS_IN_FLIGHT` at a time; a page may overlap
what came live, so only a *live* push of a seen ``seq`` counts as a duplicate.

Nodes: the spec lists the nodes of the cluster (``nodes``: ``[http_url, ws_url]`` each; one
for a single node). A conversation is created on its owner's HTTP port and its visitor connects
to the node the coordinator names (the owner, or another one to make every message cross
nodes); each agent belongs to a group, and each group to a node.

Latency: the sender writes ``time.monotonic_ns()`` into the text (``lt <ns> <padding>``); the
receiver reads the same clock (CLOCK_MONOTONIC is one clock for the whole machine).

Bounds: connections per worker are what the coordinator gives it (it keeps them under the
open-files limit); the Track's set beyond the contiguous ``seq`` holds at most
:data:`TRACK_AHEAD_MAX` entries (past that, messages count as ``track_overflow``); the per-second
series hold :data:`MAX_SERIES` seconds; histograms are fixed-size; the sync queue of a client
holds at most one entry per conversation it follows. Every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import random
import resource
import threading
import time
from collections import defaultdict, deque
from multiprocessing.connection import Connection
from typing import Any

import aiohttp
import msgspec
import uvloop
from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

from loadtest.hist import LatencyHistogram

CONNECT_CONCURRENCY = 128
#: REST creates in flight per worker and node (the coordinator lowers it for a cluster).
CREATES_IN_FLIGHT = 16
CONNECT_TIMEOUT_S = 60.0
#: Attempts of a connection closed with 1013 (try again later), and the first pause between.
CONNECT_ATTEMPTS = 6
RETRY_PAUSE_S = 0.05
HELLO_TIMEOUT_S = 30.0
TRACK_AHEAD_MAX = 10_000
MAX_SERIES = 3_600
#: Open-loop sender's tick; each tick sends what the schedule says is due.
TICK_S = 0.002
#: At most this many sends per tick (keeps the loop answering frames between bursts).
MAX_SENDS_PER_TICK = 2_000
#: Messages per ``sync`` (the protocol's largest page).
SYNC_LIMIT = 300


#: Error codes that refuse a command (it was not stored and will not be).
REFUSALS = frozenset({"rate_limited", "queue_full", "busy", "unavailable", "payload_too_large"})


class _From(msgspec.Struct):
    role: str = ""


class _ConvInfo(msgspec.Struct):
    conv: str
    epoch: int = 0
    top_seq: int = 0


class _Stored(msgspec.Struct, kw_only=True):
    """A message inside ``assigned`` or ``history``."""

    conv: str = ""
    seq: int = 0
    epoch: int = 0
    text: str = ""
    from_: _From | None = msgspec.field(name="from", default=None)


class Frame(msgspec.Struct, kw_only=True):
    """The fields of any server frame the load generator reads; the rest is skipped."""

    type: str
    conv: str = ""
    seq: int = 0
    client_msg_id: str | None = None
    dup: bool = False
    text: str = ""
    from_: _From | None = msgspec.field(name="from", default=None)
    convs: list[_ConvInfo] | None = None
    messages: list[_Stored] | None = None
    more: bool = False
    code: str = ""
    ref: str | None = None
    recovered: bool = True
    epoch: int = 0


_decode = msgspec.json.Decoder(Frame).decode
_encode = msgspec.json.Encoder().encode


class Track:
    """Which ``seq`` of one conversation a client has seen: contiguous top and a few beyond."""

    __slots__ = ("ahead", "contig", "epoch")

    def __init__(self, contig: int | None, epoch: int = 0) -> None:
        self.contig = contig
        self.ahead: set[int] | None = None
        self.epoch = epoch

    def see(self, seq: int) -> bool | None:
        """True when new, False when seen before, None when the set beyond is full."""
        c = self.contig
        if c is None:
            self.contig = seq
            return True
        if seq == c + 1:
            c = seq
            ahead = self.ahead
            if ahead:
                while c + 1 in ahead:
                    c += 1
                    ahead.discard(c)
            self.contig = c
            return True
        if seq <= c:
            return False
        if self.ahead is None:
            self.ahead = set()
        if seq in self.ahead:
            return False
        if len(self.ahead) >= TRACK_AHEAD_MAX:
            return None
        self.ahead.add(seq)
        return True


class Seat:
    """One client identity (a visitor of one conversation, or an agent) across reconnects."""

    def __init__(
        self, w: Worker, role: str, token: str, index: int, node: int = 0, group: int = 0
    ) -> None:
        self.w = w
        self.role = role
        self.token = token
        self.index = index
        self.node = node  # the node its WebSocket goes to
        self.group = group  # an agent's group (the conversations it is meant to take)
        self.owner = 0  # a visitor's conversation was created on this node
        self.conn: _Conn | None = None
        self.up = False
        self.tracks: dict[str, Track] = {}
        self.conv = ""  # a visitor's conversation
        self.pending: dict[str, tuple[str, int, str]] = {}  # cmid -> (conv, sent ns, text)
        self.n = 0
        self.got_from_other = 0
        self.bot_waiting: deque[int] = deque()
        self.welcome: asyncio.Future[Frame] | None = None
        self.online: asyncio.Future[None] | None = None
        self.resumed: asyncio.Future[None] | None = None
        self.pong: asyncio.Future[int] | None = None
        self.expect_resumed = 0

    # -- sending --------------------------------------------------------------------------

    def send(self, conv: str, text: str | None = None) -> bool:
        conn = self.conn
        if conn is None or not self.up:
            return False
        now = time.monotonic_ns()
        self.n += 1
        cmid = f"{self.w.wid}.{self.index}.{self.n}"
        if text is None:
            text = f"lt {now} {self.w.padding}"
        self.pending[cmid] = (conv, now, text)
        frame = {"type": "send", "conv": conv, "client_msg_id": cmid, "text": text}
        conn.transport.send(WSMsgType.TEXT, _encode(frame))
        self.w.sent[self.role] += 1
        if self.role == "visitor":
            if self.w.bot:
                self.bot_waiting.append(now)
            self.w.tick_series(self.w.sent_series, now)
        return True

    def resend_pending(self) -> None:
        """After a resume: what was not acknowledged goes again, same client_msg_id and text."""
        conn = self.conn
        if conn is None:
            return
        for cmid, (conv, _ns, text) in list(self.pending.items()):
            frame = {"type": "send", "conv": conv, "client_msg_id": cmid, "text": text}
            conn.transport.send(WSMsgType.TEXT, _encode(frame))
            self.w.resent += 1

    # -- receiving ------------------------------------------------------------------------

    def on_frame(self, f: Frame) -> None:
        w = self.w
        kind = f.type
        if kind == "msg":
            self._on_msg(f)
        elif kind == "ack":
            p = self.pending.pop(f.client_msg_id or "", None)
            if p is None:
                w.stray_acks += 1
                return
            w.ack_hist.record_ns(time.monotonic_ns() - p[1])
            w.acked[self.role] += 1
            w.acked_conv[self.role][p[0]] += 1
            if f.dup:
                w.acked_dup += 1
            if w.closed_loop and w.running and self.role == "visitor":
                self.send(self.conv)
        elif kind == "welcome":
            for c in f.convs or ():
                if self.role == "visitor" and not self.conv:
                    self.conv = c.conv
                tr = self.tracks.get(c.conv)
                if tr is None:
                    self.tracks[c.conv] = Track(c.top_seq, c.epoch)
                    continue
                if not tr.epoch and c.top_seq > (tr.contig or 0):
                    # Not in the resume list (``assigned`` carries no epoch and no message
                    # told it): page what was missed, as a client does after recovered: false.
                    self.sync(c.conv, tr.contig or 0)
                tr.epoch = c.epoch
            if self.welcome is not None and not self.welcome.done():
                self.welcome.set_result(f)
        elif kind == "assigned":
            if self.role == "agent" and f.conv not in self.tracks:
                last = max(f.messages or (), key=lambda m: m.seq, default=None)
                self.tracks[f.conv] = Track(last.seq, last.epoch) if last else Track(0)
                w.assigned += 1
        elif kind == "resumed":
            if not f.recovered:
                w.not_recovered += 1
                tr = self.tracks.get(f.conv)
                self.sync(f.conv, (tr.contig or 0) if tr else 0)
            self._resumed_one()
        elif kind == "history":
            for m in f.messages or ():
                self._on_msg(m, paged=True)
            tr = self.tracks.get(f.conv)
            if f.more and tr is not None and f.messages:
                self.sync(f.conv, tr.contig or 0)
            self._resumed_one()

        elif kind == "status":
            if self.online is not None and not self.online.done():
                self.online.set_result(None)
        elif kind == "pong":
            if self.pong is not None and not self.pong.done():
                self.pong.set_result(time.monotonic_ns())
        elif kind == "error":
            w.errors[f.code or "?"] += 1
            if f.ref is not None and self.pending.pop(f.ref, None) is not None:
                w.refused += 1
            elif f.code in REFUSALS and self.pending:
                # A refusal without ``ref`` (an inbox over its bound) is of the newest command
                # that reached the server: the newest pending one, as far as counting goes.
                self.pending.pop(next(reversed(self.pending)))
                w.refused += 1

    def sync(self, conv: str, after: int) -> None:
        """Asks for the messages after ``after``; the ``history`` answer counts as a resume."""
        if self.conn is None:
            return
        self.expect_resumed += 1
        self.w.synced += 1
        frame = {"type": "sync", "conv": conv, "after": after, "limit": SYNC_LIMIT}
        self.conn.transport.send(WSMsgType.TEXT, _encode(frame))

    def _resumed_one(self) -> None:
        self.expect_resumed -= 1
        if self.expect_resumed <= 0 and self.resumed is not None and not self.resumed.done():
            self.w.last_resumed_ns = max(self.w.last_resumed_ns, time.monotonic_ns())
            self.resumed.set_result(None)

    def _on_msg(self, f: Frame | _Stored, paged: bool = False) -> None:
        """A message, live or from a page of history (``paged``: a page may overlap what
        already came live, which the client skips by ``seq``; only a live push seen before is
        a duplicate delivery)."""
        w = self.w
        conv = f.conv
        tr = self.tracks.get(conv)
        if tr is None:
            tr = self.tracks[conv] = Track(None)
        tr.epoch = f.epoch  # an agent learns a conversation's epoch from its messages
        new = tr.see(f.seq)
        if new is None:
            w.track_overflow += 1
        elif not new:
            if not paged:
                w.dups += 1
            return
        sender = f.from_.role if f.from_ is not None else ""
        if sender == self.role:
            return  # the echo of our own message
        now = time.monotonic_ns()
        text = f.text
        if text.startswith("lt "):
            sent = int(text[3 : text.index(" ", 3)])
            if sender == "visitor":
                w.v2a_hist.record_ns(now - sent)
                w.tick_series(w.delivered_series, now)
                if now <= w.window_end_ns:
                    w.window_delivered += 1
            else:
                w.a2v_hist.record_ns(now - sent)
            w.recv[sender] += 1
            w.recv_conv[sender][conv] += 1
            if self.role == "agent" and w.reply_every and w.running:
                self.got_from_other += 1
                if self.got_from_other % w.reply_every == 0:
                    self.send(conv)
        elif sender == "bot" and self.bot_waiting:
            w.bot_hist.record_ns(now - self.bot_waiting.popleft())
            if now <= w.window_end_ns:
                w.window_delivered += 1
            w.recv["bot"] += 1
            w.recv_conv["bot"][conv] += 1
            w.tick_series(w.delivered_series, now)


class _Conn(WSListener):
    """One WebSocket of a :class:`Seat`; a reconnect makes a new one."""

    def __init__(self, seat: Seat) -> None:
        super().__init__()
        self.seat = seat
        self.transport: WSTransport = None  # type: ignore[assignment]
        self.close_reason = ""  # the server's close frame, if one came: code and reason

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.TEXT:
            if self.seat.conn is self:
                self.seat.on_frame(_decode(frame.get_payload_as_bytes()))
        elif frame.msg_type == WSMsgType.CLOSE:
            code: Any = frame.get_close_code()  # an int where the enum has no such member
            self.seat.w.closes[int(code)] += 1
            with contextlib.suppress(Exception):
                reason = frame.get_close_message() or b""
                self.close_reason = f" ({int(code)} {reason.decode('utf-8', 'replace')})"
            transport.send_close(code)
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        seat = self.seat
        if seat.conn is self:
            if seat.w.expect_up and seat.up:  # a hello refused is not a drop
                seat.w.dropped += 1
            seat.up = False
            for fut in (seat.welcome, seat.online, seat.resumed, seat.pong):
                if fut is not None and not fut.done():
                    fut.set_exception(ConnectionError("disconnected" + self.close_reason))


class Worker:
    """The counters and seats of one worker process."""

    def __init__(self, spec: dict[str, Any], pipe: Connection) -> None:
        self.spec = spec
        self.pipe = pipe
        self.wid: int = spec["wid"]
        nodes = spec.get("nodes") or [[spec.get("http_url", ""), spec["ws_url"]]]
        self.nodes: list[tuple[str, str]] = [(str(h), str(w)) for h, w in nodes]
        self.source: str | None = spec.get("source")
        self.padding = "x" * max(0, int(spec.get("size", 64)) - 24)
        self.reply_every: int = spec.get("reply_every", 0)
        self.bot: bool = spec.get("bot", False)
        self.questions: list[str] = spec.get("questions", [])
        tokens = spec.get("agent_tokens", [])
        groups = spec.get("agent_groups") or [0] * len(tokens)
        group_node = spec.get("group_node") or [0]
        self.agents = [
            Seat(self, "agent", t, i, node=group_node[g], group=g)
            for i, (t, g) in enumerate(zip(tokens, groups, strict=True))
        ]
        self.created: defaultdict[str, int] = defaultdict(int)  # create answers by status
        self.connect_concurrency: int = spec.get("connect_concurrency") or CONNECT_CONCURRENCY
        self.creates_in_flight: int = spec.get("creates_in_flight") or CREATES_IN_FLIGHT
        self.visitors: list[Seat] = []
        for i, tok in enumerate(spec.get("visitor_tokens", [])):
            self.visitors.append(Seat(self, "visitor", tok, len(self.agents) + i))
        self.running = False
        self.closed_loop = False
        self.expect_up = False
        self.t_go_ns = 0
        self.window_end_ns = 0  # end of the current run: deliveries before it count as on time
        self.window_delivered = 0
        self.sent: defaultdict[str, int] = defaultdict(int)
        self.acked: defaultdict[str, int] = defaultdict(int)
        self.recv: defaultdict[str, int] = defaultdict(int)
        self.acked_conv: defaultdict[str, defaultdict[str, int]] = defaultdict(
            lambda: defaultdict(int)
        )
        self.recv_conv: defaultdict[str, defaultdict[str, int]] = defaultdict(
            lambda: defaultdict(int)
        )
        self.errors: defaultdict[str, int] = defaultdict(int)
        self.closes: defaultdict[int, int] = defaultdict(int)
        self.acked_dup = 0
        self.refused = 0
        self.dups = 0
        self.stray_acks = 0
        self.resent = 0
        self.track_overflow = 0
        self.assigned = 0
        self.not_recovered = 0
        self.synced = 0
        self.dropped = 0
        self.retried_1013 = 0
        self.last_resumed_ns = 0
        self.skipped = 0
        self.behind_max_ms = 0.0
        # This process's garbage collections while traffic runs: a pause here delays every
        # frame the process sends or reads, and shows as latency that is not the server's.
        self.gc_pauses = 0
        self.gc_pause_max_ms = 0.0
        self.gc_pause_total_ms = 0.0
        self._gc_t0 = 0
        gc.callbacks.append(self._on_gc)
        self.ack_hist = LatencyHistogram()
        self.v2a_hist = LatencyHistogram()
        self.a2v_hist = LatencyHistogram()
        self.bot_hist = LatencyHistogram()
        self.connect_hist = LatencyHistogram()
        self.ping_hist = LatencyHistogram()
        self.sent_series = [0] * MAX_SERIES
        self.delivered_series = [0] * MAX_SERIES

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_t0 = time.perf_counter_ns() if self.running else 0
        elif self._gc_t0:
            ms = (time.perf_counter_ns() - self._gc_t0) / 1e6
            self._gc_t0 = 0
            self.gc_pauses += 1
            self.gc_pause_total_ms += ms
            self.gc_pause_max_ms = max(self.gc_pause_max_ms, ms)

    def tick_series(self, series: list[int], now_ns: int) -> None:
        if self.t_go_ns:
            i = (now_ns - self.t_go_ns) // 1_000_000_000
            if 0 <= i < MAX_SERIES:
                series[i] += 1

    def connected(self) -> int:
        return sum(1 for s in self.agents if s.up) + sum(1 for s in self.visitors if s.up)

    def snapshot(self) -> dict[str, Any]:
        return {
            "connected": self.connected(),
            "assigned": self.assigned,
            "sent": sum(self.sent.values()),
            "acked": sum(self.acked.values()),
            "acked_visitor": self.acked["visitor"],
            "acked_agent": self.acked["agent"],
            "recv_visitor": self.recv["visitor"],
            "recv_agent": self.recv["agent"],
            "recv_bot": self.recv["bot"],
            "pending": sum(len(s.pending) for s in self.agents)
            + sum(len(s.pending) for s in self.visitors),
            "errors": sum(self.errors.values()),
            "dups": self.dups,
            "dropped": self.dropped,
        }

    # -- connecting -----------------------------------------------------------------------

    async def _connect(self, seat: Seat, sem: asyncio.Semaphore, resume: bool) -> bool:
        """Connects and says hello; a close 1013 (try again later: a cluster node or Redis
        was not reachable for the welcome) is retried after a pause, as a client would, at
        most :data:`CONNECT_ATTEMPTS` times in all (the retries are counted)."""
        for attempt in range(CONNECT_ATTEMPTS):
            async with sem:
                ok = await self._connect_once(seat, resume, last=attempt + 1 == CONNECT_ATTEMPTS)
            if ok is not None:
                return ok
            self.retried_1013 += 1
            await asyncio.sleep(RETRY_PAUSE_S * 2**attempt * (0.5 + random.random()))
        return False

    async def _connect_once(self, seat: Seat, resume: bool, last: bool) -> bool | None:
        """True when welcomed, False when it failed, None when closed with 1013 and not
        ``last`` (to be tried again)."""
        loop = asyncio.get_running_loop()
        t0 = time.monotonic_ns()
        kwargs: dict[str, Any] = {}
        if self.source:
            kwargs["local_addr"] = (self.source, 0)
        try:
            seat.welcome = loop.create_future()
            _t, listener = await asyncio.wait_for(
                ws_connect(
                    lambda: _Conn(seat),
                    self.nodes[seat.node][1],
                    websocket_handshake_timeout=CONNECT_TIMEOUT_S,
                    **kwargs,
                ),
                CONNECT_TIMEOUT_S,
            )
            conn = listener
            assert isinstance(conn, _Conn)
            seat.conn = conn
            hello: dict[str, Any] = {"type": "hello", "token": seat.token}
            if resume:
                items = [
                    {"conv": c, "epoch": tr.epoch, "last_seq": tr.contig}
                    for c, tr in seat.tracks.items()
                    if tr.contig is not None and tr.epoch  # else: paged after the welcome
                ][:100]
                hello["resume"] = items
                seat.expect_resumed = len(items)
                seat.resumed = loop.create_future()
            conn.transport.send(WSMsgType.TEXT, _encode(hello))
            await asyncio.wait_for(seat.welcome, HELLO_TIMEOUT_S)
            seat.up = True
            if resume and seat.expect_resumed <= 0:  # nothing to resume nor to page
                seat.expect_resumed = 1
                seat._resumed_one()
            self.connect_hist.record_ns(time.monotonic_ns() - t0)
            return True
        except (OSError, ConnectionError, TimeoutError, asyncio.TimeoutError) as e:
            conn_now = seat.conn
            if not last and conn_now is not None and conn_now.close_reason.startswith(" (1013"):
                seat.conn = None
                return None
            self.errors[f"connect: {type(e).__name__}: {str(e)[:120]}"] += 1
            return False
        except Exception as e:  # picows handshake errors (e.g. 503 at max_connections)
            self.errors[f"connect: {type(e).__name__}: {str(e)[:120]}"] += 1
            return False

    async def connect(self, seats: list[Seat], resume: bool = False) -> tuple[int, int, int, int]:
        sem = asyncio.Semaphore(self.connect_concurrency)
        t0 = time.monotonic_ns()
        ok = await asyncio.gather(*(self._connect(s, sem, resume) for s in seats))
        return sum(ok), len(ok) - sum(ok), t0, time.monotonic_ns()

    async def agents_online(self, group: int | None = None) -> tuple[int, int]:
        """Connects the agents of ``group`` (None: all) and sets them online."""
        seats = [a for a in self.agents if group is None or a.group == group]
        ok, failed, _t0, _t1 = await self.connect(seats)
        await self.set_online(seats)
        return ok, failed

    async def set_online(self, seats: list[Seat]) -> None:
        loop = asyncio.get_running_loop()
        waits = []
        for a in seats:
            if a.up and a.conn is not None:
                a.online = loop.create_future()
                a.conn.transport.send(WSMsgType.TEXT, b'{"type":"status","status":"online"}')
                waits.append(a.online)
        if waits:
            with contextlib.suppress(TimeoutError, asyncio.TimeoutError, ConnectionError):
                await asyncio.wait_for(asyncio.gather(*waits), HELLO_TIMEOUT_S)

    async def create(self, count: int, owner: int = 0, via: int = 0) -> tuple[int, int, float]:
        """REST-creates ``count`` conversations on node ``owner``; their visitor tokens become
        seats whose WebSockets go to node ``via``."""
        t0 = time.monotonic()
        sem = asyncio.Semaphore(self.creates_in_flight)
        timeout = aiohttp.ClientTimeout(total=60)
        connector = aiohttp.TCPConnector(
            limit=self.creates_in_flight, local_addr=(self.source, 0) if self.source else None
        )
        failed = 0
        http_url = self.nodes[owner][0]
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:

            async def one(i: int) -> str | None:
                nonlocal failed
                async with sem:
                    try:
                        async with session.post(
                            f"{http_url}/v1/chat/create", json={"name": f"load {self.wid}.{i}"}
                        ) as resp:
                            body = await resp.json()
                            if resp.status in (200, 201):
                                self.created[str(body.get("status", "?"))] += 1
                                return str(body["token"])
                            self.errors[f"create {resp.status}"] += 1
                    except (aiohttp.ClientError, TimeoutError, asyncio.TimeoutError) as e:
                        self.errors[f"create: {type(e).__name__}"] += 1
                    failed += 1
                    return None

            tokens = await asyncio.gather(*(one(i) for i in range(count)))
        base = len(self.agents) + len(self.visitors)
        for i, tok in enumerate(t for t in tokens if t):
            seat = Seat(self, "visitor", tok, base + i, node=via)
            seat.owner = owner
            self.visitors.append(seat)
        return count - failed, failed, time.monotonic() - t0

    # -- traffic --------------------------------------------------------------------------

    async def run(self, rate: float, duration: float, t_go_ns: int, window: int) -> int:
        """Visitors send at ``rate`` per second in total (0: each keeps ``window`` in flight)."""
        self.t_go_ns = self.t_go_ns or t_go_ns
        delay = (t_go_ns - time.monotonic_ns()) / 1e9
        if delay > 0:
            await asyncio.sleep(delay)
        start = time.monotonic()
        end = start + duration
        self.window_end_ns = t_go_ns + int(duration * 1e9)
        seats = [s for s in self.visitors if s.conv]
        sent_before = self.sent["visitor"]
        self.running = True
        try:
            if not seats:
                await asyncio.sleep(duration)
            elif rate <= 0:
                self.closed_loop = True
                for s in seats:
                    for _ in range(window):
                        s.send(s.conv, self._text())
                await asyncio.sleep(max(0.0, end - time.monotonic()))
                self.closed_loop = False
            else:
                await self._open_loop(seats, rate, start, end, window)
        finally:
            self.running = False
            self.closed_loop = False
        return self.sent["visitor"] - sent_before

    def _text(self) -> str | None:
        if self.bot:
            return random.choice(self.questions)
        return None

    async def _open_loop(
        self, seats: list[Seat], rate: float, start: float, end: float, window: int
    ) -> None:
        n = len(seats)
        i = random.randrange(n)
        done = 0
        while True:
            now = time.monotonic()
            if now >= end:
                break
            due = int((now - start) * rate) - done
            if due > MAX_SENDS_PER_TICK:
                self.behind_max_ms = max(self.behind_max_ms, (due / rate) * 1000)
                due = MAX_SENDS_PER_TICK
            for _ in range(due):
                s = seats[i]
                i = i + 1 if i + 1 < n else 0
                busy = len(s.pending) >= window or (self.bot and s.bot_waiting)
                if busy or not s.send(s.conv, self._text()):
                    self.skipped += 1
                done += 1
            await asyncio.sleep(TICK_S)

    # -- storm and probes -----------------------------------------------------------------

    async def storm(self) -> dict[str, Any]:
        """Every connection dropped at once, then each resumes its conversations."""
        t0 = time.monotonic_ns()
        seats = self.agents + self.visitors
        for s in seats:
            conn, s.conn = s.conn, None  # its disconnect is expected: not counted as a drop
            s.up = False
            if conn is not None:
                conn.transport.disconnect()
        ok, failed, _a, _b = await self.connect(seats, resume=True)
        resumed = [s.resumed for s in seats if s.up and s.resumed is not None]
        timed_out = 0
        if resumed:
            try:
                await asyncio.wait_for(asyncio.gather(*resumed), CONNECT_TIMEOUT_S)
            except (TimeoutError, asyncio.TimeoutError, ConnectionError):
                timed_out = sum(1 for f in resumed if not f.done())
        await self.set_online([s for s in self.agents if s.up])
        for s in seats:
            s.resend_pending()
        return {
            "t0_ns": t0,
            "reconnected": ok,
            "failed": failed,
            "resume_timed_out": timed_out,
            "last_resumed_ns": self.last_resumed_ns,
            "not_recovered": self.not_recovered,
            "synced": self.synced,
        }

    async def probe(self, count: int) -> tuple[int, int]:
        """Pings ``count`` connections picked at random: how many answered within the timeout."""
        loop = asyncio.get_running_loop()
        seats = [s for s in self.agents + self.visitors if s.up]
        pick = random.sample(seats, min(count, len(seats)))
        for s in pick:
            s.pong = loop.create_future()
            assert s.conn is not None
            s.conn.transport.send(WSMsgType.TEXT, b'{"type":"ping"}')
        t0 = time.monotonic_ns()
        futs = [s.pong for s in pick if s.pong is not None]
        if futs:
            await asyncio.wait(futs, timeout=HELLO_TIMEOUT_S)
        answered = 0
        for f in futs:
            if f.done() and not f.cancelled() and f.exception() is None:
                answered += 1
                self.ping_hist.record_ns(f.result() - t0)
        return len(pick), answered

    def report(self) -> dict[str, Any]:
        return {
            "wid": self.wid,
            "sent": dict(self.sent),
            "acked": dict(self.acked),
            "recv": dict(self.recv),
            "acked_conv": {k: dict(v) for k, v in self.acked_conv.items()},
            "recv_conv": {k: dict(v) for k, v in self.recv_conv.items()},
            "errors": dict(self.errors),
            "created": dict(self.created),
            # Where each conversation is: its owner node, and the group of the agent that took
            # it (the coordinator checks the placement: group k takes owner k's conversations).
            "placement": {
                "owner": {s.conv: s.owner for s in self.visitors if s.conv} if self.agents else {},
                "group": {c: a.group for a in self.agents for c in a.tracks},
            },
            "closes": dict(self.closes),
            "acked_dup": self.acked_dup,
            "refused": self.refused,
            "dups": self.dups,
            "stray_acks": self.stray_acks,
            "resent": self.resent,
            "track_overflow": self.track_overflow,
            "unacked": sum(len(s.pending) for s in self.agents + self.visitors),
            "skipped": self.skipped,
            "behind_max_ms": round(self.behind_max_ms, 1),
            "gc_pauses": self.gc_pauses,
            "gc_pause_max_ms": round(self.gc_pause_max_ms, 2),
            "gc_pause_total_ms": round(self.gc_pause_total_ms, 2),
            "dropped": self.dropped,
            "retried_1013": self.retried_1013,
            "up_per_node": [
                sum(1 for s in self.agents + self.visitors if s.up and s.node == i)
                for i in range(len(self.nodes))
            ],
            "window_delivered": self.window_delivered,
            "hist": {
                "ack": self.ack_hist.to_wire(),
                "v2a": self.v2a_hist.to_wire(),
                "a2v": self.a2v_hist.to_wire(),
                "bot": self.bot_hist.to_wire(),
                "connect": self.connect_hist.to_wire(),
                "ping": self.ping_hist.to_wire(),
            },
            "sent_series": self.sent_series,
            "delivered_series": self.delivered_series,
        }

    def reset_histograms(self) -> None:
        self.window_delivered = 0
        self.ack_hist = LatencyHistogram()
        self.v2a_hist = LatencyHistogram()
        self.a2v_hist = LatencyHistogram()
        self.bot_hist = LatencyHistogram()

    def close_all(self) -> None:
        self.expect_up = False
        for s in self.agents + self.visitors:
            if s.conn is not None and s.up:
                s.up = False
                with contextlib.suppress(Exception):
                    s.conn.transport.send_close(WSCloseCode.OK)
                    s.conn.transport.disconnect()


async def _serve(w: Worker) -> None:
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue(maxsize=64)

    def read_commands() -> None:
        # A thread, not loop.add_reader: that would make the pipe non-blocking, and a large
        # reply (the report) would then fail half-written.
        while True:
            try:
                cmd = w.pipe.recv()
            except (EOFError, OSError):
                cmd = ("close",)
            loop.call_soon_threadsafe(inbox.put_nowait, cmd)
            if cmd[0] == "close":
                return

    threading.Thread(target=read_commands, daemon=True).start()

    async def progress() -> None:
        while True:
            await asyncio.sleep(1.0)
            w.pipe.send(("progress", w.wid, w.snapshot()))

    ticker = asyncio.create_task(progress())
    tasks: set[asyncio.Task[None]] = set()
    try:
        while True:
            cmd = await inbox.get()
            kind = cmd[0]
            if kind == "agents":
                w.pipe.send(("agents", *(await w.agents_online(*cmd[1:]))))
            elif kind == "create":  # ("create", [(count, owner, via), ...]): concurrently
                t0 = time.monotonic()
                got = await asyncio.gather(*(w.create(*job) for job in cmd[1]))
                made, failed = sum(g[0] for g in got), sum(g[1] for g in got)
                w.pipe.send(("created", made, failed, time.monotonic() - t0))
            elif kind == "visitors":
                w.expect_up = True
                w.pipe.send(("visitors", *(await w.connect(w.visitors))))
            elif kind == "run":  # in the background: a storm comes while it runs
                _k, rate, duration, t_go_ns, window = cmd

                async def run_then_reply(*args: Any) -> None:
                    w.pipe.send(("ran", await w.run(*args)))

                running = asyncio.create_task(run_then_reply(rate, duration, t_go_ns, window))
                tasks.add(running)
                running.add_done_callback(tasks.discard)
            elif kind == "counts":
                w.pipe.send(("counts", w.snapshot()))
            elif kind == "storm":
                w.pipe.send(("stormed", await w.storm()))
            elif kind == "probe":
                w.pipe.send(("probed", *(await w.probe(cmd[1]))))
            elif kind == "report":
                w.pipe.send(("report", w.report()))
                if len(cmd) > 1 and cmd[1]:  # ramp: each step's histograms on their own
                    w.reset_histograms()
            elif kind == "close":
                w.close_all()
                await asyncio.sleep(0.2)  # let the close frames go out
                with contextlib.suppress(OSError):
                    w.pipe.send(("closed",))
                return
    finally:
        ticker.cancel()


def worker_main(spec: dict[str, Any], pipe: Connection) -> None:
    """Entry point of a worker process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    uvloop.run(_serve(Worker(spec, pipe)))
