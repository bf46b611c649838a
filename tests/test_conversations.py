"""kefu.conversations: lifecycle, seq, idle expiry, restore and who may see what.

Pure unit tests: time is a number passed in.
"""

from __future__ import annotations

import pytest

from kefu.conversations import (
    ConversationClosed,
    Conversations,
    ConversationState,
    Ended,
    InvalidTransition,
    TooManyConversations,
    UnknownConversation,
    may_see,
    may_write,
)
from kefu.routing import Assign, PositionChanged, Queue, Requeue, Unassign
from kefu.store import StoredConversation

MIN = 60_000
TTL = 60 * MIN


def test_create_is_idempotent_per_user_while_open() -> None:
    convs = Conversations(max_open=10, idle_ttl_ms=TTL, bot_enabled=True)
    first, created = convs.create("v1", "u1", 1_000, conv_id=11)
    assert created
    assert (first.status, first.epoch, first.top_seq, first.created_ms) == ("bot", 1, 0, 1_000)
    again, created = convs.create("v1-other-device", "u1", 2_000, conv_id=12)
    assert (again is first, created) == (True, False)
    assert first.last_activity_ms == 2_000  # coming back is activity
    assert convs.open_of_user("u1") is first
    # Without a user id there is nothing to match: each create is a new conversation.
    assert convs.create("v2", None, 0, conv_id=21)[1]
    assert convs.create("v2", None, 0, conv_id=22)[1]
    with pytest.raises(ValueError, match="taken"):
        convs.create("v3", None, 0, conv_id=21)
    # Once closed, the same user starts a new one.
    convs.close(11, "visitor", "visitor", 3_000)
    assert convs.open_of_user("u1") is None
    fresh, created = convs.create("v1", "u1", 4_000, conv_id=13)
    assert created and fresh.id == 13
    assert convs.stats()["created_total"] == 4


def test_without_the_bot_a_conversation_starts_queued() -> None:
    convs = Conversations(bot_enabled=False)
    state, _ = convs.create("v", None, 0, conv_id=1)
    assert state.status == "queued"
    assert convs.counts() == {"bot": 0, "queued": 1, "assigned": 0}


def test_max_open_is_a_hard_limit_for_new_conversations() -> None:
    convs = Conversations(max_open=2, idle_ttl_ms=TTL, bot_enabled=True)
    convs.create("a", "ua", 0, conv_id=1)
    convs.create("b", None, 0, conv_id=2)
    with pytest.raises(TooManyConversations) as caught:
        convs.create("c", None, 0, conv_id=3)
    assert caught.value.code == "too_many_conversations"
    # The user who already has one still gets it back at the limit.
    assert convs.create("a", "ua", 0, conv_id=4) == (convs.get(1), False)
    assert convs.stats()["rejected_total"] == 1
    convs.close(2, "visitor", "visitor", 0)
    assert convs.create("c", None, 0, conv_id=3)[1]


def test_discard_undoes_a_create_that_routing_refused() -> None:
    convs = Conversations(bot_enabled=False)
    convs.create("v", "u", 0, conv_id=1)
    convs.discard(1)
    assert convs.get(1) is None and convs.open_of_user("u") is None
    assert len(convs) == 0 and convs.counts()["queued"] == 0
    assert convs.stats()["created_total"] == 0
    with pytest.raises(UnknownConversation):
        convs.discard(1)


def test_next_seq_is_gap_free_from_1() -> None:
    convs = Conversations()
    convs.create("v", None, 0, conv_id=1)
    convs.create("w", None, 0, conv_id=2)
    assert [convs.next_seq(1) for _ in range(5)] == [1, 2, 3, 4, 5]
    assert convs.next_seq(2) == 1  # per conversation
    assert convs.get(1) is not None and convs.get(1).top_seq == 5  # type: ignore[union-attr]
    with pytest.raises(UnknownConversation):
        convs.next_seq(3)


def test_take_seq_is_check_touch_and_next_seq_in_one() -> None:
    """The per-message step: the same seq, activity and refusals as the three calls."""
    one, three = Conversations(idle_ttl_ms=TTL), Conversations(idle_ttl_ms=TTL)
    for convs in (one, three):
        convs.create("v", None, 1_000, conv_id=1)
        convs.create("w", None, 2_000, conv_id=2)
    for now in (3_000, 2_500, 4_000):  # a clock that steps back counts as the latest
        seq = one.take_seq(1, now)
        three.check(1, "send")
        three.touch(1, now)
        assert seq == three.next_seq(1)
        assert one.get(1) == three.get(1)
        assert one.expired(10 * TTL) == three.expired(10 * TTL) == [2, 1]
    assert one.get(1).top_seq == 3  # type: ignore[union-attr]
    with pytest.raises(UnknownConversation):
        one.take_seq(3, 5_000)
    one.close(2, "visitor", None, 5_000)
    with pytest.raises(ConversationClosed):
        one.take_seq(2, 5_000)
    assert one.get(2).top_seq == 0  # type: ignore[union-attr]


