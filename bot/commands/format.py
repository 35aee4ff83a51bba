"""The one stats formatter, used by every platform and the CLI."""

from __future__ import annotations

from typing import TypedDict


class StatsSummary(TypedDict):
    """The keys the formatter reads (``ViewerStats`` has them all)."""

    conversation_count: int
    current_mood: str
    intimacy_level: float
    intimacy_tier: str
    intimacy_trend: str


def format_stats(stats: StatsSummary) -> str:
    return (f"conversations: {stats['conversation_count']}, mood: {stats['current_mood']}, "
            f"intimacy: {stats['intimacy_level']} ({stats['intimacy_tier']}, "
            f"{stats['intimacy_trend']})")
