"""Outgoing message rate limits (a platform's chat send limits, such as Twitch's)."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable


class SendLimiter:
    """At most ``limit`` sends in any ``window`` seconds; ``acquire`` waits for a slot.
    Waiters are served in arrival order."""

    def __init__(self, limit: int, window: float, *,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        if limit < 1 or window <= 0:
            raise ValueError("limit must be >= 1 and window > 0")
        self.limit = limit
        self.window = window
        self._clock = clock
        self._sleep = sleep
        self._sent: deque[float] = deque()
        self._lock = asyncio.Lock()
        self._waiting = 0

    def backlog_s(self) -> float:
        """About how long a send asked for now would wait (whole windows, an upper bound):
        the sends of the window and those already waiting go first, ``limit`` a window."""
        now = self._clock()
        recent = sum(1 for sent in self._sent if now - sent < self.window)
        return (self._waiting + recent) // self.limit * self.window

    async def acquire(self) -> None:
        self._waiting += 1
        try:
            await self._acquire()
        finally:
            self._waiting -= 1

    async def _acquire(self) -> None:
        async with self._lock:
            while True:
                now = self._clock()
                while self._sent and now - self._sent[0] >= self.window:
                    self._sent.popleft()
                if len(self._sent) < self.limit:
                    self._sent.append(now)
                    return
                await self._sleep(self.window - (now - self._sent[0]))

    def fill(self) -> None:
        """The platform said we sent too fast (its count is ahead of ours: another client on
        the account, clocks apart): the window counts as full from now."""
        now = self._clock()
        self._sent.extend([now] * max(0, self.limit - len(self._sent)))
