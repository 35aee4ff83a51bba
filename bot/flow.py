"""Flow control in memory: sliding-window rate limits and per-viewer ordered lanes."""

from __future__ import annotations

import asyncio
from collections import defaultdict, deque
from dataclasses import dataclass, field


class SlidingWindowLimiter:
    """At most ``limit`` events per key in any ``window`` seconds."""

    def __init__(self, limit: int, window: float = 60.0) -> None:
        self._limit = limit
        self._window = window
        self._events: dict[str, deque[float]] = defaultdict(deque)

    def allow(self, key: str, now: float) -> bool:
        events = self._events[key]
        while events and now - events[0] >= self._window:
            events.popleft()
        if len(events) >= self._limit:
            return False
        events.append(now)
        return True


@dataclass(slots=True)
class Lane:
    """One viewer's ordered lane: the lock, and how many messages hold or wait for it."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0
    arrived: int = 0  # arrival counter: a message's place in this lane
    burst: list[str] = field(default_factory=list)  # superseded texts, for coalescing

    def newer_waiting(self, place: int) -> bool:
        return place < self.arrived


@dataclass(slots=True)
class Ticket:
    """A message's place in its lane; ``turn`` completes when the lane is its own."""

    key: tuple[str, str]
    lane: Lane
    place: int
    turn: asyncio.Future[bool]


class Lanes:
    """Per-viewer lanes: a viewer's messages are answered one at a time, in arrival order.
    A lane exists only while someone holds or waits for it (bounded by the pending limit)."""

    def __init__(self) -> None:
        self._lanes: dict[tuple[str, str], Lane] = {}

    def __len__(self) -> int:
        return len(self._lanes)

    def enter(self, key: tuple[str, str]) -> Ticket:
        """Take a place. Call before the first await so arrival order is kept."""
        lane = self._lanes.setdefault(key, Lane())
        lane.users += 1
        lane.arrived += 1
        return Ticket(key, lane, lane.arrived, asyncio.ensure_future(lane.lock.acquire()))

    def leave(self, ticket: Ticket) -> None:
        """Release the lane (or give up the place if the turn never came)."""
        if ticket.turn.done() and not ticket.turn.cancelled():
            ticket.lane.lock.release()
        else:
            ticket.turn.cancel()
        ticket.lane.users -= 1
        if ticket.lane.users == 0:
            self._lanes.pop(ticket.key, None)
