"""The lifecycle of conversations: create, bot, queued, assigned, transfer, close, expire.

Synchronous and free of I/O, like :mod:`kefu.routing`: time comes in as ``now_ms`` and no
clock is read. The node persists what changes (:meth:`ConversationState.to_stored`) and sends
the frames; this module decides and validates.

Statuses and transitions
------------------------
========  ==============================  ==================================================
status    who serves                      next
========  ==============================  ==================================================
bot       the bot (``bot.enabled``)       queued or assigned (handoff), closed
queued    nobody yet: waiting in line     assigned (routed, accepted), closed
assigned  one agent                       assigned (transfer), queued (requeue, transfer to
                                          a busy group), closed
closed    nobody                          nothing: closed is final
========  ==============================  ==================================================

With the bot off, a new conversation starts ``queued`` and the node routes it in the same step;
routing's effects (:meth:`Conversations.apply`) move it on. Any operation on a closed
conversation raises :class:`ConversationClosed`; closing one again is a no-op.

Sequence numbers
----------------
``seq`` is gap-free per conversation, from 1: :meth:`Conversations.next_seq` is the only source,
and the node calls it only in the step that enqueues the message to the store, so a taken
number is always written. ``epoch`` comes from the record and is kept.

Idle expiry
-----------
A conversation idle for ``idle_ttl_ms`` or more (``session.idle_ttl_minutes``, default 60) is
listed by :meth:`Conversations.expired`; the node closes it with ``by="expired"``,
``reason="expired"``. Every open status expires, queued ones too: a visitor who waited the
whole TTL without a word has most likely left. The idle order is a dict kept in order of last
activity, so a touch is O(1) and a scan for expired conversations stops at the first that is
not; the times are held non-decreasing (a clock that steps back counts as standing still), which
keeps that order exact.

Bounds
------
===================  ==========================  =============================================
what                 limit                       when full
===================  ==========================  =============================================
open conversations   ``max_open``                ``create`` raises TooManyConversations (the
                                                 node answers ``too_many_conversations``, HTTP
                                                 503); ``restore`` lets every stored one in
closed, in memory    ``closed_cache``            the oldest is forgotten; the store still has
                                                 it (the node answers from there)
user index           the open conversations      (by construction)
idle order           the open conversations      (by construction)
===================  ==========================  =============================================

Metrics: :meth:`Conversations.stats`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, Final, Literal, TypeAlias, cast

import msgspec

from kefu.errors import KefuError
from kefu.protocol import Sender
from kefu.routing import Assign, Effect, PositionChanged, Queue, Requeue, Unassign
from kefu.store import CONVERSATION_STATUSES, StoredConversation

__all__ = [
    "CLOSED_BY",
    "DEFAULT_CLOSED_CACHE",
    "DEFAULT_IDLE_TTL_MS",
    "DEFAULT_MAX_OPEN",
    "OPEN_STATUSES",
    "ClosedBy",
    "ConversationClosed",
    "ConversationError",
    "ConversationState",
    "ConversationStatus",
    "Conversations",
    "Ended",
    "InvalidTransition",
    "Role",
    "TooManyConversations",
    "UnknownConversation",
    "may_see",
    "may_write",
]

ConversationStatus: TypeAlias = Literal["bot", "queued", "assigned", "closed"]
ClosedBy: TypeAlias = Literal["visitor", "agent", "expired", "admin"]
Role: TypeAlias = Literal["visitor", "agent", "admin"]
Action: TypeAlias = Literal["send", "handoff", "accept", "transfer"]

OPEN_STATUSES: Final = ("bot", "queued", "assigned")
CLOSED_BY: Final = frozenset({"visitor", "agent", "expired", "admin"})
DEFAULT_IDLE_TTL_MS: Final = 60 * 60_000  # session.idle_ttl_minutes
DEFAULT_MAX_OPEN: Final = 100_000
DEFAULT_CLOSED_CACHE: Final = 10_000

_NEXT: Final[dict[str, frozenset[str]]] = {
    "bot": frozenset({"queued", "assigned", "closed"}),
    "queued": frozenset({"queued", "assigned", "closed"}),
    "assigned": frozenset({"assigned", "queued", "closed"}),
    "closed": frozenset(),
}
_ALLOWED: Final[dict[str, frozenset[str]]] = {
    "send": frozenset(OPEN_STATUSES),
    "handoff": frozenset({"bot"}),
    "accept": frozenset({"queued"}),
    "transfer": frozenset({"assigned"}),
}
_SENDABLE: Final = _ALLOWED["send"]


# ---------------------------------------------------------------------------------------------
# Errors: each carries the snake_case code the node puts in its error frame or body.


class ConversationError(KefuError):
    """A conversation operation was refused; nothing changed."""

    code = "conversation_error"


class TooManyConversations(ConversationError):
    code = "too_many_conversations"


class ConversationClosed(ConversationError):
    code = "conversation_closed"


class UnknownConversation(ConversationError, KeyError):
    code = "not_found"


class InvalidTransition(ConversationError):
    """The operation does not apply in the conversation's status (handoff when not bot...)."""

    code = "invalid_state"


