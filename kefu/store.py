"""The durable store of one node: RocksDB through rocksdict, with group commit.

Key layout
----------
Every key starts with a one-byte prefix; integers are fixed-width big-endian, so RocksDB's
bytewise order is numeric order and a conversation's history is one contiguous key range.

=============================  =====================  ========================================
key                            value                  what
=============================  =====================  ========================================
``m`` conv(8) seq(8)           StoredMessage          a message
``c`` conv(8)                  StoredConversation     a conversation
``o`` conv(8)                  empty                  index: the conversation is not closed
``d`` conv(8) client_msg_id    seq(8)                 dedup of a sender's retry
``r`` conv(8) reader           seq(8)                 read mark (``visitor:<id>``/``agent:<id>``)
``u`` user_id                  conv(8)                index: the open conversation of a user
``a`` agent_id                 StoredAgent            an agent
``s`` agent_id                 StoredAgentSessions    what ends the agent's session tokens early
``k`` name                     bytes                  meta values (schema version, secrets)
=============================  =====================  ========================================

Records are msgspec Structs encoded as MessagePack arrays (``array_like``): measured on a
typical message, 125 bytes and 118 ns to encode against 198 bytes and 173 ns as a map. The
price is that a field may only be added at the end of a record, with a default.

Conversation ids are random 63-bit integers (nonzero, checked against the store); the wire
format prints them as 16 lowercase hex digits (:func:`format_conv_id`, :func:`parse_conv_id`).

Group commit
------------
Every write goes through one :class:`GroupCommitWriter` and resolves an ``asyncio.Future``
once it is durable. The write methods are plain functions that enqueue synchronously and
return that future, so the enqueue order is the call order (the caller assigns ``seq`` and
enqueues in the same step) and a full queue raises :class:`StoreBusy` at the call, before
anything is awaited. Awaiting the future is the ack: ``await store.append_message(msg)``.

- The first write of a loop iteration schedules one flush with ``loop.call_soon``; every write
  of that iteration joins the same ``WriteBatch``. A batch is also cut when the pending queue
  reaches ``batch_max_entries`` entries or ``batch_max_bytes``, because the write runs on the
  loop: measured here, building and writing a batch of 1,000 messages costs 1.3 ms of loop
  time, 4,000 cost 10 ms.
- One entry (a message with its dedup key and, when passed, its conversation record) is never
  split across batches, so RocksDB's atomic batch keeps them together.
- ``durability="process"`` (the default): the batch is written with the WAL and without sync.
  RocksDB hands the WAL to the kernel on every write, so an acked message survives ``kill -9``
  of the process, not a power loss. Acks follow the write.
- ``durability="fsync"``: the batch is written unsynced on the loop, then
  ``db.flush_wal(True)`` syncs the WAL in one dedicated thread, and only then are its entries
  acked. Measured with rocksdict 0.3.29 (``python -m bench.bench_store``): ``write``/``put``
  with ``sync=True`` keep the GIL through the fdatasync, so a spinning main thread stood still
  for 240 µs per 170 to 190 µs sync; around ``flush_wal(True)`` it stood still for 3 to 130 µs.
  One sync runs at a time; batches keep being written while it runs and wait for the next
  sync, which covers them all. Acks stay in write order because a sync covers everything
  written before it started and syncs run one after another. Writing during the sync takes
  the batch write off the path between two syncs: with a simulated 10 ms sync and 20 messages
  offered per ms, p99 ack latency was 25 ms against 30 ms when batches wait for the sync;
  with this machine's 0.2 ms syncs and 1,000 appenders the two do not differ (the loop, at
  about 1,000 messages per iteration, is the bottleneck in both durability modes).
- Budget: at most ``max_pending`` entries and ``max_pending_bytes`` of keys and values may be
  unacknowledged (queued, or written and waiting for a sync). Past it the call raises
  :class:`StoreBusy` and enqueues nothing; the caller turns that into back-pressure or an
  error frame. A single write larger than the whole byte budget is a ``ValueError``.
- A failed write or sync marks the store unhealthy for good (``healthy`` is False; after a
  failed fsync the kernel may have dropped the dirty pages, so retrying would lie). Every
  unacknowledged future gets :class:`StoreUnavailable` (chained to the RocksDB error), and
  later writes raise it at the call. A failure may be reported for a write that did reach the
  disk; the client's retry with the same ``client_msg_id`` is then answered as a duplicate.
- Cancelling the wait does not cancel the write.

The pending queue is ``kefu._core.mq.BatchQueue``, bounded by ``max_pending`` entries and
``max_pending_bytes``; a batch is one ``drain(batch_max_entries, batch_max_bytes)``.

Reads
-----
Reads are synchronous: point reads and bounded iterators cost microseconds. Point reads see
writes that are queued but not yet in RocksDB (an overlay keyed by the same keys, bounded by the
write budget), so a retried ``client_msg_id`` or a second create for the same user in the same
moment finds the first one. Messages are not overlaid: history shows what RocksDB holds. In
fsync mode RocksDB holds a batch before its sync, so a reader may see a message shortly before
its sender's ack; a seq found by :meth:`Store.get_dedup` may likewise not be durable yet, and
the duplicate's ack waits for :meth:`Store.barrier`.

Dedup filter
------------
Nearly every ``send`` carries a ``client_msg_id`` never seen before, and its dedup check was a
RocksDB point read that finds nothing (a memtable search and the tables' bloom filters: 4 to
6 µs per message under load, a tenth of the node's CPU per message). The store keeps its own
Bloom filter (``kefu._core.bloom``) over every dedup key in RocksDB or queued for it: a key the
filter has never seen is answered "new" at once; a key it may have seen is read as before. So
the answer is the same as without the filter; a false positive costs the read it saves.

- Every dedup key is added when its message is enqueued, before the write. The keys already
  stored are added by a scan of the ``d`` range after :meth:`Store.open`, in steps of
  :data:`DEDUP_SCAN_STEP` keys (:meth:`Store.start_dedup_filter` runs them on the loop, one
  step per iteration; :meth:`Store.load_dedup_filter` runs them at once). The filter is used
  only once the scan is done: a key written meanwhile was added by its write.
- Bound: ``dedup_filter_keys`` keys at 10 bits each, rounded up to a power of two (4 million
  keys: 8 MiB; 0.2 % false positives when full, a key's bits in one cache line). At that count
  the store drops the filter for good (until it is opened again) and every check reads
  RocksDB, as with ``dedup_filter_keys=0``. Metrics: ``kefu_store_dedup_filter_*``
  (:meth:`Store.stats`).

Memtable size
-------------
Every message puts two keys in RocksDB's memtable, a skiplist: the message's and its dedup
key's. With thousands of conversations writing, consecutive keys land far apart, and each
insert is a search down the skiplist, a chain of cache misses that grows with the memtable.
So the memtable is small, ``write_buffer_bytes`` = 4 MiB by default, and RocksDB merges
:data:`MEMTABLES_PER_FLUSH` (4) of them into one table file per flush and compacts
:data:`FLUSHES_PER_COMPACTION` (8) such files at a time. The merge matters: the keys are
random across the whole key space, so every compaction of new files into the base level
rewrites that whole level, and with one small file per memtable that happened eight times as
often as with 32 MiB memtables; the process's CPU then grew with the data (21, 31, 36, 44 %
in successive 30 s windows at 20,000 keys/s), where merged flushes keep each compaction the
size it was with 32 MiB memtables (128 MiB of new data) and the CPU flat (16-21 %, against
21-23 % with 32 MiB). Measured in RocksDB alone, on one core, 16 keys a batch at 20,000 keys/s
over 150 s: 52-78 µs a batch against 85-97 µs with one 32 MiB memtable. In the node at 10,000
messages/s on one core (8,000 conversations), six pairs alternating with the 32 MiB
configuration: the group commit's write 0.060-0.133 against 0.079-0.188 ms a batch (every
pair), the CPU per message lower in five; the p99 within this VM's spread (one run of the
six at 226 ms, the others 5.5-54 against 7.9-52 ms). Memory: at most
:data:`MEMTABLES_MAX` (8) memtables, 32 MiB, against 96 MiB before; the WAL is flushed past
eight memtables' worth.

Background work
---------------
RocksDB flushes a full memtable and compacts tables in its own threads (``max_background_jobs``
2). A flush takes its CPU in one go (0.2 s for a 32 MiB memtable, the size before "Memtable
size"); on a core the event loop also runs on, the scheduler shares the core between the two
and every message waits meanwhile (the p99 of a node at 10,000 messages/s on one core, with
32 MiB: over 100 ms, from one flush per 13 s). So
:meth:`Store.open` lowers those threads' priority to ``background_nice`` (10 by default,
Linux only; 0 leaves them alone): they take what the loop leaves, and at nice 10 still about a
tenth of a core the loop keeps busy. Measured on one core at 10,000 messages/s: p99 17-40 ms
against 25-122 ms alternating with the threads left alone. On a saturated core a flush falls
behind, and RocksDB stops writes when all its memtables are full until one is flushed (a
write-only run at full speed on one core: 3 stops, 0.38 s in all over 768,000 messages,
at a higher rate than without the nice value); the memory stays bounded by the memtables.

Invariants
----------
- The ``o`` and ``u`` index keys are written in the same batch as the conversation record they
  index, by :meth:`Store.put_conversation` only.
- A conversation record's ``top_seq`` is a lower bound: the record need not be rewritten with
  each message. :meth:`Store.recover` takes the larger of it and the last message key, so a
  seq is never reused even if old messages were removed.
- Call the store from the event loop's thread; :meth:`Store.close` before the loop closes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import re
import secrets
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Final, Literal, cast

import msgspec
from rocksdict import (
    BlockBasedOptions,
    Cache,
    DbClosedError,
    DBCompressionType,
    DBRecoveryMode,
    Options,
    Rdict,
    ReadOptions,
    WriteBatch,
    WriteOptions,
)

from kefu._core import bloom, mq
from kefu.errors import KefuError

log = logging.getLogger(__name__)

__all__ = [
    "DEDUP_FILTER_KEYS",
    "DEDUP_SCAN_STEP",
    "HISTORY_MAX_LIMIT",
    "MAX_CLIENT_MSG_ID_BYTES",
    "MAX_NAME_BYTES",
    "SCHEMA_VERSION",
    "Durability",
    "GroupCommitWriter",
    "Store",
    "StoreBusy",
    "StoreError",
    "StoreUnavailable",
    "StoredAgent",
    "StoredAgentSessions",
    "StoredConversation",
    "StoredMessage",
    "agent_key",
    "agent_sessions_key",
    "conversation_key",
    "dedup_key",
    "format_conv_id",
    "message_key",
    "meta_key",
    "open_key",
    "parse_conv_id",
    "read_mark_key",
    "user_key",
]

Durability = Literal["process", "fsync"]

SCHEMA_VERSION: Final = 1
U64_MAX: Final = (1 << 64) - 1
MAX_CLIENT_MSG_ID_BYTES: Final = 64
#: Dedup keys the store's filter holds by default (module doc, "Dedup filter"): 8 MiB.
DEDUP_FILTER_KEYS: Final = 4_000_000
#: The nice value of RocksDB's background threads by default (module doc, "Background work").
BACKGROUND_NICE: Final = 10
#: The largest ``dedup_filter_keys`` (``kefu._core.bloom.MAX_BITS`` at 10 bits per key).
DEDUP_FILTER_MAX_KEYS: Final = 1 << 32
#: Stored dedup keys added to the filter per loop iteration while it loads (about 1 ms).
DEDUP_SCAN_STEP: Final = 2_048
# Agent ids, user ids, readers and meta names: long enough for any external id, short enough
# that a key stays small.
MAX_NAME_BYTES: Final = 256
HISTORY_MAX_LIMIT: Final = 500
READ_MARKS_MAX: Final = 256  # readers returned per conversation by read_marks()
CONVERSATION_STATUSES: Final = frozenset({"bot", "queued", "assigned", "closed"})
MESSAGE_ROLES: Final = frozenset({"visitor", "agent", "bot", "system"})
READER_KINDS: Final = ("visitor:", "agent:")

_P_MESSAGE: Final = b"m"
_P_CONVERSATION: Final = b"c"
_P_OPEN: Final = b"o"
_P_DEDUP: Final = b"d"
_P_DEDUP_END: Final = b"e"
_P_READ: Final = b"r"
_P_USER: Final = b"u"
_P_AGENT: Final = b"a"
_P_META: Final = b"k"
_P_AGENT_SESSIONS: Final = b"s"
_MESSAGE_BYTE: Final = _P_MESSAGE[0]

_U64 = struct.Struct(">Q")
_U64_PAIR = struct.Struct(">QQ")
_CONV_ID_RE = re.compile(r"[0-9a-f]{16}")
_SCHEMA_KEY: Final = _P_META + b"schema_version"


class StoreError(KefuError):
    """A store operation failed."""

    code = "store_error"


class StoreBusy(StoreError):
    """The write budget is used up; nothing was enqueued. Retry later or refuse the request."""

    code = "busy"


class StoreUnavailable(StoreError):
    """The store is closed, or an earlier write failed and the node must restart."""

    code = "unavailable"


# ---------------------------------------------------------------------------------------------
# Records


class StoredMessage(msgspec.Struct, array_like=True, kw_only=True, gc=False):
    conv: int
    seq: int
    epoch: int
    id: str
    client_msg_id: str | None
    from_role: str
    from_id: str
    from_name: str
    text: str
    ts: int  # ms since the Unix epoch
    meta: dict[str, Any] | None = None


class StoredConversation(msgspec.Struct, array_like=True, kw_only=True, gc=False):
    id: int
    visitor_id: str
    user_id: str | None = None
    status: str  # one of CONVERSATION_STATUSES
    agent_id: str | None = None
    group: str | None = None
    epoch: int = 1
    top_seq: int = 0
    created_ts: int = 0
    updated_ts: int = 0
    closed_by: str | None = None
    closed_reason: str | None = None
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)


class StoredAgent(msgspec.Struct, array_like=True, kw_only=True, gc=False):
    id: str
    name: str
    token_hash: str | None = None
    weight: int = 1
    max_chats: int = 5
    groups: list[str] = msgspec.field(default_factory=list)
    disabled: bool = False
    # When the agent's token stops working (ms since the epoch); None: never. Last, so that
    # records written before it existed still decode (array_like: a missing tail is default).
    token_expires_ms: int | None = None
    # Cluster mode: the revision of the record in the cluster's agent directory
    # (kefu.cluster.directory); 0 for a node alone. Last, for the same reason.
    rev: int = 0


class StoredAgentSessions(msgspec.Struct, array_like=True, kw_only=True, gc=False):
    """What ends an agent's session tokens before they expire (``kefu.node``, "Agent
    tokens"): every token issued before ``not_before`` (Unix seconds), and the revoked ones
    of ``revoked`` as ``(jti, exp)`` pairs (the node keeps few: past its bound it moves
    ``not_before`` instead)."""

    agent_id: str
    not_before: int = 0
    revoked: list[tuple[str, int]] = msgspec.field(default_factory=list)


_ENCODE = msgspec.msgpack.Encoder().encode
_DECODE_MESSAGE = msgspec.msgpack.Decoder(StoredMessage).decode
_DECODE_CONVERSATION = msgspec.msgpack.Decoder(StoredConversation).decode
_DECODE_AGENT = msgspec.msgpack.Decoder(StoredAgent).decode
_DECODE_AGENT_SESSIONS = msgspec.msgpack.Decoder(StoredAgentSessions).decode


# ---------------------------------------------------------------------------------------------
# Keys


def _check_u64(value: int, what: str) -> None:
    if not 0 <= value <= U64_MAX:
        raise ValueError(f"{what} must be in 0..2**64-1, got {value}")


def _name_bytes(text: str, what: str, limit: int = MAX_NAME_BYTES) -> bytes:
    raw = text.encode("utf-8")
    if not 0 < len(raw) <= limit:
        raise ValueError(f"{what} must be 1 to {limit} bytes of UTF-8, got {len(raw)}")
    return raw


def format_conv_id(conv: int) -> str:
    """A conversation id as the wire prints it: 16 lowercase hex digits."""
    _check_u64(conv, "conversation id")
    return f"{conv:016x}"


def parse_conv_id(text: str) -> int:
    """The inverse of :func:`format_conv_id`; exactly 16 lowercase hex digits, else ValueError.

    One spelling per id: no prefix, sign, separators, whitespace or upper case.
    """
    if not isinstance(text, str) or _CONV_ID_RE.fullmatch(text) is None:
        raise ValueError(f"conversation id must be 16 lowercase hex digits, got {text!r}")
    return int(text, 16)


def message_key(conv: int, seq: int) -> bytes:
    if not (0 <= conv <= U64_MAX and 0 <= seq <= U64_MAX):  # one test on the message path
        _check_u64(conv, "conversation id")
        _check_u64(seq, "seq")
    return _P_MESSAGE + _U64_PAIR.pack(conv, seq)


def conversation_key(conv: int) -> bytes:
    _check_u64(conv, "conversation id")
    return _P_CONVERSATION + _U64.pack(conv)


def open_key(conv: int) -> bytes:
    _check_u64(conv, "conversation id")
    return _P_OPEN + _U64.pack(conv)


def dedup_key(conv: int, client_msg_id: str) -> bytes:
    cmid = client_msg_id.encode("utf-8")
    if not (0 <= conv <= U64_MAX and 0 < len(cmid) <= MAX_CLIENT_MSG_ID_BYTES):
        # The refusals, worded as elsewhere; the common case costs the one test above.
        _check_u64(conv, "conversation id")
        _name_bytes(client_msg_id, "client_msg_id", MAX_CLIENT_MSG_ID_BYTES)
    return _P_DEDUP + _U64.pack(conv) + cmid


def read_mark_key(conv: int, reader: str) -> bytes:
    _check_u64(conv, "conversation id")
    if not reader.startswith(READER_KINDS) or reader.endswith(":"):
        raise ValueError(f"reader must be 'visitor:<id>' or 'agent:<id>', got {reader!r}")
    return _P_READ + _U64.pack(conv) + _name_bytes(reader, "reader")


def user_key(user_id: str) -> bytes:
    return _P_USER + _name_bytes(user_id, "user_id")


def agent_key(agent_id: str) -> bytes:
    return _P_AGENT + _name_bytes(agent_id, "agent id")


def agent_sessions_key(agent_id: str) -> bytes:
    return _P_AGENT_SESSIONS + _name_bytes(agent_id, "agent id")


def meta_key(name: str) -> bytes:
    return _P_META + _name_bytes(name, "meta name")


def _message_range_end(conv: int) -> bytes:
    """The exclusive upper bound of conversation ``conv``'s message keys."""
    if conv == U64_MAX:
        return bytes([_MESSAGE_BYTE + 1])
    return _P_MESSAGE + _U64.pack(conv + 1)


