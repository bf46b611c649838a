"""Crash audit: ``kill -9`` of a loaded node, again and again, then count what was lost.

``python -m loadtest.crash [--kills 20] [--visitors 200] [--rate 3000] ...`` spawns
``python -m kefu serve`` with a fresh data directory and drives it with picows WebSocket
clients (one process, uvloop): ``--agents`` agents online first, then ``--visitors`` visitors
with a conversation each (assigned to the agents as they are created). Together they send
``--rate`` messages/s, ``--agent-share`` of them by the agents into the conversations they
hold, so both sides write into each conversation; every message has a unique
``client_msg_id``. At a random moment ``--min-up`` to ``--max-up`` seconds after
each start the node gets SIGKILL and is started again on the same data directory, ``--kills``
times; the first kill then waits for the senders' next tick and comes right after it, so
that at least one kill finds messages in flight however fast the node acks. Clients reconnect by
themselves (the node's new ports are read from its ``listening`` lines), resume with
``hello.resume`` from the last contiguous ``seq`` they saw, and re-send every message not yet
acknowledged with the same ``client_msg_id`` and text. After the last restart the senders
stop, every message still unacknowledged is retried until it is acked
(bounded by ``--drain-timeout``), and the audit pages every conversation's REST history:

- **lost**: acknowledged, and not in the history (or stored under another ``seq`` than the
  ack said: counted apart as ``seq_mismatch``);
- **duplicated**: a ``client_msg_id`` stored more than once (each extra copy counts);
- **gaps**: ``seq`` not exactly ``1..N`` (a missing, repeated or out-of-order ``seq``);
- **phantoms**: a stored ``client_msg_id`` no client sent; **unacked**: sent, never acked.

The clients also check the live stream: a ``msg`` pushed twice (``live_dups``) or one that
jumps over a ``seq`` (``live_gaps``) outside a resume. ``retried_stored`` counts the retries of
messages the client had already seen stored (in the replay after a resume) without their ack:
exactly what dedup must answer with ``dup: true``, and what makes duplicates without it.

Negative control: ``--unsafe-no-dedup`` starts the node with ``KEFU_UNSAFE_NO_DEDUP=1`` (a
test-only switch that turns client_msg_id dedup off); the audit must then report duplicates,
which proves it can see them. In that mode the run stops early once a retry of a stored
message was seen (``--kills`` is then the most it kills), and the exit code is 0 when the audit
found duplicates.

Power loss: ``--power-loss`` puts the data directory on :mod:`loadtest.unsynced_fs`, a FUSE
layer that keeps file data in its daemon's memory until ``fsync``; each kill then also kills
that daemon, so what was not synced is gone. ``--durability fsync`` must lose nothing; the
default ``process`` durability loses what the kernel had and the disk had not (a conversation
whose record or token key went with it counts all its acknowledged messages as lost).

The first output line is ``OK`` or what failed (``LOST``, ``DUPLICATED``, ``GAPS``...); the
report (also ``--json FILE``) gives the kills, the restart times, the acknowledged messages per
second while the node was up and over the whole run, and every counter. Exit code 0 for
``OK``, 1 otherwise.

Bounds: at most ``--window`` messages unacknowledged per conversation and :data:`INFLIGHT_MAX`
per connection; every wait has a deadline (start of the node, connects, drain,
REST pages); the node's stderr of each start is kept in the run's folder (removed at the end
unless ``--keep``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import uvloop
import yaml
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 5.0
#: A (re)connect that fails waits this long, plus up to as much again at random, and tries again.
RECONNECT_DELAY_S = 0.05
#: A send refused with an error (the store busy...) is sent again after this long.
RETRY_REFUSED_S = 0.05
#: The senders' schedule is checked this often; each tick sends what is due.
TICK_S = 0.002
#: How long the first kill waits for the pacer's next sends (no client up: it goes ahead).
BURST_WAIT_S = 1.0
#: REST page size of the audit (the protocol's largest page is 500).
PAGE = 500
#: REST pages per conversation at most (bounds the audit of a runaway history).
MAX_PAGES = 10_000
UNSAFE_ENV = "KEFU_UNSAFE_NO_DEDUP"
#: The protocol's ``max_chats`` limit: conversations one agent holds at most.
MAX_CHATS = 100

_HTTP_LINE = re.compile(r"^kefu: http listening on (http://\S+)\s*$")
_WS_LINE = re.compile(r"^kefu: ws listening on (ws://\S+)\s*$")


def agent_token(i: int) -> str:
    return f"crash-agent-token-{i}-0123456789abcdef"


# -- the node ---------------------------------------------------------------------------------


#: A run that does not drain reports (``diagnosis``) this many of its waiting clients, the
#: node's metrics with these prefixes, and this much of the end of the node's log.
DIAGNOSIS_CLIENTS = 10
DIAGNOSIS_METRICS = ("kefu_store_", "kefu_ws_", "kefu_connections", "kefu_queue")
DIAGNOSIS_LOG_CHARS = 4000


class Node:
    """``kefu serve`` of this checkout, killed and restarted on one data directory."""

    def __init__(
        self,
        workdir: Path,
        *,
        visitors: int,
        agents: int,
        durability: str,
        unsafe: bool,
        power_loss: bool = False,
    ) -> None:
        self.workdir = workdir
        self.fs = UnsyncedMount(workdir) if power_loss else None
        self.data_dir = (self.fs.mountpoint if self.fs else workdir) / "data"
        self.config_path = workdir / "kefu.yaml"
        per_agent = min(MAX_CHATS, max(1, -(-visitors // max(1, agents))))
        cfg = {
            "admin_token": "crash-admin-token-0123456789",
            "agents": [
                {
                    "id": f"agent{i}",
                    "name": f"Agent {i}",
                    "token": agent_token(i),
                    "max_chats": per_agent,
                }
                for i in range(agents)
            ],
            "durability": durability,
            "bot": {"enabled": False},
            "ws": {
                "rate": {"per_second": 100_000.0, "burst": 100_000},
                "max_connections": max(1_000, visitors + 100),
            },
            "routing": {"max_queue": max(1_000, visitors + 100)},
            "log_level": "warning",
        }
        self.config_path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        root = str(Path(__file__).resolve().parent.parent)  # run this checkout
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (root, self.env.get("PYTHONPATH")) if p)
        for name in ("KEFU_DATA_DIR", "KEFU_REDIS_URL", "KEFU_API_KEY", "KEFU_ADMIN_TOKEN"):
            self.env.pop(name, None)
        self.env.pop(UNSAFE_ENV, None)
        if unsafe:
            self.env[UNSAFE_ENV] = "1"
        self.proc: subprocess.Popen[bytes] | None = None
        self.http_url = ""
        self.ws_url = ""
        self.starts = 0
        self.up = False

    def start(self) -> float:
        """Starts the node and waits for ``kefu: ready``; the seconds it took."""
        assert self.proc is None
        self.starts += 1
        t0 = time.monotonic()
        if self.fs is not None and not self.fs.mounted():
            self.fs.mount()
        cmd = [sys.executable, "-m", "kefu", "serve", "--config", str(self.config_path)]
        cmd += ["--data-dir", str(self.data_dir), "--http-port", "0", "--ws-port", "0"]
        with open(self.workdir / f"stderr-{self.starts}.log", "wb") as err:
            proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, env=self.env
            )
        self.proc = proc
        urls: dict[str, str] = {}
        ready = threading.Event()
        threading.Thread(target=self._drain, args=(proc, urls, ready), daemon=True).start()
        if not ready.wait(READY_TIMEOUT_S) or "ws" not in urls or "http" not in urls:
            self.kill()
            tail = (self.workdir / f"stderr-{self.starts}.log").read_text(errors="replace")
            raise SystemExit(f"kefu serve did not start (start {self.starts}):\n{tail[-3000:]}")
        self.http_url, self.ws_url = urls["http"], urls["ws"]
        self.up = True
        return time.monotonic() - t0

    @staticmethod
    def _drain(proc: subprocess.Popen[bytes], urls: dict[str, str], ready: threading.Event) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:  # to the end: a full pipe would block the node
            line = raw.decode("utf-8", "replace")
            if m := _HTTP_LINE.match(line):
                urls["http"] = m[1]
            elif m := _WS_LINE.match(line):
                urls["ws"] = m[1]
            elif line.strip() == "kefu: ready":
                ready.set()
        ready.set()

    def kill(self) -> None:
        """SIGKILL: nothing is flushed, no connection is closed politely. With ``power_loss``
        the file system's daemon is killed too: what was not fsynced is gone."""
        self.up = False
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        if proc is not None:
            proc.wait(STOP_TIMEOUT_S)
        if self.fs is not None:
            self.fs.cut()

    def stop(self) -> int | None:
        """SIGTERM; the exit code (None when it had to be killed)."""
        self.up = False
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT_S)
            return None

    def cleanup(self) -> None:
        """Whatever state it is in: the node killed, the file system unmounted."""
        self.kill()

    def log_tail(self, chars: int = DIAGNOSIS_LOG_CHARS) -> str:
        """The end of the latest start's stderr (its warnings and errors)."""
        path = self.workdir / f"stderr-{self.starts}.log"
        try:
            return path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def unsafe_logged(self) -> bool:
        """Whether a start logged that dedup is off (the switch was read)."""
        return any(
            UNSAFE_ENV in p.read_text(errors="replace") for p in self.workdir.glob("stderr-*.log")
        )