def test_expiry_at_exactly_the_ttl() -> None:
    convs = Conversations(idle_ttl_ms=TTL)
    convs.create("v", None, 1_000, conv_id=1)
    convs.create("w", None, 2_000, conv_id=2)
    assert convs.next_expiry_ms() == 1_000 + TTL
    assert convs.expired(1_000 + TTL - 1) == []
    assert convs.expired(1_000 + TTL) == [1]
    assert convs.expired(2_000 + TTL) == [1, 2]
    assert convs.expired(2_000 + TTL, limit=1) == [1]
    # Activity restarts the clock and moves it behind the others.
    convs.touch(1, 1_500 + TTL)
    assert convs.expired(2_000 + TTL) == [2]
    assert convs.expired(1_500 + 2 * TTL) == [2, 1]
    # They stay open until the node closes them; then they are gone from the idle order.
    assert convs.close(2, "expired", "expired", 2_000 + TTL) == [Ended(2, "expired", "expired")]
    assert convs.expired(10 * TTL) == [1]
    assert convs.stats()["expired_total"] == 1


def test_a_clock_that_steps_back_does_not_expire_early() -> None:
    convs = Conversations(idle_ttl_ms=TTL)
    convs.create("v", None, 5_000, conv_id=1)
    convs.create("w", None, 6_000, conv_id=2)
    convs.touch(1, 4_000)  # counts as 6,000: the latest time seen
    assert convs.get(1).last_activity_ms == 6_000  # type: ignore[union-attr]
    assert convs.expired(6_000 + TTL - 1) == []
    assert convs.expired(6_000 + TTL) == [2, 1]


def test_closed_is_final() -> None:
    convs = Conversations(bot_enabled=True)
    convs.create("v", None, 0, conv_id=1)
    convs.set_status(1, "assigned", agent_id="a")
    assert convs.close(1, "agent", "resolved", 10) == [Ended(1, "agent", "resolved", "a")]
    state = convs.get(1)
    assert state is not None
    assert (state.status, state.closed_by, state.closed_reason, state.agent_id) == (
        "closed",
        "agent",
        "resolved",
        "a",
    )
    assert convs.close(1, "visitor", "again", 20) == []  # idempotent, nothing changes
    assert state.closed_by == "agent"
    for operation in (
        lambda: convs.next_seq(1),
        lambda: convs.touch(1, 30),
        lambda: convs.check(1, "send"),
        lambda: convs.set_status(1, "queued"),
        lambda: convs.apply(Assign(1, "b")),
    ):
        with pytest.raises(ConversationClosed) as caught:
            operation()
        assert caught.value.code == "conversation_closed"
    with pytest.raises(ValueError, match="by must be"):
        convs.close(1, "robot", "x", 0)
    with pytest.raises(UnknownConversation):
        convs.close(99, "admin", "x", 0)
    assert len(convs) == 0 and convs.counts() == {"bot": 0, "queued": 0, "assigned": 0}


def test_closed_conversations_in_memory_are_bounded() -> None:
    convs = Conversations(closed_cache=2)
    for conv in (1, 2, 3):
        convs.create("v", None, 0, conv_id=conv)
        convs.close(conv, "visitor", "visitor", 0)
    assert [convs.get(c) is not None for c in (1, 2, 3)] == [False, True, True]
    with pytest.raises(UnknownConversation):  # the store still has it; the node asks there
        convs.close(1, "visitor", "visitor", 0)


def test_transitions_are_checked() -> None:
    convs = Conversations(bot_enabled=True)
    convs.create("v", None, 0, conv_id=1)
    assert convs.check(1, "handoff").status == "bot"
    with pytest.raises(InvalidTransition):
        convs.check(1, "accept")
    with pytest.raises(InvalidTransition):
        convs.check(1, "transfer")
    convs.apply(Queue(1, 3, "sales"))
    state = convs.check(1, "accept")
    assert (state.status, state.group) == ("queued", "sales")
    with pytest.raises(InvalidTransition) as caught:
        convs.check(1, "handoff")  # only from the bot
    assert caught.value.code == "invalid_state"
    assert convs.apply(PositionChanged(1, 2)) is None
    convs.apply(Assign(1, "a", "sales"))
    assert (state.status, state.agent_id) == ("assigned", "a")
    convs.check(1, "transfer")
    # A transfer: the Unassign changes nothing, the Assign after it moves the conversation.
    assert convs.apply(Unassign(1, "a")) is None
    convs.apply(Assign(1, "b", "sales"))
    assert state.agent_id == "b"
    # A requeue: back in line, without an agent.
    convs.apply(Requeue(1, "b"))
    requeued = convs.apply(Queue(1, 1, "sales"))
    assert requeued is state
    assert (requeued.status, requeued.agent_id) == ("queued", None)
    with pytest.raises(InvalidTransition):
        convs.set_status(1, "bot")
    with pytest.raises(InvalidTransition):
        convs.set_status(1, "closed")
    with pytest.raises(ValueError, match="agent_id"):
        convs.set_status(1, "assigned")
    with pytest.raises(TypeError):
        convs.apply("assign")  # type: ignore[arg-type]
    assert convs.counts() == {"bot": 0, "queued": 1, "assigned": 0}


