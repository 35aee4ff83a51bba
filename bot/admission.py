"""Admission: whether a new message is answered or dropped, decided in memory before any
database work (docs/ARCHITECTURE.md, "One message"): redeliveries, pauses, rate limits, the
pending bound, and overload, of the bot itself and of the model's queue."""

from __future__ import annotations

import time

from bot.config import AppConfig, LimitsConfig
from bot.events import ChatEvent
from bot.flow import (
    OverheadLimit,
    Pipeline,
    RecentKeys,
    ReplyPace,
    SlidingWindowLimiter,
    Stay,
)
from bot.reports import LatencySummary


class Admission:
    def __init__(self, config: AppConfig) -> None:
        self._config = config
        limits = config.limits
        self._limiter = SlidingWindowLimiter(limits.user_messages_per_minute)
        self._channel_limiter = self._channel_limiter_for(limits)
        self._recent = RecentKeys()
        self._overhead = OverheadLimit(limits.max_overhead_ms / 1000, limits.max_pending)
        self._pipeline = Pipeline()
        self._pace = ReplyPace()
        self.paused: set[str] = set()  # platforms whose messages end dropped(paused)
        self.muted: set[tuple[str, str]] = set()  # (platform, viewer): dropped(muted)

    @staticmethod
    def _channel_limiter_for(limits: LimitsConfig) -> SlidingWindowLimiter | None:
        per_minute = limits.channel_messages_per_minute
        return SlidingWindowLimiter(per_minute) if per_minute else None

    def apply_limits(self, old: LimitsConfig) -> None:
        """After a reload changed ``config.limits``: rebuild what depends on a changed limit
        (rate windows start afresh); the other limits are read where used."""
        limits = self._config.limits
        if limits.user_messages_per_minute != old.user_messages_per_minute:
            self._limiter = SlidingWindowLimiter(limits.user_messages_per_minute)
        if limits.channel_messages_per_minute != old.channel_messages_per_minute:
            self._channel_limiter = self._channel_limiter_for(limits)
        if (limits.max_overhead_ms, limits.max_pending) != (old.max_overhead_ms,
                                                            old.max_pending):
            self._overhead = OverheadLimit(limits.max_overhead_ms / 1000, limits.max_pending)

    def redelivered(self, event: ChatEvent) -> bool:
        """A platform message seen lately (the database's unique key catches the rest)."""
        return event.message_id is not None and self._recent.seen(
            (event.platform, event.channel_id, event.message_id))

    def refusal(self, event: ChatEvent, text: str, *, pending: int,
                generation_limit: int) -> str | None:
        """The reason to drop a new message, or None to answer it. ``pending``: admitted
        messages not final yet; ``generation_limit``: how many the model takes at once."""
        if event.platform in self.paused:
            return "paused"
        if (event.platform, event.platform_user_id) in self.muted:
            return "muted"
        if not text:
            return "empty"
        # The event's own time, so replays rate-limit exactly as the live run did.
        moment = event.timestamp.timestamp()
        if not self._limiter.allow(f"{event.platform}:{event.platform_user_id}", moment):
            return "rate_limited"
        if self._channel_limiter is not None and not self._channel_limiter.allow(
                f"{event.platform}:{event.channel_id}", moment):
            return "channel_cooldown"
        limits = self._config.limits
        if pending >= limits.max_pending:
            return "queue_full"
        if not self._overhead.admits(self._pipeline, time.monotonic()):
            return "busy"  # the bot itself (store, event loop) is the bottleneck
        if 0 < limits.max_wait_s < self._expected_wait_s(pending, generation_limit):
            return "busy"  # the model's queue is
        return None

    def _expected_wait_s(self, pending: int, generation_limit: int) -> float:
        """How long a message admitted now would wait for a generation slot at the recent
        pace (0 while a slot is free or before any reply finished)."""
        queued = pending - generation_limit + 1
        pace = self._pace.per_second(time.monotonic())
        return queued / pace if queued > 0 and pace else 0.0

    def allow_command(self, platform: str, platform_user_id: str) -> bool:
        """Commands spend the same per-viewer budget as chat (a flood of ``!link`` guesses or
        ``!stats`` is a flood all the same)."""
        return self._limiter.allow(f"{platform}:{platform_user_id}", time.time())

    def admitted(self) -> Stay:
        """An admitted message enters the bot's pipeline."""
        return self._pipeline.enter()

    def answered(self, latency_s: float, stay: Stay) -> None:
        """An answered message: its reply latency and the bot's overhead for it."""
        now = time.monotonic()
        stay.leave()
        self._pace.record(latency_s, now)
        self._overhead.record(stay.spent_s, now)

    def latency_percentiles(self) -> LatencySummary:
        return self._pace.percentiles()
