"""The node: the one place that wires the store, conversations, routing and the fronts.

:class:`Node` owns one :class:`~kefu.store.Store`, the in-memory
:class:`~kefu.conversations.Conversations`, the :class:`~kefu.routing.Routing` over the agents,
the :class:`~kefu.security.TokenSigner` and the :class:`~kefu.web.ws.WsServer`, and implements
the server's :class:`~kefu.web.ws.FrameHandler`. The REST front (:mod:`kefu.web.http`) calls
the public methods below; a REST call and the WebSocket frame that does the same thing run the
same code.

Start and stop
--------------
``await node.start()`` opens the store (``data_dir``, ``durability``, ``store`` settings), loads
the agents (the config file's, then those created through the admin API, kept in the store),
takes back the open conversations (``Store.recover()``; the routed ones go back to routing in
order of creation), loads or creates the token-signing secret (store meta ``token_secret``),
starts the WebSocket listener and the housekeeping timer. ``await node.stop()`` stops the
timer, closes every connection with 1001, then flushes and closes the store.

First start
-----------
Without ``admin_token`` in the config (or ``KEFU_ADMIN_TOKEN``) the node makes one at its first
start; without any agent (none in the config, none stored) it creates the agent ``demo``. Their
tokens are written once, to ``<data_dir>/credentials.txt`` (mode 0600), and reported in
:attr:`Node.bootstrap` so ``kefu serve`` can print them; the store keeps only SHA-256 hashes.
A later start creates nothing (store meta ``bootstrapped``).

Identities
----------
A ``hello`` token is an agent's token (looked up by its SHA-256 hash, so the lookup costs the
same for every token) or a visitor token issued by :meth:`Node.create_chat` (``sub`` is the
visitor id, ``extra["conv"]`` its conversation). Live connections are kept per principal
(``(role, id)`` -> connections), which is how ``msg``, ``assigned``, ``queued``, ``typing``,
``read`` and ``closed`` reach everyone. Agents declared in the config file are the file's:
the admin API refuses to change them (``conflict``); agents created through the API are kept
in the store and may be changed, disabled (their conversations are requeued at once) and
deleted.

Agent tokens
------------
An agent's token is a random secret (``new_secret``, 256 bits) known to the node by its
SHA-256 only. An agent created through the admin API may get ``token_ttl_days``: from then on
the token is refused (REST 403, ``hello`` 1008) and the housekeeping tick closes the agent's
open connections with 1008 ("token expired"). ``POST /v1/admin/agents/{id}/token``
(:meth:`Node.rotate_agent_token`) replaces the token: the old one is refused as soon as the
call answers and the agent's open connections, all opened with it, are closed with 1008
("token revoked"). The tokens of agents declared in the config file change in the file.

That long-lived token need not sit in a browser: ``POST /v1/agent/login`` with it
(:meth:`Node.agent_login`) gives a *session token*, a :class:`~kefu.security.TokenSigner`
token of kind ``agent`` (``sub`` the agent id, a random ``jti``, ``exp`` 12 h from now by
default, ``ttl_s`` from 60 s to 7 days, never past the long-lived token's own expiry), signed
with the node's token secret (store meta ``token_secret``), so it survives restarts. Every
place that takes an agent's token (the agent REST calls, history, ``hello``) takes either
(:meth:`Node.agent_of_token`); a session token cannot open another session (no endless
renewal of a stolen one). A session token is refused (REST 403, ``hello`` 1008) when:

- its signature, kind or expiry fail (:meth:`TokenSigner.verify`);
- its agent is gone, disabled, or its long-lived token expired;
- its ``extra["cred"]`` is not the :func:`~kefu.security.credential_tag` of the agent's
  *current* token hash: changing the token (rotation, or the config file's ``token`` and a
  restart) ends every session obtained with the old one;
- it was issued (``iat``) before the agent's ``not_before`` (Unix seconds), which rotation,
  disabling, deletion and creation move past every ``iat`` given so far (so re-enabling an
  agent, or re-creating a deleted id, brings no old session back); a login in that same
  second is issued *at* ``not_before``;
- its ``jti`` was revoked by ``POST /v1/agent/logout`` (:meth:`Node.agent_logout`; logout
  is idempotent: an unexpired session token of the node that is already ended gets the same
  204, so a retry after a lost answer is no error).

``not_before`` and the revoked ``(jti, exp)`` pairs of each agent are kept in the store
(``StoredAgentSessions``, written before logout answers) and reloaded at start: a logout must
outlast a restart, since a token taken from a shared computer after its owner logged out would
otherwise work again. At most :data:`AGENT_REVOKED_MAX` revocations are kept per agent (each
until its token would expire anyway); past that, a logout moves ``not_before`` instead, ending
every session of that agent: more is ended, never less. Login writes nothing. Deleting an agent
keeps its record (one small record per agent id ever used): ``not_before`` only moves forward,
so an agent created again under that id, even with the same token, gets no old session back.
``not_before`` moves at least one second per end, so that a login issued at ``not_before`` is
ended by the next end too; such a login keeps the ``exp`` it would have had.

The node remembers which live connection came with which session token
(``conn.id`` -> agent, ``jti``, end): a logout closes those of that ``jti`` with 1008 ("token
revoked"), and the housekeeping tick closes those whose token expired (from ``exp +
CLOCK_SKEW_S``, when it stops verifying) with 1008 ("token expired"). Rotation, disabling and
deletion close every connection of the agent, as before.

Messages
--------
``send`` (WS) and :meth:`Node.send_message` (REST): ``may_write`` (else ``forbidden``), dedup
(``Store.get_dedup``; a duplicate is answered with its original seq after ``Store.barrier()``),
then ``next_seq`` and ``append_message`` in the same step, so a taken seq is always written
(the conversation's record is not rewritten per message: recovery takes ``top_seq`` and the
last activity from the last stored message). Should the store refuse the write at the call
(``StoreBusy``), the seq is given back before anything is awaited. After the write is durable:
``ack`` to the sender, ``msg`` to every participant connection (encoded once per encoding,
not once per connection), and the message joins the conversation's ring of recent messages
(kept by the :class:`~kefu.hub.Hub`, which also holds the live connections).

Resume
------
For each ``{conv, epoch, last_seq}`` of ``hello.resume`` the caller may see: an unknown epoch,
a ``last_seq`` beyond the conversation's top or more than :data:`RESUME_MAX` missed messages
give ``resumed {conv, recovered: false}``. Otherwise the missed ``msg`` frames are sent (from
the ring, or from the store when the ring does not reach back far enough), followed by
``resumed {conv, from_seq, to_seq}`` where ``from_seq..to_seq`` is the inclusive range of the
replayed seqs: ``from_seq`` is always ``last_seq + 1`` and ``to_seq`` the last seq replayed, so
``to_seq`` is always the client's new position. With nothing missed the range is empty:
``from_seq = last_seq + 1``, ``to_seq = last_seq``. The replay and the registration of the
connection happen in one step without an await, so a message acked meanwhile is pushed live
after the ``resumed`` and none is lost or sent twice. The replay stops before the first message
still in flight (its seq taken, its write not yet answered: ``_inflight``), even when its batch
is already in RocksDB: that message is pushed live to the connection once its write is
answered, and replaying it too would deliver it twice. A visitor's connection is then told where
its conversation stands, ``queued {position}`` or ``assigned {agent}``: the frame sent when that
happened may have reached no connection (the page opened after the create call, a reload).

Agents at work
--------------
``accept`` takes a queued conversation by hand; ``transfer`` hands an assigned one to an agent
(``to_agent``) or a group (``to_group``): the sender gets ``transferred {conv, to}`` (``to``
as asked), the new agent ``assigned``; with nobody free in the group the conversation is queued
for it and the visitor gets ``queued``. Any change of an agent's status or load is announced
to every connected agent as ``presence {agent: {id, status, active_chats}}``, coalesced: one
frame per changed agent per loop turn, however many changes the turn made. A new agent
connection gets the presence of every agent after its ``welcome``.

Timers
------
One housekeeping timer runs every :attr:`Node.tick_s` (a second, or a tenth of the idle TTL or
a quarter of the agent grace when those are shorter): it closes the conversations idle for the
TTL (``closed {by: "expired", reason: "expired"}``, at most :data:`EXPIRE_BATCH` a tick),
requeues the conversations of agents whose grace ran out, and closes the connections whose
agent token or session token expired ("Agent tokens").

Accounting
----------
Per conversation, the node adds up the time the loop's thread spends on it in synchronous
stretches only (``time.perf_counter_ns``: on the loop's one thread, between two awaits, that is
CPU time unless the OS preempts the process; ``thread_time_ns`` would be exact but is a system
call, and six of them per message cost a fifth of the node's throughput under load), so that
what other tasks do while one waits is never charged to it: checking and enqueueing each
message, acking and fanning it out, and the bot's decisions (rules, retrieval, handling each
streamed piece; the model client's own parsing is not attributed). Memory is what the
conversation holds now: its state, its ring of recent messages and the bot's context
(estimates from measured per-object sizes). The gauge of all of them,
``kefu_session_memory_bytes``, is read from running totals the hub, the conversations and the
bot keep as messages and conversations come and go: a scrape walks no ring (the walk took 48 ms
of the loop's time at 8,000 conversations of 20 messages). CPU times are kept for
:data:`MAX_ACCOUNTED` conversations, least recently charged dropped first.

Bounds
------
===================  =============================  =========================================
what                 limit                          when full
===================  =============================  =========================================
rings, connections   see :mod:`kefu.hub`
expiries per tick    :data:`EXPIRE_BATCH`            the rest wait for the next tick
pending presence     one entry per agent             (by construction)
session revocations  :data:`AGENT_REVOKED_MAX` per    the logout ends all the agent's sessions
                     agent                           (``not_before``)
session connections  one entry per agent connection  (by construction)
CPU accounting       :data:`MAX_ACCOUNTED` entries   least recently charged dropped
bot turns            ``bot.max_concurrency`` at once  the message is handed to humans (busy)
bot turns waiting    :data:`BOT_PENDING_MAX` per      the message is stored, not answered
                     conversation                    (counted in ``bot_skipped``)
===================  =============================  =========================================
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import ssl as ssl_module
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sized
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal, NamedTuple, cast

import msgspec

from kefu import _core
from kefu._version import __version__
from kefu.bot.kb import KbError, KbWatcher, sample_kb_path
from kefu.bot.llm import Endpoint, LlmClient, LlmOptions
from kefu.bot.policy import BotPolicy, BotTurn, KnowledgeSource
from kefu.bot.policy import Handoff as BotHandoff
from kefu.cluster.directory import AgentDirectory
from kefu.cluster.link import ClusterUnavailable
from kefu.config import Config
from kefu.conversations import (
    Conversations,
    ConversationState,
    may_see,
    may_write,
    metadata_chars,
)
from kefu.errors import KefuError
from kefu.hub import Encoded, Hub, Principal, frame_tag
from kefu.metrics import (
    LATENCY_BUCKETS,
    LOOP_LAG_INTERVAL_S,
    CollectedFamily,
    GcPauseMonitor,
    LoopLagMonitor,
    Registry,
)
from kefu.protocol import (
    AGENT_SESSION_TTL_S,
    MAX_TEXT_CHARS,
    PROTOCOL_VERSION,
    Accept,
    Ack,
    AdminStats,
    AgentConversation,
    AgentConversations,
    AgentCreate,
    AgentCreated,
    AgentList,
    AgentMe,
    AgentPresence,
    AgentRef,
    AgentSession,
    AgentToken,
    AgentTokenRequest,
    AgentUpdate,
    AgentView,
    Assigned,
    CacheFigures,
    ClientFrame,
    Close,
    Closed,
    ClosedBy,
    ConversationStatus,
    ConvState,
    Delta,
    Error,
    Handoff,
    Health,
    Hello,
    History,
    HistoryResponse,
    KbFigures,
    KbHit,
    KbReloadResponse,
    KbSearchResponse,
    Msg,
    Presence,
    PublicConfig,
    Queued,
    QuickReply,
    Read,
    ReadRelay,
    Resumed,
    ResumePoint,
    Send,
    Sender,
    SessionStats,
    Status,
    StatusFrame,
    Sync,
    Transfer,
    Transferred,
    Typing,
    TypingRelay,
    VisitorProfile,
    WaitingConversation,
    Welcome,
    encode_json,
    encode_msgpack,
)
from kefu.routing import (
    AgentPool,
    Assign,
    Effect,
    PositionChanged,
    Queue,
    Requeue,
    Routing,
    RoutingError,
    Unassign,
    WaitingQueue,
)
from kefu.security import (
    CLOCK_SKEW_S,
    Revocations,
    TokenClaims,
    TokenError,
    TokenSigner,
    credential_tag,
    credential_tag_key,
    hash_token,
    new_secret,
    verify_user_hash,
)
from kefu.store import (
    Store,
    StoredAgent,
    StoredAgentSessions,
    StoredMessage,
    StoreError,
    format_conv_id,
    parse_conv_id,
)
from kefu.web.ratelimit import Limits
from kefu.web.ws import AuthError, Connection, TryAgainLater, WsServer

if TYPE_CHECKING:
    from kefu._core.meters import Ledger, MessageMeter
    from kefu.cluster.member import Member
    from kefu.cluster.routing import ClusterRouting, Outcome

__all__ = [
    "EXPIRE_BATCH",
    "RESUME_MAX",
    "Bootstrap",
    "Conflict",
    "Forbidden",
    "Node",
    "NotFound",
    "SendResult",
    "Unauthorized",
    "Unsupported",
]

log = logging.getLogger("kefu.node")

RESUME_MAX: Final = 300  # PROTOCOL.md: more missed than this -> recovered: false
#: Cluster mode: remote conversations whose state an agent's welcome asks their owners for.
MAX_REMOTE_WELCOME: Final = 1_000
ASSIGNED_RECENT: Final = 20  # last messages an agent gets with `assigned`
#: Buckets of the group-commit batch-size histogram (messages; the writer caps a batch at
#: ``store.batch_max_entries``, 1,024 by default).
BATCH_BUCKETS: Final = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0)
WAITING_SHOWN: Final = 100  # head of the waiting queue shown by GET /v1/agent/conversations
EXPIRE_BATCH: Final = 1_000  # idle conversations closed per housekeeping tick at most
BOT_PENDING_MAX: Final = 4  # visitor messages waiting for the bot per conversation
#: The senders' roles ``kefu_messages_total`` shows from 0 (the store takes no other).
_COUNTED_ROLES: Final = ("visitor", "agent", "bot", "system")
MAX_ACCOUNTED: Final = 100_000  # conversations whose CPU time is kept; LRU dropped past it
SECRET_META: Final = "token_secret"
ADMIN_HASH_META: Final = "admin_token_hash"
BOOTSTRAPPED_META: Final = "bootstrapped"
CREDENTIALS_FILE: Final = "credentials.txt"
DEMO_AGENT_ID: Final = "demo"
#: Revoked session tokens kept per agent; past it a logout ends all the agent's sessions.
AGENT_REVOKED_MAX: Final = 64
#: The claim of a session token naming the agent token it was obtained with.
CREDENTIAL_CLAIM: Final = "cred"
#: Test-only: set to ``1`` to switch client_msg_id dedup off (see :func:`unsafe_no_dedup`).
UNSAFE_NO_DEDUP_ENV: Final = "KEFU_UNSAFE_NO_DEDUP"


def unsafe_no_dedup() -> bool:
    """True when ``KEFU_UNSAFE_NO_DEDUP=1``: retries of a ``client_msg_id`` are stored again.

    Test-only, never for production: it exists so that the crash audit
    (``python -m loadtest.crash --unsafe-no-dedup``) can prove that it sees duplicates when
    dedup is gone. Read once per node, at construction; a node that has it logs so at start.
    """
    return os.environ.get(UNSAFE_NO_DEDUP_ENV) == "1"


class Forbidden(KefuError):
    """The caller may not see or write the conversation (or it does not exist)."""

    code = "forbidden"


class Unauthorized(KefuError):
    """No credentials, or credentials that prove nothing (HTTP 401)."""

    code = "unauthorized"


class Conflict(KefuError):
    """The request contradicts what exists (an agent id taken, an agent of the config file)."""

    code = "conflict"


class Unsupported(KefuError):
    code = "unsupported"


class InvalidKnowledgeBase(KefuError):
    """The knowledge-base files do not load; the message names the file and line."""

    code = "invalid_kb"


class NotFound(KefuError):
    """No such session (REST, where the caller named it by ``session_id``)."""

    code = "not_found"


class SendResult(msgspec.Struct, frozen=True):
    """What :meth:`Node.send_message` answers once the message is durable."""

    seq: int
    ts: int
    dup: bool
    status: ConversationStatus
    replies: list[Msg]


class Bootstrap(msgspec.Struct, frozen=True):
    """What this start created; the tokens are shown once (and are in ``credentials_path``)."""

    admin_token: str | None
    demo_agent_id: str | None
    demo_agent_token: str | None
    credentials_path: str


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class _AgentSessions:
    """What ends one agent's session tokens early (module doc, "Agent tokens")."""

    __slots__ = ("not_before", "revoked")

    def __init__(self) -> None:
        self.not_before = 0  # Unix seconds: tokens issued before are refused
        self.revoked = Revocations(AGENT_REVOKED_MAX)


