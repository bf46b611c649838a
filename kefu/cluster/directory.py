"""The agents an administrator creates, shared by every node of a cluster through Redis.

Agents declared in the config file are the same on every node by construction (every node
reads the same file, as a rule). Agents made through the admin API live in the store of the
node that answered the call; in a cluster they must work on every node: their token, their
settings, and what ends their session tokens. This module keeps them in Redis:

- ``agents`` (hash): agent id -> ``<rev>:<msgpack StoredAgent>``, or ``<rev>:`` once deleted
  (a tombstone, so that a node that was away learns of the deletion). ``rev`` comes from one
  counter (``agents:rev``) bumped by every change: a node applies a record only when its
  ``rev`` is newer than the one it holds, so changes made on two nodes settle on the last
  one everywhere.
- ``agents:nb`` (hash): agent id -> the ``not_before`` of its session tokens (Unix seconds;
  only ever raised).
- ``agents:revoked:<id>`` (sorted set): the agent's revoked session token ids, scored by
  their expiry; expired ones are dropped on each revocation, and past
  :data:`MAX_REVOKED` the caller ends every session instead (``not_before``).

Every write is one Lua script (atomic in Redis). After a change the node that made it tells
the others (a bus event); a node also reads the whole directory when it starts and whenever
Redis comes back, so an event lost on the way costs nothing lasting. When Redis lost its data
(no persistence), each node writes back what it holds and Redis lacks.
"""

from __future__ import annotations

from typing import Any, Final, NamedTuple

import msgspec

from kefu.cluster.link import Link
from kefu.store import StoredAgent

#: Agents the directory holds at most (tombstones included): the admin API's own bound is
#: far lower; past this a new agent is refused by the node (Conflict), not written.
MAX_AGENTS: Final = 100_000
#: Revoked session tokens kept per agent in Redis (the node's own bound, AGENT_REVOKED_MAX,
#: decides when to end them all instead; this only bounds what a stale caller could add).
MAX_REVOKED: Final = 1_024

_ENCODE = msgspec.msgpack.Encoder().encode
_DECODE_AGENT = msgspec.msgpack.Decoder(StoredAgent).decode

# KEYS: agents, agents:rev, agents:nb. ARGV: id, payload ("" deletes), not_before.
_PUT = """
local rev = redis.call('INCR', KEYS[2])
redis.call('HSET', KEYS[1], ARGV[1], rev .. ':' .. ARGV[2])
local nb = tonumber(ARGV[3])
local held = tonumber(redis.call('HGET', KEYS[3], ARGV[1]) or '0')
if nb > held then redis.call('HSET', KEYS[3], ARGV[1], nb) end
return rev
"""

# KEYS: agents, agents:rev, agents:nb. ARGV: id, rev, payload, not_before.
# Writes back a record Redis lacks (it lost its data): only if the id is absent.
_RESTORE = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then return 0 end
local rev = tonumber(ARGV[2])
redis.call('HSET', KEYS[1], ARGV[1], rev .. ':' .. ARGV[3])
if tonumber(redis.call('GET', KEYS[2]) or '0') < rev then redis.call('SET', KEYS[2], rev) end
local nb = tonumber(ARGV[4])
local held = tonumber(redis.call('HGET', KEYS[3], ARGV[1]) or '0')
if nb > held then redis.call('HSET', KEYS[3], ARGV[1], nb) end
return 1
"""

# KEYS: agents:nb. ARGV: id, not_before.
_RAISE = """
local held = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if tonumber(ARGV[2]) > held then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
return 1
"""

# KEYS: agents:revoked:<id>. ARGV: jti, exp, now, max. 1 = kept, 0 = too many (end them all).
_REVOKE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[3])
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 1 end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[4]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
-- The set lives as long as its last token (a minute more for clocks apart).
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
redis.call('EXPIREAT', KEYS[1], tonumber(last[2]) + 60)
return 1
"""


class Entry(NamedTuple):
    """One agent as the directory holds it: ``agent`` None once deleted."""

    rev: int
    agent: StoredAgent | None


