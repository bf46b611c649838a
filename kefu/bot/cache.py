"""The response cache: whole LLM answers, reused when the same question meets the same
knowledge base, the same retrieved entries and the same model.

Use::

    cache = ResponseCache(max_entries=1024, max_bytes=4 * MiB, ttl_s=3600)
    key = cache_key(question, kb_version=kb.version, entry_ids=[h.id for h in hits],
                    model=done_model)
    answer = cache.get(key)            # None: a miss (or an uncacheable question)
    ...
    cache.put(key, done.text, finish_reason=done.finish_reason)

Decisions and bounds
--------------------
- **The key** is a 16-byte BLAKE2b digest of: the normalised question, the KB version, the
  ids of the retrieved entries in rank order, the model, and an optional ``context`` string.
  The question is normalised to its tokens from :func:`kefu.text.tokenize` joined with spaces:
  the knowledge base's own view of the text (case, fullwidth letters and digits, punctuation,
  spacing and emoji do not count), so "运费多少？" and "运费多少" share an answer, and "a b"
  and "b a" do not. A question without tokens (only emoji or punctuation) has no key
  (``None``): such questions would all share one. The parts are encoded as a JSON list before
  hashing, so no two different tuples of parts give the same input.
- **Conversation history is not in the key.** A follow-up ("那退货呢") means different things
  after different turns; pass a digest of what the answer depended on as ``context`` (for
  instance the previous turn), or consult the cache only for a conversation's first question.
- **Invalidation** is by key: a new KB version (or other retrieved ids, or another model)
  makes new keys, so entries of the old version are never served again. They are not swept at
  once: they age out by TTL (:meth:`ResponseCache.purge_expired`, on a housekeeping timer, or
  when read) and by LRU, which evicts them first as they are no longer read.
- **Bounds**: at most ``max_entries`` entries and ``max_bytes`` bytes (each entry's answer as
  ``sys.getsizeof`` counts it, plus its key and bookkeeping); the least recently read entries go
  first when either is full. An answer larger than ``max_bytes`` is refused. Every entry lives
  at most ``ttl_s`` seconds from its put.
- **Only complete answers**: :meth:`ResponseCache.put` refuses an answer whose
  ``finish_reason`` is not ``"stop"`` (cut by ``max_tokens``, filtered, or interrupted) and an
  empty one.
- **Metrics**: :meth:`ResponseCache.stats` (hits, misses, puts, entries, bytes, evictions by
  reason ``entries``/``bytes``/``expired``, refusals by reason).
"""

from __future__ import annotations

import hashlib
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Final

from kefu.protocol import encode_json
from kefu.text import tokenize

__all__ = ["CacheKey", "ResponseCache", "cache_key", "normalize_question"]

CacheKey = bytes
KiB: Final = 1024
MiB: Final = 1024 * KiB


def normalize_question(question: str) -> str:
    """The question as the cache compares it: its tokens joined with spaces."""
    return " ".join(tokenize(question))


def cache_key(
    question: str,
    *,
    kb_version: str | int,
    entry_ids: Sequence[str],
    model: str,
    context: str = "",
) -> CacheKey | None:
    """The key of an answer; None when the question has no tokens (see the module doc)."""
    normalized = normalize_question(question)
    if not normalized:
        return None
    parts = encode_json([normalized, str(kb_version), list(entry_ids), model, context])
    return hashlib.blake2b(parts, digest_size=16).digest()


class _Entry:
    __slots__ = ("answer", "expires", "nbytes")

    def __init__(self, answer: str, expires: float, nbytes: int) -> None:
        self.answer = answer
        self.expires = expires
        self.nbytes = nbytes


# An entry's object, its 16-byte key and its node in the OrderedDict (links and hash slot).
_ENTRY_BYTES: Final = (
    sys.getsizeof(_Entry("", 0.0, 0)) + sys.getsizeof(b"\0" * 16) + sys.getsizeof(0.0) + 100
)


class ResponseCache:
    """A bounded LRU of complete answers with a TTL; see the module doc.

    ``clock`` is monotonic seconds (injectable for tests).
    """

    def __init__(
        self,
        *,
        max_entries: int = 1024,
        max_bytes: int = 4 * MiB,
        ttl_s: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 1 <= max_entries <= 10_000_000:
            raise ValueError(f"max_entries must be in [1, 10000000], got {max_entries}")
        if not 4 * KiB <= max_bytes <= 64 * 1024 * MiB:
            raise ValueError(f"max_bytes must be in [4 KiB, 64 GiB], got {max_bytes}")
        if not 0 < ttl_s <= 30 * 86400:
            raise ValueError(f"ttl_s must be in (0, 30 days], got {ttl_s}")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self._clock = clock
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()
        self._bytes = 0
        self._hits = 0
        self._misses = 0
        self._puts = 0
        self._evictions = {"entries": 0, "bytes": 0, "expired": 0}
        self._refused = {"uncacheable": 0, "incomplete": 0, "empty": 0, "too_large": 0}

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes_held(self) -> int:
        """Bytes held (see the module doc)."""
        return self._bytes

    def get(self, key: CacheKey | None) -> str | None:
        """The cached answer, or None; a hit makes the entry the most recently used."""
        if key is None:
            self._misses += 1
            return None
        entry = self._entries.get(key)
        if entry is None:
            self._misses += 1
            return None
        if self._clock() >= entry.expires:
            self._drop(key, entry, "expired")
            self._misses += 1
            return None
        self._entries.move_to_end(key)
        self._hits += 1
        return entry.answer

    def put(self, key: CacheKey | None, answer: str, *, finish_reason: str | None = "stop") -> bool:
        """Keep a complete answer; False (and a refusal counted) when it may not be kept."""
        if key is None:
            self._refused["uncacheable"] += 1
            return False
        if finish_reason != "stop":
            self._refused["incomplete"] += 1
            return False
        if not answer.strip():
            self._refused["empty"] += 1
            return False
        nbytes = sys.getsizeof(answer) + _ENTRY_BYTES
        if nbytes > self.max_bytes:
            self._refused["too_large"] += 1
            return False
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= old.nbytes
        self._entries[key] = _Entry(answer, self._clock() + self.ttl_s, nbytes)
        self._bytes += nbytes
        self._puts += 1
        while len(self._entries) > self.max_entries:
            self._evict_oldest("entries")
        while self._bytes > self.max_bytes:
            self._evict_oldest("bytes")
        return True

    def purge_expired(self) -> int:
        """Drop every expired entry (O(entries)); returns how many went."""
        now = self._clock()
        expired = [(k, e) for k, e in self._entries.items() if now >= e.expires]
        for key, entry in expired:
            self._drop(key, entry, "expired")
        return len(expired)

    def clear(self) -> None:
        """Drop everything (not counted as evictions)."""
        self._entries.clear()
        self._bytes = 0

    def stats(self) -> dict[str, Any]:
        """Counters since start and the current size, for ``/metrics``."""
        return {
            "hits": self._hits,
            "misses": self._misses,
            "puts": self._puts,
            "entries": len(self._entries),
            "bytes": self._bytes,
            "max_entries": self.max_entries,
            "max_bytes": self.max_bytes,
            "evictions": dict(self._evictions),
            "refused": dict(self._refused),
        }

    def _evict_oldest(self, reason: str) -> None:
        key, entry = next(iter(self._entries.items()))
        self._drop(key, entry, reason)

    def _drop(self, key: bytes, entry: _Entry, reason: str) -> None:
        del self._entries[key]
        self._bytes -= entry.nbytes
        self._evictions[reason] += 1
