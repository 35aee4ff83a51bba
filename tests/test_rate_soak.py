"""A short show against the platforms' send limits (``benchmarks.rate_soak``): the fakes
enforce Twitch's chat limit and Discord's per-route buckets; a raid overruns Twitch's."""

from __future__ import annotations

import argparse

import pytest

pytest.importorskip("twitchio")
pytest.importorskip("discord")

from benchmarks.rate_soak import run


async def test_a_show_with_a_raid_never_breaks_a_platform_limit() -> None:
    """Every message ends; what the channel cannot take in time is dropped before it is
    generated (``send_backlog``), not timed out into a fallback."""
    # 72 show seconds at 5x: windows of 6 s (Twitch) and 1 s (Discord), a raid of 30
    # messages half way.
    report = await run(argparse.Namespace(hours=1.2 / 60, speed=5.0, rate=0.5,
                                          raid_every_min=0.6, seed=3,
                                          platforms=["twitch", "discord"]))
    assert report["twitch_dropped_over_limit"] == 0, report
    assert report["discord_429"] == 0, report
    assert report["answered_twice"] == 0, report
    ended = report["ended"]
    assert not any("received" in key or "timeout" in key for key in ended), report
    assert sum(ended.values()) == sum(report["offered"].values()), report
    assert ended.get("twitch answered", 0) > 0 and ended.get("discord answered", 0) > 0
