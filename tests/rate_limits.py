"""The platforms' send limits, as the fake servers enforce them.

Twitch: chat messages per channel in a sliding window (20 in 30 s; 100 for a moderator); a
message over the limit is dropped (``is_sent: false``, ``msg_ratelimit``) and counts as a
violation, which on Twitch ends in a lockout. Discord: per-route buckets (a fixed window that
starts with its first request), announced in ``X-RateLimit-*`` headers; a request over the
limit gets 429 with ``retry_after``.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class SlidingWindow:
    """At most ``limit`` admitted per key in any ``window`` seconds."""

    limit: int
    window: float
    clock: Callable[[], float] = time.monotonic
    refused: int = 0
    _admitted: defaultdict[str, deque[float]] = field(
        default_factory=lambda: defaultdict(deque))

    def admit(self, key: str) -> bool:
        now, admitted = self.clock(), self._admitted[key]
        while admitted and now - admitted[0] >= self.window:
            admitted.popleft()
        if len(admitted) >= self.limit:
            self.refused += 1
            return False
        admitted.append(now)
        return True


@dataclass
class Bucket:
    remaining: int
    resets_at: float


@dataclass
class DiscordBuckets:
    """``limit`` requests per ``per`` seconds for each route and channel."""

    limit: int = 5
    per: float = 5.0
    clock: Callable[[], float] = time.monotonic
    answered_429: int = 0
    _buckets: dict[str, Bucket] = field(default_factory=dict)

    def take(self, route: str) -> tuple[bool, dict[str, str], float]:
        """Spend one request of ``route``'s bucket: (allowed, headers, retry_after)."""
        now = self.clock()
        bucket = self._buckets.get(route)
        if bucket is None or now >= bucket.resets_at:
            bucket = self._buckets[route] = Bucket(self.limit, now + self.per)
        allowed = bucket.remaining > 0
        if allowed:
            bucket.remaining -= 1
        else:
            self.answered_429 += 1
        reset_after = max(0.0, bucket.resets_at - now)
        headers = {"X-RateLimit-Limit": str(self.limit),
                   "X-RateLimit-Remaining": str(bucket.remaining),
                   "X-RateLimit-Reset": f"{time.time() + reset_after:.3f}",
                   "X-RateLimit-Reset-After": f"{reset_after:.3f}",
                   "X-RateLimit-Bucket": f"bucket-{abs(hash(route.split(':')[0])) % 10**8}"}
        if not allowed:
            headers["Retry-After"] = str(math.ceil(reset_after))
            headers["X-RateLimit-Scope"] = "user"
        return allowed, headers, reset_after
