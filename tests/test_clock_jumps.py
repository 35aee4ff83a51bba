"""Clock jumps never mute a viewer for the size of the jump: a message stamped an hour ahead,
or a host clock stepped back, costs the viewer at most one rate-limit window."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from bot.admission import Admission
from bot.config import parse_config
from bot.events import ChatEvent
from bot.flow import SlidingWindowLimiter
from tests.sinks import RecordingSink


def test_an_entry_from_the_future_ages_from_when_it_is_first_seen_as_such() -> None:
    limiter = SlidingWindowLimiter(2, window=60)
    assert limiter.allow("ann", 1000 + 3600)  # stamped an hour ahead
    assert limiter.allow("ann", 1000)
    assert not limiter.allow("ann", 1001)  # two in the window: the limit holds
    assert limiter.allow("ann", 1061)  # one window later, not an hour


def test_a_clock_stepped_back_costs_at_most_one_window() -> None:
    limiter = SlidingWindowLimiter(2, window=60)
    assert limiter.allow("ann", 2000) and limiter.allow("ann", 2001)
    assert not limiter.allow("ann", 1400)  # ten minutes back: the last minute still counts
    assert limiter.allow("ann", 1461)


def test_admission_does_not_believe_a_timestamp_from_the_future() -> None:
    admission = Admission(parse_config({"limits": {"user_messages_per_minute": 2}}, env={}))
    now = datetime.now(UTC)

    def said(at: datetime) -> ChatEvent:
        return ChatEvent(platform="twitch", channel_id="c", platform_user_id="ann",
                         display_name="Ann", text="hi", sink=RecordingSink(), timestamp=at)

    def refusal(at: datetime) -> str | None:
        return admission.refusal(said(at), "hi", pending=0, generation_limit=1)

    assert refusal(now + timedelta(hours=1)) is None
    assert refusal(now) is None
    assert refusal(now) == "rate_limited"
    assert refusal(now + timedelta(seconds=61)) is None  # not an hour