# ---------------------------------------------------------------------------------------------
# State


class Ended(msgspec.Struct, frozen=True):
    """``conv`` was closed now: ``closed {conv, by, reason}`` to every participant; then
    :meth:`kefu.routing.Routing.release` frees its agent or its place in line."""

    conv: int
    by: str
    reason: str
    agent_id: str | None = None


class ConversationState(msgspec.Struct, kw_only=True, gc=False):
    """One conversation in memory. Change it through :class:`Conversations`."""

    id: int
    visitor_id: str
    user_id: str | None = None
    status: ConversationStatus
    agent_id: str | None = None  # kept after close: that agent may still read the history
    group: str | None = None
    epoch: int = 1
    top_seq: int = 0
    created_ms: int = 0
    last_activity_ms: int = 0
    closed_by: str | None = None
    closed_reason: str | None = None
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)
    #: Made by the first message frame that needs them (``Node._land``), then shared by every
    #: later one and by the rings of recent messages: the id as the wire spells it, and the
    #: sender of the visitor's messages. None until then (an idle conversation pays 16 bytes).
    wire_id: str | None = None
    visitor_sender: Sender | None = None

    def to_stored(self) -> StoredConversation:
        return StoredConversation(
            id=self.id,
            visitor_id=self.visitor_id,
            user_id=self.user_id,
            status=self.status,
            agent_id=self.agent_id,
            group=self.group,
            epoch=self.epoch,
            top_seq=self.top_seq,
            created_ts=self.created_ms,
            updated_ts=self.last_activity_ms,
            closed_by=self.closed_by,
            closed_reason=self.closed_reason,
            metadata=dict(self.metadata),
        )

    @classmethod
    def from_stored(cls, stored: StoredConversation) -> ConversationState:
        if stored.status not in CONVERSATION_STATUSES:
            raise ValueError(f"stored conversation {stored.id} has status {stored.status!r}")
        return cls(
            id=stored.id,
            visitor_id=stored.visitor_id,
            user_id=stored.user_id,
            status=cast(ConversationStatus, stored.status),
            agent_id=stored.agent_id,
            group=stored.group,
            epoch=stored.epoch,
            top_seq=stored.top_seq,
            created_ms=stored.created_ts,
            last_activity_ms=stored.updated_ts,
            closed_by=stored.closed_by,
            closed_reason=stored.closed_reason,
            metadata=dict(stored.metadata),
        )


# ---------------------------------------------------------------------------------------------
# Authorization


def may_see(state: ConversationState, role: str, principal_id: str) -> bool:
    """Whether ``principal_id`` acting as ``role`` may read ``state`` (history, frames).

    A visitor sees its own conversations; an agent the ones assigned to it (closed ones too,
    for their history) and the queued ones, which it may accept; an admin all of them.
    """
    if role == "admin":
        return True
    if role == "visitor":
        return state.visitor_id == principal_id
    if role == "agent":
        return state.status == "queued" or state.agent_id == principal_id
    return False


