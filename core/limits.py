"""Rate limits: one token bucket, behind a WebSocket connection's frame and `track_usage`
rates and the HTTP API's per-caller ingest rate."""

from __future__ import annotations

from core.clock import Clock


class TokenBucket:
    """`rate` tokens per second up to `burst`; a new bucket is full."""

    __slots__ = ("_clock", "_last", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float, clock: Clock) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = burst
        self._last = clock()

    def _refill(self) -> None:
        now = self._clock()
        elapsed = now - self._last
        self._last = now
        if elapsed > 0:
            self._tokens = min(self.burst, self._tokens + elapsed * self.rate)

    def take(self, cost: float = 1.0) -> bool:
        """Takes `cost` tokens and answers True, or takes none and answers False."""
        return self.wait(cost) == 0.0

    def wait(self, cost: float = 1.0) -> float:
        """Takes `cost` tokens and answers 0, or takes none and answers the seconds until
        they would be there."""
        self._refill()
        if self._tokens >= cost:
            self._tokens -= cost
            return 0.0
        return (cost - self._tokens) / self.rate

    def full(self) -> bool:
        """True when the bucket holds `burst` tokens (an idle caller: nothing to remember)."""
        self._refill()
        return self._tokens >= self.burst