def _stored(conv: int, **fields: object) -> StoredConversation:
    values: dict[str, object] = {
        "id": conv,
        "visitor_id": f"v{conv}",
        "status": "assigned",
        "agent_id": "a",
        "epoch": 3,
        "top_seq": 41,
        "created_ts": 100,
        "updated_ts": 5_000,
    }
    values.update(fields)
    return StoredConversation(**values)  # type: ignore[arg-type]


def test_restore_continues_seq_and_keeps_epoch() -> None:
    convs = Conversations(max_open=2, idle_ttl_ms=TTL)
    restored = convs.restore(
        [
            _stored(7, created_ts=300, updated_ts=9_000, user_id="u7"),
            _stored(5, status="queued", agent_id=None, group="sales", created_ts=200),
            _stored(6, status="bot", agent_id=None, created_ts=100, updated_ts=1_000),
            _stored(8, status="closed"),
        ]
    )
    assert [s.id for s in restored] == [6, 5, 7]  # in order of creation, closed skipped
    assert convs.next_seq(7) == 42
    state = convs.get(7)
    assert state is not None and state.epoch == 3
    assert convs.open_of_user("u7") is state
    assert convs.counts() == {"bot": 1, "queued": 1, "assigned": 1}
    # Idle order follows the stored activity, not the order of the records.
    assert convs.expired(5_000 + TTL) == [6, 5]
    # Past max_open after a restore: nothing stored is dropped, new ones wait for room.
    with pytest.raises(TooManyConversations):
        convs.create("n", None, 10_000, conv_id=9)


def test_state_round_trips_through_the_stored_record() -> None:
    convs = Conversations()
    state, _ = convs.create("v", "u", 1_234, conv_id=77, metadata={"page": "/cart"})
    convs.next_seq(77)
    convs.apply(Assign(77, "a", "sales"))
    stored = state.to_stored()
    assert stored == StoredConversation(
        id=77,
        visitor_id="v",
        user_id="u",
        status="assigned",
        agent_id="a",
        group="sales",
        epoch=1,
        top_seq=1,
        created_ts=1_234,
        updated_ts=1_234,
        metadata={"page": "/cart"},
    )
    assert ConversationState.from_stored(stored) == state
    with pytest.raises(ValueError, match="status"):
        ConversationState.from_stored(_stored(1, status="lost"))


def test_open_metadata_chars_follow_opens_and_closes() -> None:
    convs = Conversations()
    convs.create("v1", None, 1, conv_id=1, metadata={"page": "/cart", "n": 12})
    convs.create("v2", None, 1, conv_id=2, metadata={"名": "张三"})
    convs.create("v3", None, 1, conv_id=3)
    assert convs.open_metadata_chars == (4 + 5 + 1 + 2) + (1 + 2) + 0
    convs.close(1, "visitor", "done", 2)
    convs.close(1, "visitor", "done", 2)  # already closed: nothing more
    assert convs.open_metadata_chars == 3
    convs.discard(2)
    assert convs.open_metadata_chars == 0
    restored = Conversations()
    restored.restore([_stored(5, metadata={"ab": "cd"}), _stored(6, status="closed")])
    assert restored.open_metadata_chars == 4


def _state(status: str, agent_id: str | None = None) -> ConversationState:
    return ConversationState(
        id=1,
        visitor_id="vis",
        status=status,  # type: ignore[arg-type]
        agent_id=agent_id,
    )


@pytest.mark.parametrize(
    ("status", "agent_id", "role", "principal", "sees", "writes"),
    [
        ("bot", None, "visitor", "vis", True, True),
        ("bot", None, "visitor", "other", False, False),
        ("bot", None, "agent", "a", False, False),
        ("bot", None, "admin", "root", True, False),
        ("queued", None, "visitor", "vis", True, True),
        ("queued", None, "agent", "a", True, False),  # may look before accepting
        ("assigned", "a", "agent", "a", True, True),
        ("assigned", "a", "agent", "b", False, False),
        ("assigned", "a", "visitor", "vis", True, True),
        ("assigned", "a", "visitor", "a", False, False),  # an id of another kind
        ("assigned", "a", "admin", "root", True, False),
        ("closed", "a", "agent", "a", True, False),  # its history, read-only
        ("closed", "a", "agent", "b", False, False),
        ("closed", "a", "visitor", "vis", True, False),
        ("assigned", "a", "robot", "a", False, False),
    ],
)
def test_who_may_see_and_write(
    status: str,
    agent_id: str | None,
    role: str,
    principal: str,
    sees: bool,
    writes: bool,
) -> None:
    state = _state(status, agent_id)
    assert may_see(state, role, principal) is sees
    assert may_write(state, role, principal) is writes
