"""How hard the openai backend presses a model server: as many requests at once as it shows it
can take (``ConcurrencyLimit``), and none while it is down (``CircuitBreaker``). I/O-free
apart from waiting; the clock and the randomness are injectable.

A server past its capacity answers 429 (or 503). Retrying every refused request on the same
schedule sends them back together, refused together again: with a server taking 2 at once,
20 viewers got 12 fallbacks where all could have been answered in a few seconds. Here a
refusal halves how many are sent at once and the rest wait their turn on this side; each
success adds a little back (additive increase, multiplicative decrease, as TCP does)."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable

# A refusal lowers the limit once per this many seconds: the requests already sent under the
# old limit are refused together, and all of them together are one sign of overload.
DECREASE_EVERY_S = 0.5


def jittered(delay: float, rng: Callable[[], float] = random.random) -> float:
    """``delay`` spread over [0.5, 1.5) x itself, so retries scheduled together part."""
    return delay * (0.5 + rng())


class ConcurrencyLimit:
    """At most ``limit`` requests in flight; ``limit`` adapts between 1 and ``ceiling``.

    Invariant: 1 <= limit <= ceiling, and ``in_flight`` counts acquired, unreleased slots.
    Waiters are woken in arrival order."""

    def __init__(self, ceiling: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.ceiling = ceiling
        self.limit = float(ceiling)
        self.in_flight = 0
        self._clock = clock
        self._lowered_at = -DECREASE_EVERY_S
        self._turn = asyncio.Condition()

    async def acquire(self) -> None:
        async with self._turn:
            await self._turn.wait_for(lambda: self.in_flight < int(self.limit))
            self.in_flight += 1

    async def release(self, *, refused: bool = False) -> None:
        """A request ended: ``refused`` when the server said it was over capacity."""
        async with self._turn:
            self.in_flight -= 1
            if refused:
                now = self._clock()
                if now - self._lowered_at >= DECREASE_EVERY_S:
                    self._lowered_at = now
                    self.limit = max(1.0, self.limit / 2)
            else:
                self.limit = min(float(self.ceiling), self.limit + 1 / self.limit)
            self._turn.notify_all()


class CircuitBreaker:
    """After ``threshold`` failures in a row to reach the server, requests fail at once for
    ``cooldown_s`` (doubling while it stays down, up to ``max_cooldown_s``); then one request
    is let through to try, and its success closes the breaker.

    Invariant: ``open_until`` is 0 while closed; ``failures`` counts failures since the last
    success."""

    def __init__(self, threshold: int = 5, cooldown_s: float = 2.0,
                 max_cooldown_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._threshold = threshold
        self._first_cooldown = self._cooldown = cooldown_s
        self._max_cooldown = max_cooldown_s
        self._clock = clock
        self.failures = 0
        self.open_until = 0.0
        self._probing = False

    @property
    def is_open(self) -> bool:
        return self.open_until > 0

    def retry_in_s(self) -> float | None:
        """None when a request may go now (closed, or the one trying after a cooldown);
        else how long until the next try."""
        if not self.is_open:
            return None
        left = self.open_until - self._clock()
        if left <= 0 and not self._probing:
            self._probing = True
            return None
        return max(left, 0.0)

    def succeeded(self) -> bool:
        """True when this closed an open breaker."""
        was_open = self.is_open
        self.failures, self.open_until, self._probing = 0, 0.0, False
        self._cooldown = self._first_cooldown
        return was_open

    def failed(self) -> bool:
        """True when this opened the breaker (or kept it open after a failed try)."""
        self.failures += 1
        if self._probing:  # the try after a cooldown failed: wait longer
            self._cooldown = min(self._max_cooldown, 2 * self._cooldown)
        elif self.failures < self._threshold or self.is_open:
            return False
        self._probing = False
        self.open_until = self._clock() + self._cooldown
        return True