# ---------------------------------------------------------------------------------------------
# Writer

Op = tuple[bytes, bytes | None]  # (key, value); value None deletes the key
#: A write's completion callback: None once durable, else the error that settles it.
Done = Callable[[BaseException | None], None]


class _Entry(msgspec.Struct):
    """One write: its ops go into a single batch and one future acknowledges them.

    A Struct: built by one C call, a quarter of a ``__slots__`` class's ``__init__``."""

    ops: list[Op]
    nbytes: int
    messages: int
    future: asyncio.Future[None] | Done
    serial: int


def _resolve(future: asyncio.Future[None] | Done, exc: BaseException | None) -> None:
    if not isinstance(future, asyncio.Future):
        try:
            future(exc)
        except Exception:
            log.exception("a write's completion callback failed")
        return
    if future.done():  # the waiter was cancelled; the write itself stands
        return
    try:
        if exc is None:
            future.set_result(None)
        else:
            future.set_exception(exc)
    except RuntimeError:  # its loop is closed: nobody is left to wake
        pass


class GroupCommitWriter:
    """Turns the writes of one loop iteration into one RocksDB ``WriteBatch`` (module doc).

    Counters (plain attributes until the metrics module reads them): ``batches_written``,
    ``messages_written``, ``ops_written``, ``last_batch_entries``, ``last_batch_messages``,
    ``last_write_us`` (loop time to build and write the last batch), ``max_write_us``,
    ``syncs``, ``last_sync_us``, ``busy_rejections``; gauges ``pending_count``,
    ``pending_bytes``, ``unacked_count``, ``unacked_bytes``, ``awaiting_sync``.
    """

    def __init__(
        self,
        db: Rdict,
        *,
        durability: Durability,
        max_pending: int,
        max_pending_bytes: int,
        batch_max_entries: int,
        batch_max_bytes: int,
    ) -> None:
        if durability not in ("process", "fsync"):
            raise ValueError(f"durability must be 'process' or 'fsync', got {durability!r}")
        for name, value in (
            ("max_pending", max_pending),
            ("max_pending_bytes", max_pending_bytes),
            ("batch_max_entries", batch_max_entries),
            ("batch_max_bytes", batch_max_bytes),
        ):
            if value < 1:
                raise ValueError(f"{name} must be positive, got {value}")
        self.durability: Durability = durability
        self.max_pending = max_pending
        self.max_pending_bytes = max_pending_bytes
        self.batch_max_entries = batch_max_entries
        self.batch_max_bytes = batch_max_bytes
        # The two calls into RocksDB, as attributes so that tests can inject faults.
        self._write_batch: Callable[[WriteBatch, WriteOptions], None] = db.write
        self._sync_wal: Callable[[bool], None] = db.flush_wal
        self._write_options = WriteOptions()  # WAL on, no sync: see the module doc
        self._pending = mq.BatchQueue(max_pending, max_pending_bytes)
        self._unsynced: list[_Entry] = []  # written, waiting for the next WAL sync
        self._syncing: list[_Entry] | None = None  # covered by the sync now running
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        if durability == "fsync":
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="kefu-wal-sync"
            )
        # False: hold new batches back while a sync runs (measured against True in the bench).
        self._overlap_sync = True
        # Point-read view of queued writes: key -> (value, serial of the entry that wrote it).
        self._overlay: dict[bytes, tuple[bytes | None, int]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._flush_scheduled = False
        self._failure: BaseException | None = None
        self._closed = False
        self._serial = 0
        self.unacked_count = 0
        self.unacked_bytes = 0
        self.batches_written = 0
        self.messages_written = 0
        self.ops_written = 0
        self.last_batch_entries = 0
        self.last_batch_messages = 0
        self.last_write_us = 0.0
        self.max_write_us = 0.0
        # Called after each batch with (messages, seconds): the node's histograms of batch
        # size and write time (the counters above only keep the last and the largest).
        self.on_batch: Callable[[int, float], None] | None = None
        # Called once a batch's callbacks have all run (the messages acked and delivered):
        # the node writes the frames they produced now (kefu.web.ws.WsServer.flush_writes).
        # Not after a batch a full queue forced from inside a caller (a socket's read, on a
        # saturated node): writing there would have the clients answer within the same poll
        # of the loop, which then goes on reading for seconds before any timer or callback
        # runs; those frames go at the end of the turn.
        self.after_ack: Callable[[], None] | None = None
        # Completions answered a run at a time (set_batch_handler): their type and handler.
        self._batch_kind: type | None = None
        self._batch_handler: Callable[[list[Any]], None] | None = None
        self.syncs = 0
        self.last_sync_us = 0.0
        self.busy_rejections = 0

    # -- state ---------------------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        return self._failure is None and not self._closed

    @property
    def pending_count(self) -> int:
        return len(self._pending)

    @property
    def pending_bytes(self) -> int:
        return int(self._pending.nbytes)

    @property
    def awaiting_sync(self) -> int:
        return len(self._unsynced) + len(self._syncing or ())

    def lookup(self, key: bytes) -> tuple[bytes | None, int] | None:
        """The queued value of ``key`` as ``(value, serial)``; None when nothing is queued."""
        return self._overlay.get(key)

    # -- enqueue -------------------------------------------------------------------------------

    def submit(self, ops: list[Op], *, messages: int = 0) -> asyncio.Future[None]:
        """Enqueue ``ops`` as one entry; the future resolves once they are durable."""
        future: asyncio.Future[None] = self._enter(ops, messages, None)
        return future

    def submit_then(self, ops: list[Op], done: Done, *, messages: int = 0) -> None:
        """Enqueue ``ops`` as one entry; ``done(None)`` is called once they are durable, or
        ``done(error)`` if they cannot be. No future: the per-message path (kefu.node)."""
        self._enter(ops, messages, done)

    def submit_message_then(self, ops: list[Op], nbytes: int, done: Done) -> None:
        """``submit_then`` of one message's ops (``_message_ops``: its key, then its dedup key
        if it has one) of ``nbytes`` bytes, counted by the caller: the per-message path, whose
        checks pass in one test in the common case. Anything else (a failure, the first write
        of a burst, a full budget) goes through ``_enter``, which raises or enqueues."""
        if (
            self._failure is not None
            or self._closed
            or not self.unacked_count
            or self.unacked_count >= self.max_pending
            or self.unacked_bytes + nbytes > self.max_pending_bytes
        ):
            self._enter(ops, 1, done)
            return
        self._admit(ops, nbytes, 1, done)

    def _enter(self, ops: list[Op], messages: int, done: Done | None) -> Any:
        if self._failure is not None:
            raise StoreUnavailable(f"an earlier write failed: {self._failure!r}") from (
                self._failure
            )
        if self._closed:
            raise StoreUnavailable("the store is closed")
        if not self.unacked_count:
            # Only while nothing is in flight may the loop change (a store reopened under a new
            # loop in tests); asking for the running loop costs a getpid() system call, too
            # much for every message.
            loop = asyncio.get_running_loop()
            if loop is not self._loop:
                self._loop = loop
                self._flush_scheduled = False
        else:
            loop = self._loop  # type: ignore[assignment]  # set by the first submit
        nbytes = 0
        for key, value in ops:
            nbytes += len(key) if value is None else len(key) + len(value)
        if nbytes > self.max_pending_bytes:
            raise ValueError(f"a write of {nbytes} bytes exceeds max_pending_bytes")
        if (
            self.unacked_count >= self.max_pending
            or self.unacked_bytes + nbytes > self.max_pending_bytes
        ):
            self.busy_rejections += 1
            raise StoreBusy(
                f"{self.unacked_count} writes ({self.unacked_bytes} bytes) are not yet durable"
            )
        waiter = loop.create_future() if done is None else done
        self._admit(ops, nbytes, messages, waiter)
        return waiter

    def _admit(
        self, ops: list[Op], nbytes: int, messages: int, waiter: asyncio.Future[None] | Done
    ) -> None:
        """Enqueue a write that passed the checks: its entry queued and counted, its keys
        overlaid, then the batch flushed if full, else a flush scheduled (``_loop`` is set)."""
        serial = self._serial = self._serial + 1
        pending = self._pending
        if not pending.put(_Entry(ops, nbytes, messages, waiter, serial), nbytes):
            # Only if the queue's bounds were lowered.
            self.busy_rejections += 1
            raise StoreBusy("the pending queue is full")
        self.unacked_count += 1
        self.unacked_bytes += nbytes
        overlay = self._overlay
        for key, value in ops:
            if key[0] != _MESSAGE_BYTE:
                overlay[key] = (value, serial)
        if len(pending) >= self.batch_max_entries or pending.nbytes >= self.batch_max_bytes:
            self._flush(forced=True)
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._on_tick)  # type: ignore[union-attr]  # set by _enter

    # -- write ---------------------------------------------------------------------------------

    def _on_tick(self) -> None:
        self._flush_scheduled = False
        self._flush()

    def _flush(self, forced: bool = False) -> None:
        """Write the next batch. ``forced``: by a full batch, from inside the caller's step
        (``_admit``), where ``after_ack`` is not called (see there)."""
        if self._failure is not None or self._closed or not self._pending:
            return
        if self._syncing is not None and not self._overlap_sync:
            return  # _on_synced flushes
        entries = self._pending.drain(self.batch_max_entries, self.batch_max_bytes)
        try:
            self._write(entries)
        except Exception as exc:
            self._fail(exc, entries)
            return
        if self._pending and not self._flush_scheduled and self._loop is not None:
            # What is left waits one iteration so that other callbacks run between batches.
            self._flush_scheduled = True
            self._loop.call_soon(self._on_tick)
        if self._executor is None:
            self._ack(entries)
            if not forced:
                self._answered()
            return
        self._unsynced.extend(entries)
        if self._syncing is None:
            self._start_sync()

    def _write(self, entries: list[_Entry]) -> None:
        t0 = time.perf_counter()
        batch = WriteBatch(raw_mode=True)
        ops, messages = mq.fill_batch(entries, batch.put, batch.delete)
        self._write_batch(batch, self._write_options)
        # RocksDB answers point reads from here on; drop what the overlay held for these entries.
        mq.settle(entries, self._overlay)
        elapsed = (time.perf_counter() - t0) * 1e6
        self.batches_written += 1
        self.messages_written += messages
        self.ops_written += ops
        self.last_batch_entries = len(entries)
        self.last_batch_messages = messages
        self.last_write_us = elapsed
        self.max_write_us = max(self.max_write_us, elapsed)
        if self.on_batch is not None:
            self.on_batch(messages, elapsed / 1e6)

    def set_batch_handler(self, kind: type, handler: Callable[[list[Any]], None]) -> None:
        """Durable writes whose completion (the ``done`` of ``submit_then``) is of type
        ``kind`` are answered a run at a time: ``handler(run)`` with the completions of
        consecutive such entries of a batch, in order, rather than a call each (the node's
        messages: one loop over a group commit's acks and deliveries). A failure still calls
        each completion with its error, so ``kind`` stays a ``Done``."""
        self._batch_kind = kind
        self._batch_handler = handler

    def _ack(self, entries: list[_Entry]) -> None:
        kind = self._batch_kind
        run: list[Any] | None = None
        for entry in entries:
            self.unacked_count -= 1
            self.unacked_bytes -= entry.nbytes
            future = entry.future
            if type(future) is kind:
                if run is None:
                    run = [future]
                else:
                    run.append(future)
                continue
            if run is not None:  # answered before what follows: entries keep their order
                self._answer_run(run)
                run = None
            _resolve(future, None)
        if run is not None:
            self._answer_run(run)

    def _answer_run(self, run: list[Any]) -> None:
        try:
            self._batch_handler(run)  # type: ignore[misc]  # set with _batch_kind
        except Exception:
            log.exception("a batch's completion handler failed")

    def _answered(self) -> None:
        """A batch's callbacks have run: ``after_ack`` (see there)."""
        if self.after_ack is not None:
            try:
                self.after_ack()
            except Exception:
                log.exception("after_ack failed")

    # -- fsync ---------------------------------------------------------------------------------

    def _timed_sync(self) -> float:
        t0 = time.perf_counter()
        self._sync_wal(True)
        return (time.perf_counter() - t0) * 1e6

    def _start_sync(self) -> None:
        assert self._loop is not None and self._executor is not None
        self._syncing, self._unsynced = self._unsynced, []
        done = self._loop.run_in_executor(self._executor, self._timed_sync)
        done.add_done_callback(self._on_synced)

    def _on_synced(self, done: asyncio.Future[float]) -> None:
        exc: BaseException | None
        if done.cancelled():
            exc = StoreUnavailable("the WAL sync was cancelled")
        else:
            exc = done.exception()
        covered, self._syncing = self._syncing, None
        if covered is None or self._failure is not None:
            return  # close() or a failure already settled these entries
        if exc is not None:
            self._syncing = covered  # the oldest unacked entries: _fail settles them first
            self._fail(exc, [])
            return
        self.syncs += 1
        self.last_sync_us = done.result()
        self._ack(covered)
        if covered:
            self._answered()
        if self._unsynced:
            self._start_sync()
        elif self._pending and not self._overlap_sync:
            self._flush()

    # -- failure and close ---------------------------------------------------------------------

    def _fail(self, exc: BaseException, failed_batch: list[_Entry]) -> None:
        self._failure = exc
        error = StoreUnavailable(f"write failed: {exc!r}")
        error.__cause__ = exc
        entries = [
            *(self._syncing or ()),
            *self._unsynced,
            *failed_batch,
            *self._pending.drain(),
        ]
        self._syncing = None
        self._unsynced = []
        self._overlay.clear()
        self.unacked_count = 0
        self.unacked_bytes = 0
        for entry in entries:
            _resolve(entry.future, error)

    def close(self) -> None:
        """Write and sync what is queued, settle every future, stop the sync thread.

        Blocks the calling thread for one write and one sync; meant for shutdown.
        """
        if self._closed:
            return
        self._closed = True
        if self._failure is None:
            entries = [*(self._syncing or ()), *self._unsynced]
            queued = self._pending.drain()
            self._syncing = None
            self._unsynced = []
            try:
                if queued:
                    self._write(queued)
                if self._executor is not None and (entries or queued):
                    self._sync_wal(True)
            except Exception as exc:
                self._syncing = entries  # so that _fail settles them too
                self._fail(exc, queued)
            else:
                self._ack(entries + queued)
        if self._executor is not None:
            self._executor.shutdown(wait=True)