class _SessionConn(NamedTuple):
    """A live connection opened with a session token: closed when that token ends."""

    conn: Connection
    agent_id: str
    jti: str
    end_ms: int  # when the token stops verifying (exp + CLOCK_SKEW_S)


def _follow_point(
    conv: int, welcomed: dict[int, tuple[int, int]]
) -> tuple[int, str, int | None, int]:
    """A remote conversation to follow without a resume point of the client's: from where
    the welcome said it stood, if it said (``Member.attach``'s ``quiet``), else from now."""
    at = welcomed.get(conv)
    if at is None:
        return (conv, format_conv_id(conv), None, 0)
    return (conv, format_conv_id(conv), at[0], at[1])


def _msg_frame(m: StoredMessage, conv: str | None = None) -> Msg:
    """The ``msg`` frame of ``m`` (``conv``: its id as spelled already, if it is)."""
    return Msg(
        # format_conv_id's spelling; a stored id is a valid one
        conv=f"{m.conv:016x}" if conv is None else conv,
        seq=m.seq,
        epoch=m.epoch,
        id=m.id,
        client_msg_id=m.client_msg_id,
        from_=Sender(role=m.from_role, id=m.from_id, name=m.from_name),  # type: ignore[arg-type]
        text=m.text,
        ts=m.ts,
        meta=m.meta,
    )


