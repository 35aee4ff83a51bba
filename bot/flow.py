"""Flow control in memory, decided before any database work: sliding-window rate limits,
recently seen message keys, and per-viewer ordered lanes. Every structure is bounded."""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from collections.abc import Hashable
from dataclasses import dataclass, field

from bot.reports import LatencySummary

MAX_TRACKED_KEYS = 50_000


class SlidingWindowLimiter:
    """At most ``limit`` events per key in any ``window`` seconds. Keys idle for a whole
    window are forgotten; beyond ``max_keys`` the least recently seen are."""

    def __init__(self, limit: int, window: float = 60.0,
                 max_keys: int = MAX_TRACKED_KEYS) -> None:
        self._limit = limit
        self._window = window
        self._max_keys = max_keys
        self._events: OrderedDict[str, deque[float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._events)

    def allow(self, key: str, now: float) -> bool:
        events = self._events.pop(key, None) or deque()
        self._events[key] = events  # most recently seen last
        while events and now - events[0] >= self._window:
            events.popleft()
        if len(self._events) > self._max_keys:
            self._forget(now)
        if len(events) >= self._limit:
            return False
        events.append(now)
        return True

    def _forget(self, now: float) -> None:
        for key in [k for k, e in self._events.items() if not e or now - e[-1] >= self._window]:
            del self._events[key]
        while len(self._events) > self._max_keys:
            self._events.popitem(last=False)


class RecentKeys:
    """The last ``size`` keys seen (a redelivered platform message is caught here before any
    database work; the database's unique key catches the rest)."""

    def __init__(self, size: int = MAX_TRACKED_KEYS) -> None:
        self._size = size
        self._keys: OrderedDict[Hashable, None] = OrderedDict()

    def seen(self, key: Hashable) -> bool:
        """True if ``key`` was seen before; remembers it either way."""
        if key in self._keys:
            self._keys.move_to_end(key)
            return True
        self._keys[key] = None
        if len(self._keys) > self._size:
            self._keys.popitem(last=False)
        return False


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


class ReplyPace:
    """Recent replies: their latencies (for the operator) and how many finished lately (the
    pace the overload policy predicts a queue's wait with)."""

    def __init__(self, window_s: float = 10.0, size: int = 500) -> None:
        self._window_s = window_s
        self.latencies: deque[float] = deque(maxlen=size)
        self._finished: deque[float] = deque(maxlen=size)

    def record(self, latency_s: float, now: float) -> None:
        self.latencies.append(latency_s)
        self._finished.append(now)

    def percentiles(self) -> LatencySummary:
        """p50/p95 of recent reply latencies, in milliseconds."""
        if not self.latencies:
            return LatencySummary(p50=None, p95=None, samples=0)
        ordered = sorted(self.latencies)

        def pick(q: float) -> float:
            return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 1)

        return LatencySummary(p50=pick(0.5), p95=pick(0.95), samples=len(ordered))

    def per_second(self, now: float) -> float:
        """Replies finished per second in the last ``window_s`` (0 before any), over the
        time they span (at least a second, so two quick replies do not read as a flood)."""
        while self._finished and now - self._finished[0] > self._window_s:
            self._finished.popleft()
        if not self._finished:
            return 0.0
        return len(self._finished) / max(now - self._finished[0], 1.0)
