"""kefu.store: key layout, group commit, durability modes, failure paths, recovery.

Async cases run their coroutine on a fresh loop per test (no pytest plugin); the group-commit
cases run on both asyncio's loop and uvloop, because "one batch per loop iteration" rests on how
each loop runs its ready callbacks.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import pytest

from kefu import store as store_mod
from kefu.store import (
    HISTORY_MAX_LIMIT,
    Store,
    StoreBusy,
    StoredAgent,
    StoredConversation,
    StoredMessage,
    StoreError,
    StoreUnavailable,
    conversation_key,
    dedup_key,
    format_conv_id,
    message_key,
    parse_conv_id,
    read_mark_key,
)

REPO = Path(__file__).resolve().parent.parent
T = TypeVar("T")
LoopFactory = Callable[[], asyncio.AbstractEventLoop]

LOOPS = [pytest.param(asyncio.new_event_loop, id="asyncio")]
try:
    import uvloop

    LOOPS.append(pytest.param(uvloop.new_event_loop, id="uvloop"))
except ImportError:  # uvloop is a dependency; still, asyncio alone must not stop the suite
    pass


def run(coro: Coroutine[Any, Any, T], loop_factory: LoopFactory = asyncio.new_event_loop) -> T:
    loop = loop_factory()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


@pytest.fixture
def db_path(tmp_path: Path) -> str:
    return str(tmp_path / "db")


@pytest.fixture
def store(db_path: str) -> Iterator[Store]:
    s = Store.open(db_path)
    yield s
    s.close()


def message(conv: int, seq: int, cmid: str | None = None, text: str = "hello") -> StoredMessage:
    return StoredMessage(
        conv=conv,
        seq=seq,
        epoch=1,
        id=f"msg-{seq}",
        client_msg_id=cmid,
        from_role="visitor",
        from_id="v1",
        from_name="Visitor",
        text=text,
        ts=1_715_000_000_000 + seq,
    )


def conversation(conv: int, status: str = "bot", **kw: Any) -> StoredConversation:
    return StoredConversation(id=conv, visitor_id="v1", status=status, **kw)


def append_all(s: Store, conv: int, seqs: Iterable[int]) -> None:
    """Append ``message(conv, seq)`` for each seq in one loop iteration and wait for the acks."""

    async def main() -> None:
        await asyncio.gather(*(s.append_message(message(conv, seq)) for seq in seqs))

    run(main())


def all_seqs(s: Store, conv: int) -> list[int]:
    seqs: list[int] = []
    after = 0
    while True:
        page, more = s.history(conv, after, HISTORY_MAX_LIMIT)
        seqs.extend(m.seq for m in page)
        if not more:
            return seqs
        after = page[-1].seq


# ---------------------------------------------------------------------------------------------
# records and keys


def test_round_trip_of_every_record(db_path: str) -> None:
    conv_id = (1 << 63) | 0x0123456789ABCDEF
    msg = StoredMessage(
        conv=conv_id,
        seq=7,
        epoch=3,
        id="01HZX3K9Q4T8",
        client_msg_id="c-7",
        from_role="agent",
        from_id="alice",
        from_name="爱丽丝",
        text="满99元包邮 🚚",
        ts=1_715_000_000_123,
        meta={"kb": "shipping_fee", "score": 0.91, "tags": ["a", "b"]},
    )
    conv = StoredConversation(
        id=conv_id,
        visitor_id="v-9",
        user_id="user-42",
        status="assigned",
        agent_id="alice",
        group="sales",
        epoch=3,
        top_seq=7,
        created_ts=1,
        updated_ts=2,
        metadata={"page": "/cart", "vip": True},
    )
    agent = StoredAgent(
        id="alice", name="Alice", token_hash="ab" * 32, weight=3, max_chats=5, groups=["sales"]
    )

    async def write(s: Store) -> None:
        await s.append_message(msg, conv)
        await s.put_agent(agent)
        await s.put_read_mark(conv_id, "agent:alice", 7)
        await s.put_meta("node_secret", b"\x00\xffsecret")

    s = Store.open(db_path)
    run(write(s))
    s.close()
    with Store.open(db_path) as s:
        assert s.history(conv_id) == ([msg], False)
        assert s.get_conversation(conv_id) == conv
        assert s.get_agent("alice") == agent
        assert s.agents() == [agent]
        assert s.get_dedup(conv_id, "c-7") == 7
        assert s.get_read_mark(conv_id, "agent:alice") == 7
        assert s.read_marks(conv_id) == {"agent:alice": 7}
        assert s.get_meta("node_secret") == b"\x00\xffsecret"
        assert s.open_conversation_of_user("user-42") == conv_id
        assert s.get_meta("schema_version") == store_mod.SCHEMA_VERSION.to_bytes(8, "big")


def test_records_are_msgpack_arrays() -> None:
    raw = msgspec.msgpack.encode(message(1, 1))
    assert isinstance(msgspec.msgpack.decode(raw), list)  # array_like: no field names stored


def test_key_order_is_numeric_order() -> None:
    seqs = [0, 1, 2, 255, 256, 257, 65_535, 65_536, 1 << 32, (1 << 63) - 1, 1 << 63, (1 << 64) - 1]
    convs = [0, 1, 255, 256, (1 << 63) - 1, 1 << 63, (1 << 63) + 1, (1 << 64) - 1]
    keys = [message_key(c, s) for c in convs for s in seqs]
    assert sorted(keys) == keys
    assert sorted(conversation_key(c) for c in convs) == [conversation_key(c) for c in convs]
    assert len(message_key(1, 1)) == 17 and len(conversation_key(1)) == 9
    # Fixed width: a dedup key of one conversation never sorts among another's.
    assert dedup_key(1, "\xff" * 10) < dedup_key(2, "a")


def test_history_iterates_in_numeric_order_across_byte_boundaries(store: Store) -> None:
    neighbour_low, conv, neighbour_high = (1 << 63) - 1, 1 << 63, (1 << 63) + 1
    top = (1 << 64) - 1

    async def fill() -> None:
        futs = [store.append_message(message(conv, seq)) for seq in range(1, 300)]
        futs += [store.append_message(message(n, 1)) for n in (neighbour_low, neighbour_high)]
        futs += [store.append_message(message(top, seq)) for seq in (1, 256, 1 << 40)]
        await asyncio.gather(*futs)

    run(fill())
    assert all_seqs(store, conv) == list(range(1, 300))
    page, more = store.history(conv, after=254, limit=3)
    assert [m.seq for m in page] == [255, 256, 257] and more
    assert all_seqs(store, top) == [1, 256, 1 << 40]  # the last conversation id: no overflow
    assert [m.seq for m in store.tail(conv, 3)] == [297, 298, 299]
    assert [m.seq for m in store.tail(top, 2)] == [256, 1 << 40]
    assert store.top_seq(conv) == 299 and store.top_seq(neighbour_high) == 1
    assert store.top_seq(conv + 2) == 0 and store.tail(conv + 2) == []


def test_conv_id_format_and_parse() -> None:
    for conv in (0, 1, 0xDEADBEEF, (1 << 63) + 5, (1 << 64) - 1):
        text = format_conv_id(conv)
        assert len(text) == 16 and text == text.lower()
        assert parse_conv_id(text) == conv
    assert format_conv_id(255) == "00000000000000ff"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "123",
        "00000000000000ff0",
        "00000000000000FF",
        "0x000000000000ff",
        "g000000000000000",
        " 00000000000000f",
        "00000000000000f\n",
        "+000000000000000",
        "-000000000000001",
        "0000_00000000000",
        "٠٠٠٠٠٠٠٠٠٠٠٠٠٠٠٠",  # Arabic-Indic digits: int() accepts them, the wire does not
    ],
)
def test_parse_conv_id_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_conv_id(text)


def test_parse_conv_id_rejects_non_strings() -> None:
    with pytest.raises(ValueError):
        parse_conv_id(b"00000000000000ff")  # type: ignore[arg-type]


@pytest.mark.parametrize("conv", [-1, 1 << 64])
def test_format_conv_id_rejects_out_of_range(conv: int) -> None:
    with pytest.raises(ValueError):
        format_conv_id(conv)


def test_new_conversation_ids(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    ids = {store.new_conversation_id() for _ in range(200)}
    assert len(ids) == 200 and all(0 < i < 1 << 63 for i in ids)

    async def occupy() -> None:
        await store.put_conversation(conversation(5))
        store.put_conversation(conversation(6))  # queued, not yet written: still taken
        draws = iter([5, 0, 6, 7])
        monkeypatch.setattr(store_mod.secrets, "randbits", lambda _bits: next(draws))
        assert store.new_conversation_id() == 7
        await store.barrier()

    run(occupy())


# ---------------------------------------------------------------------------------------------
# group commit


@pytest.mark.parametrize("loop_factory", LOOPS)
def test_one_tick_of_appends_is_one_batch(store: Store, loop_factory: LoopFactory) -> None:
    async def main() -> None:
        futs = [store.append_message(message(1, seq, f"c{seq}")) for seq in range(1, 1001)]
        assert store.writer.batches_written == 0  # nothing written inside the caller's step
        await asyncio.gather(*futs)

    run(main(), loop_factory)
    w = store.writer
    assert (w.batches_written, w.messages_written, w.ops_written) == (1, 1000, 2000)
    assert w.last_batch_messages == 1000 and w.unacked_count == 0
    assert all_seqs(store, 1) == list(range(1, 1001))


@pytest.mark.parametrize("loop_factory", LOOPS)
def test_appends_from_many_tasks_in_one_tick_share_a_batch(
    store: Store, loop_factory: LoopFactory
) -> None:
    async def appender(seq: int) -> int:
        await store.append_message(message(2, seq))
        return seq

    async def main() -> list[int]:
        return await asyncio.gather(*(appender(seq) for seq in range(1, 1001)))

    assert run(main(), loop_factory) == list(range(1, 1001))
    assert store.writer.batches_written == 1


@pytest.mark.parametrize("loop_factory", LOOPS)
def test_appends_across_ticks_make_batches_and_acks_keep_order(
    store: Store, loop_factory: LoopFactory
) -> None:
    acked: list[int] = []

    async def main() -> None:
        futs = []
        for tick in range(5):
            for i in range(1, 101):
                seq = tick * 100 + i
                fut = store.append_message(message(3, seq))
                fut.add_done_callback(lambda _f, seq=seq: acked.append(seq))
                futs.append(fut)
            await asyncio.sleep(0)
        await asyncio.gather(*futs)

    run(main(), loop_factory)
    assert store.writer.batches_written >= 2
    assert acked == list(range(1, 501))


@pytest.mark.parametrize("durability", ["process", "fsync"])
def test_after_ack_runs_once_a_batch_is_answered(
    db_path: str, durability: str, caplog: pytest.LogCaptureFixture
) -> None:
    answered: list[int] = []
    seen: list[list[int]] = []
    with Store.open(db_path, durability=durability) as s:

        def after_ack() -> None:
            seen.append(list(answered))
            if len(seen) == 2:
                raise RuntimeError("after_ack broke")

        s.writer.after_ack = after_ack

        async def main() -> None:
            for seq in range(1, 4):
                s.append_message_then(message(40, seq), lambda exc, seq=seq: answered.append(seq))
            await s.barrier()
            for seq in range(4, 6):
                s.append_message_then(message(40, seq), lambda exc, seq=seq: answered.append(seq))
            await s.barrier()
            # A failing hook is logged; the writer goes on.
            await s.append_message(message(40, 6))

        with caplog.at_level(logging.ERROR, logger="kefu.store"):
            run(main())
    assert answered == [1, 2, 3, 4, 5]
    assert seen[:2] == [[1, 2, 3], [1, 2, 3, 4, 5]]  # after every callback of its batch
    assert len(seen) == 3 and "after_ack failed" in caplog.text
    with Store.open(db_path) as s:
        assert all_seqs(s, 40) == [1, 2, 3, 4, 5, 6]


def test_after_ack_waits_for_the_turn_when_a_full_batch_forced_the_write(db_path: str) -> None:
    answered: list[int] = []
    seen: list[list[int]] = []
    with Store.open(db_path, batch_max_entries=2) as s:
        s.writer.after_ack = lambda: seen.append(list(answered))

        async def main() -> None:
            for seq in range(1, 6):  # one step: batches [1, 2] and [3, 4] forced, [5] at the tick
                s.append_message_then(message(41, seq), lambda exc, seq=seq: answered.append(seq))
            assert answered == [1, 2, 3, 4] and seen == []  # forced: answered, no after_ack
            for _ in range(3):
                await asyncio.sleep(0)  # the tick writes [5]
            assert seen == [[1, 2, 3, 4, 5]]  # that batch's answer: after_ack, once

        run(main())


def test_batch_is_cut_at_batch_max_entries(db_path: str) -> None:
    acked: list[int] = []
    with Store.open(db_path, batch_max_entries=100) as s:

        async def main() -> None:
            futs = []
            for seq in range(1, 251):
                fut = s.append_message(message(4, seq))
                fut.add_done_callback(lambda _f, seq=seq: acked.append(seq))
                futs.append(fut)
            await asyncio.gather(*futs)

        run(main())
        assert s.writer.batches_written == 3 and s.writer.last_batch_entries == 50
    assert acked == list(range(1, 251))


def test_barrier_waits_for_everything_before_it(store: Store) -> None:
    async def main() -> None:
        assert store.barrier().done()  # nothing queued
        futs = [store.append_message(message(5, seq)) for seq in range(1, 11)]
        await store.barrier()
        assert all(f.done() for f in futs)

    run(main())


def test_cancelled_wait_does_not_cancel_the_write(store: Store) -> None:
    async def main() -> None:
        fut = store.append_message(message(6, 1))
        fut.cancel()
        await store.barrier()

    run(main())
    assert all_seqs(store, 6) == [1]


# ---------------------------------------------------------------------------------------------
# history


def test_history_paging(store: Store) -> None:
    append_all(store, 9, range(1, 11))
    page, more = store.history(9)
    assert [m.seq for m in page] == list(range(1, 11)) and not more
    page, more = store.history(9, after=0, limit=10)
    assert len(page) == 10 and not more  # exactly the rest: no more
    page, more = store.history(9, after=0, limit=9)
    assert [m.seq for m in page] == list(range(1, 10)) and more
    page, more = store.history(9, after=9, limit=5)
    assert [m.seq for m in page] == [10] and not more
    assert store.history(9, after=10) == ([], False)
    assert store.history(9, after=(1 << 64) - 1) == ([], False)
    page, more = store.history(9, after=3, limit=2)
    assert [m.seq for m in page] == [4, 5] and more


def test_history_limit_is_capped(store: Store) -> None:
    count = HISTORY_MAX_LIMIT + 20
    append_all(store, 10, range(1, count + 1))
    page, more = store.history(10, limit=10_000)
    assert len(page) == HISTORY_MAX_LIMIT and more
    assert len(store.tail(10, limit=10_000)) == HISTORY_MAX_LIMIT


def test_history_of_empty_and_unknown_conversations(store: Store) -> None:

    async def main() -> None:
        await store.put_conversation(conversation(11))

    run(main())
    assert store.history(11) == ([], False)
    assert store.history(12345) == ([], False)
    assert store.get_conversation(12345) is None


@pytest.mark.parametrize(("after", "limit"), [(-1, 10), (0, 0), (0, -5)])
def test_history_rejects_bad_bounds(store: Store, after: int, limit: int) -> None:
    with pytest.raises(ValueError):
        store.history(1, after, limit)


# ---------------------------------------------------------------------------------------------
# dedup


def test_dedup_key_is_in_the_message_batch(db_path: str) -> None:
    s = Store.open(db_path)
    batch_sizes: list[int] = []
    real_write = s.writer._write_batch

    def counting_write(batch: Any, opts: Any) -> None:
        batch_sizes.append(len(batch))
        real_write(batch, opts)

    s.writer._write_batch = counting_write

    async def main() -> None:
        fut = s.append_message(message(20, 1, "retry-me"), conversation(20, top_seq=1))
        assert s.get_dedup(20, "retry-me") == 1  # visible while queued
        await fut

    run(main())
    assert batch_sizes == [4]  # message, dedup key, conversation record, open index
    s.close()
    with Store.open(db_path) as s:
        assert s.get_dedup(20, "retry-me") == 1
        assert [m.client_msg_id for m in s.history(20)[0]] == ["retry-me"]
        assert s.get_dedup(20, "never-sent") is None
        assert s.get_dedup(21, "retry-me") is None


def test_an_append_stores_its_own_dedup_key_whatever_was_looked_up_before(
    store: Store,
) -> None:
    """The append after a ``get_dedup`` reuses the key that check built only when it is the
    same conversation and client_msg_id; any other append builds its own."""

    async def main() -> None:
        assert store.get_dedup(30, "a") is None
        await store.append_message(message(30, 1, "a"))  # the key looked up
        assert store.get_dedup(30, "b") is None
        await store.append_message(message(31, 1, "b"))  # same id, other conversation
        assert store.get_dedup(32, "c") is None
        await store.append_message(message(32, 1, "d"))  # other id
        done: list[BaseException | None] = []
        assert store.get_dedup(33, "e") is None
        store.append_message_then(message(33, 1, "e"), done.append)
        await store.barrier()
        assert done == [None]

    run(main())
    assert store.get_dedup(30, "a") == 1
    assert store.get_dedup(31, "b") == 1 and store.get_dedup(30, "b") is None
    assert store.get_dedup(32, "d") == 1 and store.get_dedup(32, "c") is None
    assert store.get_dedup(33, "e") == 1


def stored_with_cmids(db_path: str, convs: int, per_conv: int, **open_kw: Any) -> None:
    """``per_conv`` messages with client_msg_ids ``c{conv}-{seq}`` in each of ``convs``
    conversations, written and closed."""

    async def main(s: Store) -> None:
        for conv in range(1, convs + 1):
            await asyncio.gather(
                *(
                    s.append_message(message(conv, seq, f"c{conv}-{seq}"))
                    for seq in range(1, per_conv + 1)
                )
            )

    with Store.open(db_path, **open_kw) as s:
        run(main(s))


def test_the_dedup_filter_answers_as_rocksdb_after_a_restart(db_path: str) -> None:
    stored_with_cmids(db_path, convs=30, per_conv=10)
    with Store.open(db_path) as s:
        assert not s.dedup_filter_active  # not loaded yet: every check reads RocksDB
        assert s.get_dedup(7, "c7-3") == 3
        assert s.get_dedup(7, "c7-99") is None
        assert s.dedup_filter_skips == 0
        assert s.load_dedup_filter() is True
        assert s.dedup_filter_active
        assert s.stats()["dedup_filter_keys"] == 300
        for conv in range(1, 31):
            for seq in range(1, 11):
                assert s.get_dedup(conv, f"c{conv}-{seq}") == seq
        assert s.dedup_filter_skips == 0  # a stored key is never skipped
        for conv in range(1, 31):
            for seq in range(11, 45):  # 1,020 ids never sent
                assert s.get_dedup(conv, f"c{conv}-{seq}") is None
        assert s.dedup_filter_skips + s.dedup_filter_false_positives == 1_020
        assert s.dedup_filter_skips > 1_000  # most are answered without a read
        stats = s.stats()
        assert stats["dedup_filter_active"] == 1.0
        assert stats["dedup_filter_skips_total"] == s.dedup_filter_skips
        assert stats["dedup_filter_bytes"] == 8 << 20  # 4 million keys at 10 bits, rounded up
    # A message's retry after the restart, through the node's path: the same seq.
    with Store.open(db_path) as s:
        s.load_dedup_filter()

        async def main() -> None:
            assert s.get_dedup(3, "c3-4") == 4
            assert s.get_dedup(3, "new") is None
            await s.append_message(message(3, 11, "new"))
            assert s.get_dedup(3, "new") == 11

        run(main())


def test_keys_written_while_the_filter_loads_are_found(db_path: str) -> None:
    stored_with_cmids(db_path, convs=5, per_conv=1_000)
    with Store.open(db_path) as s:

        async def main() -> None:
            assert s.load_dedup_filter(budget=1_000) is False
            # Written after the scan began: the scan's view does not hold them.
            await s.append_message(message(9, 1, "during"))
            done: list[BaseException | None] = []
            s.append_message_then(message(9, 2, "during-2"), done.append)
            await s.barrier()
            assert done == [None]
            steps = 0
            while not s.load_dedup_filter(budget=1_000):
                steps += 1
            assert steps >= 3 and s.dedup_filter_active
            assert s.get_dedup(9, "during") == 1
            assert s.get_dedup(9, "during-2") == 2
            assert all(s.get_dedup(3, f"c3-{seq}") == seq for seq in range(1, 1_001))
            assert s.dedup_filter_keys_seen() == 5_002

        run(main())


def test_the_filter_loads_on_the_loop_in_steps(db_path: str) -> None:
    stored_with_cmids(db_path, convs=3, per_conv=3_000)
    with Store.open(db_path) as s:

        async def main() -> int:
            s.start_dedup_filter(asyncio.get_running_loop())
            s.start_dedup_filter(asyncio.get_running_loop())  # a second start does nothing
            iterations = 0
            while not s.dedup_filter_active:
                await asyncio.sleep(0)
                iterations += 1
                assert iterations < 1_000
            return iterations

        iterations = run(main())
        assert iterations >= 9_000 // 2_048  # one step of DEDUP_SCAN_STEP keys per iteration
        assert s.dedup_filter_keys_seen() == 9_000
        assert s.get_dedup(2, "c2-2999") == 2999


def test_a_store_closed_while_its_filter_loads(db_path: str) -> None:
    stored_with_cmids(db_path, convs=2, per_conv=3_000)
    s = Store.open(db_path)

    async def main() -> None:
        s.start_dedup_filter(asyncio.get_running_loop())
        await asyncio.sleep(0)
        assert not s.dedup_filter_active
        s.close()
        for _ in range(5):
            await asyncio.sleep(0)  # the next step finds the store closed and stops

    run(main())
    assert not s.dedup_filter_active
    with pytest.raises(StoreUnavailable):
        s.get_dedup(1, "c1-1")


def test_a_full_dedup_filter_is_dropped_and_every_check_reads(db_path: str) -> None:
    with Store.open(db_path, dedup_filter_keys=50) as s:
        assert s.load_dedup_filter() is True and s.dedup_filter_active

        async def main() -> None:
            for seq in range(1, 61):
                await s.append_message(message(4, seq, f"m{seq}"))
                assert s.dedup_filter_active == (seq < 50)

        run(main())
        stats = s.stats()
        assert stats["dedup_filter_active"] == 0.0
        assert stats["dedup_filter_keys"] == 0 and stats["dedup_filter_bytes"] == 0
        assert all(s.get_dedup(4, f"m{seq}") == seq for seq in range(1, 61))
        assert s.get_dedup(4, "m61") is None
        skips = s.dedup_filter_skips
        assert s.get_dedup(4, "m62") is None and s.dedup_filter_skips == skips
    # Reopened with the same bound over 60 stored keys: it fills while loading, is dropped.
    with Store.open(db_path, dedup_filter_keys=50) as s:
        assert s.load_dedup_filter() is True
        assert not s.dedup_filter_active
        assert s.get_dedup(4, "m60") == 60 and s.get_dedup(4, "m70") is None
    with Store.open(db_path, dedup_filter_keys=0) as s:  # none at all
        assert s.load_dedup_filter() is True and not s.dedup_filter_active
        assert s.stats()["dedup_filter_capacity"] == 0
        assert s.get_dedup(4, "m1") == 1 and s.get_dedup(4, "m0") is None
    with pytest.raises(ValueError, match="dedup_filter_keys"):
        Store.open(db_path, dedup_filter_keys=-1)


def test_client_msg_id_limits(store: Store) -> None:
    async def main() -> None:
        await store.append_message(message(22, 1, "x" * 64))
        await store.append_message(message(22, 2, "你" * 21))  # 63 bytes
        for seq, bad in ((3, "x" * 65), (4, "你" * 22), (5, "")):
            with pytest.raises(ValueError):
                store.append_message(message(22, seq, bad))
        assert store.writer.unacked_count == 0  # nothing enqueued for a refused message

    run(main())
    assert all_seqs(store, 22) == [1, 2]


def test_negative_and_zero_seq_rejected(store: Store) -> None:
    async def main() -> None:
        for seq in (0, -1):
            with pytest.raises(ValueError):
                store.append_message(message(23, seq))
        with pytest.raises(ValueError):
            store.put_read_mark(23, "visitor:v1", -1)
        with pytest.raises(ValueError):
            store.append_message(message(-1, 1))
        with pytest.raises(ValueError):
            store.append_message(message(23, 1), conversation(24))  # record of another conv

    run(main())


def test_bad_records_rejected(store: Store) -> None:
    async def main() -> None:
        with pytest.raises(ValueError):
            store.put_conversation(conversation(1, status="open"))
        with pytest.raises(ValueError):
            store.put_read_mark(1, "admin:root", 1)
        with pytest.raises(ValueError):
            store.put_read_mark(1, "visitor:", 1)
        with pytest.raises(ValueError):
            store.put_agent(StoredAgent(id="a" * 300, name="long"))
        bad_role = message(1, 1)
        bad_role.from_role = "robot"
        with pytest.raises(ValueError):
            store.append_message(bad_role)
        with pytest.raises(ValueError):
            store.write([(b"", b"v")])

    run(main())


# ---------------------------------------------------------------------------------------------
# read marks, agents, raw writes


def test_read_marks_only_move_forward(store: Store) -> None:
    async def main() -> None:
        await store.put_read_mark(30, "visitor:v1", 5)
        written = store.writer.batches_written
        await store.put_read_mark(30, "visitor:v1", 3)
        assert store.writer.batches_written == written  # an older mark writes nothing
        await store.put_read_mark(30, "agent:alice", 9)

    run(main())
    assert store.get_read_mark(30, "visitor:v1") == 5
    assert store.read_marks(30) == {"agent:alice": 9, "visitor:v1": 5}
    assert store.get_read_mark(31, "visitor:v1") == 0
    assert store.read_marks(31) == {}


def test_agents_put_list_delete(store: Store) -> None:
    async def main() -> None:
        await asyncio.gather(
            *(store.put_agent(StoredAgent(id=f"agent-{i}", name=f"A{i}")) for i in range(3))
        )
        await store.delete_agent("agent-1")

    run(main())
    assert [a.id for a in store.agents()] == ["agent-0", "agent-2"]
    assert store.get_agent("agent-1") is None
    assert len(store.agents(limit=1)) == 1


def test_raw_write(store: Store) -> None:
    async def main() -> None:
        await store.write([(read_mark_key(40, "visitor:v1"), (7).to_bytes(8, "big"))])
        await store.write([(read_mark_key(40, "visitor:v1"), None)])

    run(main())
    assert store.get_read_mark(40, "visitor:v1") == 0


# ---------------------------------------------------------------------------------------------
# back-pressure and failures


def test_full_queue_raises_store_busy_immediately(db_path: str) -> None:
    s = Store.open(db_path, max_pending=10)

    async def main() -> None:
        futs = [s.append_message(message(50, seq)) for seq in range(1, 11)]
        with pytest.raises(StoreBusy):
            s.append_message(message(50, 11, "refused"))
        assert s.writer.busy_rejections == 1
        assert s.get_dedup(50, "refused") is None
        await asyncio.gather(*futs)
        await s.append_message(message(50, 12))  # room again once acked

    run(main())
    s.close()
    with Store.open(db_path) as s:
        assert all_seqs(s, 50) == [*range(1, 11), 12]
        assert s.get_dedup(50, "refused") is None


def test_byte_budget(db_path: str) -> None:
    with Store.open(db_path, max_pending_bytes=2_000) as s:

        async def main() -> None:
            first = s.append_message(message(51, 1, text="x" * 1_500))
            with pytest.raises(StoreBusy):
                s.append_message(message(51, 2, text="y" * 600))
            with pytest.raises(ValueError):  # could never fit: not a retryable condition
                s.append_message(message(51, 3, text="z" * 3_000))
            await first

        run(main())
        assert all_seqs(s, 51) == [1]


def _failing_write(batch: Any, opts: Any) -> None:
    raise OSError("disk on fire")


def test_write_failure_fails_every_waiter_and_the_store(store: Store) -> None:
    async def main() -> None:
        futs = [store.append_message(message(60, seq)) for seq in range(1, 6)]
        store.writer._write_batch = _failing_write
        gathered = asyncio.gather(*futs, return_exceptions=True)
        results = await asyncio.wait_for(gathered, 10)
        assert all(isinstance(r, StoreUnavailable) for r in results)
        assert isinstance(results[0].__cause__, OSError)
        assert not store.healthy and store.stats()["healthy"] == 0.0
        with pytest.raises(StoreUnavailable):
            store.append_message(message(60, 6))
        with pytest.raises(StoreUnavailable):
            store.barrier()

    run(main())
    assert store.history(60) == ([], False)  # reads keep working


class _Run:
    """A completion the writer answers a run at a time (``set_batch_handler``)."""

    def __init__(self, seq: int, log: list[Any]) -> None:
        self.seq = seq
        self.log = log

    def __call__(self, exc: BaseException | None) -> None:
        self.log.append(("one", self.seq, type(exc).__name__ if exc else None))


def test_runs_of_a_batch_handler_are_answered_in_order_between_other_completions(
    store: Store,
) -> None:
    log: list[Any] = []

    def handler(run: list[_Run]) -> None:
        log.append(("run", [r.seq for r in run]))
        if run[0].seq == 7:
            raise RuntimeError("a handler's failure is logged; the writer goes on")

    store.writer.set_batch_handler(_Run, handler)

    async def main() -> None:
        for seq in range(1, 10):
            done: Any = (
                (lambda exc, seq=seq: log.append(("plain", seq)))
                if seq in (3, 6)
                else _Run(seq, log)
            )
            store.append_message_then(message(62, seq), done)
        await store.barrier()

    run(main())
    assert log == [
        ("run", [1, 2]),
        ("plain", 3),
        ("run", [4, 5]),
        ("plain", 6),
        ("run", [7, 8, 9]),
    ]
    assert store.writer.unacked_count == 0 and all_seqs(store, 62) == list(range(1, 10))


def test_a_failed_write_calls_each_completion_of_a_run_with_the_error(store: Store) -> None:
    log: list[Any] = []
    store.writer.set_batch_handler(_Run, lambda run: log.append(("run", len(run))))

    async def main() -> None:
        for seq in (1, 2):
            store.append_message_then(message(63, seq), _Run(seq, log))
        store.writer._write_batch = _failing_write
        for _ in range(100):
            if len(log) == 2:
                break
            await asyncio.sleep(0)

    run(main())
    assert log == [("one", 1, "StoreUnavailable"), ("one", 2, "StoreUnavailable")]


def test_db_closed_under_the_writer(store: Store) -> None:
    async def main() -> None:
        fut = store.append_message(message(61, 1))
        store._db.close()
        with pytest.raises(StoreUnavailable):
            await asyncio.wait_for(fut, 10)
        assert not store.healthy

    run(main())


def test_fsync_failure_fails_every_waiter(db_path: str) -> None:
    s = Store.open(db_path, durability="fsync")

    def failing_sync(_sync: bool) -> None:
        raise OSError("EIO")

    s.writer._sync_wal = failing_sync

    async def main() -> None:
        futs = [s.append_message(message(62, seq)) for seq in range(1, 4)]
        gathered = asyncio.gather(*futs, return_exceptions=True)
        results = await asyncio.wait_for(gathered, 10)
        assert all(isinstance(r, StoreUnavailable) for r in results)
        assert not s.healthy
        with pytest.raises(StoreUnavailable):
            s.append_message(message(62, 4))

    run(main())
    s.close()


def test_close_flushes_and_is_idempotent(db_path: str) -> None:
    s = Store.open(db_path, durability="fsync")

    async def main() -> None:
        futs = [s.append_message(message(70, seq)) for seq in range(1, 6)]
        s.close()  # same step: nothing was written yet
        s.close()
        assert all(f.done() and f.exception() is None for f in futs)
        with pytest.raises(StoreUnavailable):
            s.append_message(message(70, 6))
        with pytest.raises(StoreUnavailable):
            s.history(70)

    run(main())
    with Store.open(db_path) as reopened:
        assert all_seqs(reopened, 70) == [1, 2, 3, 4, 5]


def test_foreign_directory_and_schema_refused(db_path: str, tmp_path: Path) -> None:
    from rocksdict import Options, Rdict

    foreign = str(tmp_path / "foreign")
    opts = Options(raw_mode=True)
    opts.create_if_missing(True)
    db = Rdict(foreign, opts)
    db[b"zzz"] = b"1"
    db.close()
    with pytest.raises(StoreError):
        Store.open(foreign)
    Store.open(db_path).close()
    db = Rdict(db_path, Options(raw_mode=True))
    db[b"kschema_version"] = (99).to_bytes(8, "big")
    db.close()
    with pytest.raises(StoreError):
        Store.open(db_path)
    with pytest.raises(ValueError):
        Store.open(str(tmp_path / "x"), durability="sometimes")  # type: ignore[arg-type]


def test_second_open_of_one_directory_refused(store: Store, db_path: str) -> None:
    with pytest.raises(StoreError):
        Store.open(db_path)  # RocksDB's lock: two nodes must not share a directory


# ---------------------------------------------------------------------------------------------
# fsync mode


def test_fsync_acks_only_after_the_wal_sync(db_path: str) -> None:
    s = Store.open(db_path, durability="fsync")
    real_sync = s.writer._sync_wal
    gate, entered = threading.Event(), threading.Event()
    syncs_done = [0]

    def gated_sync(sync: bool) -> None:
        entered.set()
        gate.wait(10)
        real_sync(sync)
        syncs_done[0] += 1

    s.writer._sync_wal = gated_sync
    seen_at_ack: dict[int, int] = {}

    def append(seq: int) -> asyncio.Future[None]:
        fut = s.append_message(message(80, seq, f"c{seq}"))
        fut.add_done_callback(lambda _f: seen_at_ack.__setitem__(seq, syncs_done[0]))
        return fut

    async def main() -> None:
        first = [append(seq) for seq in range(1, 11)]
        while not entered.is_set():
            await asyncio.sleep(0.001)
        # Batch 1 is in RocksDB, its sync is held: no ack may come out.
        second = [append(seq) for seq in range(11, 21)]
        await asyncio.sleep(0.02)
        assert s.writer.batches_written == 2  # batch 2 was written while batch 1 synced
        assert not any(f.done() for f in first + second)
        assert s.writer.awaiting_sync == 20
        gate.set()
        await asyncio.gather(*first, *second)

    try:
        run(main())
    finally:
        gate.set()
    assert all(seen_at_ack[seq] >= 1 for seq in range(1, 11))
    assert all(seen_at_ack[seq] >= 2 for seq in range(11, 21))
    assert s.writer.syncs == 2
    s.close()
    with Store.open(db_path) as s:
        assert all_seqs(s, 80) == list(range(1, 21))


def test_fsync_end_to_end(db_path: str) -> None:
    s = Store.open(db_path, durability="fsync")

    async def appender(conv: int) -> None:
        for seq in range(1, 21):
            await s.append_message(message(conv, seq, f"c{seq}"))

    async def main() -> None:
        await asyncio.gather(*(appender(conv) for conv in range(1, 51)))

    run(main())
    assert s.writer.messages_written == 1000 and s.writer.syncs >= 1
    assert s.writer.batches_written < 1000  # appenders shared batches
    s.close()
    with Store.open(db_path) as s:
        assert all(all_seqs(s, conv) == list(range(1, 21)) for conv in range(1, 51))


# ---------------------------------------------------------------------------------------------
# recovery


def test_recover_open_conversations_and_true_top_seq(db_path: str) -> None:
    s = Store.open(db_path)

    async def main() -> None:
        # A: the record says top_seq 1, the log holds 3 (record written only at creation).
        await s.append_message(message(100, 1), conversation(100, user_id="u-a", top_seq=1))
        await s.append_message(message(100, 2))
        await s.append_message(message(100, 3))
        # B: closed; it and its user index must not come back.
        await s.append_message(message(101, 1), conversation(101, user_id="u-b", top_seq=1))
        await s.put_conversation(conversation(101, "closed", user_id="u-b", top_seq=1))
        # C: queued, no message yet.
        await s.put_conversation(conversation(102, "queued", user_id="u-c"))
        # D: its record is ahead of the log (e.g. messages removed): never reuse a seq.
        await s.put_conversation(conversation(103, "assigned", agent_id="alice", top_seq=40))

    run(main())
    s.close()
    with Store.open(db_path) as s:
        recovered = {c.id: c for c in s.recover()}
        assert set(recovered) == {100, 102, 103}
        assert recovered[100].top_seq == 3
        # The last activity is the last message's, though the record was written before it.
        assert recovered[100].updated_ts == message(100, 3).ts
        assert recovered[102].updated_ts == 0  # no message: the record's
        assert s.last_message(100) == message(100, 3) and s.last_message(102) is None
        assert recovered[102].top_seq == 0 and recovered[102].status == "queued"
        assert recovered[103].top_seq == 40 and recovered[103].agent_id == "alice"
        assert s.open_conversation_of_user("u-a") == 100
        assert s.open_conversation_of_user("u-b") is None
        assert s.open_conversation_of_user("u-c") == 102
        assert s.get_conversation(101) is not None  # closed, still readable


def test_user_index_is_visible_while_queued_and_survives_a_stale_close(store: Store) -> None:
    async def main() -> None:
        fut = store.put_conversation(conversation(110, user_id="u-1"))
        assert store.open_conversation_of_user("u-1") == 110  # idempotent create sees it
        await fut
        await store.put_conversation(conversation(110, "closed", user_id="u-1"))
        await store.put_conversation(conversation(111, user_id="u-1"))
        # Closing the old conversation again must not drop the new one's index entry.
        await store.put_conversation(conversation(110, "closed", user_id="u-1"))

    run(main())
    assert store.open_conversation_of_user("u-1") == 111
    assert [c.id for c in store.recover()] == [111]


# ---------------------------------------------------------------------------------------------
# kill -9

_CHILD = textwrap.dedent(
    """
    import asyncio, random, sys
    from kefu.store import Store, StoredMessage

    async def main() -> None:
        store = Store.open(sys.argv[1])
        out = sys.stdout

        def printer(seq):
            def acked(fut):
                if not fut.cancelled() and fut.exception() is None:
                    out.write(f"{seq}\\n")
                    out.flush()
            return acked

        out.write("ready\\n")
        out.flush()
        seq = 0
        while True:
            futs = []
            for _ in range(random.randint(1, 40)):
                seq += 1
                fut = store.append_message(StoredMessage(
                    conv=7, seq=seq, epoch=1, id=f"m{seq}", client_msg_id=f"c{seq}",
                    from_role="visitor", from_id="v", from_name="V", text="x" * 100, ts=seq,
                ))
                fut.add_done_callback(printer(seq))
                futs.append(fut)
            await asyncio.gather(*futs)

    asyncio.run(main())
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("round_", range(3))
def test_process_durability_survives_kill_9(tmp_path: Path, round_: int) -> None:
    db = str(tmp_path / "db")
    out_path = tmp_path / "acked.txt"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(out_path, "w") as out:
        child = subprocess.Popen([sys.executable, "-c", _CHILD, db], stdout=out, cwd=REPO, env=env)
    try:
        deadline = time.monotonic() + 30
        while not out_path.read_text().startswith("ready\n"):
            assert child.poll() is None, "the child died before it was ready"
            assert time.monotonic() < deadline, "the child never got ready"
            time.sleep(0.01)
        time.sleep(random.uniform(0.1, 0.4))
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL
    lines = out_path.read_text().split("\n")[1:-1]  # the last piece may be a torn line
    acked = [int(line) for line in lines]
    assert acked, "nothing was acked before the kill"
    assert acked == list(range(1, len(acked) + 1))  # acks came out in order
    with Store.open(db) as s:
        present = all_seqs(s, 7)
        assert present == list(range(1, len(present) + 1))  # gap-free from 1
        assert len(present) >= acked[-1]  # every acked message is there
        top = present[-1]
        assert s.get_dedup(7, f"c{top}") == top  # dedup keys rode with their messages
        assert s.get_dedup(7, f"c{top + 1}") is None