def may_write(state: ConversationState, role: str, principal_id: str) -> bool:
    """Whether ``principal_id`` acting as ``role`` may send into ``state`` now.

    The visitor while the conversation is open; an agent only while it holds it. An admin
    speaks through an agent account or not at all.
    """
    if state.status == "closed":
        return False
    if role == "visitor":
        return state.visitor_id == principal_id
    if role == "agent":
        return state.status == "assigned" and state.agent_id == principal_id
    return False


# ---------------------------------------------------------------------------------------------
# The collection


def metadata_chars(state: ConversationState) -> int:
    """The characters of ``state``'s metadata, keys and values as text (set at creation)."""
    return sum(len(k) + len(str(v)) for k, v in state.metadata.items())


class Conversations:
    """Every open conversation of this node, plus the most recently closed ones."""

    def __init__(
        self,
        max_open: int = DEFAULT_MAX_OPEN,
        idle_ttl_ms: int = DEFAULT_IDLE_TTL_MS,
        bot_enabled: bool = True,
        *,
        closed_cache: int = DEFAULT_CLOSED_CACHE,
    ) -> None:
        for name, value in (
            ("max_open", max_open),
            ("idle_ttl_ms", idle_ttl_ms),
            ("closed_cache", closed_cache),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self.max_open = max_open
        self.idle_ttl_ms = idle_ttl_ms
        self.bot_enabled = bool(bot_enabled)
        self.closed_cache = closed_cache
        self._open: dict[int, ConversationState] = {}
        #: The open conversation ``conv``, None if it is not open here: the dict's own ``get``
        #: (one C call, for the message path).
        self.open_state: Callable[[int], ConversationState | None] = self._open.get
        self._closed: dict[int, ConversationState] = {}  # oldest first, for eviction
        self._by_user: dict[str, int] = {}
        self._idle: dict[int, None] = {}  # open conversations, least recently active first
        self._clock = 0  # the latest time seen: activity times never go backwards
        self._counts: dict[str, int] = dict.fromkeys(OPEN_STATUSES, 0)
        #: Characters of the open conversations' metadata (keys and values as text), kept
        #: as they open and close: the node's memory gauge reads it without a walk.
        self.open_metadata_chars = 0
        self.created_total = 0
        self.closed_total = 0
        self.expired_total = 0
        self.rejected_total = 0

    # -- queries -----------------------------------------------------------------------------

    def __len__(self) -> int:
        """Open conversations."""
        return len(self._open)

    def __contains__(self, conv: object) -> bool:
        return conv in self._open or conv in self._closed

    def __iter__(self) -> Iterator[ConversationState]:
        """The open conversations."""
        return iter(list(self._open.values()))

    def get(self, conv: int) -> ConversationState | None:
        """An open or recently closed conversation; None when this node does not hold it."""
        state = self._open.get(conv)
        return state if state is not None else self._closed.get(conv)

    def open_of_user(self, user_id: str) -> ConversationState | None:
        conv = self._by_user.get(user_id)
        return None if conv is None else self._open[conv]

    def check(self, conv: int, action: Action) -> ConversationState:
        """The conversation, if ``action`` applies in its status.

        ``send`` needs it open, ``handoff`` bot, ``accept`` queued, ``transfer`` assigned.
        Raises UnknownConversation, ConversationClosed or InvalidTransition.
        """
        state = self._require_open(conv)
        if state.status not in _ALLOWED[action]:
            raise InvalidTransition(f"cannot {action} conversation {conv}: it is {state.status}")
        return state

    def counts(self) -> dict[str, int]:
        """Open conversations by status."""
        return dict(self._counts)

    def stats(self) -> dict[str, int]:
        """Gauges and counters for the metrics endpoint."""
        out = {f"open_{status}": n for status, n in self._counts.items()}
        out.update(
            open=len(self._open),
            max_open=self.max_open,
            closed_cached=len(self._closed),
            created_total=self.created_total,
            closed_total=self.closed_total,
            expired_total=self.expired_total,
            rejected_total=self.rejected_total,
        )
        return out

    # -- lifecycle ---------------------------------------------------------------------------

    def create(
        self,
        visitor_id: str,
        user_id: str | None,
        now_ms: int,
        conv_id: int,
        *,
        metadata: dict[str, Any] | None = None,
    ) -> tuple[ConversationState, bool]:
        """A new conversation, or the user's open one: ``(state, created)``.

        A known ``user_id`` with an open conversation gets that one back (and it counts as
        activity). Otherwise the conversation starts ``bot`` when the bot is on and ``queued``
        when it is off; the node routes a ``queued`` one in the same step and, if routing
        refuses, calls :meth:`discard`. Raises TooManyConversations at ``max_open``.
        """
        if user_id is not None:
            existing = self._by_user.get(user_id)
            if existing is not None:
                state = self._open[existing]
                self.touch(existing, now_ms)
                return state, False
        if conv_id in self._open or conv_id in self._closed:
            raise ValueError(f"conversation id {conv_id} is taken")
        if len(self._open) >= self.max_open:
            self.rejected_total += 1
            raise TooManyConversations(f"{len(self._open)} conversations are open")
        self._clock = max(self._clock, now_ms)
        state = ConversationState(
            id=conv_id,
            visitor_id=visitor_id,
            user_id=user_id,
            status="bot" if self.bot_enabled else "queued",
            created_ms=now_ms,
            last_activity_ms=self._clock,
            metadata=dict(metadata) if metadata else {},
        )
        self._add_open(state)
        self.created_total += 1
        return state, True

    def discard(self, conv: int) -> None:
        """Undo a :meth:`create` of this same step (routing refused it, nothing was stored)."""
        state = self._open.pop(conv, None)
        if state is None:
            raise UnknownConversation(f"conversation {conv} is not open")
        self._drop_indexes(state)
        self.created_total -= 1

    def take_seq(self, conv: int, now_ms: int) -> int:
        """:meth:`check` for ``send``, :meth:`touch` and :meth:`next_seq` in one call (the
        per-message path); raises as :meth:`check` does."""
        state = self._open.get(conv)
        if state is None or state.status not in _SENDABLE:
            self.check(conv, "send")  # raises the precise refusal
            raise AssertionError("unreachable")  # pragma: no cover
        if now_ms > self._clock:
            self._clock = now_ms
        state.last_activity_ms = self._clock
        idle = self._idle
        del idle[conv]
        idle[conv] = None
        state.top_seq += 1
        return state.top_seq

    def next_seq(self, conv: int) -> int:
        """The next message's seq: exactly one more than the last. Only call it in the step
        that enqueues the message to the store."""
        state = self._require_open(conv)
        state.top_seq += 1
        return state.top_seq

    def touch(self, conv: int, now_ms: int) -> None:
        """Activity in ``conv`` (a message, a typing or read frame): its idle clock restarts."""
        state = self._require_open(conv)
        self._clock = max(self._clock, now_ms)
        state.last_activity_ms = self._clock
        del self._idle[conv]
        self._idle[conv] = None

    def set_status(
        self,
        conv: int,
        status: ConversationStatus,
        *,
        agent_id: str | None = None,
        group: str | None = None,
    ) -> ConversationState:
        """Move ``conv`` to ``status`` (not ``closed``: use :meth:`close`), checked against the
        transition table; ``agent_id`` is set for ``assigned`` and cleared otherwise."""
        state = self._require_open(conv)
        if status == "closed" or status not in _NEXT[state.status]:
            raise InvalidTransition(
                f"conversation {conv} cannot go from {state.status} to {status}"
            )
        if status == "assigned" and agent_id is None:
            raise ValueError("an assigned conversation needs its agent_id")
        self._counts[state.status] -= 1
        self._counts[status] += 1
        state.status = status
        state.agent_id = agent_id if status == "assigned" else None
        state.group = group
        return state

    def apply(self, effect: Effect) -> ConversationState | None:
        """Keep the states in step with one of routing's effects; returns the state changed.

        ``Unassign`` and ``Requeue`` change nothing here: the ``Assign`` or ``Queue`` that
        follows them in the same list moves the conversation.
        """
        if isinstance(effect, Assign):
            return self.set_status(
                effect.conv, "assigned", agent_id=effect.agent_id, group=effect.group
            )
        if isinstance(effect, Queue):
            return self.set_status(effect.conv, "queued", group=effect.group)
        if isinstance(effect, (Unassign, Requeue, PositionChanged)):
            return None
        raise TypeError(f"not a routing effect: {effect!r}")

    def close(self, conv: int, by: str, reason: str, now_ms: int) -> list[Ended]:
        """Close ``conv``; ``[Ended]`` the first time, ``[]`` when it was already closed.

        ``by`` is one of CLOSED_BY (``expired`` for idle expiry). The conversation keeps its
        ``agent_id``, so that agent may still read it.
        """
        if by not in CLOSED_BY:
            raise ValueError(f"by must be one of {sorted(CLOSED_BY)}, got {by!r}")
        state = self._open.pop(conv, None)
        if state is None:
            if conv in self._closed:
                return []
            raise UnknownConversation(f"no conversation {conv}")
        self._drop_indexes(state)
        self._clock = max(self._clock, now_ms)
        state.status = "closed"
        state.closed_by = by
        state.closed_reason = reason
        state.last_activity_ms = self._clock
        self._closed[conv] = state
        if len(self._closed) > self.closed_cache:
            del self._closed[next(iter(self._closed))]
        self.closed_total += 1
        if by == "expired":
            self.expired_total += 1
        return [Ended(conv, by, reason, state.agent_id)]

    def expired(self, now_ms: int, limit: int | None = None) -> list[int]:
        """Open conversations idle for ``idle_ttl_ms`` or more at ``now_ms``, longest idle
        first, at most ``limit``. They stay open until the node closes them."""
        out: list[int] = []
        cutoff = now_ms - self.idle_ttl_ms
        for conv in self._idle:
            if self._open[conv].last_activity_ms > cutoff or len(out) == limit:
                break
            out.append(conv)
        return out

    def next_expiry_ms(self) -> int | None:
        """When the longest idle conversation expires, for the node's timer."""
        for conv in self._idle:
            return self._open[conv].last_activity_ms + self.idle_ttl_ms
        return None

    def restore(self, records: Iterable[StoredConversation]) -> list[ConversationState]:
        """Take back the open conversations of ``Store.recover()`` at startup.

        Returns them in order of creation: the order in which the node gives the routed ones
        back to :meth:`kefu.routing.Routing.restore`. Closed records are skipped. ``max_open``
        is not applied (refusing a stored conversation would lose it); ``create`` waits until
        the count is below it again. Should two open records name one user, the newer one
        answers that user's ``create``.
        """
        restored: list[ConversationState] = []
        for record in records:
            if record.status == "closed" or record.id in self._open:
                continue
            restored.append(ConversationState.from_stored(record))
        restored.sort(key=lambda s: (s.created_ms, s.id))
        for state in restored:
            self._closed.pop(state.id, None)
            self._add_open(state)
        # Restored activity times arrive in any order; one sort puts the idle order right.
        ordered = sorted(self._idle, key=lambda c: self._open[c].last_activity_ms)
        self._idle = dict.fromkeys(ordered)
        if ordered:
            self._clock = max(self._clock, self._open[ordered[-1]].last_activity_ms)
        return restored

    # -- internals ---------------------------------------------------------------------------

    def _require_open(self, conv: int) -> ConversationState:
        state = self._open.get(conv)
        if state is not None:
            return state
        if conv in self._closed:
            raise ConversationClosed(f"conversation {conv} is closed")
        raise UnknownConversation(f"no conversation {conv}")

    def _add_open(self, state: ConversationState) -> None:
        self._open[state.id] = state
        self._idle[state.id] = None
        self._counts[state.status] += 1
        self.open_metadata_chars += metadata_chars(state)
        if state.user_id is not None:
            self._by_user[state.user_id] = state.id

    def _drop_indexes(self, state: ConversationState) -> None:
        del self._idle[state.id]
        self._counts[state.status] -= 1
        self.open_metadata_chars -= metadata_chars(state)
        if state.user_id is not None and self._by_user.get(state.user_id) == state.id:
            del self._by_user[state.user_id]
