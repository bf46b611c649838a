"""Token-bucket rate limit of one client (one WebSocket connection, one API caller)."""

from __future__ import annotations

__all__ = ["TokenBucket"]


class TokenBucket:
    """``burst`` commands at once, refilled at ``per_second``; starts full.

    The caller passes the time (``loop.time()``, a monotonic clock) so that one clock read
    serves every check of a frame and tests can drive the bucket without sleeping.
    """

    __slots__ = ("_last", "_tokens", "burst", "per_second")

    def __init__(self, per_second: float, burst: int, now: float) -> None:
        if per_second <= 0 or burst < 1:
            raise ValueError("per_second must be > 0 and burst >= 1")
        self.per_second = per_second
        self.burst = burst
        self._tokens = float(burst)
        self._last = now

    def take(self, now: float) -> bool:
        """Spends one token; ``False`` (nothing spent) when the bucket is empty."""
        tokens = self._tokens + (now - self._last) * self.per_second
        self._last = now
        if tokens > self.burst:
            tokens = float(self.burst)
        if tokens >= 1.0:
            self._tokens = tokens - 1.0
            return True
        self._tokens = tokens
        return False

    @property
    def tokens(self) -> float:
        """Tokens left at the last :meth:`take` (without the refill since)."""
        return self._tokens