_NICE_CHILD = textwrap.dedent(
    """
    import os, sys

    os.nice(int(sys.argv[3]))  # the whole process started under `nice`
    from kefu.store import Store

    def nices():
        out = {}
        for task in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{task}/comm") as f:
                name = f.read().strip()
            out[int(task)] = (name, os.getpriority(os.PRIO_PROCESS, int(task)))
        return out

    with Store.open(sys.argv[1] + "/off", background_nice=0):
        print("off", sorted(set(nice for _, nice in nices().values())))
    with Store.open(sys.argv[1] + "/on", background_nice=int(sys.argv[2])):
        for tid, (name, nice) in sorted(nices().items()):
            print("on", "main" if tid == os.getpid() else name, nice)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="thread priorities: Linux")
def test_rocksdb_background_threads_yield_to_the_loop(tmp_path: Path) -> None:
    """``background_nice`` lowers the priority of RocksDB's flush and compaction threads only
    (a fresh process: the thread pool is the process's)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def child(start_nice: int) -> tuple[list[str], set[int], set[int]]:
        run_ = subprocess.run(
            [
                sys.executable,
                "-c",
                _NICE_CHILD,
                str(tmp_path / str(start_nice)),
                "7",
                str(start_nice),
            ],
            capture_output=True,
            text=True,
            cwd=REPO,
            env=env,
            timeout=60,
        )
        assert run_.returncode == 0, run_.stderr
        lines = run_.stdout.splitlines()
        on = [line.split() for line in lines[1:]]
        rocksdb = [int(nice) for _, name, nice in on if name.startswith("rocksdb:")]
        assert len(rocksdb) >= 2  # at least a flush and a compaction thread
        others = {int(nice) for _, name, nice in on if not name.startswith("rocksdb:")}
        return lines, set(rocksdb), others

    lines, rocksdb, others = child(0)
    assert lines[0] == "off [0]"  # nothing changed with 0
    assert rocksdb == {7} and others == {0}  # the loop's thread (and any other) untouched
    # Started under `nice -n 12`: no thread is given a higher priority than it had.
    lines, rocksdb, others = child(12)
    assert lines[0] == "off [12]" and rocksdb == {12} and others == {12}
    with pytest.raises(ValueError, match="background_nice"):
        Store.open(str(tmp_path / "bad"), background_nice=20)


def test_memtables_are_small_and_merged_four_to_a_flush(tmp_path: Path) -> None:
    # kefu.store, "Memtable size": RocksDB records the options it runs with in the data
    # directory's OPTIONS file; these are the ones that keep compactions the size they were.
    with Store.open(str(tmp_path / "db")):
        pass
    (options_file,) = sorted((tmp_path / "db").glob("OPTIONS-*"))[-1:]
    text = options_file.read_text(encoding="utf-8")
    settings = dict(line.strip().split("=", 1) for line in text.splitlines() if "=" in line)
    assert settings["write_buffer_size"] == str(4 << 20)
    assert settings["max_write_buffer_number"] == "8"
    assert settings["min_write_buffer_number_to_merge"] == "4"
    assert settings["level0_file_num_compaction_trigger"] == "8"
    assert settings["max_total_wal_size"] == str(32 << 20)
    # A configured size scales the WAL bound with it.
    with Store.open(str(tmp_path / "db2"), write_buffer_bytes=16 << 20):
        pass
    text = sorted((tmp_path / "db2").glob("OPTIONS-*"))[-1].read_text(encoding="utf-8")
    assert "write_buffer_size=16777216" in text and "max_total_wal_size=134217728" in text
