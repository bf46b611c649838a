"""Live connections of one node: who is connected as whom, fan-out, and recent messages.

The :class:`Hub` knows connections and frames, not conversations: the node tells it who takes
part (``(role, id)`` principals) and what to send. It keeps

- the live connections of each principal (a person may have several tabs or devices: every
  frame for them goes to each);
- the rings of recent messages per conversation (``_core.ringbuf``) that resume replays from
  without reading the store.

Fan-out encodes a frame once per encoding in use (JSON, MessagePack), not once per
connection: one ``msg`` to a visitor with three tabs and an agent costs one encode.

Bounds
------
===================  ===============================  ======================================
what                 limit                            when full
===================  ===============================  ======================================
connections          ``ws.max_connections`` (the WS   503 at the upgrade (:mod:`kefu.web.ws`)
                     front refuses more)
rings                :data:`MAX_RINGS` conversations  least recently used ring dropped; a
                     x :data:`RING_CAPACITY` messages resume then reads the store
===================  ===============================  ======================================

Metrics: :meth:`Hub.stats`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from typing import TYPE_CHECKING, Final, cast

import msgspec

from kefu._core import outbox as _outbox
from kefu._core import ringbuf as _ringbuf
from kefu.protocol import Msg, encode_json, encode_msgpack
from kefu.web.ws import Connection

if TYPE_CHECKING:
    from kefu._core.ringbuf import RingSet

__all__ = ["MAX_RINGS", "RING_CAPACITY", "Encoded", "Hub", "Principal", "frame_tag"]

RING_CAPACITY: Final = 320  # recent messages kept per conversation (>= the resume limit, 300)
MAX_RINGS: Final = 10_000  # conversations with a ring; least recently used dropped first

#: A ``Msg`` in a ring besides its text (the struct, its ids, its sender), and a ring itself
#: with its map entry: tracemalloc over 10,000 rings and 320 messages, CPython 3.11 (518 bytes
#: a message, 1,102 a ring holding one). The frames of a conversation have shared its id and
#: its visitor's sender since (``Node._land``): 381 bytes a message beyond its text where 485
#: were before (tracemalloc over 2,000 rings of 100 visitor messages), so 518 * 381 / 485. An
#: agent's message, with a sender of its own, takes about 64 bytes more.
MSG_OVERHEAD_BYTES: Final = 410
RING_OVERHEAD_BYTES: Final = 600

Principal = tuple[str, str]  # (role, id)
#: A principal's connections as fan-out targets: (those taking JSON, those taking MessagePack).
Targets = tuple[tuple[object, ...], tuple[object, ...]]

_fan_out = _outbox.fan_out
_JSON_ENCODE = msgspec.json.Encoder().encode
_MSGPACK_DECODE = msgspec.msgpack.Decoder().decode


def _utf8_len(text: str) -> int:
    """Bytes of ``text`` in UTF-8 (lone surrogates, which msgspec refuses, as 3 each)."""
    return len(text.encode("utf-8", "surrogatepass"))


#: frame class -> its ``type`` (the frame classes are a fixed few; past the bound, not kept).
_TAGS: dict[type, str] = {}
_MAX_TAGS: Final = 256


def frame_tag(frame: object) -> str:
    """The ``type`` a frame is written with (cached per class: one dict lookup a frame)."""
    cls = type(frame)
    tag = _TAGS.get(cls)
    if tag is None:
        config = getattr(cls, "__struct_config__", None)
        found = getattr(config, "tag", None)
        tag = found if isinstance(found, str) else cls.__name__
        if len(_TAGS) < _MAX_TAGS:
            _TAGS[cls] = tag
    return tag


class Encoded:
    """One frame encoded at most once per encoding, for fan-out to many connections."""

    __slots__ = ("_json", "_msgpack", "frame", "kind")

    def __init__(self, frame: object) -> None:
        self.frame: object = frame
        self.kind = _TAGS.get(type(frame)) or frame_tag(frame)  # frame_tag, cached: inline
        self._json: bytes | None = None
        self._msgpack: bytes | None = None

    @classmethod
    def from_msgpack(cls, data: bytes, kind: str) -> Encoded:
        """A frame that arrived encoded (from another node): JSON made from it when asked."""
        encoded = cls.__new__(cls)
        encoded.frame = None
        encoded.kind = kind
        encoded._msgpack = data
        encoded._json = None
        return encoded

    def msgpack(self) -> bytes:
        if self._msgpack is None:
            self._msgpack = encode_msgpack(self.frame)
        return self._msgpack

    def send(self, conn: Connection) -> None:
        if self.frame is None and not conn.msgpack and self._json is None:
            self._json = _JSON_ENCODE(_MSGPACK_DECODE(cast(bytes, self._msgpack)))
        if conn.msgpack:
            if self._msgpack is None:
                self._msgpack = encode_msgpack(self.frame)
            conn.send_encoded(self._msgpack, self.kind)
        else:
            if self._json is None:
                self._json = encode_json(self.frame)
            conn.send_encoded(self._json, self.kind)


class Hub:
    """Connections by principal, fan-out and the rings of recent messages (module doc)."""

    def __init__(self, max_rings: int = MAX_RINGS, ring_capacity: int = RING_CAPACITY) -> None:
        self.max_rings = max_rings
        self.ring_capacity = ring_capacity
        self._conns: dict[Principal, set[Connection]] = {}
        self._registered: dict[Connection, Principal] = {}
        #: The principal ``conn`` is registered as, None if it is not: the dict's own ``get``
        #: (one C call; the message path asks it for every message).
        self.key_of: Callable[[Connection], Principal | None] = self._registered.get
        #: role -> its principals' connection sets (the same sets as ``_conns``): a role's
        #: broadcast (``send_role``) visits that role's principals, not every connected one.
        self._by_role: dict[str, dict[Principal, set[Connection]]] = {}
        self._role_connections: dict[str, int] = {}
        #: Where a message goes (send_pair): by visitor id and by agent id, the targets of the
        #: principal's connections, those taking JSON and those taking MessagePack; a target
        #: is the connection's outbox (``kefu._core.outbox.fan_out`` calls it in C) or its
        #: ``send_encoded``. Rebuilt when a connection of the principal comes or goes.
        self._targets: dict[str, dict[str, Targets]] = {"visitor": {}, "agent": {}}
        #: conv -> its ring, with running totals over every ring (rings_bytes: a scrape must
        #: not walk the messages); compiled (``kefu._core.ringbuf``): the message path keeps
        #: each message here, its ``remember`` one call.
        self.rings: RingSet = _ringbuf.RingSet(max_rings, ring_capacity)
        self.replayed_from_ring = 0
        self.replayed_from_store = 0

    # -- connections ------------------------------------------------------------------------

    def register(self, conn: Connection, key: Principal) -> bool:
        """Add ``conn`` as ``key``; True when it is the principal's first live connection."""
        old = self._registered.get(conn)
        if old == key:
            return False
        if old is not None:
            self.unregister(conn)  # one principal per connection
        conns = self._conns.get(key)
        first = conns is None
        if conns is None:
            conns = self._conns[key] = set()
            self._by_role.setdefault(key[0], {})[key] = conns
        conns.add(conn)
        self._registered[conn] = key
        self._retarget(key, conns)
        role_connections = self._role_connections
        role_connections[key[0]] = role_connections.get(key[0], 0) + 1
        return first

    def unregister(self, conn: Connection) -> tuple[Principal, bool] | None:
        """Forget ``conn``: ``(key, last)`` where ``last`` says no connection of ``key`` is
        left; None for a connection that was never registered."""
        key = self._registered.pop(conn, None)
        if key is None:
            return None
        self._role_connections[key[0]] -= 1
        conns = self._conns.get(key)
        if conns is None:
            return key, True
        conns.discard(conn)
        self._retarget(key, conns)
        if conns:
            return key, False
        del self._conns[key]
        of_role = self._by_role[key[0]]
        del of_role[key]
        if not of_role:
            del self._by_role[key[0]]
        return key, True

    def _retarget(self, key: Principal, conns: set[Connection]) -> None:
        table = self._targets.get(key[0])
        if table is None:
            return  # only visitors and agents take messages through send_pair
        if not conns:
            table.pop(key[1], None)
            return
        json_targets: list[object] = []
        packed_targets: list[object] = []
        for c in conns:
            send = c.send_encoded
            box = getattr(send, "__self__", None)
            target = box if type(box) is _outbox.Outbox else send
            (packed_targets if c.msgpack else json_targets).append(target)
        table[key[1]] = (tuple(json_targets), tuple(packed_targets))

    def connections(self, key: Principal) -> list[Connection]:
        """A snapshot of ``key``'s live connections (safe to send to while iterating)."""
        conns = self._conns.get(key)
        return list(conns) if conns else []

    def is_connected(self, key: Principal) -> bool:
        return key in self._conns

    # -- sending ----------------------------------------------------------------------------

    def send(
        self,
        keys: Iterable[Principal],
        frame: object,
        skip: Principal | None = None,
        exclude: Collection[Connection] = (),
    ) -> int:
        """``frame`` (or an :class:`Encoded`) to every connection of ``keys`` but ``skip``'s
        and those in ``exclude``; returns how many got it."""
        encoded: Encoded | None = frame if isinstance(frame, Encoded) else None
        sent = 0
        for key in keys:
            if key == skip:
                continue
            conns = self._conns.get(key)
            if not conns:
                continue
            if encoded is None:
                encoded = Encoded(frame)
            if len(conns) == 1 and not exclude:  # the common case, without the set's copy
                (c,) = conns
                encoded.send(c)
                sent += 1
                continue
            for c in list(conns):
                if exclude and c in exclude:
                    continue
                encoded.send(c)
                sent += 1
        return sent

    def send_pair(self, visitor_id: str, agent_id: str | None, frame: object, kind: str) -> None:
        """``frame`` (of type ``kind``) to every connection of a conversation's visitor and of
        its agent: :meth:`send` for those two keys, without an :class:`Encoded` or a list of
        keys. The fan-out of every message (kefu.node); encoded at most once per encoding, and
        sent by ``kefu._core.outbox.fan_out`` to each connection's outbox (the targets are
        tuples: a write that closes a slow consumer leaves them as they are)."""
        targets = self._targets
        _fan_out(
            targets["visitor"].get(visitor_id),
            None if agent_id is None else targets["agent"].get(agent_id),
            frame,
            kind,
            encode_json,
            encode_msgpack,
        )

    def send_role(self, role: str, frames: Iterable[object]) -> None:
        """Each of ``frames`` to every connection of every principal of ``role``."""
        of_role = self._by_role.get(role)
        if not of_role:
            return
        targets = list(of_role.values())
        for frame in frames:
            encoded = frame if isinstance(frame, Encoded) else Encoded(frame)
            for conns in targets:
                for c in list(conns):
                    encoded.send(c)

    # -- recent messages --------------------------------------------------------------------

    def remember(self, conv: int, msg: Msg) -> None:
        """Keep ``msg`` in ``conv``'s ring (seqs contiguous; a gap restarts the ring; a seq at
        or below the newest, from acks resolved out of order, is left out: the ring starts
        later and a resume reads the store)."""
        self.rings.remember(conv, msg, msg.seq)

    def forget(self, conv: int) -> None:
        self.rings.forget(conv)

    @property
    def rings_dropped(self) -> int:
        return self.rings.dropped

    @property
    def ring_messages(self) -> int:
        return self.rings.items

    @property
    def ring_text_bytes(self) -> int:
        return self.rings.text_bytes

    def missed(
        self, conv: int, last_seq: int, count: int, read_store: Callable[[int, int], list[Msg]]
    ) -> list[Msg]:
        """The messages after ``last_seq`` (``count`` of them): from the ring when it reaches
        back far enough, else ``read_store(last_seq, count)``."""
        ring = self.rings.get(conv)
        if ring is not None and ring.first_key is not None and ring.first_key <= last_seq + 1:
            self.rings.touch(conv)
            self.replayed_from_ring += 1
            return cast("list[Msg]", ring.since(last_seq))
        self.replayed_from_store += 1
        return read_store(last_seq, count)

    def ring_bytes(self, conv: int) -> int:
        """An estimate of the memory ``conv``'s ring holds: the ring, and per message its text
        (UTF-8) and :data:`MSG_OVERHEAD_BYTES` for the frame's other fields."""
        ring = self.rings.get(conv)
        if ring is None:
            return 0
        msgs = cast("list[Msg]", ring.to_list())
        texts = sum(_utf8_len(m.text) for m in msgs)
        return RING_OVERHEAD_BYTES + texts + len(msgs) * MSG_OVERHEAD_BYTES

    def rings_bytes(self) -> int:
        """:meth:`ring_bytes` summed over every ring, from running totals: no ring is read."""
        rings = self.rings
        return (
            RING_OVERHEAD_BYTES * len(rings) + rings.text_bytes + rings.items * MSG_OVERHEAD_BYTES
        )

    def stats(self) -> dict[str, int]:
        by_role = self._role_connections
        return {
            "principals": len(self._conns),
            "visitor_connections": by_role.get("visitor", 0),
            "agent_connections": by_role.get("agent", 0),
            "rings": len(self.rings),
            "rings_max": self.max_rings,
            "rings_dropped_total": self.rings_dropped,
            "ring_messages": self.ring_messages,
            "ring_text_bytes": self.ring_text_bytes,
            "replayed_from_ring_total": self.replayed_from_ring,
            "replayed_from_store_total": self.replayed_from_store,
        }