class UnsyncedMount:
    """``python -m loadtest.unsynced_fs`` over ``WORKDIR/backing`` at ``WORKDIR/mnt``: the
    data directory of a power-loss run. :meth:`cut` is the power cut (the daemon killed, so
    every unsynced write with it, and the mount detached); :meth:`mount` mounts it again."""

    def __init__(self, workdir: Path) -> None:
        from loadtest.unsynced_fs import available

        why = available()
        if why is not None:
            raise SystemExit(f"--power-loss needs a FUSE mount: {why}")
        self.workdir = workdir
        self.backing = workdir / "backing"
        self.mountpoint = workdir / "mnt"
        self.backing.mkdir()
        self.mountpoint.mkdir()
        self.proc: subprocess.Popen[bytes] | None = None
        self.mounts = 0

    def mounted(self) -> bool:
        return self.proc is not None and os.path.ismount(self.mountpoint)

    def mount(self) -> None:
        self.mounts += 1
        root = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        cmd = [
            sys.executable,
            "-m",
            "loadtest.unsynced_fs",
            str(self.backing),
            str(self.mountpoint),
        ]
        with open(self.workdir / f"fs-{self.mounts}.log", "wb") as err:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stderr=err, env=env)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not os.path.ismount(self.mountpoint):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log = (self.workdir / f"fs-{self.mounts}.log").read_text(errors="replace")
                self.cut()
                raise SystemExit(f"the unsynced file system did not mount:\n{log[-2000:]}")
            time.sleep(0.02)

    def cut(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.wait(STOP_TIMEOUT_S)
        # A mount whose daemon is dead is no longer seen by ismount: detach it whatever.
        subprocess.run(
            ["umount", "-l", str(self.mountpoint)],
            check=False,
            timeout=30,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )


# -- the clients ------------------------------------------------------------------------------


class _From(msgspec.Struct):
    role: str = ""


class _Stored(msgspec.Struct, kw_only=True):
    seq: int = 0
    epoch: int = 0
    client_msg_id: str | None = None


class _ConvInfo(msgspec.Struct):
    conv: str
    epoch: int = 0
    top_seq: int = 0


class Frame(msgspec.Struct, kw_only=True):
    """The fields of the server frames a crash client reads."""

    type: str
    conv: str = ""
    seq: int = 0
    epoch: int | None = 0  # ``assigned`` may carry null
    client_msg_id: str | None = None
    dup: bool = False
    code: str = ""
    ref: str | None = None
    recovered: bool = True
    more: bool = False
    messages: list[_Stored] | None = None
    convs: list[_ConvInfo] | None = None


_decode = msgspec.json.Decoder(Frame).decode
_encode = msgspec.json.Encoder().encode

#: Unacknowledged sends per connection at most: the node handles a connection's commands one
#: at a time from an inbox of 64 (kefu.web.ws.INBOX_FRAMES) and refuses what does not fit.
INFLIGHT_MAX = 32
#: Errors after which a message will never be stored: it is dropped from the pending ones.
FINAL_REFUSALS = frozenset({"forbidden", "conversation_closed", "invalid", "not_found"})


@dataclass
class Counters:
    sent: int = 0
    sent_by_agents: int = 0
    acked: int = 0
    acked_dup: int = 0
    resent: int = 0
    retried_stored: int = 0
    refused: int = 0
    stray_acks: int = 0
    live_dups: int = 0
    live_gaps: int = 0
    not_recovered: int = 0
    synced: int = 0
    reconnects: int = 0
    connect_failures: int = 0
    errors: dict[str, int] = field(default_factory=dict)


class Track:
    """Where a client stands in one conversation: every ``seq`` up to ``contig`` was seen."""

    __slots__ = ("contig", "epoch", "inflight")

    def __init__(self, contig: int = 0, epoch: int = 0) -> None:
        self.contig = contig
        self.epoch = epoch
        self.inflight = 0


class Client:
    """One identity across connections: a visitor and its conversation, or an agent and the
    conversations assigned to it."""

    def __init__(self, run: Run, role: str, index: int, token: str, conv: str = "") -> None:
        self.run = run
        self.role = role
        self.index = index
        self.token = token
        self.conv = conv  # a visitor's conversation
        self.tracks: dict[str, Track] = {conv: Track()} if conv else {}
        self.order: list[str] = [conv] if conv else []  # an agent's conversations, to rotate
        self.turn = 0
        self.n = 0
        self.prefix = f"{role[0]}{index}."
        self.pending: dict[str, tuple[str, str]] = {}  # client_msg_id -> (conv, text)
        self.acked: dict[str, tuple[str, int]] = {}  # client_msg_id -> (conv, seq of its ack)
        self.refused: dict[str, str] = {}  # client_msg_id -> conv: refused for good
        self.seen_stored: set[str] = set()  # pending ids seen in a msg before their ack
        self.listener: _Listener | None = None
        self.up = False  # welcomed, resumed, retries sent
        self.welcome: asyncio.Future[Frame] | None = None
        self.ready: asyncio.Future[None] | None = None
        self.expect = 0  # resumed/history answers still awaited before ``ready``
        self.syncing: set[str] = set()
        self.gone = asyncio.Event()  # set when the connection ends

    # sending

    def send_new(self, window: int) -> bool:
        """One new message into a conversation with fewer than ``window`` in flight, while
        the connection has fewer than :data:`INFLIGHT_MAX` (the node's inbox is 64)."""
        order = self.order
        if len(self.pending) >= INFLIGHT_MAX:
            return False
        for _ in range(len(order)):
            conv = order[self.turn % len(order)]
            self.turn += 1
            track = self.tracks[conv]
            if track.inflight < window:
                break
        else:
            return False
        self.n += 1
        cmid = f"{self.prefix}{self.n}"
        text = f"crash audit {cmid}"
        self.pending[cmid] = (conv, text)
        track.inflight += 1
        self.run.c.sent += 1
        if self.role == "agent":
            self.run.c.sent_by_agents += 1
        self._send(conv, cmid, text)
        return True

    def _send(self, conv: str, cmid: str, text: str) -> None:
        """Writes one ``send``; on a connection already lost it stays pending (retried later)."""
        listener = self.listener
        if listener is None or listener.transport.underlying_transport.is_closing():
            return
        frame = {"type": "send", "conv": conv, "client_msg_id": cmid, "text": text}
        listener.transport.send(WSMsgType.TEXT, _encode(frame))

    def retry_pending(self) -> None:
        c = self.run.c
        for cmid, (conv, text) in list(self.pending.items()):
            c.resent += 1
            if cmid in self.seen_stored:
                c.retried_stored += 1
            self._send(conv, cmid, text)

    def _retry_one(self, cmid: str) -> None:
        p = self.pending.get(cmid)
        if p is not None and self.up and self.listener is not None:
            self.run.c.resent += 1
            self._send(p[0], cmid, p[1])

    def sent_ids(self) -> dict[str, str]:
        """Every id this client sent -> its conversation."""
        out = {cmid: conv for cmid, (conv, _seq) in self.acked.items()}
        out.update((cmid, conv) for cmid, (conv, _text) in self.pending.items())
        out.update(self.refused)
        return out

    # receiving

    def on_frame(self, f: Frame) -> None:
        kind = f.type
        c = self.run.c
        if kind == "ack":
            cmid = f.client_msg_id or ""
            p = self.pending.pop(cmid, None)
            if p is None:
                c.stray_acks += 1
                return
            self.tracks[p[0]].inflight -= 1
            self.seen_stored.discard(cmid)
            self.acked[cmid] = (p[0], f.seq)
            c.acked += 1
            if f.dup:
                c.acked_dup += 1
        elif kind == "msg":
            self._on_msg(f.conv, f.seq, f.epoch or 0, f.client_msg_id, live=True)
        elif kind == "welcome":
            self._on_welcome(f)
            if self.welcome is not None and not self.welcome.done():
                self.welcome.set_result(f)
        elif kind == "assigned":
            if self.role == "agent" and f.conv not in self.tracks:
                last = max((m.seq for m in f.messages or ()), default=0)
                self.tracks[f.conv] = Track(last, f.epoch or 0)
                self.order.append(f.conv)
        elif kind == "resumed":
            if not f.recovered:
                c.not_recovered += 1
                self._sync(f.conv)  # its history answer ends this one
            else:
                self._answered()
        elif kind == "history":
            for m in f.messages or ():
                self._on_msg(f.conv, m.seq, m.epoch, m.client_msg_id, live=False)
            if f.more and f.messages:
                self._sync(f.conv)
            else:
                self.syncing.discard(f.conv)
                self._answered()
        elif kind == "error":
            code = f.code or "?"
            c.errors[code] = c.errors.get(code, 0) + 1
            ref = f.ref or ""
            if ref in self.pending:
                if code in FINAL_REFUSALS:  # never stored: not pending any more
                    conv, _text = self.pending.pop(ref)
                    self.tracks[conv].inflight -= 1
                    self.refused[ref] = conv
                    c.refused += 1
                else:  # refused for now (store busy...): try again soon
                    asyncio.get_running_loop().call_later(RETRY_REFUSED_S, self._retry_one, ref)

    def _on_welcome(self, f: Frame) -> None:
        """Conversations the welcome names: new ones are followed from their top; one that
        could not be resumed (no epoch known yet) and has moved on is paged with ``sync``."""
        for info in f.convs or ():
            track = self.tracks.get(info.conv)
            if track is None:
                if self.role == "agent":
                    self.tracks[info.conv] = Track(info.top_seq, info.epoch)
                    self.order.append(info.conv)
                continue
            if not track.epoch:
                track.epoch = info.epoch
                if info.top_seq > track.contig:
                    self.expect += 1
                    self._sync(info.conv)

    def _answered(self) -> None:
        self.expect -= 1
        if self.expect <= 0 and self.ready is not None and not self.ready.done():
            self.ready.set_result(None)

    def _sync(self, conv: str) -> None:
        if self.listener is None:
            return
        self.syncing.add(conv)
        self.run.c.synced += 1
        track = self.tracks[conv]
        frame = {"type": "sync", "conv": conv, "after": track.contig, "limit": 300}
        self.listener.transport.send(WSMsgType.TEXT, _encode(frame))

    def _on_msg(self, conv: str, seq: int, epoch: int, cmid: str | None, *, live: bool) -> None:
        c = self.run.c
        track = self.tracks.get(conv)
        if track is None:  # an agent's conversation it was not told about: follow it from here
            track = self.tracks[conv] = Track(seq - 1, epoch)
            if self.role == "agent":
                self.order.append(conv)
        if epoch != track.epoch and track.epoch:
            c.errors["epoch_changed"] = c.errors.get("epoch_changed", 0) + 1
        track.epoch = epoch
        if cmid is not None and cmid in self.pending:
            self.seen_stored.add(cmid)  # stored; its ack may never come (a kill in between)
        if seq <= track.contig:
            if live:
                c.live_dups += 1
            return
        if seq != track.contig + 1 and live and conv not in self.syncing:
            c.live_gaps += 1
        track.contig = seq

    # connecting

    async def connect(self) -> bool:
        """Connect, hello with ``resume``, wait for every resume and page, then retry what is
        pending (an agent says ``status: online`` first)."""
        run = self.run
        loop = asyncio.get_running_loop()
        url = run.node.ws_url
        if not run.node.up:
            return False
        self.welcome = loop.create_future()
        self.ready = loop.create_future()
        for fut in (self.welcome, self.ready):  # a failure may come when nobody waits
            fut.add_done_callback(_retrieve)
        self.syncing.clear()
        try:
            _t, listener = await asyncio.wait_for(
                ws_connect(
                    lambda: _Listener(self), url, websocket_handshake_timeout=CONNECT_TIMEOUT_S
                ),
                CONNECT_TIMEOUT_S,
            )
            assert isinstance(listener, _Listener)
            self.listener = listener
            resume = [
                {"conv": conv, "epoch": t.epoch, "last_seq": t.contig}
                for conv, t in self.tracks.items()
                if t.epoch
            ]
            self.expect = len(resume)
            hello: dict[str, Any] = {"type": "hello", "token": self.token}
            if resume:
                hello["resume"] = resume
            listener.transport.send(WSMsgType.TEXT, _encode(hello))
            await asyncio.wait_for(self.welcome, CONNECT_TIMEOUT_S)
            if self.expect <= 0 and not self.ready.done():
                self.ready.set_result(None)
            await asyncio.wait_for(self.ready, CONNECT_TIMEOUT_S)
        except Exception as e:  # refused while the node is down, reset by a kill, a 503...
            run.c.connect_failures += 1
            key = f"connect: {type(e).__name__}"
            run.connect_errors[key] = run.connect_errors.get(key, 0) + 1
            self._drop()
            return False
        if self.role == "agent":
            frame = {"type": "status", "status": "online"}
            listener.transport.send(WSMsgType.TEXT, _encode(frame))
        self.retry_pending()
        self.up = True
        return True

    def _drop(self) -> None:
        listener, self.listener = self.listener, None
        self.up = False
        if listener is not None and listener.transport is not None:
            listener.transport.disconnect(graceful=False)

    def on_disconnected(self, listener: _Listener) -> None:
        self.gone.set()
        if self.listener is listener:
            self.listener = None
            self.up = False
            for fut in (self.welcome, self.ready):
                if fut is not None and not fut.done():
                    fut.set_exception(ConnectionError("disconnected"))

    async def keep_connected(self) -> None:
        """Reconnects whenever the connection is gone, until the run ends."""
        run = self.run
        while not run.finished:
            if self.listener is None:
                self.gone.clear()
                if await self.connect():
                    run.c.reconnects += 1
                    continue
                await asyncio.sleep(RECONNECT_DELAY_S * (1 + random.random()))
                continue
            await self.gone.wait()


def _retrieve(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


class _Listener(WSListener):
    def __init__(self, client: Client) -> None:
        super().__init__()
        self.client = client
        self.transport: WSTransport = None  # type: ignore[assignment]

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.TEXT:
            if self.client.listener is self:
                self.client.on_frame(_decode(frame.get_payload_as_bytes()))
        elif frame.msg_type == WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code())
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.client.on_disconnected(self)


# -- the run ----------------------------------------------------------------------------------


@dataclass
class Options:
    kills: int = 20
    visitors: int = 200
    agents: int = 2
    agent_share: float = 0.25
    rate: float = 3_000.0
    window: int = 16
    min_up: float = 0.5
    max_up: float = 3.0
    settle: float = 2.0
    drain_timeout: float = 60.0
    durability: str = "process"
    power_loss: bool = False
    unsafe_no_dedup: bool = False
    seed: int | None = None
    keep: bool = False


class Run:
    def __init__(self, opts: Options, node: Node) -> None:
        self.opts = opts
        self.node = node
        self.c = Counters()
        self.agents = [Client(self, "agent", i, agent_token(i)) for i in range(opts.agents)]
        self.visitors: list[Client] = []
        self.finished = False
        self.sending = False
        self.connect_errors: dict[str, int] = {}
        self.up_s = 0.0  # seconds the node was up while the senders ran
        self.acked_while_up = 0
        #: Set by the pacer after a tick that wrote sends: the first kill waits for it, so that
        #: it lands with those sends in flight, whatever the node's speed.
        self.burst = asyncio.Event()

    @property
    def clients(self) -> list[Client]:
        return self.agents + self.visitors

    async def create(self, api: aiohttp.ClientSession) -> None:
        sem = asyncio.Semaphore(32)

        async def one(i: int) -> Client:
            async with sem:
                for _ in range(100):  # a create refused for its rate waits and tries again
                    async with api.post(
                        self.node.http_url + "/v1/chat/create", json={"name": f"Crash {i}"}
                    ) as resp:
                        body = await resp.json()
                        if resp.status in (200, 201):
                            return Client(self, "visitor", i, body["token"], body["session_id"])
                        if resp.status != 429:
                            raise SystemExit(f"create: {resp.status} {body}")
                        await asyncio.sleep(float(resp.headers.get("Retry-After", "1")))
                raise SystemExit("create: refused (429) a hundred times")

        self.visitors = list(await asyncio.gather(*(one(i) for i in range(self.opts.visitors))))

    async def pace(self) -> None:
        """Open loop: ``rate`` messages/s in total, ``agent_share`` of them by the agents (in
        the conversations they hold), the rest by the visitors; only connected clients send."""
        opts = self.opts
        share = opts.agent_share if self.agents else 0.0
        pools = [(self.visitors, opts.rate * (1 - share)), (self.agents, opts.rate * share)]
        due = [0.0, 0.0]
        turn = [0, 0]
        t0 = time.monotonic()
        while self.sending:
            await asyncio.sleep(TICK_S)
            now = time.monotonic()
            for k, (pool, rate) in enumerate(pools):
                if not pool or rate <= 0:
                    continue
                # a node down for a while is not made up for in one burst
                due[k] = min(due[k] + rate * (now - t0), rate)
                tried = 0
                while due[k] >= 1 and tried < len(pool):
                    client = pool[turn[k] % len(pool)]
                    turn[k] += 1
                    tried += 1
                    if client.up and client.send_new(opts.window):
                        due[k] -= 1
                        tried = 0
                        self.burst.set()
            t0 = now

    def finish(self) -> None:
        self.finished = True
        for client in self.clients:
            client.gone.set()


async def _audit_conv(
    api: aiohttp.ClientSession,
    http_url: str,
    visitor: Client,
    acked: dict[str, int],
    sent: set[str],
) -> dict[str, int]:
    """One conversation's REST history (read with its visitor's token) against what its
    senders were acknowledged (``acked``) and sent (``sent``)."""
    stored: list[_Stored] = []
    after = 0
    for _ in range(MAX_PAGES):
        url = f"{http_url}/v1/chat/{visitor.conv}/messages?after={after}&limit={PAGE}"
        async with api.get(url, headers={"Authorization": f"Bearer {visitor.token}"}) as resp:
            raw = await resp.read()
            if resp.status in (401, 403, 404):  # the conversation (or the token key) is gone
                out = check_history([], acked, sent)
                out["conversations_lost"] = 1
                return out
            if resp.status != 200:
                raise SystemExit(f"history {visitor.conv}: {resp.status} {raw[:300]!r}")
        page = msgspec.json.decode(raw)
        stored += [msgspec.convert(m, _Stored) for m in page["messages"]]
        if not page["more"] or not page["messages"]:
            break
        after = page["messages"][-1]["seq"]
    return check_history([(m.seq, m.client_msg_id) for m in stored], acked, sent)


def check_history(
    stored: Sequence[tuple[int, str | None]], acked: dict[str, int], sent: set[str]
) -> dict[str, int]:
    """The audit of one conversation: ``stored`` is its history in order, ``(seq,
    client_msg_id)``; ``acked`` what its senders were acknowledged (id -> seq); ``sent`` every
    id they sent. Counts (module doc): lost, seq_mismatch, duplicated, gaps, phantoms, and
    stored_not_acked (stored, its ack never came: only right while some are unacked)."""
    out = {"stored": len(stored), "lost": 0, "seq_mismatch": 0, "duplicated": 0}
    out["conversations_lost"] = 0
    out["gaps"] = sum(1 for i, (seq, _cmid) in enumerate(stored) if seq != i + 1)
    out["phantoms"] = out["stored_not_acked"] = 0
    by_id: dict[str, list[int]] = {}
    for seq, cmid in stored:
        if cmid is None or cmid not in sent:
            out["phantoms"] += 1
        if cmid is not None:
            by_id.setdefault(cmid, []).append(seq)
    for cmid, where in by_id.items():
        out["duplicated"] += len(where) - 1
        if cmid not in acked:
            out["stored_not_acked"] += 1
    for cmid, seq in acked.items():
        found = by_id.get(cmid)
        if not found:
            out["lost"] += 1
        elif seq not in found:
            out["seq_mismatch"] += 1
    return out


async def audit(run: Run) -> dict[str, int]:
    """Every conversation audited against what all its senders (its visitor, the agents)
    were acknowledged and sent."""
    acked: dict[str, dict[str, int]] = {v.conv: {} for v in run.visitors}
    sent: dict[str, set[str]] = {v.conv: set() for v in run.visitors}
    for client in run.clients:
        for cmid, (conv, seq) in client.acked.items():
            acked.setdefault(conv, {})[cmid] = seq
        for cmid, conv in client.sent_ids().items():
            sent.setdefault(conv, set()).add(cmid)
    totals: dict[str, int] = {}
    sem = asyncio.Semaphore(16)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as api:

        async def one(v: Client) -> dict[str, int]:
            async with sem:
                return await _audit_conv(api, run.node.http_url, v, acked[v.conv], sent[v.conv])

        for part in await asyncio.gather(*(one(v) for v in run.visitors)):
            for k, n in part.items():
                totals[k] = totals.get(k, 0) + n
    totals["acked_ids"] = sum(len(c.acked) for c in run.clients)
    totals["acked_agent_ids"] = sum(len(a.acked) for a in run.agents)
    totals["unacked"] = sum(len(c.pending) for c in run.clients)
    totals["refused"] = sum(len(c.refused) for c in run.clients)
    return totals


def _progress(run: Run, label: str) -> None:
    c = run.c
    up = sum(1 for v in run.clients if v.up)
    print(
        f"[crash] {label}: connected {up}/{len(run.clients)} sent {c.sent:,} acked {c.acked:,}"
        f" dup-acks {c.acked_dup:,} resent {c.resent:,} retried-stored {c.retried_stored:,}",
        file=sys.stderr,
        flush=True,
    )


async def _wait_connected(clients: list[Client], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(c.up for c in clients):
            return True
        await asyncio.sleep(0.05)
    return False


async def drive(opts: Options, node: Node, rng: random.Random) -> dict[str, Any]:
    run = Run(opts, node)
    restarts: list[float] = []
    restarts.append(node.start())
    # The agents are online first, so that each conversation is assigned as it is created.
    keepers = [asyncio.ensure_future(a.keep_connected()) for a in run.agents]
    if not await _wait_connected(run.agents, 60):
        raise SystemExit("the agents did not all connect within 60 s")
    await asyncio.sleep(0.2)  # their status: online is handled
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as api:
        await run.create(api)
    keepers += [asyncio.ensure_future(v.keep_connected()) for v in run.visitors]
    if not await _wait_connected(run.clients, 60):
        raise SystemExit("the clients did not all connect within 60 s")
    run.sending = True
    t_traffic = time.monotonic()
    pacer = asyncio.ensure_future(run.pace())
    kills = 0
    stopped_early = False
    try:
        for k in range(opts.kills):
            up_for = rng.uniform(opts.min_up, opts.max_up)
            acked0, t0 = run.c.acked, time.monotonic()
            await asyncio.sleep(up_for)
            if opts.unsafe_no_dedup and run.c.retried_stored:
                stopped_early = True  # the negative control has what it needs
                break
            if k == 0:
                # The first kill comes right after a tick's sends are written (this task wakes
                # a loop turn later at most), before the node can have acked them (a read, a
                # group commit and a write away): so it finds messages in flight on a node
                # however fast. The others come at their random moment alone, which is where a
                # message stored but not yet acked (what dedup answers) is caught now and then.
                run.burst.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(run.burst.wait(), BURST_WAIT_S)
            node.kill()
            kills += 1
            run.up_s += time.monotonic() - t0
            run.acked_while_up += run.c.acked - acked0
            _progress(run, f"kill {k + 1}/{opts.kills} after {up_for:.2f} s up")
            restarts.append(node.start())
        acked0, t0 = run.c.acked, time.monotonic()
        await asyncio.sleep(opts.settle)
        run.up_s += time.monotonic() - t0
        run.acked_while_up += run.c.acked - acked0
    finally:
        run.sending = False
        traffic_s = time.monotonic() - t_traffic
        await asyncio.gather(pacer, return_exceptions=True)
    # Drain: everything still pending is retried by the reconnect logic until acked.
    deadline = time.monotonic() + opts.drain_timeout
    while time.monotonic() < deadline:
        if all(c.up and not c.pending for c in run.clients):
            break
        await asyncio.sleep(0.05)
    _progress(run, "drained")
    # What still waits when the drain ends, before the audit's reads change the picture.
    stuck = [c for c in run.clients if c.pending or not c.up]
    diagnosis = await _diagnose(node, stuck) if stuck else None
    result = await audit(run)
    run.finish()
    for client in run.clients:
        client._drop()
    for t in keepers:
        t.cancel()
    await asyncio.gather(*keepers, return_exceptions=True)
    code = node.stop()
    c = run.c
    return {
        "kills": kills,
        "stopped_early": stopped_early,
        "restart_s": {
            "mean": round(sum(restarts[1:]) / max(1, len(restarts) - 1), 3),
            "max": round(max(restarts[1:], default=0.0), 3),
        },
        # Acks per second while the node was up: these include the retries of what was sent
        # into a dead connection, so they may exceed the offered --rate.
        "rate_while_up": round(run.acked_while_up / max(1e-9, run.up_s), 1),
        # Everything acked over the whole traffic window, restarts included.
        "rate_overall": round(c.acked / max(1e-9, traffic_s), 1),
        "traffic_s": round(traffic_s, 2),
        "up_s": round(run.up_s, 2),
        "exit_code": code,
        "unsafe_logged": node.unsafe_logged(),
        "clients": {k: v for k, v in c.__dict__.items()},
        "connect_errors": run.connect_errors,
        "audit": result,
        **({"diagnosis": diagnosis} if diagnosis is not None else {}),
    }


async def _diagnose(node: Any, stuck: list[Any]) -> dict[str, Any]:
    """What a run that did not drain leaves to look at: the clients still waiting (a few),
    the node's store and connection figures from ``/metrics``, the end of its log."""
    metrics: dict[str, str] = {}
    try:
        timeout = aiohttp.ClientTimeout(total=10)
        async with (
            aiohttp.ClientSession(timeout=timeout) as http,
            http.get(f"{node.http_url}/metrics") as resp,
        ):
            text = await resp.text()
        for line in text.splitlines():
            name, _, value = line.partition(" ")
            if name.startswith(DIAGNOSIS_METRICS) and "_bucket" not in name:
                metrics[name] = value
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        metrics["error"] = repr(exc)
    return {
        "stuck_clients": [
            {
                "role": c.role,
                "index": c.index,
                "up": c.up,
                "pending": len(c.pending),
                "first_pending": sorted(c.pending)[:3],
            }
            for c in stuck[:DIAGNOSIS_CLIENTS]
        ],
        "stuck_total": len(stuck),
        "metrics": metrics,
        "log_tail": node.log_tail(),
    }


def verdict(report: dict[str, Any], unsafe: bool) -> tuple[str, bool]:
    """(first line, success)."""
    a = report["audit"]
    c = report["clients"]
    bad = [
        name
        for name, n in (
            ("LOST", a["lost"]),
            ("CONVERSATIONS_LOST", a["conversations_lost"]),
            ("DUPLICATED", a["duplicated"]),
            ("GAPS", a["gaps"]),
            ("SEQ_MISMATCH", a["seq_mismatch"]),
            ("PHANTOMS", a["phantoms"]),
            ("UNACKED", a["unacked"]),
            ("LIVE_DUPS", c["live_dups"]),
            ("LIVE_GAPS", c["live_gaps"]),
        )
        if n
    ]
    if unsafe:
        ok = a["duplicated"] > 0
        line = (
            f"NEGATIVE CONTROL {'OK' if ok else 'FAILED'}: dedup off, the audit found "
            f"{a['duplicated']} duplicated messages after {report['kills']} kills "
            f"({', '.join(bad) or 'nothing'})"
        )
        return line, ok
    if bad:
        return " ".join(bad), False
    return "OK", True


def parse(argv: Sequence[str] | None) -> Options:
    p = argparse.ArgumentParser(prog="python -m loadtest.crash", description=__doc__.split("\n")[0])
    p.add_argument("--kills", type=int, default=20, help="kill -9 this many times (default 20)")
    p.add_argument("--visitors", type=int, default=200, help="clients, one conversation each")
    p.add_argument("--agents", type=int, default=2, help="agents holding the conversations")
    p.add_argument("--agent-share", type=float, default=0.25, help="part of --rate the agents send")
    p.add_argument("--rate", type=float, default=3_000.0, help="messages/s offered in total")
    p.add_argument("--window", type=int, default=16, help="unacknowledged messages per client")
    p.add_argument("--min-up", type=float, default=0.5, help="seconds up before a kill, least")
    p.add_argument("--max-up", type=float, default=3.0, help="seconds up before a kill, most")
    p.add_argument("--settle", type=float, default=2.0, help="traffic after the last restart")
    p.add_argument("--drain-timeout", type=float, default=60.0)
    p.add_argument("--durability", choices=("process", "fsync"), default="process")
    p.add_argument(
        "--power-loss",
        action="store_true",
        help="each kill is a power cut: the data directory is on loadtest.unsynced_fs",
    )
    p.add_argument(
        "--unsafe-no-dedup",
        action="store_true",
        help="negative control: the node runs with KEFU_UNSAFE_NO_DEDUP=1 (test-only)",
    )
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--json", default=None, help="write the report to this file as well")
    p.add_argument("--keep", action="store_true", help="keep the data directory and logs")
    ns = p.parse_args(argv)
    if ns.kills < 0 or ns.visitors < 1 or ns.rate <= 0 or ns.window < 1:
        p.error("--kills >= 0, --visitors >= 1, --rate > 0, --window >= 1")
    if ns.agents < 0:  # each holds at most MAX_CHATS; conversations beyond wait in the queue
        p.error("--agents >= 0")
    if not 0 <= ns.agent_share < 1:
        p.error("0 <= --agent-share < 1")
    if not 0 < ns.min_up <= ns.max_up:
        p.error("0 < --min-up <= --max-up")
    opts = Options(
        kills=ns.kills,
        visitors=ns.visitors,
        agents=ns.agents,
        agent_share=ns.agent_share,
        rate=ns.rate,
        window=ns.window,
        min_up=ns.min_up,
        max_up=ns.max_up,
        settle=ns.settle,
        drain_timeout=ns.drain_timeout,
        durability=ns.durability,
        power_loss=ns.power_loss,
        unsafe_no_dedup=ns.unsafe_no_dedup,
        seed=ns.seed,
        keep=ns.keep,
    )
    opts.json = ns.json  # type: ignore[attr-defined]
    return opts


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse(argv)
    seed = opts.seed if opts.seed is not None else random.randrange(2**32)
    rng = random.Random(seed)
    workdir = Path(tempfile.mkdtemp(prefix="kefu-crash-"))
    node = Node(
        workdir,
        visitors=opts.visitors,
        agents=opts.agents,
        durability=opts.durability,
        unsafe=opts.unsafe_no_dedup,
        power_loss=opts.power_loss,
    )
    t0 = time.monotonic()
    try:
        report = uvloop.run(drive(opts, node, rng))
    finally:
        node.cleanup()
        if not opts.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    report["seed"] = seed
    report["elapsed_s"] = round(time.monotonic() - t0, 1)
    report["command"] = "python -m loadtest.crash " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    report["options"] = {k: v for k, v in opts.__dict__.items() if k != "json"}
    if opts.keep:
        report["workdir"] = str(workdir)
    line, ok = verdict(report, opts.unsafe_no_dedup)
    report["verdict"] = line
    print(line)
    print(json.dumps(report, indent=2, sort_keys=True))
    path = getattr(opts, "json", None)
    if path:
        Path(path).write_text(json.dumps(report, indent=2, sort_keys=True), encoding="utf-8")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
