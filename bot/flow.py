"""Flow control in memory, decided before any database work: sliding-window rate limits,
recently seen message keys, and per-viewer ordered lanes. Every structure is bounded."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from collections.abc import Hashable, Iterator
from contextlib import contextmanager
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
        """Invariant: a key's times are in order and none is later than the latest ``now``
        seen for it, so a clock stepped back, or an event stamped ahead, counts as now: it
        costs at most one window, not the size of the jump."""
        events = self._events.pop(key, None) or deque()
        if events and events[-1] > now:
            events = deque(min(moment, now) for moment in events)
        self._events[key] = events  # most recently seen last
        while events and now - events[0] >= self._window:
            events.popleft()
        if len(self._events) > self._max_keys:
            self._forget(now)
        if len(events) >= self._limit:
            return False
        events.append(now)
        return True

    def used(self, key: str, now: float) -> int:
        """How many events ``key`` has in the window ending at ``now`` (nothing recorded)."""
        return sum(1 for moment in self._events.get(key, ()) if now - moment < self._window)

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
    """One viewer's ordered lane: who holds it, the turns waiting for it in arrival order,
    and how many messages hold or wait for it."""

    held: bool = False
    waiting: deque[asyncio.Future[bool]] = field(default_factory=deque)
    users: int = 0
    arrived: int = 0  # arrival counter: a message's place in this lane
    burst: list[str] = field(default_factory=list)  # superseded texts, for coalescing

    def newer_waiting(self, place: int) -> bool:
        return place < self.arrived

    def pass_on(self) -> None:
        """The holder is done: the next turn still wanted gets the lane."""
        while self.waiting:
            turn = self.waiting.popleft()
            if not turn.done():
                turn.set_result(True)
                return
        self.held = False


@dataclass(slots=True)
class Ticket:
    """A message's place in its lane; ``turn`` completes when the lane is its own (at once,
    without a trip through the event loop, when nobody held it)."""

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
        turn: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        if lane.held:
            lane.waiting.append(turn)
        else:
            lane.held = True
            turn.set_result(True)
        return Ticket(key, lane, lane.arrived, turn)

    def leave(self, ticket: Ticket) -> None:
        """Release the lane (or give up the place if the turn never came)."""
        if ticket.turn.done() and not ticket.turn.cancelled():
            ticket.lane.pass_on()
        else:
            ticket.turn.cancel()  # pass_on skips it
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


STALL_FACTOR = 2.0  # a message this far past the budget and still in the pipeline: stalled
STALL_QUEUE = 4  # ...with this many behind it: a queue, not one slow message or a hiccup
CALM_S = 1.0  # each second with no message over the budget doubles the bound


class Pipeline:
    """Admitted messages in the bot's own stages: being recorded, their context read, their
    reply sent and recorded; not while they wait for the model or for the viewer's earlier
    message. How many there are, since when the oldest is there, and how long each spent
    there in all (the bot's own overhead for it)."""

    def __init__(self) -> None:
        # Insertion order is entry order: the first is the one present the longest.
        self._present: dict[Stay, float] = {}

    def __len__(self) -> int:
        return len(self._present)

    def enter(self) -> Stay:
        stay = Stay(self)
        stay.come_back()
        return stay

    def oldest_age(self, now: float) -> float:
        for entered in self._present.values():
            return now - entered
        return 0.0

    def arrived(self, stay: Stay) -> None:
        self._present[stay] = time.monotonic()

    def departed(self, stay: Stay) -> float:
        """How long ``stay`` was present this time (0 if it was not)."""
        entered = self._present.pop(stay, None)
        return time.monotonic() - entered if entered is not None else 0.0


class Stay:
    """One message's time in the ``Pipeline``."""

    __slots__ = ("_pipeline", "spent_s")

    def __init__(self, pipeline: Pipeline) -> None:
        self._pipeline = pipeline
        self.spent_s = 0.0

    def come_back(self) -> None:
        self._pipeline.arrived(self)

    def leave(self) -> None:
        self.spent_s += self._pipeline.departed(self)

    @contextmanager
    def away(self) -> Iterator[None]:
        """Out of the pipeline meanwhile (waiting for the model, or for a turn)."""
        self.leave()
        try:
            yield
        finally:
            self.come_back()


class OverheadLimit:
    """How many messages may be in the ``Pipeline`` at once: an adaptive bound that keeps
    the bot's own overhead per message near ``budget_s`` when the bot itself (its store, its
    event loop) is the bottleneck; past the bound new messages are refused at once (``busy``)
    instead of queueing.

    Sized as TCP sizes its window: a reply within the budget raises the bound by ``1/bound``
    (about one per round of replies), a reply over it lowers it by a tenth, never below one,
    and each calm second doubles it, up to ``ceiling``: a chat the bot keeps up with never
    meets it, and a raid's burst comes in whole. Replies tell late, so a flood's first wave
    is cut short another way: while ``STALL_QUEUE`` or more messages are in the pipeline and
    the oldest has been there ``STALL_FACTOR`` times the budget, new ones are refused. The
    budget is at least twice the lowest overhead seen lately: a remote database is slow even
    when idle, which is its cost, not congestion."""

    def __init__(self, budget_s: float, ceiling: int, window: int = 256) -> None:
        self._budget_s = budget_s
        self._ceiling = float(ceiling)
        self.bound = self._ceiling
        self._window = window
        self._recent: deque[float] = deque(maxlen=window)
        self._samples = 0
        self._floor_s = float("inf")  # the lowest overhead seen lately
        self._calm_since = 0.0

    def _limit_s(self) -> float:
        return max(self._budget_s, 2 * self._floor_s) if self._samples else self._budget_s

    def admits(self, pipeline: Pipeline, now: float) -> bool:
        if self._budget_s <= 0:
            return True
        if (len(pipeline) >= STALL_QUEUE
                and pipeline.oldest_age(now) > STALL_FACTOR * self._limit_s()):
            self._calm_since = now
            return False
        if now - self._calm_since >= CALM_S and self.bound < self._ceiling:
            self.bound, self._calm_since = min(self._ceiling, self.bound * 2), now
        return len(pipeline) < int(self.bound)

    def record(self, overhead_s: float, now: float) -> None:
        """An answered message's overhead (its ``Stay``)."""
        if self._budget_s <= 0:
            return
        self._recent.append(overhead_s)
        self._samples += 1
        # Down at once; back up (the window forgot a lucky one) only now and then.
        self._floor_s = (min(self._recent) if self._samples % self._window == 0
                         else min(self._floor_s, overhead_s))
        if overhead_s > self._limit_s():
            self.bound, self._calm_since = max(1.0, self.bound * 0.9), now
        else:
            self.bound = min(self._ceiling, self.bound + 1 / self.bound)


class Episodes:
    """Keys that are in some state now (a channel whose send line is full). ``begin`` and
    ``end`` are True only when a key's state changes, so each episode is told once.

    Invariant: a key is in at most one episode at a time."""

    def __init__(self) -> None:
        self._on: set[str] = set()

    def begin(self, key: str) -> bool:
        started = key not in self._on
        self._on.add(key)
        return started

    def end(self, key: str) -> bool:
        ended = key in self._on
        self._on.discard(key)
        return ended