class Sessions(NamedTuple):
    """What ends an agent's session tokens, cluster-wide."""

    not_before: int
    revoked: list[tuple[str, int]]


def _entry(raw: bytes) -> Entry:
    rev, _, payload = raw.partition(b":")
    return Entry(int(rev), _DECODE_AGENT(payload) if payload else None)


class AgentDirectory:
    """Reads and writes of the directory (module doc); every call may raise
    ``ClusterUnavailable`` (through :meth:`Link.call`)."""

    def __init__(self, link: Link) -> None:
        self.link = link
        self._agents = link.key("agents")
        self._rev = link.key("agents", "rev")
        self._nb = link.key("agents", "nb")
        self._put = link.redis.register_script(_PUT)
        self._restore = link.redis.register_script(_RESTORE)
        self._revoke = link.redis.register_script(_REVOKE)
        self._raise = link.redis.register_script(_RAISE)

    def _revoked_key(self, agent_id: str) -> str:
        return self.link.key("agents", "revoked", agent_id)

    async def put(self, agent_id: str, agent: StoredAgent | None, not_before: int) -> int:
        """Write ``agent`` (None: the deletion) and raise the sessions' ``not_before``; the
        record's new ``rev``."""
        payload = b"" if agent is None else _ENCODE(agent)

        async def put(r: Any) -> int:
            keys = (self._agents, self._rev, self._nb)
            return int(await self._put(keys=keys, args=(agent_id, payload, not_before)))

        return await self.link.call(put)

    async def restore(self, agent: StoredAgent, rev: int, not_before: int) -> bool:
        """Write back ``agent`` at ``rev`` if the directory has no record of it at all."""

        async def restore(r: Any) -> bool:
            keys = (self._agents, self._rev, self._nb)
            args = (agent.id, rev, _ENCODE(agent), not_before)
            return bool(await self._restore(keys=keys, args=args))

        return await self.link.call(restore)

    async def get(self, agent_id: str) -> tuple[Entry | None, Sessions]:
        """The agent's record (None: never known) and its sessions' state."""
        revoked_key = self._revoked_key(agent_id)

        async def read(r: Any) -> list[Any]:
            async with r.pipeline(transaction=False) as pipe:
                pipe.hget(self._agents, agent_id)
                pipe.hget(self._nb, agent_id)
                pipe.zrange(revoked_key, 0, MAX_REVOKED - 1, withscores=True)
                result: list[Any] = await pipe.execute()
                return result

        raw, nb, revoked = await self.link.call(read)
        sessions = Sessions(int(nb or 0), [(jti.decode(), int(exp)) for jti, exp in revoked or ()])
        return (None if raw is None else _entry(raw)), sessions

    async def all(self) -> dict[str, Entry]:
        """Every record (tombstones included), at most :data:`MAX_AGENTS`."""

        async def read(r: Any) -> dict[bytes, bytes]:
            out: dict[bytes, bytes] = {}
            async for field, value in r.hscan_iter(self._agents, count=500):
                out[field] = value
                if len(out) >= MAX_AGENTS:
                    break
            return out

        raw = await self.link.call(read)
        return {k.decode(): _entry(v) for k, v in raw.items()}

    async def count(self) -> int:
        async def count(r: Any) -> int:
            return int(await r.hlen(self._agents))

        return await self.link.call(count)

    async def end_sessions(self, agent_id: str, not_before: int) -> None:
        """Raise the ``not_before`` of the agent's session tokens (never lowers it)."""

        async def end(r: Any) -> None:
            await self._raise(keys=(self._nb,), args=(agent_id, not_before))

        await self.link.call(end)

    async def revoke(self, agent_id: str, jti: str, exp: int, now: int) -> bool:
        """Add a revoked session token; False when the agent has too many (end them all)."""
        key = self._revoked_key(agent_id)

        async def revoke(r: Any) -> bool:
            return bool(await self._revoke(keys=(key,), args=(jti, exp, now, MAX_REVOKED)))

        return await self.link.call(revoke)