def _message_ops(
    msg: StoredMessage, looked_up: tuple[int, str, bytes] | None = None
) -> tuple[list[Op], int]:
    """The message's key and, with a ``client_msg_id``, its dedup key (``looked_up``: the
    last ``(conv, client_msg_id, key)`` :meth:`Store.get_dedup` built, reused when it is
    this message's: the check and the append of one send build the key once); and their
    bytes, as the writer counts them."""
    if msg.seq < 1:
        raise ValueError(f"seq starts at 1, got {msg.seq}")
    if msg.from_role not in MESSAGE_ROLES:
        raise ValueError(f"from_role must be one of {sorted(MESSAGE_ROLES)}")
    key = message_key(msg.conv, msg.seq)
    value = _ENCODE(msg)
    cmid = msg.client_msg_id
    if cmid is None:
        return [(key, value)], len(key) + len(value)
    if looked_up is not None and looked_up[0] == msg.conv and looked_up[1] == cmid:
        dkey = looked_up[2]
    else:
        dkey = dedup_key(msg.conv, cmid)
    return [(key, value), (dkey, _U64.pack(msg.seq))], len(key) + len(value) + len(dkey) + 8


# ---------------------------------------------------------------------------------------------
# Store


def lower_background_priority(nice: int) -> int:
    """Give RocksDB's background threads (named ``rocksdb:*``) of this process the nice value
    ``nice``, or keep theirs if it is higher (module doc, "Background work"); the number of
    threads set. Linux only (0 elsewhere); a thread that cannot be changed is left as it is."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return 0
    changed = 0
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/comm", encoding="utf-8") as f:
                name = f.read().strip()
            if name.startswith("rocksdb:"):
                tid = int(task)  # with a thread's id, PRIO_PROCESS means that thread (Linux)
                # Never raised above where it stands (a node started under `nice` keeps it).
                os.setpriority(
                    os.PRIO_PROCESS, tid, max(nice, os.getpriority(os.PRIO_PROCESS, tid))
                )
                changed += 1
        except (OSError, ValueError):
            continue
    return changed


#: Memtables: at most this many (each ``write_buffer_bytes``); this many merged into one table
#: file per flush; this many such files before they are compacted (module doc, "Memtable size").
MEMTABLES_MAX: Final = 8
MEMTABLES_PER_FLUSH: Final = 4
FLUSHES_PER_COMPACTION: Final = 8


def _db_options(block_cache_bytes: int, write_buffer_bytes: int) -> Options:
    opts = Options(raw_mode=True)
    opts.create_if_missing(True)
    table = BlockBasedOptions()
    table.set_block_cache(Cache(block_cache_bytes))
    # Bloom filters make the misses of point reads (dedup, user index, new ids) cheap; index
    # and filter blocks live in the block cache so that its bound covers them.
    table.set_bloom_filter(10, False)
    table.set_cache_index_and_filter_blocks(True)
    opts.set_block_based_table_factory(table)
    opts.set_compression_type(DBCompressionType.lz4())
    opts.set_bottommost_compression_type(DBCompressionType.zstd())
    # Memtables of write_buffer_bytes (module doc, "Memtable size"), four of them merged into
    # one table file per flush and eight such files to a compaction; at most eight memtables,
    # and the WAL bounded by forcing a flush once it passes eight memtables' worth.
    opts.set_write_buffer_size(write_buffer_bytes)
    opts.set_max_write_buffer_number(MEMTABLES_MAX)
    opts.set_min_write_buffer_number_to_merge(MEMTABLES_PER_FLUSH)
    opts.set_level_zero_file_num_compaction_trigger(FLUSHES_PER_COMPACTION)
    opts.set_max_total_wal_size(8 * write_buffer_bytes)
    opts.set_level_compaction_dynamic_level_bytes(True)
    opts.set_max_background_jobs(2)
    opts.set_bytes_per_sync(1 << 20)
    opts.set_max_open_files(512)
    opts.set_keep_log_file_num(4)
    opts.set_max_log_file_size(8 << 20)
    opts.set_max_manifest_file_size(64 << 20)
    # Replay the WAL up to the last intact record: after a power loss in process mode the
    # tail may be torn, and everything past it was never acknowledged as power-safe.
    opts.set_wal_recovery_mode(DBRecoveryMode.point_in_time())
    return opts


class Store:
    """One node's RocksDB: synchronous reads, writes through the :class:`GroupCommitWriter`.

    Open with :meth:`Store.open`. Write methods return a future to await (module doc).
    """

    def __init__(
        self,
        db: Rdict,
        path: str,
        writer: GroupCommitWriter,
        dedup_filter_keys: int = DEDUP_FILTER_KEYS,
    ) -> None:
        self._db = db
        # The last dedup key get_dedup built, for the append that follows it (_message_ops).
        self._looked_up: tuple[int, str, bytes] | None = None
        # Module doc, "Dedup filter": keys are added from here on; used once the scan is done.
        self._dedup_filter: Any = (
            bloom.BloomFilter(dedup_filter_keys) if dedup_filter_keys else None
        )
        self._dedup_ready = False
        self._dedup_scan: Iterator[bytes] | None = None
        self._dedup_scan_handle: asyncio.Handle | None = None
        self.dedup_filter_capacity = dedup_filter_keys
        self.dedup_filter_bytes = 0 if self._dedup_filter is None else self._dedup_filter.nbytes
        self.dedup_filter_skips = 0
        self.dedup_filter_false_positives = 0
        self.path = path
        self.writer = writer
        self.durability: Durability = writer.durability
        self._closed = False

    @classmethod
    def open(
        cls,
        path: str,
        *,
        durability: Durability = "process",
        max_pending: int = 16_384,
        max_pending_bytes: int = 32 << 20,
        batch_max_entries: int = 1_024,
        batch_max_bytes: int = 4 << 20,
        block_cache_bytes: int = 64 << 20,
        write_buffer_bytes: int = 4 << 20,
        dedup_filter_keys: int = DEDUP_FILTER_KEYS,
        background_nice: int = BACKGROUND_NICE,
    ) -> Store:
        """Open (or create) the store at ``path``.

        ``dedup_filter_keys``: the dedup filter's bound (module doc, "Dedup filter"); 0 for
        none. The filter is used once :meth:`start_dedup_filter` or :meth:`load_dedup_filter`
        has added the keys already stored. ``background_nice``: the nice value given to
        RocksDB's background threads (module doc, "Background work"); 0 for none.

        StoreError when RocksDB cannot open it (a second node on the same directory) or it
        holds another schema version or data that is not kefu's.
        """
        if durability not in ("process", "fsync"):
            raise ValueError(f"durability must be 'process' or 'fsync', got {durability!r}")
        try:
            db = Rdict(path, _db_options(block_cache_bytes, write_buffer_bytes))
        except Exception as exc:  # e.g. another process holds the directory's lock
            raise StoreError(f"cannot open the store at {path}: {exc}") from exc
        try:
            _check_schema(db)
            writer = GroupCommitWriter(
                db,
                durability=durability,
                max_pending=max_pending,
                max_pending_bytes=max_pending_bytes,
                batch_max_entries=batch_max_entries,
                batch_max_bytes=batch_max_bytes,
            )
            if not 0 <= dedup_filter_keys <= DEDUP_FILTER_MAX_KEYS:
                raise ValueError(
                    f"dedup_filter_keys must be in 0..{DEDUP_FILTER_MAX_KEYS}, "
                    f"got {dedup_filter_keys}"
                )
            if not 0 <= background_nice <= 19:
                raise ValueError(f"background_nice must be in 0..19, got {background_nice}")
        except BaseException:
            db.close()
            raise
        if background_nice:
            lower_background_priority(background_nice)
        return cls(db, path, writer, dedup_filter_keys)

    def close(self) -> None:
        """Flush the writer, then close RocksDB. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._stop_dedup_scan()
        self.writer.close()
        with contextlib.suppress(DbClosedError):  # closed under us by a failure drill
            self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def healthy(self) -> bool:
        """False once a write failed or the store closed; /healthz answers 503."""
        return self.writer.healthy

    def stats(self) -> dict[str, float]:
        """The writer's counters and gauges, plus RocksDB's memory use."""
        w = self.writer
        out: dict[str, float] = {
            "healthy": float(w.healthy),
            "pending_count": w.pending_count,
            "pending_bytes": w.pending_bytes,
            "unacked_count": w.unacked_count,
            "unacked_bytes": w.unacked_bytes,
            "awaiting_sync": w.awaiting_sync,
            "max_pending": w.max_pending,
            "max_pending_bytes": w.max_pending_bytes,
            "batches_written": w.batches_written,
            "messages_written": w.messages_written,
            "ops_written": w.ops_written,
            "last_batch_entries": w.last_batch_entries,
            "last_batch_messages": w.last_batch_messages,
            "avg_batch_messages": w.messages_written / w.batches_written
            if w.batches_written
            else 0.0,
            "last_write_us": w.last_write_us,
            "max_write_us": w.max_write_us,
            "syncs": w.syncs,
            "last_sync_us": w.last_sync_us,
            "busy_rejections": w.busy_rejections,
            "dedup_filter_active": float(self._dedup_ready),
            "dedup_filter_keys": self.dedup_filter_keys_seen(),
            "dedup_filter_capacity": self.dedup_filter_capacity,
            "dedup_filter_bytes": self.dedup_filter_bytes,
            "dedup_filter_skips_total": self.dedup_filter_skips,
            "dedup_filter_false_positives_total": self.dedup_filter_false_positives,
        }
        if not self._closed:
            for name in (
                "rocksdb.cur-size-all-mem-tables",
                "rocksdb.block-cache-usage",
                "rocksdb.estimate-live-data-size",
            ):
                value = self._db.property_int_value(name)
                if value is not None:
                    out[name] = value
        return out

    # -- reads ---------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise StoreUnavailable("the store is closed")

    def _get(self, key: bytes) -> bytes | None:
        if self._closed:  # _check_open, inline: every point read (each message's dedup) is here
            raise StoreUnavailable("the store is closed")
        held = self.writer._overlay.get(key)  # GroupCommitWriter.lookup, inline
        if held is not None:
            return held[0]
        value: bytes | None = self._db.get(key)
        return value

    def get_conversation(self, conv: int) -> StoredConversation | None:
        raw = self._get(conversation_key(conv))
        return None if raw is None else _DECODE_CONVERSATION(raw)

    def get_dedup(self, conv: int, client_msg_id: str) -> int | None:
        """The seq already given to ``client_msg_id`` in ``conv``, queued writes included.

        Check this and call :meth:`append_message` in the same step (no await between), then
        a retry can never slip in twice. The seq may not be durable yet: ack the duplicate
        after ``await store.barrier()``.
        """
        key = dedup_key(conv, client_msg_id)
        self._looked_up = (conv, client_msg_id, key)
        if self._dedup_ready:
            if not self._dedup_filter.may_contain(key):
                if self._closed:
                    raise StoreUnavailable("the store is closed")
                self.dedup_filter_skips += 1
                return None
            raw = self._get(key)
            if raw is None:
                self.dedup_filter_false_positives += 1
                return None
        else:
            raw = self._get(key)
            if raw is None:
                return None
        return int(_U64.unpack(raw)[0])

    # -- dedup filter (module doc) -------------------------------------------------------------

    @property
    def dedup_filter_active(self) -> bool:
        """Whether :meth:`get_dedup` consults the filter (loaded and not full)."""
        return self._dedup_ready

    def dedup_filter_keys_seen(self) -> int:
        """Keys added to the filter so far (0 without one)."""
        return 0 if self._dedup_filter is None else int(self._dedup_filter.count)

    def load_dedup_filter(self, budget: int | None = None) -> bool:
        """Add up to ``budget`` (all when None) of the stored dedup keys to the filter, going
        on from where the last call stopped; True once every key is in and the filter is used
        (or when there is no filter). A filter that fills up is dropped."""
        flt = self._dedup_filter
        if flt is None or self._dedup_ready:
            return True
        self._check_open()
        scan = self._dedup_scan
        if scan is None:
            opts = ReadOptions()
            opts.set_iterate_upper_bound(_P_DEDUP_END)
            scan = self._dedup_scan = cast(
                Iterator[bytes], self._db.keys(from_key=_P_DEDUP, read_opt=opts)
            )
        add = flt.add
        for taken, key in enumerate(scan, 1):
            add(key)
            if budget is not None and taken >= budget:
                break
        else:
            self._dedup_scan = None
            if flt.full:
                self._drop_dedup_filter()
                return True
            self._dedup_ready = True
            log.info("store: dedup filter loaded, %d keys", flt.count)
            return True
        if flt.full:
            self._drop_dedup_filter()
            return True
        return False

    def start_dedup_filter(self, loop: asyncio.AbstractEventLoop) -> None:
        """Load the filter on ``loop``, :data:`DEDUP_SCAN_STEP` keys per iteration."""
        if self._dedup_filter is None or self._dedup_ready or self._dedup_scan_handle is not None:
            return

        def step() -> None:
            self._dedup_scan_handle = None
            if self._closed:
                return
            try:
                done = self.load_dedup_filter(DEDUP_SCAN_STEP)
            except Exception:
                log.exception("store: loading the dedup filter failed; every check reads")
                self._drop_dedup_filter()
                return
            if not done:
                self._dedup_scan_handle = loop.call_soon(step)

        self._dedup_scan_handle = loop.call_soon(step)

    def _stop_dedup_scan(self) -> None:
        if self._dedup_scan_handle is not None:
            self._dedup_scan_handle.cancel()
            self._dedup_scan_handle = None
        self._dedup_scan = None  # an iterator must go before its database closes

    def _drop_dedup_filter(self) -> None:
        """The filter reached its bound: every check reads RocksDB from now on."""
        if self._dedup_filter is None:
            return
        log.warning(
            "store: the dedup filter reached its bound of %d keys and is dropped; every "
            "dedup check reads RocksDB until the next start (store.dedup_filter_keys)",
            self.dedup_filter_capacity,
        )
        self._stop_dedup_scan()
        self._dedup_filter = None
        self._dedup_ready = False
        self.dedup_filter_bytes = 0

    def _note_dedup(self, ops: list[Op]) -> None:
        """``ops`` (one message's) go to the writer: its dedup key joins the filter first."""
        flt = self._dedup_filter
        if flt is not None and len(ops) > 1:
            flt.add(ops[1][0])
            if flt.full:
                self._drop_dedup_filter()

    def get_read_mark(self, conv: int, reader: str) -> int:
        """The last seq ``reader`` has read in ``conv``; 0 when it has read nothing."""
        raw = self._get(read_mark_key(conv, reader))
        return 0 if raw is None else int(_U64.unpack(raw)[0])

    def read_marks(self, conv: int) -> dict[str, int]:
        """Every reader's mark in ``conv`` as stored in RocksDB (first READ_MARKS_MAX)."""
        self._check_open()
        prefix = _P_READ + _U64.pack(conv)
        opts = ReadOptions()
        opts.set_iterate_upper_bound(_P_READ + _U64.pack(conv + 1) if conv < U64_MAX else b"s")
        out: dict[str, int] = {}
        items = cast(Iterator[tuple[bytes, bytes]], self._db.items(from_key=prefix, read_opt=opts))
        for key, value in items:
            out[key[len(prefix) :].decode("utf-8")] = int(_U64.unpack(value)[0])
            if len(out) >= READ_MARKS_MAX:
                break
        return out

    def get_agent(self, agent_id: str) -> StoredAgent | None:
        raw = self._get(agent_key(agent_id))
        return None if raw is None else _DECODE_AGENT(raw)

    def agents(self, limit: int = 10_000) -> list[StoredAgent]:
        """Stored agents in id order, at most ``limit`` of them."""
        self._check_open()
        opts = ReadOptions()
        opts.set_iterate_upper_bound(bytes([_P_AGENT[0] + 1]))
        out: list[StoredAgent] = []
        for raw in self._db.values(from_key=_P_AGENT, read_opt=opts):
            if len(out) >= limit:
                break
            out.append(_DECODE_AGENT(raw))
        return out

    def get_agent_sessions(self, agent_id: str) -> StoredAgentSessions | None:
        raw = self._get(agent_sessions_key(agent_id))
        return None if raw is None else _DECODE_AGENT_SESSIONS(raw)

    def get_meta(self, name: str) -> bytes | None:
        return self._get(meta_key(name))

    def open_conversation_of_user(self, user_id: str) -> int | None:
        """The id of ``user_id``'s conversation that is not closed, if there is one."""
        raw = self._get(user_key(user_id))
        return None if raw is None else int(_U64.unpack(raw)[0])

    def history(
        self, conv: int, after: int = 0, limit: int = 50
    ) -> tuple[list[StoredMessage], bool]:
        """Messages of ``conv`` with ``seq > after``, oldest first, and whether more follow.

        One iterator over at most ``limit + 1`` keys; ``limit`` is capped at
        HISTORY_MAX_LIMIT. An unknown conversation has no messages.
        """
        self._check_open()
        if after < 0:
            raise ValueError(f"after must be >= 0, got {after}")
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        limit = min(limit, HISTORY_MAX_LIMIT)
        if after >= U64_MAX:
            return [], False
        opts = ReadOptions()
        opts.set_iterate_upper_bound(_message_range_end(conv))
        out: list[StoredMessage] = []
        for raw in self._db.values(from_key=message_key(conv, after + 1), read_opt=opts):
            if len(out) == limit:
                return out, True
            out.append(_DECODE_MESSAGE(raw))
        return out, False

    def tail(self, conv: int, limit: int = 50) -> list[StoredMessage]:
        """The last ``limit`` messages of ``conv`` (capped at HISTORY_MAX_LIMIT), oldest first."""
        self._check_open()
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        limit = min(limit, HISTORY_MAX_LIMIT)
        prefix = _P_MESSAGE + _U64.pack(conv)
        # Backwards without a lower bound: rocksdict 0.3.29's set_iterate_lower_bound sets
        # the upper bound instead, so the prefix is checked here.
        out: list[StoredMessage] = []
        items = cast(
            Iterator[tuple[bytes, bytes]],
            self._db.items(backwards=True, from_key=message_key(conv, U64_MAX)),
        )
        for key, raw in items:
            if not key.startswith(prefix) or len(out) >= limit:
                break
            out.append(_DECODE_MESSAGE(raw))
        out.reverse()
        return out

    def top_seq(self, conv: int) -> int:
        """The seq of the last message of ``conv`` in RocksDB; 0 when it has none."""
        self._check_open()
        it = self._db.iter()
        it.seek_for_prev(message_key(conv, U64_MAX))
        if it.valid():
            key: bytes = it.key()
            if key.startswith(_P_MESSAGE + _U64.pack(conv)):
                return int(_U64.unpack_from(key, 9)[0])
        return 0

    def last_message(self, conv: int) -> StoredMessage | None:
        """The last message of ``conv`` in RocksDB."""
        self._check_open()
        it = self._db.iter()
        it.seek_for_prev(message_key(conv, U64_MAX))
        if it.valid():
            key: bytes = it.key()
            if key.startswith(_P_MESSAGE + _U64.pack(conv)):
                return _DECODE_MESSAGE(it.value())
        return None

    def recover(self) -> Iterator[StoredConversation]:
        """Every conversation that is not closed, with its true ``top_seq`` and last activity.

        Walks the ``o`` index (open conversations only, not every conversation ever held);
        ``top_seq`` is the larger of the record's and the last message key's, ``updated_ts``
        the later of the record's and the last message's (module doc): a message does not
        need to rewrite its conversation's record.
        """
        self._check_open()
        opts = ReadOptions()
        opts.set_iterate_upper_bound(bytes([_P_OPEN[0] + 1]))
        keys = cast(Iterator[bytes], self._db.keys(from_key=_P_OPEN, read_opt=opts))
        for key in keys:
            conv_id = int(_U64.unpack_from(key, 1)[0])
            raw = self._db.get(conversation_key(conv_id))
            if raw is None:  # cannot happen while the index is written with its record
                continue
            conv = _DECODE_CONVERSATION(raw)
            if conv.status == "closed":
                continue
            last = self.last_message(conv_id)
            if last is not None:
                conv.top_seq = max(conv.top_seq, last.seq)
                conv.updated_ts = max(conv.updated_ts, last.ts)
            yield conv

    def new_conversation_id(self, draw: Callable[[], int] | None = None) -> int:
        """A random nonzero 63-bit id no stored or queued conversation has (``draw()`` makes
        the candidates when given: a cluster node's carry its index).

        Enqueue the conversation (:meth:`put_conversation`) before the next await, so that no
        other caller can draw the same id meanwhile.
        """
        for _ in range(32):
            conv = secrets.randbits(63) if draw is None else draw()
            if conv and self._get(conversation_key(conv)) is None:
                return conv
        raise StoreError("no unused conversation id in 32 draws")

    # -- writes --------------------------------------------------------------------------------

    def append_message(
        self, msg: StoredMessage, conv: StoredConversation | None = None
    ) -> asyncio.Future[None]:
        """Enqueue ``msg`` with its dedup key (and ``conv``'s record and indexes, if given).

        All of it lands in one batch; the future resolves once that batch is durable.
        Raises StoreBusy, StoreUnavailable, or ValueError on a malformed message.
        """
        ops, _ = _message_ops(msg, self._looked_up)
        self._note_dedup(ops)
        if conv is not None:
            if conv.id != msg.conv:
                raise ValueError(f"message of {msg.conv} with the record of {conv.id}")
            ops.extend(self._conversation_ops(conv))
        return self.writer.submit(ops, messages=1)

    def append_message_then(self, msg: StoredMessage, done: Done) -> None:
        """``append_message`` without a future: ``done(None)`` once durable, ``done(error)``
        if the write fails. Raises as ``append_message`` does, and then never calls ``done``."""
        ops, nbytes = _message_ops(msg, self._looked_up)
        self._note_dedup(ops)
        self.writer.submit_message_then(ops, nbytes, done)

    def put_conversation(self, conv: StoredConversation) -> asyncio.Future[None]:
        """Enqueue ``conv``'s record with its ``o`` and ``u`` index keys."""
        return self.writer.submit(self._conversation_ops(conv))

    def _conversation_ops(self, conv: StoredConversation) -> list[Op]:
        if conv.status not in CONVERSATION_STATUSES:
            raise ValueError(f"status must be one of {sorted(CONVERSATION_STATUSES)}")
        if conv.top_seq < 0 or conv.epoch < 0:
            raise ValueError("top_seq and epoch must be >= 0")
        ops: list[Op] = [(conversation_key(conv.id), _ENCODE(conv))]
        conv_id = _U64.pack(conv.id)
        closed = conv.status == "closed"
        ops.append((open_key(conv.id), None if closed else b""))
        if conv.user_id is not None:
            ukey = user_key(conv.user_id)
            if not closed:
                ops.append((ukey, conv_id))
            elif self._get(ukey) == conv_id:  # another open conversation keeps its entry
                ops.append((ukey, None))
        return ops

    def put_agent(self, agent: StoredAgent) -> asyncio.Future[None]:
        return self.writer.submit([(agent_key(agent.id), _ENCODE(agent))])

    def put_agent_sessions(self, sessions: StoredAgentSessions) -> asyncio.Future[None]:
        return self.writer.submit([(agent_sessions_key(sessions.agent_id), _ENCODE(sessions))])

    def delete_agent(self, agent_id: str) -> asyncio.Future[None]:
        return self.writer.submit([(agent_key(agent_id), None)])

    def put_read_mark(self, conv: int, reader: str, seq: int) -> asyncio.Future[None]:
        """Move ``reader``'s mark in ``conv`` forward to ``seq``; an older mark writes nothing."""
        _check_u64(seq, "seq")
        key = read_mark_key(conv, reader)
        current = self._get(key)
        if current is not None and _U64.unpack(current)[0] >= seq:
            return self._settled()
        return self.writer.submit([(key, _U64.pack(seq))])

    def put_meta(self, name: str, value: bytes) -> asyncio.Future[None]:
        return self.writer.submit([(meta_key(name), bytes(value))])

    def write(self, ops: Iterable[Op]) -> asyncio.Future[None]:
        """Enqueue raw ``(key, value | None)`` ops as one entry. Bypasses every index: the
        caller keeps the invariants of the key layout."""
        checked: list[Op] = []
        for key, value in ops:
            if not isinstance(key, bytes) or not key:
                raise ValueError("keys are non-empty bytes")
            if value is not None and not isinstance(value, bytes):
                raise ValueError("values are bytes, or None to delete")
            checked.append((key, value))
        return self.writer.submit(checked, messages=sum(k[0] == _MESSAGE_BYTE for k, _ in checked))

    def barrier(self) -> asyncio.Future[None]:
        """A future that resolves once every write enqueued so far is durable."""
        if self.writer.unacked_count == 0:
            return self._settled()
        return self.writer.submit([])

    def _settled(self) -> asyncio.Future[None]:
        if not self.writer.healthy:
            raise StoreUnavailable("the store is closed or failed")
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


def _check_schema(db: Rdict) -> None:
    raw = db.get(_SCHEMA_KEY)
    if raw is None:
        it = db.iter()
        it.seek_to_first()
        if it.valid():
            raise StoreError("the directory holds data without a kefu schema version")
        sync = WriteOptions()
        sync.sync = True
        db.put(_SCHEMA_KEY, _U64.pack(SCHEMA_VERSION), sync)
        return
    version = int(_U64.unpack(raw)[0])
    if version != SCHEMA_VERSION:
        raise StoreError(f"schema version {version}; this kefu reads {SCHEMA_VERSION}")
