"""The node: the one place that wires the store, conversations, routing and the WebSocket front.

:class:`Node` owns one :class:`~kefu.store.Store`, the in-memory
:class:`~kefu.conversations.Conversations`, the :class:`~kefu.routing.Routing` over the agents of
the config, the :class:`~kefu.security.TokenSigner` and the :class:`~kefu.web.ws.WsServer`, and
implements the server's :class:`~kefu.web.ws.FrameHandler`.

Start and stop
--------------
``await node.start()`` opens the store (``data_dir``, ``durability``, ``store`` settings), loads
the configured agents into the pool, takes back the open conversations (``Store.recover()``; the
routed ones go back to routing in order of creation), loads or creates the token-signing secret
(store meta ``token_secret``) and starts the WebSocket listener. ``await node.stop()`` closes
every connection with 1001, then flushes and closes the store.

Identities
----------
A ``hello`` token is an agent's configured token (constant-time compare) or a visitor token
issued by :meth:`Node.create_chat` (``sub`` is the visitor id, ``extra["conv"]`` its
conversation). Live connections are kept per principal (``(role, id)`` -> connections), which
is how ``msg``, ``assigned``, ``queued``, ``typing``, ``read`` and ``closed`` reach everyone.

Messages
--------
``send``: ``may_write`` (else ``forbidden``), dedup (``Store.get_dedup``; a duplicate is acked
with its original seq after ``Store.barrier()``), then ``next_seq`` and ``append_message`` with
the conversation record in the same step, so a taken seq is always written. Should the store
refuse the write at the call (``StoreBusy``), the seq is given back before anything is awaited.
After the write is durable: ``ack`` to the sender, ``msg`` to every participant connection, and
the message joins the conversation's ring of recent messages (:data:`RING_CAPACITY` messages,
:data:`MAX_RINGS` rings, least recently used ring dropped first).

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
after the ``resumed`` and none is lost or sent twice.

Not in this slice: the bot, ``accept`` and ``transfer`` (answered ``error unsupported``), the
timers for agent grace and idle expiry, presence frames, encode-once fan-out, metrics.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict
from typing import TYPE_CHECKING, Final, cast

from kefu._core import ringbuf as _ringbuf
from kefu.config import Config
from kefu.conversations import Conversations, ConversationState, may_see, may_write
from kefu.errors import KefuError
from kefu.protocol import (
    Accept,
    Ack,
    AgentRef,
    Assigned,
    ClientFrame,
    Close,
    Closed,
    ClosedBy,
    ConversationStatus,
    ConvState,
    Error,
    Hello,
    History,
    Msg,
    Queued,
    Read,
    ReadRelay,
    Resumed,
    Send,
    Sender,
    SenderRole,
    Status,
    StatusFrame,
    Sync,
    Transfer,
    Transferred,
    Typing,
    TypingRelay,
    VisitorProfile,
    Welcome,
)
from kefu.routing import (
    AgentPool,
    Assign,
    Effect,
    PositionChanged,
    Queue,
    Routing,
    Unassign,
    WaitingQueue,
)
from kefu.security import TokenError, TokenSigner, new_secret, secret_equals
from kefu.store import (
    Store,
    StoredMessage,
    StoreError,
    format_conv_id,
    parse_conv_id,
)
from kefu.web.ws import AuthError, Connection, WsServer

if TYPE_CHECKING:
    from kefu._core.ringbuf import RingBuffer

__all__ = ["MAX_RINGS", "RESUME_MAX", "RING_CAPACITY", "Forbidden", "Node", "Unsupported"]

log = logging.getLogger("kefu.node")

RESUME_MAX: Final = 300  # PROTOCOL.md: more missed than this -> recovered: false
RING_CAPACITY: Final = 320  # recent messages kept per conversation (>= RESUME_MAX)
MAX_RINGS: Final = 10_000  # conversations with a ring; least recently used dropped first
ASSIGNED_RECENT: Final = 20  # last messages an agent gets with `assigned`
SECRET_META: Final = "token_secret"

Principal = tuple[str, str]  # (role, id)


class Forbidden(KefuError):
    """The caller may not see or write the conversation (or it does not exist)."""

    code = "forbidden"


class Unsupported(KefuError):
    code = "unsupported"


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _msg_frame(m: StoredMessage) -> Msg:
    return Msg(
        conv=format_conv_id(m.conv),
        seq=m.seq,
        epoch=m.epoch,
        id=m.id,
        client_msg_id=m.client_msg_id,
        from_=Sender(role=cast("SenderRole", m.from_role), id=m.from_id, name=m.from_name),
        text=m.text,
        ts=m.ts,
        meta=m.meta,
    )


def _log_failure(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.error("background store write failed: %s", fut.exception())


class Node:
    """One kefu node (module doc). ``await start()``, then ``await stop()``."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._store: Store | None = None
        self._signer: TokenSigner | None = None
        self.ws: WsServer | None = None
        self.conversations = Conversations(
            idle_ttl_ms=config.session.idle_ttl_minutes * 60_000, bot_enabled=False
        )
        self.pool = AgentPool(grace_ms=int(config.routing.agent_grace_s * 1000))
        self.routing = Routing(self.pool, WaitingQueue(config.routing.max_queue))
        self._agent_tokens = [(a.token, a.id) for a in config.agents]
        self._conns: dict[Principal, set[Connection]] = {}
        self._registered: dict[Connection, Principal] = {}
        self._rings: OrderedDict[int, RingBuffer] = OrderedDict()

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
        self._store = store = Store.open(
            cfg.data_dir,
            durability=cfg.durability,
            max_pending=sc.max_pending,
            max_pending_bytes=sc.max_pending_bytes,
            batch_max_entries=sc.batch_max_entries,
            batch_max_bytes=sc.batch_max_bytes,
            block_cache_bytes=sc.block_cache_bytes,
            write_buffer_bytes=sc.write_buffer_bytes,
        )
        try:
            for a in cfg.agents:
                self.pool.add(a.id, a.name, weight=a.weight, max_chats=a.max_chats, groups=a.groups)
            await self._restore()
            secret = store.get_meta(SECRET_META)
            if secret is None:
                secret = new_secret().encode()
                await store.put_meta(SECRET_META, secret)
            self._signer = TokenSigner(secret)
            self.ws = WsServer(cfg.ws, self, allowed_origins=cfg.allowed_origins)
            await self.ws.start()
        except BaseException:
            store.close()
            self._store = None
            raise

    async def _restore(self) -> None:
        now = _now_ms()
        states = self.conversations.restore(list(self.store.recover()))
        effects: list[Effect] = []
        for state in states:
            if state.status in ("queued", "assigned"):
                agent = state.agent_id if state.status == "assigned" else None
                effects += self.routing.restore(state.id, now, agent_id=agent, group=state.group)
        # Only the records routing changed are written: recover() already gives the true
        # top_seq, and rewriting every open conversation could pass the store's write budget.
        await asyncio.gather(*self._apply_states(effects))

    async def stop(self) -> None:
        if self.ws is not None:
            await self.ws.stop()
            self.ws = None
        if self._store is not None:
            self._store.close()
            self._store = None

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
        conv_id = store.new_conversation_id()
        state, created = self.conversations.create(
            "v" + uuid.uuid4().hex[:16], user_id, now, conv_id, metadata=meta
        )
        effects: list[Effect] = []
        if created:
            try:
                effects = self.routing.route(state.id, now)
            except KefuError:
                self.conversations.discard(state.id)
                raise
            for effect in effects:
                self.conversations.apply(effect)
            try:
                fut = store.put_conversation(state.to_stored())
            except StoreError:
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

    # -- FrameHandler -----------------------------------------------------------------------

    async def authenticate(self, conn: Connection, hello: Hello) -> Welcome:
        token = hello.token
        for expected, agent_id in self._agent_tokens:
            if secret_equals(token, expected):
                convs = [self._conv_state(c) for c in self.routing.conversations_of(agent_id)]
                return Welcome(
                    role="agent",
                    id=agent_id,
                    convs=[c for c in convs if c is not None],
                    ping_interval_ms=0,
                    max_msg_bytes=0,
                )
        try:
            claims = self.signer.verify(token, "visitor")
            conv = parse_conv_id(claims.extra["conv"])
        except (TokenError, KeyError, ValueError) as exc:
            raise AuthError("bad token") from exc
        cs = self._conv_state(conv)
        return Welcome(
            role="visitor",
            id=claims.sub,
            convs=[] if cs is None else [cs],
            ping_interval_ms=0,
            max_msg_bytes=0,
        )

    async def on_ready(self, conn: Connection, hello: Hello) -> None:
        # No await from here to the registration: see "Resume" in the module doc.
        role, principal = conn.role, conn.principal
        if role is None or principal is None:
            return
        for point in hello.resume or ():
            try:
                state = self._visible(point.conv, role, principal)
            except KefuError as exc:
                conn.send(Error(code=exc.code, message=str(exc), ref="hello"))
                continue
            self._resume(conn, state, point.epoch, point.last_seq)
        key = (role, principal)
        first = key not in self._conns
        self._conns.setdefault(key, set()).add(conn)
        self._registered[conn] = key
        if role == "agent" and first:
            self._run_effects(self.routing.agent_connected(principal))

    async def on_frame(self, conn: Connection, frame: ClientFrame) -> None:
        key = self._registered.get(conn)
        if key is None:
            return
        try:
            await self._dispatch(conn, key, frame)
        except KefuError as exc:
            ref = frame.client_msg_id if isinstance(frame, Send) else _frame_tag(frame)
            conn.send(Error(code=exc.code, message=str(exc), ref=ref))

    def on_close(self, conn: Connection) -> None:
        key = self._registered.pop(conn, None)
        if key is None:
            return
        conns = self._conns.get(key)
        if conns is None:
            return
        conns.discard(conn)
        if conns:
            return
        del self._conns[key]
        if key[0] == "agent":
            try:
                self._run_effects(self.routing.agent_disconnected(key[1], _now_ms()))
            except KefuError:
                log.exception("agent %s: disconnect bookkeeping failed", key[1])

    # -- frames -----------------------------------------------------------------------------

    async def _dispatch(self, conn: Connection, key: Principal, frame: ClientFrame) -> None:
        role, principal = key
        if isinstance(frame, Send):
            await self._send(conn, key, frame)
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
            await self._close(conn, key, frame)
        elif isinstance(frame, Status):
            if role != "agent":
                raise Forbidden("only agents have a status")
            self._run_effects(self.routing.agent_status(principal, frame.status, frame.max_chats))
            conn.send(StatusFrame(status=frame.status, max_chats=frame.max_chats))
        elif isinstance(frame, (Accept, Transfer)):
            raise Unsupported(f"{_frame_tag(frame)} is not supported yet")
        else:
            raise Unsupported(f"{_frame_tag(frame)} is not supported")

    async def _send(self, conn: Connection, key: Principal, frame: Send) -> None:
        role, principal = key
        store = self.store
        state = self._visible(frame.conv, role, principal)
        if not may_write(state, role, principal):
            raise Forbidden("you may not write in this conversation")
        conv = state.id
        dup = store.get_dedup(conv, frame.client_msg_id)
        if dup is not None:
            await store.barrier()
            ts = 0
            found, _ = store.history(conv, dup - 1, 1)
            if found and found[0].seq == dup:
                ts = found[0].ts
            conn.send(_ack(frame, dup, ts, True))
            return
        self.conversations.check(conv, "send")
        now = _now_ms()
        self.conversations.touch(conv, now)
        seq = self.conversations.next_seq(conv)
        sender = self._sender(key)
        msg = StoredMessage(
            conv=conv,
            seq=seq,
            epoch=state.epoch,
            id=uuid.uuid4().hex,
            client_msg_id=frame.client_msg_id,
            from_role=role,
            from_id=principal,
            from_name=sender.name,
            text=frame.text,
            ts=now,
        )
        try:
            fut = store.append_message(msg, state.to_stored())
        except BaseException:
            state.top_seq -= 1  # nothing was enqueued: give the seq back (no await since)
            raise
        await fut
        conn.send(_ack(frame, seq, now, False))
        out = _msg_frame(msg)
        self._remember(conv, out)
        self._fan_out(state, out)

    async def _close(self, conn: Connection, key: Principal, frame: Close) -> None:
        role, principal = key
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
        ended = self.conversations.close(state.id, role, role, _now_ms())
        futures = [self.store.put_conversation(state.to_stored())]
        for e in ended:
            self._fan_out(
                state, Closed(conv=frame.conv, by=cast("ClosedBy", e.by), reason=e.reason)
            )
            futures += self._run_effects(self.routing.release(e.conv))
        await asyncio.gather(*futures)

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
            return Sender(role="agent", id=principal, name=self.pool.get(principal).name)
        return Sender(role="visitor", id=principal, name="visitor")

    def _participants(self, state: ConversationState) -> list[Principal]:
        keys: list[Principal] = [("visitor", state.visitor_id)]
        if state.agent_id is not None:
            keys.append(("agent", state.agent_id))
        return keys

    def _fan_out(
        self, state: ConversationState, frame: object, skip: Principal | None = None
    ) -> None:
        for key in self._participants(state):
            if key == skip:
                continue
            for c in list(self._conns.get(key, ())):
                c.send(frame)

    def _remember(self, conv: int, msg: Msg) -> None:
        ring = self._rings.get(conv)
        if ring is None:
            ring = self._rings[conv] = _ringbuf.RingBuffer(RING_CAPACITY, keyed=True)
            if len(self._rings) > MAX_RINGS:
                self._rings.popitem(last=False)
        else:
            self._rings.move_to_end(conv)
        last = ring.last_key
        if last is not None and msg.seq <= last:
            return  # acks resolved out of order: the ring starts later, resume reads the store
        if last is not None and msg.seq != last + 1:
            ring.clear()
        ring.append(msg, msg.seq)

    def _missed(self, conv: int, last_seq: int, count: int) -> list[Msg]:
        ring = self._rings.get(conv)
        if ring is not None and ring.first_key is not None and ring.first_key <= last_seq + 1:
            self._rings.move_to_end(conv)
            return cast("list[Msg]", ring.since(last_seq))
        messages, _ = self.store.history(conv, last_seq, count)
        return [_msg_frame(m) for m in messages]

    def _resume(self, conn: Connection, state: ConversationState, epoch: int, last: int) -> None:
        conv_hex = format_conv_id(state.id)
        missed = state.top_seq - last
        if epoch != state.epoch or missed < 0 or missed > RESUME_MAX:
            conn.send(Resumed(conv=conv_hex, recovered=False))
            return
        to_seq = last
        if missed:
            for m in self._missed(state.id, last, missed):
                conn.send(m)
                to_seq = m.seq
        conn.send(Resumed(conv=conv_hex, from_seq=last + 1, to_seq=to_seq))

    def _apply_states(self, effects: list[Effect]) -> list[asyncio.Future[None]]:
        """Move the conversations with routing's effects and enqueue their records."""
        futures: list[asyncio.Future[None]] = []
        for effect in effects:
            state = self.conversations.apply(effect)
            if state is not None:
                try:
                    futures.append(self.store.put_conversation(state.to_stored()))
                except StoreError:
                    log.exception("conversation %x: record not stored", state.id)
        return futures

    def _run_effects(self, effects: list[Effect]) -> list[asyncio.Future[None]]:
        """Apply routing's effects: states, records (enqueued, not awaited), frames."""
        futures = self._apply_states(effects)
        for fut in futures:
            fut.add_done_callback(_log_failure)
        self._notify(effects)
        return futures

    def _notify(self, effects: list[Effect]) -> None:
        for effect in effects:
            state = self.conversations.get(effect.conv)
            if state is None:
                continue
            conv_hex = format_conv_id(effect.conv)
            visitor = self._conns.get(("visitor", state.visitor_id), set())
            if isinstance(effect, Assign):
                agent = self.pool.get(effect.agent_id)
                ref = AgentRef(id=effect.agent_id, name=agent.name)
                for c in list(visitor):
                    c.send(Assigned(conv=conv_hex, agent=ref))
                recent = [_msg_frame(m) for m in self.store.tail(effect.conv, ASSIGNED_RECENT)]
                name = state.metadata.get("name")
                profile = VisitorProfile(
                    id=state.visitor_id,
                    name=name if isinstance(name, str) else None,
                    user_id=state.user_id,
                )
                frame = Assigned(conv=conv_hex, agent=ref, visitor=profile, messages=recent)
                for c in list(self._conns.get(("agent", effect.agent_id), ())):
                    c.send(frame)
            elif isinstance(effect, (Queue, PositionChanged)):
                for c in list(visitor):
                    c.send(Queued(conv=conv_hex, position=effect.position))
            elif isinstance(effect, Unassign):
                to = state.agent_id or ""
                for c in list(self._conns.get(("agent", effect.agent_id), ())):
                    c.send(Transferred(conv=conv_hex, to=to))


def _ack(frame: Send, seq: int, ts: int, dup: bool) -> Ack:
    return Ack(conv=frame.conv, client_msg_id=frame.client_msg_id, seq=seq, ts=ts, dup=dup)


def _frame_tag(frame: object) -> str:
    config = getattr(type(frame), "__struct_config__", None)
    tag = getattr(config, "tag", None)
    return tag if isinstance(tag, str) else type(frame).__name__