def _log_failure(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.error("background store write failed: %s", fut.exception())


class Node:
    """One kefu node (module doc). ``await start()``, then ``await stop()``."""

    def __init__(
        self,
        config: Config,
        *,
        idle_ttl_ms: int | None = None,
        ssl: ssl_module.SSLContext | None = None,
    ) -> None:
        self.config = config
        self._ssl = ssl
        self._store: Store | None = None
        self._signer: TokenSigner | None = None
        self.ws: WsServer | None = None
        ttl_ms = config.session.idle_ttl_minutes * 60_000 if idle_ttl_ms is None else idle_ttl_ms
        self.conversations = Conversations(idle_ttl_ms=ttl_ms, bot_enabled=config.bot.enabled)
        grace_ms = int(config.routing.agent_grace_s * 1000)
        self.pool = AgentPool(grace_ms=grace_ms)
        self.routing = Routing(self.pool, WaitingQueue(config.routing.max_queue))
        candidates = [1.0, ttl_ms / 10_000]
        if grace_ms > 0:
            candidates.append(grace_ms / 4_000)
        self.tick_s = max(0.05, min(candidates))
        self._config_agents = frozenset(a.id for a in config.agents)
        self._agent_by_hash: dict[str, str] = {}  # sha256(token) -> agent id
        self._agent_hash: dict[str, str] = {}  # agent id -> sha256(token)
        # agent id -> when its token expires (ms); only agents whose token expires. See
        # "Agent tokens" in the module doc.
        self._agent_exp: dict[str, int] = {}
        self._next_agent_exp = 0  # the earliest of _agent_exp (0: none)
        # Agent session tokens (module doc, "Agent tokens"): per agent what ends them early,
        # the live connections opened with one (by conn.id) and the earliest of their ends.
        self._sessions: dict[str, _AgentSessions] = {}
        self._session_conns: dict[int, _SessionConn] = {}
        # Cluster mode (kefu.cluster.directory): the directory revision of each admin-made
        # agent held here, the agents changed here that the directory does not have yet
        # (Redis was away), and one pull from the directory at a time.
        self._agent_rev: dict[str, int] = {}
        self._agent_unshared: set[str] = set()
        self._agent_pull_lock = asyncio.Lock()
        self.directory: AgentDirectory | None = None
        self._next_session_end = 0  # ms; 0: none
        self._tag_key = b""  # credential_tag_key of the token secret, set at start
        self._admin_hash: str | None = None
        self.hub = Hub()
        self._presence_dirty: set[str] = set()
        self._presence_scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._loop_lag: LoopLagMonitor | None = None  # started with the node
        self._loop: asyncio.AbstractEventLoop | None = None
        self.bootstrap: Bootstrap | None = None
        self.credentials_path = str(Path(config.data_dir) / CREDENTIALS_FILE)
        self.started_at = 0.0
        self.expired_total = 0
        # Conversations with messages between seq and delivery: conv -> [the lowest such seq,
        # how many]. Bounded by the store's pending limit; entries go when they land.
        self._inflight: dict[int, list[int]] = {}
        #: The node's place in a cluster (``cluster.redis_url``); None: a single node.
        self.member: Member | None = None
        #: Cluster mode: an agent connection's remote conversations, from its welcome to its
        #: on_ready (which follows them).
        self._agent_remote: dict[Connection, list[int]] = {}
        # Cluster mode: where each remote conversation stood in a connection's welcome
        # ((epoch, top_seq) by conv), from authenticate to on_ready: a hello without a resume
        # point follows the owner from there, so nothing landing in between is missed.
        self._welcomed: dict[Connection, dict[int, tuple[int, int]]] = {}
        self._id_prefix = os.urandom(8).hex()
        self._id_counter = 0
        self.duplicates_total = 0
        self._dedup = not unsafe_no_dedup()  # test-only switch, read once
        self.bot: BotPolicy | None = None
        self.llm: LlmClient | None = None
        # A knowledge source given directly (tests, embedding) instead of the watched files.
        self._kb: KnowledgeSource | None = None
        self.kb_watcher: KbWatcher | None = None
        self._bot_locks: dict[int, asyncio.Lock] = {}
        self._bot_pending: dict[int, int] = {}
        self._bot_active = 0
        self._bot_tasks: set[asyncio.Task[list[Msg]]] = set()
        self.bot_skipped = 0
        # Per-session CPU time (ns), least recently charged dropped; see "Accounting".
        self._cpu: Ledger = _core.meters.Ledger(MAX_ACCOUNTED)
        #: Rate limits and connection caps shared by the WS and REST fronts (kefu.web.ratelimit).
        self.limits = Limits.from_config(config.limits, config.ws.rate)
        self.metrics = Registry()
        self._register_metrics()

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def store(self) -> Store:
        if self._store is None:
            raise RuntimeError("node not started")
        return self._store

    @property
    def signer(self) -> TokenSigner:
        if self._signer is None:
            raise RuntimeError("node not started")
        return self._signer

    @property
    def ws_port(self) -> int:
        if self.ws is None:
            raise RuntimeError("node not started")
        return self.ws.port

    async def start(self) -> None:
        cfg = self.config
        sc = cfg.store
        if not self._dedup:
            log.critical(
                "%s=1: client_msg_id dedup is OFF, retried messages are stored twice "
                "(test-only switch, never use it in production)",
                UNSAFE_NO_DEDUP_ENV,
            )
        self._loop = asyncio.get_running_loop()
        self._store = store = Store.open(
            cfg.data_dir,
            durability=cfg.durability,
            max_pending=sc.max_pending,
            max_pending_bytes=sc.max_pending_bytes,
            batch_max_entries=sc.batch_max_entries,
            batch_max_bytes=sc.batch_max_bytes,
            block_cache_bytes=sc.block_cache_bytes,
            write_buffer_bytes=sc.write_buffer_bytes,
            dedup_filter_keys=sc.dedup_filter_keys,
            background_nice=sc.background_nice,
        )
        store.writer.on_batch = self._observe_batch
        store.writer.after_ack = self._flush_writes
        store.writer.set_batch_handler(_Landing, _land_run)
        store.start_dedup_filter(self._loop)
        try:
            for a in cfg.agents:
                self.pool.add(a.id, a.name, weight=a.weight, max_chats=a.max_chats, groups=a.groups)
                self._set_agent_hash(a.id, hash_token(a.token))
            for sa in store.agents():
                if sa.id in self._config_agents or sa.token_hash is None:
                    continue  # the file's declaration wins over a stale stored record
                self.pool.add(
                    sa.id,
                    sa.name,
                    weight=sa.weight,
                    max_chats=sa.max_chats,
                    groups=sa.groups,
                    disabled=sa.disabled,
                )
                self._set_agent_hash(sa.id, sa.token_hash)
                self._set_agent_expiry(sa.id, sa.token_expires_ms)
                if sa.rev:
                    self._agent_rev[sa.id] = sa.rev
            await self._first_start()
            await self._restore()
            secret = store.get_meta(SECRET_META)
            if secret is None:
                secret = new_secret().encode()
                await store.put_meta(SECRET_META, secret)
            if cfg.cluster.redis_url is not None:
                from kefu.cluster.member import Member

                self.member = Member(
                    cfg.cluster,
                    store,
                    grace_ms=int(cfg.routing.agent_grace_s * 1000),
                    max_queue=cfg.routing.max_queue,
                )
                self.member.bind(self)
                await self.member.start(ws_url=cfg.ws.public_url, http_url=None)
                self.directory = AgentDirectory(self.member.link)
                await self.announce()
                # Every node signs with the cluster's secret: a token one node gave out opens
                # the conversation on any other.
                secret = await self.member.shared_secret(secret)
            self._signer = TokenSigner(secret)
            self._tag_key = credential_tag_key(secret)
            for known in self.pool:
                self._load_sessions(known.id)
            await self._start_bot()
            self.ws = WsServer(
                cfg.ws,
                self,
                ssl=self._ssl,
                allowed_origins=cfg.allowed_origins,
                limits=self.limits,
            )
            await self.ws.start()
        except BaseException:
            await self._stop_bot()
            if self.member is not None:
                await self.member.stop()
                self.member = None
            store.close()
            self._store = None
            raise
        self.started_at = time.monotonic()
        self._schedule_tick()
        self._loop_lag = LoopLagMonitor(self._loop, self._m_loop_lag.only().observe)
        self._loop_lag.start()
        self._gc_pauses.start()

    async def _first_start(self) -> None:
        """Admin token and demo agent of a first start (module doc, "First start")."""
        store = self.store
        cfg = self.config
        if cfg.admin_token is not None:
            self._admin_hash = hash_token(cfg.admin_token)
        else:
            stored = store.get_meta(ADMIN_HASH_META)
            self._admin_hash = None if stored is None else stored.decode()
        if store.get_meta(BOOTSTRAPPED_META) is not None:
            return
        admin_token = demo_token = None
        if self._admin_hash is None:
            admin_token = new_secret()
            self._admin_hash = hash_token(admin_token)
            await store.put_meta(ADMIN_HASH_META, self._admin_hash.encode())
        if len(self.pool) == 0:
            demo_token = new_secret()
            record = StoredAgent(
                id=DEMO_AGENT_ID, name="Demo Agent", token_hash=hash_token(demo_token)
            )
            await store.put_agent(record)
            self.pool.add(record.id, record.name, weight=1, max_chats=record.max_chats, groups=())
            self._set_agent_hash(record.id, cast("str", record.token_hash))
        if admin_token is not None or demo_token is not None:
            self._write_credentials(admin_token, demo_token)
            self.bootstrap = Bootstrap(
                admin_token=admin_token,
                demo_agent_id=DEMO_AGENT_ID if demo_token is not None else None,
                demo_agent_token=demo_token,
                credentials_path=self.credentials_path,
            )
        await store.put_meta(BOOTSTRAPPED_META, b"1")

    def _write_credentials(self, admin_token: str | None, demo_token: str | None) -> None:
        lines = ["# kefu credentials made at the first start; keep this file private."]
        if admin_token is not None:
            lines.append(f"admin_token: {admin_token}")
        if demo_token is not None:
            lines.append(f"demo_agent_id: {DEMO_AGENT_ID}")
            lines.append(f"demo_agent_token: {demo_token}")
        path = self.credentials_path
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        os.chmod(path, 0o600)  # an existing file keeps its mode through O_CREAT

    async def _restore(self) -> None:
        now = _now_ms()
        states = self.conversations.restore(list(self.store.recover()))
        effects: list[Effect] = []
        for state in states:
            if self.config.cluster.redis_url is not None:
                break  # the cluster's routing state lives in Redis (kefu.cluster)
            if state.status in ("queued", "assigned"):
                agent = state.agent_id if state.status == "assigned" else None
                effects += self.routing.restore(state.id, now, agent_id=agent, group=state.group)
        # Only the records routing changed are written: recover() already gives the true
        # top_seq, and rewriting every open conversation could pass the store's write budget.
        await asyncio.gather(*self._apply_states(effects))

    async def announce(self) -> None:
        """Cluster mode: tell the cluster's routing this node's agents (the same file on every
        node, as a rule), their state here, and the queued conversations owned here. At start,
        and again when Redis comes back (it may have lost its data)."""
        member = cast("Member", self.member)
        await self.sync_agents()
        for known in self.pool:
            await self._upsert_in_cluster(known.id)
            if known.connections:
                member.report_agent(known.id)
        await self._reconcile()

    async def _reconcile(self) -> None:
        """Cluster mode: the conversations owned here that wait for or have a human agree with
        the cluster's routing. What the routing decided while this node was away (a dead
        agent's conversations given to another, a queue that moved) is applied here now; a
        conversation the routing does not know (Redis lost its data) is restored: to its
        agent, or in line."""
        member = cast("Member", self.member)
        routing = member.routing
        waiting = [s for s in self.conversations if s.status in ("queued", "assigned")]
        for chunk in range(0, len(waiting), 500):
            states = waiting[chunk : chunk + 500]
            ranks = await routing.positions([s.id for s in states])
            for state, rank in zip(states, ranks, strict=True):
                conv = state.id
                if rank is not None:
                    member.positions[conv] = rank
                    if state.status != "queued":
                        self._run_effects([Queue(conv, rank, state.group)])
                    continue
                agent = await routing.assigned_to(conv)
                if agent is not None:
                    if agent != state.agent_id:
                        self._run_effects([Assign(conv, agent, state.group)])
                    continue
                # Redis lost it (restarted without its data): back to its agent, or in line.
                log.warning("conversation %x: unknown to the cluster's routing; restored", conv)
                agent_id = state.agent_id if state.status == "assigned" else None
                try:
                    effects = await member.routed(
                        routing.restore(conv, _now_ms(), agent_id=agent_id, group=state.group)
                    )
                except (RoutingError, ValueError) as exc:  # ValueError: routed meanwhile
                    log.warning("conversation %x: not restored: %s", conv, exc)
                    continue
                self._run_effects(effects)

    async def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._loop_lag is not None:
            self._loop_lag.stop()
            self._loop_lag = None
        self._gc_pauses.stop()
        if self.ws is not None:
            await self.ws.stop()
            self.ws = None
        await self._stop_bot()
        if self.member is not None:
            await self.member.stop()
            self.member = None
        if self._store is not None:
            self._store.close()
            self._store = None

    # -- bot --------------------------------------------------------------------------------

    def _knowledge(self) -> KnowledgeSource | None:
        if self._kb is not None:
            return self._kb
        return self.kb_watcher.current if self.kb_watcher is not None else None

    async def _start_bot(self) -> None:
        bot = self.config.bot
        if not bot.enabled:
            return
        paths = [sample_kb_path()] if bot.kb is None else list(bot.kb)
        if paths:
            watcher = KbWatcher(paths, bot.kb_reload_interval_s, tokenizer=bot.tokenizer)
            await watcher.start()  # KbError: an invalid knowledge base stops the start
            self.kb_watcher = watcher
        llm = bot.llm
        if llm.base_url is not None and llm.model is not None:
            self.llm = LlmClient(
                LlmOptions(
                    endpoint=Endpoint(base_url=llm.base_url, model=llm.model, api_key=llm.api_key),
                    fallbacks=tuple(
                        Endpoint(base_url=f.base_url, model=f.model, api_key=f.api_key)
                        for f in llm.fallbacks
                    ),
                    max_tokens=llm.max_tokens,
                    temperature=llm.temperature,
                    connect_timeout_s=llm.connect_timeout_s,
                    first_token_timeout_s=llm.first_token_timeout_s,
                    chunk_timeout_s=llm.chunk_timeout_s,
                    total_timeout_s=llm.timeout_s,
                    max_retries=llm.max_retries,
                    backoff_base_s=llm.backoff_base_s,
                    backoff_max_s=llm.backoff_max_s,
                    retry_after_max_s=llm.retry_after_max_s,
                    breaker_failures=llm.breaker_failures,
                    breaker_cooldown_s=llm.breaker_cooldown_s,
                    max_concurrency=llm.max_concurrency,
                    max_waiting=llm.max_waiting,
                    queue_timeout_s=llm.queue_timeout_s,
                )
            )
        self.bot = BotPolicy(bot, self._knowledge, self.llm, model=llm.model or "")

    async def _stop_bot(self) -> None:
        if self.kb_watcher is not None:
            await self.kb_watcher.stop()
            self.kb_watcher = None
        tasks = list(self._bot_tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self.llm is not None:
            await self.llm.close()
            self.llm = None

    def _spawn_bot_turn(self, state: ConversationState, text: str) -> None:
        task = asyncio.ensure_future(self._bot_turn(state, text))
        self._bot_tasks.add(task)
        task.add_done_callback(self._bot_task_done)

    def _bot_task_done(self, task: asyncio.Task[list[Msg]]) -> None:
        self._bot_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("bot turn failed", exc_info=task.exception())

    async def _bot_turn(
        self,
        state: ConversationState,
        text: str,
        on_delta: Callable[[str], None] | None = None,
    ) -> list[Msg]:
        """The bot's answer to one visitor message (:mod:`kefu.bot.policy`), stored and sent;
        turns of one conversation run one at a time, in the order of the messages."""
        bot = self.bot
        conv = state.id
        if bot is None:
            return []
        pending = self._bot_pending.get(conv, 0)
        if pending >= BOT_PENDING_MAX:
            self.bot_skipped += 1  # a visitor flooding the bot: the turns queued answer
            return []
        self._bot_pending[conv] = pending + 1
        lock = self._bot_locks.setdefault(conv, asyncio.Lock())
        try:
            async with lock:
                return await self._bot_answer(bot, state, text, on_delta)
        finally:
            left = self._bot_pending[conv] - 1
            if left:
                self._bot_pending[conv] = left
            else:
                del self._bot_pending[conv]
                self._bot_locks.pop(conv, None)

    async def _bot_answer(
        self,
        bot: BotPolicy,
        state: ConversationState,
        text: str,
        on_delta: Callable[[str], None] | None,
    ) -> list[Msg]:
        if state.status != "bot":
            return []  # handed off or closed while this turn waited
        conv_hex = format_conv_id(state.id)
        stream_id = uuid.uuid4().hex
        participants = self._participants(state)

        def delta(piece: str) -> None:
            self.hub.send(participants, Delta(conv=conv_hex, stream_id=stream_id, text=piece))
            if on_delta is not None:
                on_delta(piece)

        if self._bot_active >= self.config.bot.max_concurrency:
            turn = BotTurn(handoff=BotHandoff("busy", bot.topic_group(state.id)))
        else:
            self._bot_active += 1
            try:
                turn = await bot.decide(state.id, text, delta)
            finally:
                self._bot_active -= 1
            self._charge(state.id, turn.cpu_ns)
        if state.status != "bot":
            return []
        replies: list[Msg] = []
        answer = turn.answer
        if answer is not None:
            meta: dict[str, object] = {"source": answer.source, "stream_id": stream_id}
            if answer.entry_id is not None:
                meta["kb_entry"] = answer.entry_id
                meta["score"] = round(answer.score, 4)
            if answer.truncated:
                meta["truncated"] = True
            sender = Sender(role="bot", id="bot", name=self.config.bot.name)
            replies.append(await self._append(state, sender, answer.text, None, meta))
        if turn.handoff is not None:
            await self._handoff(state, turn.handoff.reason, turn.handoff.group)
        elif turn.close:
            await asyncio.gather(*self._end(state, "admin", "bot", _now_ms()))
        return replies

    async def _decide(
        self,
        local: Callable[[], list[Effect]],
        cluster: Callable[[ClusterRouting], Awaitable[Outcome]],
    ) -> list[Effect]:
        """A routing decision: ``local()`` on a single node; in a cluster, ``cluster`` on the
        cluster's routing in Redis (kefu.cluster.routing), whose effects for conversations
        owned elsewhere go to their owners. The effects returned are this node's."""
        member = self.member
        if member is None:
            return local()
        return await member.routed(cluster(member.routing))

    def _decide_later(
        self,
        local: Callable[[], list[Effect]],
        cluster: Callable[[ClusterRouting], Awaitable[Outcome]],
        what: str,
    ) -> list[asyncio.Future[None]]:
        """``_decide`` from a path that cannot wait: on a single node the effects are applied
        now; in a cluster when Redis answers."""
        member = self.member
        if member is None:
            return self._run_effects(local())
        member.apply_later(cluster(member.routing), what)
        return []

    async def _handoff(self, state: ConversationState, reason: str, group: str | None) -> None:
        """The bot passes the conversation to humans: routed (or queued) at once."""
        conv = state.id
        self.conversations.check(conv, "handoff")
        now = _now_ms()
        if group is not None and not self.pool.has_group(group):
            group = None  # a rule naming a group nobody is in: anyone rather than nobody
        effects = await self._decide(  # QueueFull: the bot keeps it
            lambda: self.routing.route(conv, now, group), lambda r: r.route(conv, now, group)
        )
        if self.bot is not None:
            self.bot.forget(conv)
        self._fan_out(state, Handoff(conv=format_conv_id(conv), reason=reason))
        await asyncio.gather(*self._run_effects(effects))

    # -- housekeeping -----------------------------------------------------------------------

    def _schedule_tick(self) -> None:
        if self._loop is not None and self._store is not None:
            self._timer = self._loop.call_later(self.tick_s, self._tick)

    def _tick(self) -> None:
        try:
            self.housekeeping(_now_ms())
        except Exception:
            log.exception("housekeeping failed")
        finally:
            self._schedule_tick()

    def housekeeping(self, now_ms: int) -> None:
        """Idle expiry and agent grace, as of ``now_ms`` (the timer calls it every tick)."""
        for conv in self.conversations.expired(now_ms, EXPIRE_BATCH):
            state = self.conversations.get(conv)
            if state is None:
                continue
            self.expired_total += 1
            self._end(state, "expired", "expired", now_ms)
        if self.member is None:
            effects = self.routing.expire_agents(now_ms)
            if effects:
                self._run_effects(effects)
        else:
            self.routing.expire_agents(now_ms)  # the local pool's grace (presence)
            self.member.apply_later(self.member.routing.expire(now_ms), "agent grace")
        if self._next_agent_exp and now_ms >= self._next_agent_exp:
            self._close_expired_agents(now_ms)
        if self._next_session_end and now_ms >= self._next_session_end:
            self._close_expired_sessions(now_ms)

    def _close_expired_agents(self, now_ms: int) -> None:
        """Closes (1008) the connections of agents whose token expired: a connection lives
        no longer than the token that opened it."""
        for agent_id, exp in self._agent_exp.items():
            if exp <= now_ms:
                for c in self.hub.connections(("agent", agent_id)):
                    c.close(1008, "token expired")
        pending = [exp for exp in self._agent_exp.values() if exp > now_ms]
        self._next_agent_exp = min(pending) if pending else 0

    def _close_expired_sessions(self, now_ms: int) -> None:
        """Closes (1008) the connections whose session token stopped verifying."""
        ended = [cid for cid, sc in self._session_conns.items() if sc.end_ms <= now_ms]
        for cid in ended:
            self._session_conns.pop(cid).conn.close(1008, "token expired")
        ends = [sc.end_ms for sc in self._session_conns.values()]
        self._next_session_end = min(ends) if ends else 0

    def _end(
        self, state: ConversationState, by: str, reason: str, now_ms: int
    ) -> list[asyncio.Future[None]]:
        """Close ``state``: record, ``closed`` to everyone, routing freed (queue drained)."""
        ended = self.conversations.close(state.id, by, reason, now_ms)
        futures: list[asyncio.Future[None]] = []
        try:
            fut = self.store.put_conversation(state.to_stored())
            fut.add_done_callback(_log_failure)
            futures.append(fut)
        except StoreError:
            log.exception("conversation %x: closed record not stored", state.id)
        conv_hex = format_conv_id(state.id)
        for e in ended:
            self._fan_out(state, Closed(conv=conv_hex, by=cast("ClosedBy", e.by), reason=e.reason))
            if state.agent_id is not None:
                self._presence_changed(state.agent_id)
            if self.member is not None:
                self.member.apply_later(self.member.routing.release(e.conv), "release")
            elif state.id in self.routing:
                futures += self._run_effects(self.routing.release(e.conv))
        self.hub.forget(state.id)
        if self.bot is not None:
            self.bot.forget(state.id)
        return futures

    # -- credentials ------------------------------------------------------------------------

    def _set_agent_hash(self, agent_id: str, token_hash: str) -> None:
        old = self._agent_hash.pop(agent_id, None)
        if old is not None:
            self._agent_by_hash.pop(old, None)
        if token_hash in self._agent_by_hash:
            raise Conflict("another agent has this token")
        self._agent_hash[agent_id] = token_hash
        self._agent_by_hash[token_hash] = agent_id

    def _drop_agent_hash(self, agent_id: str) -> None:
        old = self._agent_hash.pop(agent_id, None)
        if old is not None:
            self._agent_by_hash.pop(old, None)
        self._set_agent_expiry(agent_id, None)

    def _set_agent_expiry(self, agent_id: str, expires_ms: int | None) -> None:
        if expires_ms is None:
            self._agent_exp.pop(agent_id, None)
        else:
            self._agent_exp[agent_id] = expires_ms
            if not self._next_agent_exp or expires_ms < self._next_agent_exp:
                self._next_agent_exp = expires_ms

    def is_admin(self, token: str) -> bool:
        """Whether ``token`` is the admin token (compared as SHA-256 hashes)."""
        return self._admin_hash is not None and hash_token(token) == self._admin_hash

    def is_api_key(self, token: str) -> bool:
        """Whether ``token`` is the configured API key (False when none is configured)."""
        key = self.config.api_key
        return key is not None and hash_token(token) == hash_token(key)

    def agent_of_token(self, token: str) -> str | None:
        """The id of the enabled agent whose token this is: its long-lived token or one of
        its session tokens (module doc, "Agent tokens")."""
        agent_id = self.agent_of_own_token(token)
        if agent_id is not None:
            return agent_id
        claims = self.agent_session(token)
        return None if claims is None else claims.sub

    def agent_of_own_token(self, token: str) -> str | None:
        """The id of the enabled agent whose long-lived token this is."""
        agent_id = self._agent_by_hash.get(hash_token(token))
        return agent_id if agent_id is not None and self._agent_usable(agent_id) else None

    def _agent_usable(self, agent_id: str) -> bool:
        """Whether ``agent_id`` exists, is enabled and its long-lived token has not expired
        (else rotate it: POST /v1/admin/agents/{id}/token)."""
        if agent_id not in self.pool or self.pool.get(agent_id).disabled:
            return False
        exp = self._agent_exp.get(agent_id)
        return exp is None or _now_ms() < exp

    def agent_session(self, token: str, now: float | None = None) -> TokenClaims | None:
        """The claims of ``token`` if it is a session token valid now, else None (the
        checks are listed in the module doc, "Agent tokens")."""
        if not token.startswith("v1."):
            return None  # not a signed token: no cryptographic work
        try:
            claims = self.signer.verify(token, "agent", now)
        except TokenError:
            return None
        agent_id = claims.sub
        token_hash = self._agent_hash.get(agent_id)
        if token_hash is None or not self._agent_usable(agent_id):
            return None
        if claims.extra.get(CREDENTIAL_CLAIM) != credential_tag(self._tag_key, token_hash):
            return None  # obtained with another token of this agent (or of a former one)
        ended = self._sessions.get(agent_id)
        if ended is not None and (
            claims.iat < ended.not_before or ended.revoked.is_revoked(claims.jti, now)
        ):
            return None
        return claims

    def agent_login(
        self, token: str, ttl_s: int | None = None, now: float | None = None
    ) -> AgentSession:
        """``POST /v1/agent/login``: a session token for the agent whose long-lived ``token``
        this is (``Forbidden`` for any other token, a session token included). ``now`` is
        for tests: the token is issued as of that time."""
        agent_id = self.agent_of_own_token(token)
        if agent_id is None:
            raise Forbidden("a session is opened with the agent's own token only")
        ttl = AGENT_SESSION_TTL_S if ttl_s is None else ttl_s
        ended = self._sessions.get(agent_id)
        now_s = math.floor(time.time() if now is None else now)
        issued = now_s
        if ended is not None and ended.not_before > now_s:
            # A login in the second that ended the others is issued at not_before, in the
            # future; its exp stays where it would be.
            issued = ended.not_before
            ttl = max(1, ttl - (issued - now_s))
        own_exp_ms = self._agent_exp.get(agent_id)
        if own_exp_ms is not None:  # never past the long-lived token
            ttl = max(1, min(ttl, own_exp_ms // 1000 - issued))
        tag = credential_tag(self._tag_key, self._agent_hash[agent_id])
        session = self.signer.issue("agent", agent_id, ttl, issued, extra={CREDENTIAL_CLAIM: tag})
        return AgentSession(agent_id=agent_id, token=session, expires_ts=(issued + ttl) * 1000)

    async def agent_logout(self, token: str) -> None:
        """``POST /v1/agent/logout``: ends the session ``token`` at once (its connections are
        closed with 1008) and answers once that is durable. Idempotent, as a retry after a
        lost answer needs: a genuine unexpired session token that was already ended
        (logged out, rotated, ...) is answered the same. ``Forbidden`` for anything else, the
        agent's own token included (that one is ended by rotating it)."""
        claims = self.agent_session(token)
        if claims is None:
            if self._genuine_session(token):
                return  # ended already
            raise Forbidden("this token is not an agent session token")
        agent_id = claims.sub
        self._need_directory()
        if self._sessions_of(agent_id).revoked.revoke(claims.jti, claims.exp):
            self._close_sessions(agent_id, claims.jti)
        else:
            # No room for one more revocation: end them all rather than forget one.
            log.warning("agent %s: %d sessions revoked, ending all", agent_id, AGENT_REVOKED_MAX)
            self._end_sessions(agent_id)
            self._close_sessions(agent_id, None)
        await self.store.put_agent_sessions(self._stored_sessions(agent_id))
        await self._share_logout(agent_id, claims.jti, claims.exp)

    def _genuine_session(self, token: str) -> bool:
        """Whether ``token`` is an unexpired session token this node issued (valid or not)."""
        if not token.startswith("v1."):
            return False
        try:
            claims = self.signer.verify(token, "agent")
        except TokenError:
            return False
        return CREDENTIAL_CLAIM in claims.extra

    def _sessions_of(self, agent_id: str) -> _AgentSessions:
        """The agent's session state, from the store when memory has none (an agent
        created again under the id of a deleted one)."""
        ended = self._sessions.get(agent_id)
        if ended is None:
            self._load_sessions(agent_id)
            ended = self._sessions.get(agent_id)
        if ended is None:
            ended = self._sessions[agent_id] = _AgentSessions()
        return ended

    def _end_sessions(self, agent_id: str) -> None:
        """Every session token of ``agent_id`` issued so far is refused from now on (their
        connections are the caller's to close). The revocations are then moot: dropped."""
        ended = self._sessions_of(agent_id)
        # Past every iat given so far, those of logins issued at not_before included.
        ended.not_before = max(ended.not_before + 1, math.floor(time.time()) + 1)
        ended.revoked = Revocations(AGENT_REVOKED_MAX)

    def _close_sessions(self, agent_id: str, jti: str | None) -> None:
        """Closes (1008) the agent's connections opened with session ``jti`` (None: with any
        session token)."""
        for c in self.hub.connections(("agent", agent_id)):
            sc = self._session_conns.get(c.id)
            if sc is not None and (jti is None or sc.jti == jti):
                del self._session_conns[c.id]
                c.close(1008, "token revoked")

    def _stored_sessions(self, agent_id: str) -> StoredAgentSessions:
        ended = self._sessions_of(agent_id)
        return StoredAgentSessions(
            agent_id=agent_id, not_before=ended.not_before, revoked=ended.revoked.entries()
        )

    def _load_sessions(self, agent_id: str) -> None:
        record = self.store.get_agent_sessions(agent_id)
        if record is None:
            return
        ended = self._sessions[agent_id] = _AgentSessions()
        ended.not_before = record.not_before
        for jti, exp in record.revoked:  # those expired meanwhile are dropped
            if not ended.revoked.revoke(jti, exp):
                self._end_sessions(agent_id)  # more than the bound: end them all, forget none
                break

    def _track_session(self, conn: Connection, token: str) -> None:
        """Remembers that ``conn`` came with session ``token`` (nothing for the agent's own
        token: such a connection lives as long as that token, see ``_close_expired_agents``)."""
        claims = self.agent_session(token)
        if claims is None:
            return
        end_ms = (claims.exp + CLOCK_SKEW_S) * 1000
        self._session_conns[conn.id] = _SessionConn(conn, claims.sub, claims.jti, end_ms)
        if not self._next_session_end or end_ms < self._next_session_end:
            self._next_session_end = end_ms

    def visitor_of_token(self, token: str) -> tuple[str, str] | None:
        """``(visitor_id, session_id)`` of a valid visitor token, else None."""
        try:
            claims = self.signer.verify(token, "visitor")
            conv = claims.extra["conv"]
            parse_conv_id(conv)
        except (TokenError, KeyError, ValueError):
            return None
        return claims.sub, conv

    def visitor_of_session(self, session_id: str) -> str | None:
        """The visitor id of an open or known conversation ``session_id``, else None (for the
        per-visitor rate limit of calls made with the API key)."""
        try:
            return self._session(session_id).visitor_id
        except NotFound:
            return None

    def conversation_state(self, session_id: str) -> ConvState:
        """Where ``session_id`` stands, as a ``welcome`` tells it (``not_found`` when it is not
        a conversation of this node): for the gRPC front's subscribers with the API key."""
        state = self._session(session_id)
        return ConvState(
            conv=format_conv_id(state.id),
            epoch=state.epoch,
            top_seq=state.top_seq,
            status=state.status,
        )

    def check_identity(self, user_id: str | None, user_hash: str | None) -> None:
        """PROTOCOL.md "Identities": with ``identity.required`` a ``user_id`` needs its valid
        ``user_hash``; a hash given is always checked. Raises :class:`Unauthorized`."""
        ident = self.config.identity
        if user_hash is None and not (ident.required and user_id is not None):
            return
        if user_id is None:
            raise Unauthorized("user_hash given without user_id")
        secret = ident.secret
        if secret is None or not verify_user_hash(secret.encode(), user_id, user_hash):
            raise Unauthorized("user_hash does not match user_id")

    # -- REST entry points ------------------------------------------------------------------

    async def create_chat(
        self,
        user_id: str | None = None,
        name: str | None = None,
        metadata: dict[str, str] | None = None,
    ) -> tuple[str, str, str, ConversationStatus, bool]:
        """A new conversation (or the user's open one): ``(conv, visitor_id, token, status,
        created)``. With the bot off it is routed at once."""
        store = self.store
        now = _now_ms()
        meta: dict[str, object] = dict(metadata or {})
        if name is not None:
            meta["name"] = name
        member = self.member
        conv_id = store.new_conversation_id(None if member is None else member.new_conversation_id)
        state, created = self.conversations.create(
            "v" + uuid.uuid4().hex[:16], user_id, now, conv_id, metadata=meta
        )
        effects: list[Effect] = []
        if created:
            if state.status == "queued":  # with the bot on, it starts "bot" and waits
                conv = state.id
                try:
                    effects = await self._decide(
                        lambda: self.routing.route(conv, now), lambda r: r.route(conv, now)
                    )
                except KefuError:
                    self.conversations.discard(state.id)
                    raise
                for effect in effects:
                    self.conversations.apply(effect)
            try:
                fut = store.put_conversation(state.to_stored())
            except StoreError:
                if member is not None:
                    member.apply_later(member.routing.release(state.id), "release")
                elif state.id in self.routing:
                    self.routing.release(state.id)
                self.conversations.discard(state.id)
                raise
            await fut
            self._notify(effects)
        conv_hex = format_conv_id(state.id)
        token = self.signer.issue(
            "visitor",
            state.visitor_id,
            self.config.session.visitor_token_ttl_hours * 3600,
            extra={"conv": conv_hex},
        )
        return conv_hex, state.visitor_id, token, state.status, created

    async def send_message(
        self,
        session_id: str,
        text: str,
        client_msg_id: str | None = None,
        *,
        role: str = "visitor",
        principal: str | None = None,
        on_delta: Callable[[str], None] | None = None,
    ) -> SendResult:
        """Post ``text`` into ``session_id`` as ``role``; returns once it is durable.

        ``principal=None`` with role ``visitor`` acts as the conversation's visitor (a caller
        the HTTP front already authorised for the session, e.g. with the API key).
        """
        member = self.member
        if member is not None and (remote := _remote_conv_hex(member, session_id)) is not None:
            raw = await member.call_owner(
                remote, "send", (session_id, text, client_msg_id, role, principal)
            )
            return msgspec.msgpack.decode(raw, type=SendResult)
        state = self._session(session_id)
        if principal is None:
            if role != "visitor":
                raise Forbidden("only the visitor may be implied")
            principal = state.visitor_id
        key = (role, principal)
        if not may_see(state, role, principal):
            raise Forbidden("you may not see this conversation")
        to_bot = role == "visitor" and state.status == "bot" and self.bot is not None
        seq, ts, dup = await self._post(state, key, text, client_msg_id)
        replies: list[Msg] = []
        if to_bot and not dup:
            replies = await self._bot_turn(state, text, on_delta)
        return SendResult(seq=seq, ts=ts, dup=dup, status=state.status, replies=replies)

    async def close_chat(
        self, session_id: str, *, by: str = "visitor", principal: str | None = None
    ) -> None:
        """Close ``session_id`` as ``by`` (``visitor``, ``agent`` or ``admin``); idempotent."""
        member = self.member
        if member is not None and (remote := _remote_conv_hex(member, session_id)) is not None:
            await member.call_owner(remote, "close", (session_id, by, principal))
            return
        state = self._session(session_id)
        if by == "visitor" and principal is not None and state.visitor_id != principal:
            raise Forbidden("you may not see this conversation")
        if by == "agent" and (principal is None or state.agent_id != principal):
            raise Forbidden("only the agent holding the conversation may close it")
        if by not in ("visitor", "agent", "admin"):
            raise ValueError(f"by must be visitor, agent or admin, got {by!r}")
        if state.status == "closed":
            return
        await asyncio.gather(*self._end(state, by, by, _now_ms()))

    async def history_anywhere(
        self,
        session_id: str,
        after: int = 0,
        limit: int = 50,
        *,
        role: str = "visitor",
        principal: str | None = None,
    ) -> HistoryResponse:
        """:meth:`history`, read from the owner when another node of the cluster owns it."""
        member = self.member
        if member is not None and (remote := _remote_conv_hex(member, session_id)) is not None:
            raw = await member.call_owner(
                remote, "history", (session_id, after, limit, role, principal)
            )
            return msgspec.msgpack.decode(raw, type=HistoryResponse)
        return self.history(session_id, after, limit, role=role, principal=principal)

    def history(
        self,
        session_id: str,
        after: int = 0,
        limit: int = 50,
        *,
        role: str = "visitor",
        principal: str | None = None,
    ) -> HistoryResponse:
        """A page of ``session_id``'s messages after ``after`` (``more`` when the page is full
        and later ones exist)."""
        state = self._session(session_id)
        if principal is not None and not may_see(state, role, principal):
            raise Forbidden("you may not see this conversation")
        messages, more = self.store.history(state.id, after, limit)
        return HistoryResponse(
            messages=[_msg_frame(m) for m in messages], more=more, epoch=state.epoch
        )

    def public_config(self) -> PublicConfig:
        cfg = self.config
        ws = cfg.ws
        url = ws.public_url
        if url is None:
            scheme = "wss" if self._ssl is not None else "ws"
            host = ws.host if ws.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
            if ":" in host:
                host = f"[{host}]"
            port = self.ws.port if self.ws is not None else ws.port
            url = f"{scheme}://{host}:{port}{ws.path}"
        return PublicConfig(
            ws_url=url,
            protocol=PROTOCOL_VERSION,
            max_msg_bytes=ws.max_msg_bytes,
            max_text_chars=MAX_TEXT_CHARS,
            ping_interval_ms=int(ws.ping_interval_s * 1000),
            bot_enabled=self.bot is not None,
            bot_name=cfg.bot.name,
        )

    def health(self) -> Health:
        """``ok`` when the store takes writes and the node runs; ``unavailable`` otherwise."""
        checks: dict[str, str] = {}
        store = self._store
        checks["store"] = "ok" if store is not None and store.healthy else "unavailable"
        checks["ws"] = "ok" if self.ws is not None else "unavailable"
        ok = all(v == "ok" for v in checks.values())
        if self.member is not None:
            # Reported, but the node stays ok without Redis: it serves what is local
            # (kefu.cluster, "Redis down").
            checks["redis"] = self.member.health()
        uptime = time.monotonic() - self.started_at if self.started_at else 0.0
        return Health(
            status="ok" if ok else "unavailable",
            version=__version__,
            uptime_s=round(uptime, 3),
            checks=checks,
        )

    # -- knowledge base (admin) -------------------------------------------------------------

    def kb_search(self, text: str, k: int = 5) -> KbSearchResponse:
        """``GET /v1/admin/kb/search``: the best entries for ``text``, as the bot sees them."""
        kb = self._knowledge()
        if kb is None:
            raise NotFound("no knowledge base is loaded (bot.enabled false or bot.kb empty)")
        hits = [
            KbHit(id=h.id, score=round(h.score, 6), question=h.question, answer=h.answer)
            for h in kb.search(text, k)
        ]
        return KbSearchResponse(version=int(kb.version), hits=hits)

    async def kb_reload(self) -> KbReloadResponse:
        """``POST /v1/admin/kb/reload``: rebuild from the files now (``invalid_kb`` when they
        are broken: the version in service stays)."""
        if self.kb_watcher is None:
            raise NotFound("no knowledge base files are configured")
        try:
            kb = await self.kb_watcher.reload()
        except KbError as exc:
            raise InvalidKnowledgeBase(str(exc)) from None
        return KbReloadResponse(version=kb.version, entries=len(kb))

    # -- accounting -------------------------------------------------------------------------

    def _charge(self, conv: int, ns: int) -> None:
        self._cpu.charge(conv, ns)

    @property
    def messages_total(self) -> int:
        """Messages stored and delivered by this node since it started."""
        return self._meter.messages_total

    @property
    def cpu_total_ns(self) -> int:
        """CPU time charged to conversations, those dropped from the accounting included."""
        return self._cpu.total_ns

    def session_stats(self, session_id: str) -> SessionStats:
        """``GET /v1/admin/sessions/{id}/stats``: the CPU time this node spent on the
        conversation and the memory it holds now (module doc, "Accounting")."""
        state = self._session(session_id)
        return SessionStats(
            session_id=session_id,
            cpu_seconds=self._cpu.get(state.id, 0) / 1e9,
            memory_bytes=self._memory_of(state),
        )

    def _memory_of(self, state: ConversationState) -> int:
        held = self.hub.ring_bytes(state.id)
        if self.bot is not None:
            held += self.bot.memory_of(state.id)
        if state.status != "closed":
            held += _STATE_BYTES + metadata_chars(state)
        return held

    def metrics_text(self) -> bytes:
        """``GET /metrics``: Prometheus text (``kefu.metrics.CONTENT_TYPE``)."""
        return self.metrics.render()

    def _observe_batch(self, messages: int, seconds: float) -> None:
        self._m_batch_messages.observe(messages)
        self._m_batch_write.observe(seconds)

    def _register_metrics(self) -> None:
        reg = self.metrics
        self._m_persist = reg.histogram(
            "kefu_message_persist_seconds",
            "From taking a message to its durable write (the wait before its ack).",
            LATENCY_BUCKETS,
        )
        self._m_received_persisted = reg.histogram(
            "kefu_message_received_to_persisted_seconds",
            "From reading a message's frame off its WebSocket to its durable write.",
            LATENCY_BUCKETS,
        )
        self._m_received_delivered = reg.histogram(
            "kefu_message_received_to_delivered_seconds",
            "From reading a message's frame to handing the ack and the message to every "
            "participant's connection (written at the end of that loop turn).",
            LATENCY_BUCKETS,
        )
        # Every message's measures in two calls (Node._land; kefu._core.meters).
        self._meter: MessageMeter = _core.meters.MessageMeter(
            self._m_persist.only(),
            self._m_received_persisted.only(),
            self._m_received_delivered.only(),
            self._cpu,
            _COUNTED_ROLES,
            time.perf_counter_ns,
        )
        self._m_batch_messages = reg.histogram(
            "kefu_store_batch_messages",
            "Messages per group-commit batch (one RocksDB write batch per loop turn).",
            BATCH_BUCKETS,
        )
        self._m_batch_write = reg.histogram(
            "kefu_store_batch_write_seconds",
            "Time to write one group-commit batch to RocksDB (the loop waits for it).",
            LATENCY_BUCKETS,
        )
        self._m_dups = reg.counter(
            "kefu_message_duplicates_total", "Sends answered as duplicates of a client_msg_id."
        )
        self._m_loop_lag = reg.histogram(
            "kefu_event_loop_lag_seconds",
            "How late the event loop ran a timer that was due (sampled every "
            f"{LOOP_LAG_INTERVAL_S:g} s): how long a ready frame can wait for the loop.",
            LATENCY_BUCKETS,
        )
        gc_pause = reg.histogram(
            "kefu_gc_pause_seconds",
            "Garbage collections by generation, each timed (the loop runs nothing meanwhile).",
            LATENCY_BUCKETS,
            ["generation"],
        )
        self._gc_pauses = GcPauseMonitor([gc_pause.labels(str(g)).observe for g in (0, 1, 2)])
        reg.register_collector(self._collect_node, name="node")
        reg.register_collector(
            lambda: [] if self.member is None else self.member.collect(),
            name="cluster",
        )
        reg.register_collector(self._collect_sessions, name="sessions")
        # One collector per component: a failing one loses only its own families.
        reg.register_collector(
            lambda: _families("kefu_conversations", self.conversations.stats()),
            name="conversations",
        )
        reg.register_collector(
            lambda: _families("kefu_routing", self.routing.stats(_now_ms())), name="routing"
        )
        reg.register_collector(lambda: _families("kefu_hub", self.hub.stats()), name="hub")
        reg.register_collector(
            lambda: _families("kefu_limits", self.limits.stats(), labels=_LIMIT_LABELS),
            name="limits",
        )
        reg.register_collector(
            lambda: (
                [] if self.kb_watcher is None else _families("kefu_kb", self.kb_watcher.stats())
            ),
            name="kb",
        )
        reg.register_collector(self._collect_bot, name="bot")
        reg.register_collector(
            lambda: (
                []
                if self._store is None
                else _families("kefu_store", self._store.stats(), _STORE_COUNTERS)
            ),
            name="store",
        )
        reg.register_collector(
            lambda: (
                []
                if self.ws is None
                else _families("kefu_ws", self.ws.stats(), _WS_COUNTERS, _WS_LABELS)
            ),
            name="ws",
        )

    def _collect_bot(self) -> list[CollectedFamily]:
        bot = self.bot
        if bot is None:
            return []
        stats = bot.stats()
        out = _families(
            "kefu_bot",
            {
                "decisions_total": stats["decisions"],
                "contexts": stats["contexts"],
                "contexts_dropped_total": stats["contexts_dropped_total"],
                "active": self._bot_active,
                "skipped_total": self.bot_skipped,
            },
            labels={"decisions_total": "branch"},
        )
        cache = stats["cache"]
        out += _families(
            "kefu_bot_cache",
            {k: v for k, v in cache.items() if not isinstance(v, dict)},
            frozenset({"hits", "misses", "puts"}),
        )
        if self.llm is not None:
            llm = self.llm.stats()
            out += _families(
                "kefu_llm",
                {k: v for k, v in llm.items() if k != "endpoints"},
                frozenset(
                    {
                        "calls",
                        "succeeded",
                        "retries",
                        "interrupted",
                        "abandoned",
                        "fallback_attempts",
                        "tokens_in",
                        "tokens_out",
                        "failures",
                        "attempt_failures",
                        "first_token_count",
                        "first_token_seconds_sum",
                    }
                ),
                {"failures": "reason", "attempt_failures": "reason"},
            )
        return out

    def _collect_sessions(self) -> list[CollectedFamily]:
        # _memory_of over every conversation held, from running totals: summing it
        # conversation by conversation read every ring's messages (48 ms a scrape at 8,000
        # conversations of 20 messages, the loop stalled meanwhile; 16 times that when full).
        conversations = self.conversations
        memory = (
            self.hub.rings_bytes()
            + _STATE_BYTES * len(conversations)
            + conversations.open_metadata_chars
        )
        if self.bot is not None:
            memory += self.bot.memory_total()
        return [
            CollectedFamily(
                "kefu_session_cpu_seconds_total",
                "counter",
                "CPU time spent on conversations (messages, fan-out, bot), summed.",
                [({}, self.cpu_total_ns / 1e9)],
            ),
            CollectedFamily(
                "kefu_session_cpu_accounted",
                "gauge",
                f"Conversations whose CPU time is kept (at most {MAX_ACCOUNTED}).",
                [({}, float(len(self._cpu)))],
            ),
            CollectedFamily(
                "kefu_session_cpu_dropped_total",
                "counter",
                "Conversations dropped from the CPU accounting, least recently charged first.",
                [({}, float(self._cpu.dropped))],
            ),
            CollectedFamily(
                "kefu_session_memory_bytes",
                "gauge",
                "Memory held for open conversations (state, recent messages, bot context).",
                [({}, float(memory))],
            ),
        ]

    def _collect_node(self) -> list[CollectedFamily]:
        up = time.monotonic() - self.started_at if self.started_at else 0.0
        return [
            CollectedFamily(
                "kefu_messages_total",
                "counter",
                "Messages stored, by the sender's role.",
                [({"role": r}, float(n)) for r, n in self._meter.counts().items()],
            ),
            CollectedFamily("kefu_uptime_seconds", "gauge", "Seconds since start.", [({}, up)]),
            CollectedFamily(
                "kefu_healthy",
                "gauge",
                "1 when /healthz answers ok.",
                [({}, 1.0 if self.health().status == "ok" else 0.0)],
            ),
        ]

    # -- admin: agents ----------------------------------------------------------------------

    def _agent_view(self, agent_id: str) -> AgentView:
        a = self.pool.get(agent_id)
        return AgentView(
            id=a.id,
            name=a.name,
            weight=a.weight,
            max_chats=a.max_chats,
            groups=sorted(a.groups),
            disabled=a.disabled,
            status=a.status,
            active_chats=self.pool.load(a.id),
            token_expires_ts=self._agent_exp.get(a.id),
        )

    def list_agents(self) -> AgentList:
        return AgentList(agents=[self._agent_view(a.id) for a in self.pool])

    def get_agent(self, agent_id: str) -> AgentView:
        return self._agent_view(agent_id)

    # -- the agent workbench (REST, agent token) ---------------------------------------------

    def agent_me(self, agent_id: str) -> AgentMe:
        """``GET /v1/agent/me``: the agent as the admin sees it, plus the quick replies."""
        v = self._agent_view(agent_id)
        replies = [QuickReply(title=q.title, text=q.text) for q in self.config.quick_replies]
        return AgentMe(
            id=v.id,
            name=v.name,
            weight=v.weight,
            max_chats=v.max_chats,
            groups=v.groups,
            status=v.status,
            active_chats=v.active_chats,
            quick_replies=replies,
        )

    def agent_conversations(self, agent_id: str) -> AgentConversations:
        """``GET /v1/agent/conversations``: the agent's open conversations with its read marks,
        and the first :data:`WAITING_SHOWN` of the waiting queue (those it may accept)."""
        mine = [
            c
            for c in (
                self._agent_conversation(agent_id, conv)
                for conv in self.routing.conversations_of(agent_id)
            )
            if c is not None
        ]
        waiting: list[WaitingConversation] = []
        for position, entry in enumerate(self.routing.queue, start=1):
            if len(waiting) >= WAITING_SHOWN:
                break
            found = self._waiting_conversation(entry.conv, position)
            if found is not None:
                waiting.append(found)
        return AgentConversations(conversations=mine, queue=waiting)

    async def agent_conversations_anywhere(self, agent_id: str) -> AgentConversations:
        """:meth:`agent_conversations` over the cluster: the agent's conversations and the
        cluster's queue from Redis, each described by its owner."""
        member = self.member
        if member is None:
            return self.agent_conversations(agent_id)
        held = await member.routing.conversations_of(agent_id)
        head = await member.queue_head(WAITING_SHOWN)
        return await member.describe_for_agent(agent_id, held, head)

    def _agent_conversation(self, agent_id: str, conv: int) -> AgentConversation | None:
        state = self.conversations.get(conv)
        if state is None:
            return None
        tail = self.store.tail(conv, 1)
        return AgentConversation(
            session_id=format_conv_id(conv),
            status=state.status,
            epoch=state.epoch,
            top_seq=state.top_seq,
            read_seq=min(self.store.get_read_mark(conv, f"agent:{agent_id}"), state.top_seq),
            created_ts=state.created_ms,
            updated_ts=state.last_activity_ms,
            visitor=_profile(state),
            last_message=_msg_frame(tail[-1]) if tail else None,
        )

    def _waiting_conversation(self, conv: int, position: int) -> WaitingConversation | None:
        state = self.conversations.get(conv)
        if state is None:
            return None
        return WaitingConversation(
            session_id=format_conv_id(conv),
            position=position,
            created_ts=state.created_ms,
            visitor=_profile(state),
            group=state.group,
        )

    def agent_session_stats(self, agent_id: str, session_id: str) -> SessionStats:
        """The stats of a conversation the agent may see (its own or a queued one)."""
        state = self._session(session_id)
        if not may_see(state, "agent", agent_id):
            raise Forbidden("you may not see this conversation")
        return self.session_stats(session_id)

    async def admin_stats_anywhere(self) -> AdminStats:
        """``GET /v1/admin/stats``: :meth:`admin_stats` on a single node; in a cluster, the
        figures summed over the nodes that answer, the cluster's queue and the list of nodes
        (kefu.cluster.member ``cluster_stats``)."""
        member = self.member
        if member is None:
            return self.admin_stats()
        return await member.cluster_stats(self.admin_stats())

    def admin_stats(self) -> AdminStats:
        """This node's live figures for the admin page."""
        hub = self.hub.stats()
        counts = self.conversations.counts()
        cache_hits = cache_misses = 0
        if self.bot is not None:
            cache = self.bot.cache.stats()
            cache_hits, cache_misses = int(cache["hits"]), int(cache["misses"])
        looked = cache_hits + cache_misses
        kb = self._knowledge()
        watcher = self.kb_watcher
        uptime = time.monotonic() - self.started_at if self.started_at else 0.0
        return AdminStats(
            connections={
                "visitor": hub["visitor_connections"],
                "agent": hub["agent_connections"],
            },
            conversations={
                "open": sum(counts.values()),
                **{status: counts.get(status, 0) for status in ("bot", "queued", "assigned")},
            },
            queue_length=len(self.routing.queue),
            messages_total=self.messages_total,
            cache=CacheFigures(
                hits=cache_hits,
                misses=cache_misses,
                hit_rate=round(cache_hits / looked, 4) if looked else 0.0,
            ),
            kb=KbFigures(
                version=int(kb.version) if kb is not None else None,
                entries=len(kb) if isinstance(kb, Sized) else 0,
                error=watcher.last_error if watcher is not None else None,
            ),
            uptime_s=round(uptime, 3),
        )

    def _stored_agent(self, agent_id: str) -> StoredAgent:
        a = self.pool.get(agent_id)
        return StoredAgent(
            id=a.id,
            name=a.name,
            token_hash=self._agent_hash.get(a.id),
            weight=a.weight,
            max_chats=a.max_chats,
            groups=sorted(a.groups),
            disabled=a.disabled,
            token_expires_ms=self._agent_exp.get(a.id),
            rev=self._agent_rev.get(a.id, 0),
        )

    async def create_agent(self, req: AgentCreate) -> AgentCreated:
        self._need_directory()
        if req.id in self.pool:
            raise Conflict(f"agent {req.id!r} already exists")
        token = req.token if req.token is not None else new_secret()
        token_hash = hash_token(token)
        if token_hash in self._agent_by_hash:
            raise Conflict("another agent has this token")
        try:
            self.pool.add(
                req.id, req.name, weight=req.weight, max_chats=req.max_chats, groups=req.groups
            )
        except ValueError as exc:
            raise Conflict(str(exc)) from None
        self._set_agent_hash(req.id, token_hash)
        self._set_agent_expiry(req.id, _token_expiry(req.token_ttl_days))
        self._end_sessions(req.id)  # no session of a former agent of this id comes back
        try:
            await asyncio.gather(
                self.store.put_agent(self._stored_agent(req.id)),
                self.store.put_agent_sessions(self._stored_sessions(req.id)),
            )
        except BaseException:
            self._drop_agent_hash(req.id)
            self._sessions.pop(req.id, None)
            self.pool.remove(req.id)
            raise
        await self._share_agent(req.id)
        await self._upsert_in_cluster(req.id)
        view = self._agent_view(req.id)
        self._presence_changed(req.id)
        return AgentCreated(**{f: getattr(view, f) for f in view.__struct_fields__}, token=token)

    async def _upsert_in_cluster(self, agent_id: str) -> None:
        """Cluster mode: the agent's settings into the cluster's routing (kefu.cluster)."""
        member = self.member
        if member is None or agent_id not in self.pool:
            return
        agent = self.pool.get(agent_id)
        self._run_effects(
            await member.routed(
                member.routing.upsert_agent(
                    agent_id,
                    weight=agent.weight,
                    max_chats=agent.max_chats,
                    groups=agent.groups,
                    disabled=agent.disabled,
                )
            )
        )

    # -- cluster mode: the agents an administrator makes, on every node ----------------------

    def _need_directory(self) -> None:
        """Cluster mode: an agent is changed only while the cluster's directory can take the
        change (``cluster_unavailable`` otherwise), so that no node keeps a change the others
        never learn of."""
        if self.member is not None and not self.member.link.up:
            raise ClusterUnavailable("redis is unreachable: agents cannot be changed now")

    async def _share_agent(self, agent_id: str, not_before: int | None = None) -> None:
        """Cluster mode: the agent as this node now holds it (gone: deleted) into the
        directory, then tell the other nodes. If Redis went away meanwhile the change is
        shared when it is back (:meth:`sync_agents`) and the call answers
        ``cluster_unavailable``."""
        directory = self.directory
        if directory is None or agent_id in self._config_agents:
            return
        record = self._stored_agent(agent_id) if agent_id in self.pool else None
        if not_before is None:
            not_before = self._sessions_of(agent_id).not_before
        try:
            rev = await directory.put(agent_id, record, not_before)
        except ClusterUnavailable:
            self._agent_unshared.add(agent_id)
            raise
        self._agent_unshared.discard(agent_id)
        if record is not None and agent_id in self.pool:
            self._agent_rev[agent_id] = rev
            await self.store.put_agent(msgspec.structs.replace(record, rev=rev))
        await self._tell_agent(agent_id)

    async def _share_logout(self, agent_id: str, jti: str, exp: int) -> None:
        """Cluster mode: a revoked session token into the directory, then tell the others."""
        directory = self.directory
        if directory is None:
            return
        if not await directory.revoke(agent_id, jti, exp, math.floor(time.time())):
            log.warning("agent %s: too many sessions revoked in the cluster, ending all", agent_id)
            self._end_sessions(agent_id)
            self._close_sessions(agent_id, None)
            await self.store.put_agent_sessions(self._stored_sessions(agent_id))
            await directory.end_sessions(agent_id, self._sessions_of(agent_id).not_before)
        await self._tell_agent(agent_id)

    async def _tell_agent(self, agent_id: str) -> None:
        """Tell every node now alive that ``agent_id`` changed. A node that joins after the
        read below subscribes before it reads the directory, so it misses nothing."""
        member = cast("Member", self.member)
        for other in await member.link.nodes_now():
            if other != member.node_id:
                with contextlib.suppress(ClusterUnavailable):  # it syncs when it is back
                    member.bus.emit(other, "agent", agent_id)

    async def sync_agents(self) -> None:
        """Cluster mode: bring every agent in line with the directory (at start, and when
        Redis is back): what others changed is applied here, what this node changed while
        Redis was away (or what Redis lost with its data) is written back."""
        directory = cast(AgentDirectory, self.directory)
        remote = await directory.all()
        ids = set(remote).union(a.id for a in self.pool)
        for agent_id in sorted(ids):
            await self.pull_agent(agent_id)

    async def pull_agent(self, agent_id: str) -> None:
        """Cluster mode: apply the directory's record and session ends of ``agent_id`` (an
        event from the node that changed it, or :meth:`sync_agents`)."""
        directory = self.directory
        if directory is None:
            return
        async with self._agent_pull_lock:  # one at a time: each compares revisions, then waits
            if agent_id in self._agent_unshared and agent_id not in self._config_agents:
                await self._share_agent(agent_id)
            entry, sessions = await directory.get(agent_id)
            if agent_id not in self._config_agents:
                if entry is None:
                    if agent_id in self.pool:  # Redis lost its data: write back what is here
                        await directory.restore(
                            self._stored_agent(agent_id),
                            self._agent_rev.get(agent_id, 0),
                            self._sessions_of(agent_id).not_before,
                        )
                elif entry.rev > self._agent_rev.get(agent_id, 0):
                    await self._apply_agent(agent_id, entry.rev, entry.agent)
            if agent_id in self.pool:
                await self._merge_sessions(agent_id, sessions.not_before, sessions.revoked)

    async def _apply_agent(self, agent_id: str, rev: int, record: StoredAgent | None) -> None:
        """Another node's change of an admin-made agent, here: the pool, the token, and the
        agent's connections (closed with 1008 when its token changed or it was disabled or
        removed, as on the node that made the change)."""
        if record is None or record.token_hash is None:
            if agent_id in self.pool:
                effects = self.routing.remove_agent(agent_id)
                self._drop_agent_hash(agent_id)
                self._close_agent(agent_id, "agent removed")
                self._presence_dirty.discard(agent_id)
                await asyncio.gather(self.store.delete_agent(agent_id), *self._run_effects(effects))
            self._sessions.pop(agent_id, None)
            self._agent_rev.pop(agent_id, None)
            return
        holder = self._agent_by_hash.get(record.token_hash)
        if holder is not None and holder != agent_id:
            log.warning("cluster: agent %s has agent %s's token here; skipped", agent_id, holder)
            return
        futures: list[asyncio.Future[None]] = []
        if agent_id not in self.pool:
            self.pool.add(
                agent_id,
                record.name,
                weight=record.weight,
                max_chats=record.max_chats,
                groups=record.groups,
                disabled=record.disabled,
            )
        else:
            was_disabled = self.pool.get(agent_id).disabled
            futures += self._run_effects(
                self.routing.update_agent(
                    agent_id,
                    name=record.name,
                    weight=record.weight,
                    max_chats=record.max_chats,
                    groups=record.groups,
                    disabled=record.disabled,
                )
            )
            if self._agent_hash.get(agent_id) != record.token_hash:
                self._close_agent(agent_id, "token revoked")
            elif record.disabled and not was_disabled:
                self._close_agent(agent_id, "agent disabled")
        self._set_agent_hash(agent_id, record.token_hash)
        self._set_agent_expiry(agent_id, record.token_expires_ms)
        self._agent_rev[agent_id] = rev
        futures.append(self.store.put_agent(msgspec.structs.replace(record, rev=rev)))
        await asyncio.gather(*futures)

    def _close_agent(self, agent_id: str, reason: str) -> None:
        for c in self.hub.connections(("agent", agent_id)):
            self._session_conns.pop(c.id, None)
            c.close(1008, reason)

    async def _merge_sessions(
        self, agent_id: str, not_before: int, revoked: list[tuple[str, int]]
    ) -> None:
        """The cluster's session ends of ``agent_id`` joined with this node's: the later
        ``not_before``, every revoked token; the connections they end are closed (1008)."""
        ended = self._sessions_of(agent_id)
        changed = False
        if not_before > ended.not_before:
            ended.not_before = not_before
            ended.revoked = Revocations(AGENT_REVOKED_MAX)
            self._close_sessions(agent_id, None)
            changed = True
        for jti, exp in revoked:
            if ended.revoked.is_revoked(jti):
                continue
            changed = True
            if ended.revoked.revoke(jti, exp):
                self._close_sessions(agent_id, jti)
            else:
                self._end_sessions(agent_id)
                self._close_sessions(agent_id, None)
                break
        if changed:
            await self.store.put_agent_sessions(self._stored_sessions(agent_id))

    def _check_mutable(self, agent_id: str) -> None:
        self._need_directory()
        self.pool.get(agent_id)  # UnknownAgent
        if agent_id in self._config_agents:
            raise Conflict(f"agent {agent_id!r} is declared in the config file: change it there")

    async def update_agent(self, agent_id: str, req: AgentUpdate) -> AgentView:
        self._check_mutable(agent_id)
        effects = self.routing.update_agent(
            agent_id,
            name=req.name,
            weight=req.weight,
            max_chats=req.max_chats,
            groups=req.groups,
            disabled=req.disabled,
        )
        fut = self.store.put_agent(self._stored_agent(agent_id))
        futures = self._run_effects(effects)
        self._presence_changed(agent_id)
        if req.disabled:
            self._end_sessions(agent_id)  # re-enabling brings none back
            futures.append(self.store.put_agent_sessions(self._stored_sessions(agent_id)))
            for c in self.hub.connections(("agent", agent_id)):
                self._session_conns.pop(c.id, None)
                c.close(1008, "agent disabled")
        await asyncio.gather(fut, *futures)
        await self._share_agent(agent_id)
        await self._upsert_in_cluster(agent_id)
        return self._agent_view(agent_id)

    async def rotate_agent_token(self, agent_id: str, req: AgentTokenRequest) -> AgentToken:
        """A new token for ``agent_id``: the old one stops working at once, and the agent's
        open connections (all opened with the old token) are closed with 1008.

        The new record is written first and the switch made once it is durable: a failed
        write changes nothing, and no restart can bring back a token this call answered as
        revoked."""
        self._check_mutable(agent_id)
        token = req.token if req.token is not None else new_secret()
        token_hash = hash_token(token)
        if self._agent_by_hash.get(token_hash, agent_id) != agent_id:
            raise Conflict("another agent has this token")
        expires = _token_expiry(req.token_ttl_days)
        record = msgspec.structs.replace(
            self._stored_agent(agent_id), token_hash=token_hash, token_expires_ms=expires
        )
        # The sessions end at once, whatever the write below does: ending them is safe.
        self._end_sessions(agent_id)
        await asyncio.gather(
            self.store.put_agent(record),
            self.store.put_agent_sessions(self._stored_sessions(agent_id)),
        )
        if agent_id not in self.pool:
            raise NotFound("the agent was deleted meanwhile")
        self._set_agent_hash(agent_id, token_hash)
        self._set_agent_expiry(agent_id, expires)
        for c in self.hub.connections(("agent", agent_id)):
            self._session_conns.pop(c.id, None)
            c.close(1008, "token revoked")
        await self._share_agent(agent_id)
        return AgentToken(id=agent_id, token=token, token_expires_ts=expires)

    async def delete_agent(self, agent_id: str) -> None:
        self._check_mutable(agent_id)
        effects = self.routing.remove_agent(agent_id)
        self._drop_agent_hash(agent_id)
        # The sessions record stays (module doc): a new agent of this id gets none back.
        self._end_sessions(agent_id)
        ended = self.store.put_agent_sessions(self._stored_sessions(agent_id))
        not_before = self._sessions_of(agent_id).not_before
        self._sessions.pop(agent_id, None)
        fut = self.store.delete_agent(agent_id)
        futures = [ended, *self._run_effects(effects)]
        for c in self.hub.connections(("agent", agent_id)):
            self._session_conns.pop(c.id, None)
            c.close(1008, "agent removed")
        self._presence_dirty.discard(agent_id)
        await asyncio.gather(fut, *futures)
        self._agent_rev.pop(agent_id, None)
        await self._share_agent(agent_id, not_before)
        if self.member is not None:
            self._run_effects(await self.member.routed(self.member.routing.remove_agent(agent_id)))

    # -- FrameHandler -----------------------------------------------------------------------

    async def authenticate(self, conn: Connection, hello: Hello) -> Welcome:
        # The agent's own token (one hash lookup), then a visitor token, then an agent session
        # token: visitors are the many, so theirs is verified before trying a session's.
        token = hello.token
        agent_id = self.agent_of_own_token(token)
        found = None if agent_id is not None else self.visitor_of_token(token)
        if agent_id is None and found is None:
            session = self.agent_session(token)
            agent_id = None if session is None else session.sub
        if agent_id is not None:
            if self.member is None:
                convs = [self._conv_state(c) for c in self.routing.conversations_of(agent_id)]
            else:
                convs = await self._cluster_agent_convs(conn, agent_id)
            return Welcome(
                role="agent",
                id=agent_id,
                convs=[c for c in convs if c is not None],
                ping_interval_ms=0,
                max_msg_bytes=0,
            )
        if found is None:
            raise AuthError("bad token")
        visitor_id, conv_hex = found
        conv = parse_conv_id(conv_hex)
        member = self.member
        if member is not None and not member.is_local(conv):
            # Owned by another node: the welcome carries its state as the owner sees it.
            try:
                remote = await member.describe(conv, conv_hex, "visitor", visitor_id)
            except ClusterUnavailable as exc:
                raise TryAgainLater(f"the conversation is not reachable now: {exc}") from None
            except KefuError as exc:
                raise AuthError(f"the conversation is not available: {exc}") from None
            self._welcomed[conn] = {conv: (remote.epoch, remote.top_seq)}
            return Welcome(
                role="visitor",
                id=visitor_id,
                convs=[remote],
                ping_interval_ms=0,
                max_msg_bytes=0,
            )
        cs = self._conv_state(conv)
        return Welcome(
            role="visitor",
            id=visitor_id,
            convs=[] if cs is None else [cs],
            ping_interval_ms=0,
            max_msg_bytes=0,
        )

    async def _cluster_agent_convs(self, conn: Connection, agent_id: str) -> list[ConvState | None]:
        """The agent's conversations in the cluster: states from their owners (local ones
        here); the remote ones are followed from ``on_ready``."""
        member = cast("Member", self.member)
        try:
            held = await member.routing.conversations_of(agent_id)
        except KefuError as exc:
            raise TryAgainLater(f"the cluster is not reachable now: {exc}") from None
        convs: list[ConvState | None] = []
        remote: list[int] = []
        for conv in held:
            if member.is_local(conv):
                convs.append(self._conv_state(conv))
            else:
                remote.append(conv)
        welcomed: dict[int, tuple[int, int]] = {}
        for conv in remote[:MAX_REMOTE_WELCOME]:
            try:
                described = await member.describe(conv, format_conv_id(conv), "agent", agent_id)
            except KefuError:
                continue  # its owner is away: the agent sees it again once it is back
            convs.append(described)
            welcomed[conv] = (described.epoch, described.top_seq)
        self._agent_remote[conn] = remote
        self._welcomed[conn] = welcomed
        return convs

    async def on_ready(self, conn: Connection, hello: Hello) -> None:
        # No await from here to the registration: see "Resume" in the module doc.
        role, principal = conn.role, conn.principal
        if role is None or principal is None:
            return
        for point in hello.resume or ():
            if self.member is not None and _remote_conv_hex(self.member, point.conv) is not None:
                continue  # its owner replays it (below)
            try:
                state = self._visible(point.conv, role, principal)
            except KefuError as exc:
                conn.send(Error(code=exc.code, message=str(exc), ref="hello"))
                continue
            self._resume(conn, state, point.epoch, point.last_seq)
        member = self.member
        remote: list[tuple[int, str, int | None, int]] = []
        if member is not None:
            remote = [
                (conv, point.conv, point.epoch, point.last_seq)
                for point, conv in _remote_points(member, hello.resume or ())
            ]
        resumed_by_client = {r[0] for r in remote}
        first = self.hub.register(conn, (role, principal))
        welcomed = self._welcomed.pop(conn, {})
        if role == "visitor":
            # Where the visitor stands: a `queued` or `assigned` sent before this connection
            # existed (a page opened after the create call, a reload) would otherwise be lost.
            found = self.visitor_of_token(hello.token)
            for cs in [] if found is None else [parse_conv_id(found[1])]:
                current = self.conversations.get(cs)
                if current is not None:
                    self._visitor_status(conn, current)
                elif (
                    member is not None
                    and not member.is_local(cs)
                    and not any(r[0] == cs for r in remote)
                ):
                    remote.append(_follow_point(cs, welcomed))
        if role == "agent":
            self._track_session(conn, hello.token)
            if member is None:
                for a in self.pool:
                    conn.send(Presence(agent=self._presence_of(a.id)))
            if first:
                self._run_effects(self.routing.agent_connected(principal))
                self._presence_changed(principal)
            if member is not None:
                member.report_agent(principal)
                for conv in self._agent_remote.pop(conn, ()):
                    if not any(r[0] == conv for r in remote):
                        remote.append(_follow_point(conv, welcomed))
        if remote and member is not None:
            # The remote conversations' frames wait for their owner's replay (kefu.cluster).
            quiet = set(welcomed).difference(resumed_by_client)
            await member.attach(conn, (role, principal), remote, quiet=quiet)
        if role == "agent" and member is not None:
            try:
                await member.send_presence(conn, [a.id for a in self.pool])
            except KefuError as exc:
                log.warning("agent %s: presence not sent: %s", principal, exc)

    def _visitor_status(self, conn: Connection, current: ConversationState) -> None:
        """``queued {position}`` or ``assigned`` to a visitor's new connection."""
        conv_hex = format_conv_id(current.id)
        if current.status == "queued":
            position = (
                self.routing.queue.position(current.id)
                if self.member is None
                else self.member.positions.get(current.id)
            )
            if position is not None:
                conn.send(Queued(conv=conv_hex, position=position))
        elif current.status == "assigned" and current.agent_id is not None:
            ref = AgentRef(id=current.agent_id, name=self._agent_name(current.agent_id))
            conn.send(Assigned(conv=conv_hex, agent=ref, epoch=current.epoch))

    def _agent_name(self, agent_id: str) -> str:
        """The agent's display name; its id for an agent this node does not know (one an
        administrator created on another node of the cluster)."""
        return self.pool.get(agent_id).name if agent_id in self.pool else agent_id

    async def on_frame(self, conn: Connection, frame: ClientFrame) -> None:
        key = self.hub.key_of(conn)
        if key is None:
            return
        member = self.member
        if member is not None:
            conv = _remote_conv(member, frame)
            if conv is not None:
                await member.forward(conn, key, frame, conv)
                return
        await self.handle_frame(conn, key, frame)

    async def handle_frame(self, conn: Connection, key: Principal, frame: ClientFrame) -> None:
        """Run one command of ``key`` (from a local connection, or one on another node of the
        cluster), its error reported to ``conn``."""
        try:
            await self._dispatch(conn, key, frame)
        except KefuError as exc:
            ref = frame.client_msg_id if isinstance(frame, Send) else frame_tag(frame)
            conn.send(Error(code=exc.code, message=str(exc), ref=ref))

    def on_unwelcomed(self, conn: Connection) -> None:
        """``authenticate`` answered for ``conn`` but it is not welcomed (kefu.web.ws): drop
        what authenticate kept for its on_ready."""
        self._agent_remote.pop(conn, None)
        self._welcomed.pop(conn, None)

    def on_close(self, conn: Connection) -> None:
        self._session_conns.pop(conn.id, None)
        self._agent_remote.pop(conn, None)
        self._welcomed.pop(conn, None)
        if self.member is not None:
            self.member.forget(conn)
        gone = self.hub.unregister(conn)
        if gone is None:
            return
        key, last = gone
        if last and key[0] == "agent" and key[1] in self.pool:
            try:
                self._run_effects(self.routing.agent_disconnected(key[1], _now_ms()))
            except KefuError:
                log.exception("agent %s: disconnect bookkeeping failed", key[1])
            self._presence_changed(key[1])
            if self.member is not None:
                self.member.report_agent(key[1])

    # -- frames -----------------------------------------------------------------------------

    async def _dispatch(self, conn: Connection, key: Principal, frame: ClientFrame) -> None:
        role, principal = key
        if isinstance(frame, Send):
            state = self._visible(frame.conv, role, principal)
            to_bot = role == "visitor" and state.status == "bot" and self.bot is not None
            _seq, _ts, dup = await self._post(state, key, frame.text, frame.client_msg_id, conn)
            if to_bot and not dup:
                self._spawn_bot_turn(state, frame.text)
        elif isinstance(frame, Sync):
            state = self._visible(frame.conv, role, principal)
            messages, more = self.store.history(state.id, frame.after, frame.limit)
            conn.send(
                History(
                    conv=frame.conv,
                    epoch=state.epoch,
                    messages=[_msg_frame(m) for m in messages],
                    more=more,
                )
            )
        elif isinstance(frame, Typing):
            state = self._visible(frame.conv, role, principal)
            if state.status != "closed":
                self.conversations.touch(state.id, _now_ms())
            self._fan_out(state, TypingRelay(conv=frame.conv, from_=self._sender(key)), key)
        elif isinstance(frame, Read):
            state = self._visible(frame.conv, role, principal)
            seq = min(frame.seq, state.top_seq)
            fut = self.store.put_read_mark(state.id, f"{role}:{principal}", seq)
            self._fan_out(state, ReadRelay(conv=frame.conv, seq=seq, from_=self._sender(key)), key)
            await fut
        elif isinstance(frame, Close):
            state = self._visible(frame.conv, role, principal)
            if role == "agent" and state.agent_id != principal:
                raise Forbidden("only the agent holding the conversation may close it")
            if state.status == "closed":
                conn.send(
                    Closed(
                        conv=frame.conv,
                        by=cast("ClosedBy", state.closed_by or role),
                        reason=state.closed_reason or "closed",
                    )
                )
                return
            await asyncio.gather(*self._end(state, role, role, _now_ms()))
        elif isinstance(frame, Status):
            if role != "agent":
                raise Forbidden("only agents have a status")
            self._run_effects(self.routing.agent_status(principal, frame.status, frame.max_chats))
            self._presence_changed(principal)
            if self.member is not None:
                # The answer means the cluster's routing knows it (kefu.cluster).
                await self.member.report_agent(principal)
            conn.send(StatusFrame(status=frame.status, max_chats=frame.max_chats))
        elif isinstance(frame, Accept):
            if role != "agent":
                raise Forbidden("only agents accept conversations")
            state = self._visible(frame.conv, role, principal)
            self.conversations.check(state.id, "accept")
            conv = state.id
            effects = await self._decide(
                lambda: self.routing.accept(conv, principal), lambda r: r.accept(conv, principal)
            )
            await asyncio.gather(*self._run_effects(effects))
        elif isinstance(frame, Transfer):
            if role != "agent":
                raise Forbidden("only agents transfer conversations")
            state = self._visible(frame.conv, role, principal)
            if state.agent_id != principal:
                raise Forbidden("only the agent holding the conversation may transfer it")
            self.conversations.check(state.id, "transfer")
            conv, to_agent, to_group = state.id, frame.to_agent, frame.to_group
            effects = await self._decide(
                lambda: self.routing.transfer(
                    conv, principal, to_agent=to_agent, to_group=to_group
                ),
                lambda r: r.transfer(conv, principal, to_agent=to_agent, to_group=to_group),
            )
            to = frame.to_agent if frame.to_agent is not None else frame.to_group
            futures = self._run_effects(effects, transferred_to=to)
            await asyncio.gather(*futures)
        else:
            raise Unsupported(f"{frame_tag(frame)} is not supported")

    async def _post(
        self,
        state: ConversationState,
        key: Principal,
        text: str,
        client_msg_id: str | None,
        conn: Connection | None = None,
    ) -> tuple[int, int, bool]:
        """Store one message and deliver it: ``(seq, ts, dup)`` once durable (module doc)."""
        t0 = time.perf_counter_ns()
        role, principal = key
        store = self.store
        if not may_write(state, role, principal):
            if state.status == "closed":
                self.conversations.check(state.id, "send")  # conversation_closed
            raise Forbidden("you may not write in this conversation")
        conv = state.id
        if client_msg_id is not None and self._dedup:
            dup = store.get_dedup(conv, client_msg_id)
            if dup is not None:
                await store.barrier()
                ts = 0
                found, _ = store.history(conv, dup - 1, 1)
                if found and found[0].seq == dup:
                    ts = found[0].ts
                self.duplicates_total += 1
                self._m_dups.inc()
                if conn is not None:
                    conn.send(_ack(state, client_msg_id, dup, ts, True))
                return dup, ts, True
        self._charge(state.id, time.perf_counter_ns() - t0)
        msg = await self._append(state, self._sender(key), text, client_msg_id, conn=conn)
        return msg.seq, msg.ts, False

    async def _append(
        self,
        state: ConversationState,
        sender: Sender,
        text: str,
        client_msg_id: str | None = None,
        meta: dict[str, object] | None = None,
        *,
        conn: Connection | None = None,
    ) -> Msg:
        """Take the next seq, store the message, then ack ``conn`` and deliver it."""
        t0 = time.perf_counter_ns()
        msg = self._stored(state, sender, text, client_msg_id, meta)
        # Delivered from the store's callback, not after this await: writes are answered in
        # order, and so deliveries stay in seq order whichever path took each send.
        landing = _Landing(self, state, msg, conn, time.perf_counter_ns() - t0)
        waiter: asyncio.Future[Msg] = asyncio.get_running_loop().create_future()
        landing.waiter = waiter
        try:
            # The record is not rewritten: recovery reads top_seq and the last activity from
            # the last message (Store.recover), which halves the keys written per message.
            self.store.append_message_then(msg, landing)
        except BaseException:
            state.top_seq -= 1  # nothing was enqueued: give the seq back (no await since)
            landing.grounded()
            raise
        return await waiter

    def on_send_nowait(self, conn: Connection, frame: Send) -> bool:
        """The WebSocket fast path (kefu.web.ws, "Sends without a task"): a ``send`` that needs
        nothing awaited before its write is stored here, and ``Node._land`` acks and delivers
        it from the store's completion callback. Anything else (an error to report, a
        duplicate, a bot to ask, a conversation not open here) returns False and takes
        ``on_frame``'s path, which answers it as ever.

        What ``_visible``, ``may_write`` and ``_stored`` decide for a ``send``, inline: this
        runs for every message, and those calls were a tenth of it (``bench.bench_node
        --pair``: 0.919)."""
        key = self.hub.key_of(conn)
        if key is None:
            return False
        t0 = time.perf_counter_ns()
        role, principal = key
        # ``Send`` checked frame.conv (16 lowercase hex digits): parse_conv_id's answer, without
        # its pattern. Only an open conversation takes a message (take_seq's test).
        state = self.conversations.open_state(int(frame.conv, 16))
        if state is None:
            return False
        # may_see and may_write for an open conversation: a visitor's own; an agent's while it
        # holds it. A visitor's message in the bot's hands goes to the bot (on_frame).
        if role == "visitor":
            if state.visitor_id != principal or (state.status == "bot" and self.bot is not None):
                return False
            name = "visitor"
        elif role == "agent":
            if state.status != "assigned" or state.agent_id != principal:
                return False
            name = self._agent_name(principal)
        else:
            return False
        conv = state.id
        client_msg_id = frame.client_msg_id
        store: Store = self._store  # type: ignore[assignment]  # started: it takes frames
        if (
            client_msg_id is not None
            and self._dedup
            and store.get_dedup(conv, client_msg_id) is not None
        ):
            return False
        now = _now_ms()
        try:
            seq = self.conversations.take_seq(conv, now)
        except KefuError:
            return False
        msg = StoredMessage(
            conv=conv,
            seq=seq,
            epoch=state.epoch,
            id=self._message_id(),
            client_msg_id=client_msg_id,
            from_role=role,
            from_id=principal,
            from_name=name,
            text=frame.text,
            ts=now,
            meta=None,
        )
        # In flight from here: a full batch is written, and ``done`` called, inside the append.
        landing = _Landing(self, state, msg, conn, time.perf_counter_ns() - t0)
        try:
            store.append_message_then(msg, landing)
        except BaseException:
            state.top_seq -= 1  # nothing was enqueued: give the seq back
            landing.grounded()
            raise
        return True

    def _stored(
        self,
        state: ConversationState,
        sender: Sender,
        text: str,
        client_msg_id: str | None,
        meta: dict[str, object] | None,
    ) -> StoredMessage:
        """The next message of ``state``: its seq taken, the conversation touched."""
        conv = state.id
        now = _now_ms()
        seq = self.conversations.take_seq(conv, now)
        return StoredMessage(
            conv=conv,
            seq=seq,
            epoch=state.epoch,
            id=self._message_id(),
            client_msg_id=client_msg_id,
            from_role=sender.role,
            from_id=sender.id,
            from_name=sender.name,
            text=text,
            ts=now,
            meta=meta,
        )

    def _flush_writes(self) -> None:
        """A group commit's acks and deliveries go out now, not a loop turn later."""
        if self.ws is not None:
            self.ws.flush_writes()

    def _landed(self, conv: int, seq: int) -> None:
        """``seq``'s write was answered: later resumes may replay it. Writes of a conversation
        are answered in seq order (one FIFO group commit). ``_land`` does the same inline."""
        flight = self._inflight.get(conv)
        if flight is None:
            return
        flight[1] -= 1
        if flight[1] <= 0:
            del self._inflight[conv]
        else:
            flight[0] = max(flight[0], seq + 1)

    def _land(self, run: list[_Landing]) -> None:
        """Writes answered, in seq order within each conversation: a group commit's run of
        them (``GroupCommitWriter.set_batch_handler``), or one. Each message is counted and
        stops being in flight, its sender is acked and it is delivered to every participant
        (no await between the write's answer and the fan-out, module doc "Resume"); then the
        send taken by ``on_send_nowait`` is done, or ``_append``'s waiter woken. One loop for
        the run: a call and its lookups a message fewer than a callback each (5 % of a
        message's Python in ``bench.bench_node --pair``). Its measures are two calls a message
        (``kefu._core.meters.MessageMeter``)."""
        meter = self._meter
        meter.start_run()
        hub = self.hub
        remember = hub.rings.remember  # Hub.remember, a call less a message
        clustered = self.member is not None
        inflight = self._inflight
        for landing in run:
            msg = landing.msg
            conv_id = msg.conv
            seq = msg.seq
            conn = landing.conn
            waiter = landing.waiter
            try:
                # _landed, inline: no longer in flight.
                flight = inflight.get(conv_id)
                if flight is not None:
                    flight[1] -= 1
                    if flight[1] <= 0:
                        del inflight[conv_id]
                    elif flight[0] <= seq:
                        flight[0] = seq + 1
                received = landing.received
                meter.persisted(landing.w0, received, msg.from_role)
                # The ack made here and written without Connection.send's checks. The conv id
                # as the wire spells it (format_conv_id's spelling; a stored id is valid) and
                # the visitor's sender are made once a conversation: the frames kept in its
                # ring share them (a quarter of a kept message's memory).
                state = landing.state
                conv = state.wire_id
                if conv is None:
                    conv = state.wire_id = f"{conv_id:016x}"
                cmid = msg.client_msg_id
                if conn is not None and cmid is not None:
                    ack = Ack(conv=conv, client_msg_id=cmid, seq=seq, ts=msg.ts, dup=False)
                    conn.send_encoded(
                        encode_msgpack(ack) if conn.msgpack else encode_json(ack), "ack"
                    )
                if (
                    msg.from_role == "visitor"
                    and msg.from_id == state.visitor_id
                    and msg.from_name == "visitor"
                ):
                    sender = state.visitor_sender
                    if sender is None:
                        sender = state.visitor_sender = Sender(
                            role="visitor", id=state.visitor_id, name="visitor"
                        )
                else:
                    sender = Sender(role=msg.from_role, id=msg.from_id, name=msg.from_name)  # type: ignore[arg-type]
                out = Msg(  # _msg_frame, inline
                    conv=conv,
                    seq=seq,
                    epoch=msg.epoch,
                    id=msg.id,
                    client_msg_id=cmid,
                    from_=sender,
                    text=msg.text,
                    ts=msg.ts,
                    meta=msg.meta,
                )
                remember(conv_id, out, seq)
                if clustered:
                    self._fan_out(state, out)
                else:
                    hub.send_pair(state.visitor_id, state.agent_id, out, "msg")
                meter.delivered(conv_id, received, landing.t_sync)
            except Exception as exc:
                if waiter is not None and not waiter.done():
                    waiter.set_exception(exc)
                else:
                    log.exception("conn %s: delivering seq %d failed", conn and conn.id, msg.seq)
            else:
                if waiter is not None and not waiter.done():
                    waiter.set_result(out)
            finally:
                if waiter is None:
                    conn.frame_done()  # type: ignore[union-attr]  # set on this path

    def _message_id(self) -> str:
        """A message id unique across nodes and restarts: 64 random bits drawn at start, then
        a counter (32 hex digits, as a UUID's; a quarter of ``uuid4``'s cost per message)."""
        self._id_counter += 1
        return f"{self._id_prefix}{self._id_counter:016x}"

    # -- helpers ----------------------------------------------------------------------------

    def _conv_state(self, conv: int) -> ConvState | None:
        state = self._state(conv)
        if state is None:
            return None
        return ConvState(
            conv=format_conv_id(conv), epoch=state.epoch, top_seq=state.top_seq, status=state.status
        )

    def _state(self, conv: int) -> ConversationState | None:
        state = self.conversations.get(conv)
        if state is None:
            stored = self.store.get_conversation(conv)
            if stored is None:
                return None
            state = ConversationState.from_stored(stored)
            state.top_seq = max(state.top_seq, self.store.top_seq(conv))
        return state

    def _session(self, session_id: str) -> ConversationState:
        """The conversation named by a REST ``session_id`` (``not_found`` when none)."""
        try:
            conv = parse_conv_id(session_id)
        except ValueError:
            raise NotFound("no such session") from None
        state = self._state(conv)
        if state is None:
            raise NotFound("no such session")
        return state

    def _visible(self, conv_hex: str, role: str, principal: str) -> ConversationState:
        try:
            conv = parse_conv_id(conv_hex)
        except ValueError:
            raise Forbidden("no such conversation") from None
        state = self._state(conv)
        if state is None or not may_see(state, role, principal):
            raise Forbidden("you may not see this conversation")
        return state

    def _sender(self, key: Principal) -> Sender:
        role, principal = key
        if role == "agent":
            return Sender(role="agent", id=principal, name=self._agent_name(principal))
        return Sender(role="visitor", id=principal, name="visitor")

    def _participants(self, state: ConversationState) -> list[Principal]:
        keys: list[Principal] = [("visitor", state.visitor_id)]
        if state.agent_id is not None:
            keys.append(("agent", state.agent_id))
        return keys

    def _fan_out(
        self, state: ConversationState, frame: object, skip: Principal | None = None
    ) -> None:
        # _participants and, alone, _to's hub.send, inline: this runs for every message.
        keys: list[Principal] = [("visitor", state.visitor_id)]
        if state.agent_id is not None:
            keys.append(("agent", state.agent_id))
        if self.member is None:
            self.hub.send(keys, frame, skip)
        else:
            self._to(state, keys, frame, skip)

    def _to(
        self,
        state: ConversationState,
        keys: list[Principal],
        frame: object,
        skip: Principal | None = None,
    ) -> None:
        """``frame`` to the connections of ``keys`` here and on the nodes that follow
        ``state`` (kefu.cluster)."""
        member = self.member
        if member is None:
            self.hub.send(keys, frame, skip)
            return
        encoded = Encoded(frame)
        self.hub.send(keys, encoded, skip)
        member.fan_out(state.id, keys, encoded, skip, self._participants(state))

    def _followed(self, state: ConversationState) -> bool:
        """Whether another node follows ``state`` (kefu.cluster)."""
        return self.member is not None and self.member.followed(state.id)

    def _read_missed(self, conv: int) -> Callable[[int, int], list[Msg]]:
        def read(last_seq: int, count: int) -> list[Msg]:
            messages, _ = self.store.history(conv, last_seq, count)
            return [_msg_frame(m) for m in messages]

        return read

    def _resume(self, conn: Connection, state: ConversationState, epoch: int, last: int) -> None:
        conv_hex = format_conv_id(state.id)
        missed = state.top_seq - last
        if epoch != state.epoch or missed < 0 or missed > RESUME_MAX:
            conn.send(Resumed(conv=conv_hex, recovered=False))
            return
        to_seq = last
        # Up to the last message delivered live: one still in flight reaches this connection
        # live once its write is answered (module doc, "Resume").
        flight = self._inflight.get(state.id)
        replay = (flight[0] - 1 if flight is not None else state.top_seq) - last
        if replay > 0:
            for m in self.hub.missed(state.id, last, replay, self._read_missed(state.id)):
                conn.send(m)
                to_seq = m.seq
        conn.send(Resumed(conv=conv_hex, from_seq=last + 1, to_seq=to_seq))

    def _apply_states(self, effects: list[Effect]) -> list[asyncio.Future[None]]:
        """Move the conversations with routing's effects and enqueue their records."""
        futures: list[asyncio.Future[None]] = []
        for effect in effects:
            if self.member is None:
                state = self.conversations.apply(effect)
            else:
                try:
                    state = self.conversations.apply(effect)
                except KefuError as exc:
                    # A decision that crossed this conversation's end on its way here: the
                    # cluster's routing takes the slot back.
                    log.warning("routing effect %s not applied: %s", effect, exc)
                    if isinstance(effect, Assign):
                        self.member.apply_later(self.member.routing.release(effect.conv), "release")
                    continue
            if state is not None:
                try:
                    futures.append(self.store.put_conversation(state.to_stored()))
                except StoreError:
                    log.exception("conversation %x: record not stored", state.id)
        return futures

    def _run_effects(
        self, effects: list[Effect], *, transferred_to: str | None = None
    ) -> list[asyncio.Future[None]]:
        """Apply routing's effects: states, records (enqueued, not awaited), frames."""
        futures = self._apply_states(effects)
        for fut in futures:
            fut.add_done_callback(_log_failure)
        self._notify(effects, transferred_to)
        return futures

    def _notify(self, effects: list[Effect], transferred_to: str | None = None) -> None:
        for effect in effects:
            state = self.conversations.get(effect.conv)
            if state is None:
                continue
            conv_hex = format_conv_id(effect.conv)
            visitor: list[Principal] = [("visitor", state.visitor_id)]
            if isinstance(effect, Assign):
                self._presence_changed(effect.agent_id)
                ref = AgentRef(id=effect.agent_id, name=self._agent_name(effect.agent_id))
                self._to(state, visitor, Assigned(conv=conv_hex, agent=ref, epoch=state.epoch))
                agent_key = ("agent", effect.agent_id)
                if not self.hub.is_connected(agent_key) and not self._followed(state):
                    continue
                recent = [_msg_frame(m) for m in self.store.tail(effect.conv, ASSIGNED_RECENT)]
                assigned = Assigned(
                    conv=conv_hex,
                    agent=ref,
                    visitor=_profile(state),
                    messages=recent,
                    epoch=state.epoch,
                )
                self._to(state, [agent_key], assigned)
            elif isinstance(effect, (Queue, PositionChanged)):
                self._to(state, visitor, Queued(conv=conv_hex, position=effect.position))
            elif isinstance(effect, Unassign):
                self._presence_changed(effect.agent_id)
                to = transferred_to if transferred_to is not None else (state.agent_id or "")
                self._to(state, [("agent", effect.agent_id)], Transferred(conv=conv_hex, to=to))
            elif isinstance(effect, Requeue):
                self._presence_changed(effect.agent_id)

    # -- presence ---------------------------------------------------------------------------

    def _presence_of(self, agent_id: str) -> AgentPresence:
        a = self.pool.get(agent_id)
        status = a.status if a.connections > 0 and not a.disabled else "offline"
        return AgentPresence(id=a.id, status=status, active_chats=self.pool.load(a.id))

    def _presence_changed(self, agent_id: str) -> None:
        """Announce ``agent_id``'s presence to every agent, once per loop turn (module doc)."""
        if agent_id not in self.pool:
            return  # an agent of another node of the cluster: that node announces it
        self._presence_dirty.add(agent_id)
        if not self._presence_scheduled and self._loop is not None:
            self._presence_scheduled = True
            self._loop.call_soon(self._flush_presence)

    def _flush_presence(self) -> None:
        self._presence_scheduled = False
        dirty, self._presence_dirty = self._presence_dirty, set()
        if self.member is not None:
            self.member.presence_changed([a for a in dirty if a in self.pool])
            return
        self.hub.send_role(
            "agent",
            [Presence(agent=self._presence_of(a)) for a in dirty if a in self.pool],
        )


def _token_expiry(ttl_days: int | None) -> int | None:
    """When a token given now for ``ttl_days`` days expires (ms), None for no expiry."""
    return None if ttl_days is None else _now_ms() + ttl_days * 86_400_000


def _profile(state: ConversationState) -> VisitorProfile:
    """What an agent is told about the visitor (``name`` apart, string metadata only)."""
    name = state.metadata.get("name")
    meta = {k: v for k, v in state.metadata.items() if k != "name" and isinstance(v, str)}
    return VisitorProfile(
        id=state.visitor_id,
        name=name if isinstance(name, str) else None,
        user_id=state.user_id,
        metadata=meta or None,
    )


def _land_run(run: list[_Landing]) -> None:
    """The group commit's handler of a run of landings (``Node.start``): ``Node._land``,
    looked up per run, not bound once (a version installed later, as ``bench.bench_node
    --pair`` does, takes effect)."""
    run[0].node._land(run)


class _Landing:
    """One message between its write and its delivery (``Node._append``, ``on_send_nowait``).

    Created when the write is enqueued: the message counts as in flight (``Node._inflight``)
    until ``Node._land`` delivers it, so a resume meanwhile replays only what is before it.
    The store's completion for the write: the group commit hands a run of them to
    ``Node._land``, a failure calls each.
    """

    __slots__ = ("conn", "msg", "node", "received", "state", "t_sync", "w0", "waiter")

    def __init__(
        self,
        node: Node,
        state: ConversationState,
        msg: StoredMessage,
        conn: Connection | None,
        t_sync: int,
    ) -> None:
        self.node = node
        self.state = state
        self.msg = msg
        self.conn = conn
        self.t_sync = t_sync
        self.received = conn.received_ns if conn is not None else 0
        self.w0 = time.perf_counter()
        #: ``_append``'s future; None: a send taken by ``on_send_nowait``.
        self.waiter: asyncio.Future[Msg] | None = None
        flight = node._inflight.get(msg.conv)
        if flight is None:
            node._inflight[msg.conv] = [msg.seq, 1]
        else:
            flight[1] += 1

    def grounded(self) -> None:
        """The write was never enqueued: no longer in flight, and nothing landed."""
        inflight = self.node._inflight
        flight = inflight.get(self.msg.conv)
        if flight is not None:
            flight[1] -= 1
            if flight[1] <= 0:
                del inflight[self.msg.conv]

    def __call__(self, exc: BaseException | None) -> None:
        """The store's answer for this write alone (``Done``): its failure, or a success
        outside a run of them (``Node._land`` answers those, the group commit's handler)."""
        if exc is None:
            self.node._land([self])
            return
        node = self.node
        msg = self.msg
        node._landed(msg.conv, msg.seq)
        waiter = self.waiter
        if waiter is not None:
            if waiter.done():  # the sender was cancelled; the write failed all the same
                log.error("a cancelled send's write failed: %r", exc)
            else:
                waiter.set_exception(exc)
            return
        conn: Connection = self.conn  # type: ignore[assignment]  # set on this path
        try:
            if isinstance(exc, KefuError):
                conn.send(Error(code=exc.code, message=str(exc), ref=msg.client_msg_id))
            else:
                log.error("conn %s: a send's write failed: %r", conn.id, exc)
                conn.send(Error(code="internal", message="internal error", ref="send"))
        finally:
            conn.frame_done()


def _ack(state: ConversationState, client_msg_id: str, seq: int, ts: int, dup: bool) -> Ack:
    conv = f"{state.id:016x}"  # format_conv_id's spelling; a state's id is a valid one
    return Ack(conv=conv, client_msg_id=client_msg_id, seq=seq, ts=ts, dup=dup)


# Component stats keys that are counters though their names do not end in ``_total``.
_STORE_COUNTERS: Final = frozenset(
    {"batches_written", "messages_written", "ops_written", "syncs", "busy_rejections"}
)
_WS_COUNTERS: Final = frozenset(
    {
        "connections_total",
        "slow_consumer_closes",
        "rate_limit_closes",
        "hello_timeouts",
        "pong_timeouts",
        "auth_failures",
        "write_batches",
        "write_batched_frames",
        "busy_polls",
        "refused",
        "frames_in",
        "frames_out",
        "errors",
        "closes_sent",
    }
)
# Nested dicts of ws.stats(): the label their keys become.
_WS_LABELS: Final = {
    "refused": "reason",
    "frames_in": "type",
    "frames_out": "type",
    "errors": "code",
    "closes_sent": "code",
}


def _metric_name(prefix: str, key: str) -> str:
    name = "".join(c if c.isalnum() else "_" for c in key.lower())
    return f"{prefix}_{name}"


#: Labels of the nested figures of ``Limits.stats()``.
_LIMIT_LABELS: Final = {
    "tracked": "map",
    "evictions_total": "map",
    "connection_keys": "map",
    "refused_total": "limit",
}


def _families(
    prefix: str,
    stats: Mapping[str, object],
    counters: frozenset[str] = frozenset(),
    labels: Mapping[str, str] | None = None,
) -> list[CollectedFamily]:
    """A component's ``stats()`` as metric families: keys ending in ``_total`` and those in
    ``counters`` are counters (named ``..._total``), the rest gauges; a nested dict becomes one
    family labelled by ``labels[key]``."""
    out: list[CollectedFamily] = []
    for key, value in stats.items():
        counter = key.endswith("_total") or key in counters
        name = _metric_name(prefix, key)
        if counter and not name.endswith("_total"):
            name += "_total"
        kind: Literal["counter", "gauge"] = "counter" if counter else "gauge"
        help_text = f"{prefix.removeprefix('kefu_')} {key.replace('_', ' ')}"
        if isinstance(value, dict):
            label = (labels or {}).get(key, "key")
            samples = [({label: str(k)}, float(v)) for k, v in value.items()]
            out.append(CollectedFamily(name, kind, help_text, samples))
        elif isinstance(value, (int, float)):
            out.append(CollectedFamily(name, kind, help_text, [({}, float(value))]))
    return out


# What an open conversation's state costs in memory besides its metadata: the
# ConversationState struct with its strings and its entries in the indexes (tracemalloc over
# 10,000 conversations, CPython 3.11: 356 bytes each).
_STATE_BYTES: Final = 360


def _remote_conv_hex(member: Member, conv_hex: str) -> int | None:
    """The id of ``conv_hex`` when another node of the cluster owns it, else None (local, or
    not an id: the local path answers that)."""
    try:
        conv = parse_conv_id(conv_hex)
    except ValueError:
        return None
    return None if member.is_local(conv) else conv


def _remote_conv(member: Member, frame: ClientFrame) -> int | None:
    conv_hex = getattr(frame, "conv", None)
    return None if not isinstance(conv_hex, str) else _remote_conv_hex(member, conv_hex)


def _remote_points(
    member: Member, points: Iterable[ResumePoint]
) -> Iterator[tuple[ResumePoint, int]]:
    for point in points:
        conv = _remote_conv_hex(member, point.conv)
        if conv is not None:
            yield point, conv
