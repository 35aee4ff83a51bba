"""A show against the platforms' send limits: does the bot ever get locked out?

    python -m benchmarks.rate_soak [--hours 4] [--speed 10] [--rate 0.5] [--raid-every-min 30]

The runtime as ``vtuber-bot run`` opens it (scripted replies, streamed word by word; some
longer than one Twitch message), with its Twitch and Discord adapters, against the local fake
servers enforcing the real limits: Twitch chat 20 messages per 30 s per channel (a message
over it is dropped with ``msg_ratelimit``, a violation that locks a real bot out), Discord
per-route buckets of 5 per 5 s per channel with ``X-RateLimit-*`` headers and 429s. Viewers
address the persona at ``--rate`` messages a second on each platform (Poisson), with a raid
(30 messages in 10 s) every ``--raid-every-min`` minutes. Everything runs ``--speed`` times
faster than a show: the platforms' windows, the bot's send limit and edit interval, and the
arrivals alike.

Printed: messages offered and how each ended (answered, dropped by reason), replies posted,
Twitch messages dropped for the limit (must be 0), Discord 429s (a retry storm shows here),
inbound messages answered more than once (must be 0), reply latency in show seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import sqlite3
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from bot.config import parse_config
from bot.paths import DataPaths
from bot.runtime import open_runtime
from tests.fake_discord import BOT_USER, CHANNEL_ID, FakeDiscord, point_discord_at
from tests.fake_twitch import BOT_ID, BOT_TOKEN, CHANNEL_LOGIN, FakeTwitch
from tests.rate_limits import DiscordBuckets, SlidingWindow

# Streamed word by word (a space between chunks); the last is longer than a Twitch message.
REPLIES = ["嗨～ 今晚的 星星 也很亮喔", "謝謝你 來陪我 看燈塔！ 要待 久一點喔",
           "The lighthouse says hello to you too, and so do I.",
           "你問的 好問題～ 讓我 想想， " + "燈塔的光 每十秒 轉一圈， " * 40 + "好了 說完了！"]
TWITCH_ENV = {"TWITCH_CLIENT_ID": "soak-client", "TWITCH_CLIENT_SECRET": "soak-secret",
              "TWITCH_BOT_ID": BOT_ID, "TWITCH_ACCESS_TOKEN": BOT_TOKEN,
              "TWITCH_REFRESH_TOKEN": "soak-refresh", "DISCORD_TOKEN": "fake-token"}


def _config(speed: float) -> Any:
    return parse_config({
        "models": {"llm": {"backend": "scripted",
                           "scripted": {"replies": REPLIES, "chunk_delay_s": 0.05 / speed}},
                   "embedding": {"enabled": False}},
        "adapters": {"twitch": {"enabled": True, "channels": [CHANNEL_LOGIN],
                                "send_limit": 20, "send_window_s": 30 / speed},
                     "discord": {"enabled": True}},
        "store": {"remember_messages_min_chars": 0},
        "limits": {"user_messages_per_minute": 1000, "max_pending": 1000,
                   "stream_edit_interval_s": 1 / speed, "stale_after_s": 60 / speed,
                   "reply_timeout_s": 120 / speed, "max_concurrent_generations": 32},
    }, env=TWITCH_ENV)


class Show:
    """The fakes, the runtime and its adapters; arrivals on both platforms."""

    def __init__(self, speed: float, seed: int) -> None:
        self.speed = speed
        self.rng = random.Random(seed)
        self.twitch = FakeTwitch(chat_limit=SlidingWindow(20, 30 / speed))
        self.discord = FakeDiscord(buckets=DiscordBuckets(5, 5 / speed))
        self.offered: Counter[str] = Counter()
        self._index = 0

    async def twitch_message(self) -> None:
        self._index += 1
        viewer = self.rng.randrange(200)
        self.offered["twitch"] += 1
        await self.twitch.notify("channel.chat.message", self.twitch.chat_event(
            f"佩兒 你好 #{self._index}", user_id=f"t{viewer}", login=f"viewer{viewer}"))

    async def discord_message(self) -> None:
        self._index += 1
        viewer = self.rng.randrange(200)
        author = {"id": str(50_000 + viewer), "username": f"viewer{viewer}",
                  "discriminator": "0", "global_name": f"Viewer {viewer}", "avatar": None,
                  "bot": False}
        self.offered["discord"] += 1
        await self.discord.dispatch("MESSAGE_CREATE", self.discord.message_payload(
            f"<@{BOT_USER['id']}> 你好 #{self._index}", author=author, mentions=[BOT_USER]))

    async def arrivals(self, seconds: float, rate: float, raid_every_s: float,
                       platforms: list[str]) -> None:
        """Poisson arrivals on each platform, a raid on Twitch now and then (show seconds)."""
        clock, next_raid = 0.0, raid_every_s
        while clock < seconds:
            gap = self.rng.expovariate(len(platforms) * rate)
            await asyncio.sleep(gap / self.speed)
            clock += gap
            platform = self.rng.choice(platforms)
            await (self.twitch_message() if platform == "twitch" else self.discord_message())
            if raid_every_s and "twitch" in platforms and clock >= next_raid:
                next_raid += raid_every_s
                for _ in range(30):  # 30 messages in 10 s
                    await self.twitch_message()
                    await asyncio.sleep(10 / 30 / self.speed)


async def _ready(adapter: Any, task: asyncio.Task[None]) -> None:
    """Until Discord's client is ready; what stopped its adapter if it stopped first."""
    ready = asyncio.ensure_future(adapter.client.wait_until_ready())
    await asyncio.wait([ready, task], timeout=30, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        ready.cancel()
        task.result()
        raise RuntimeError("the Discord adapter stopped before it was ready")
    if not ready.done():
        ready.cancel()
        raise TimeoutError("Discord's client was not ready in 30 s")


def _ended(database: Path) -> dict[str, int]:
    """How the viewers' messages ended, by status and reason."""
    with sqlite3.connect(database) as connection:
        rows = connection.execute(
            "SELECT platform, status, status_reason, count(*) FROM messages "
            "WHERE role = 'user' GROUP BY platform, status, status_reason").fetchall()
    return {f"{platform} {status}" + (f" ({reason})" if reason else ""): count
            for platform, status, reason, count in rows}


def _answered_twice(show: Show) -> int:
    """Inbound messages with the same text posted to them more than once (each post names
    the message it answers)."""
    posts: Counter[tuple[str, str]] = Counter()
    for body in show.twitch.sent_messages():
        if body.get("reply_parent_message_id"):
            posts[(f"t{body['reply_parent_message_id']}", body["message"])] += 1
    for body in show.discord.posts_to(f"/channels/{CHANNEL_ID}/messages"):
        reference = body.get("message_reference") or {}
        if reference.get("message_id"):
            posts[(f"d{reference['message_id']}", body.get("content"))] += 1
    return len({parent for (parent, _text), count in posts.items() if count > 1})


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from adapters.discord_adapter import DiscordAdapter
    from adapters.twitch_adapter import TwitchAdapter
    from tests.test_twitch import _point_twitchio_at

    show = Show(args.speed, args.seed)
    await show.twitch.start()
    await show.discord.start()
    config = _config(args.speed)
    folder = Path(tempfile.mkdtemp(prefix="vtuber-rate-soak-"))
    started = time.perf_counter()
    with pytest.MonkeyPatch.context() as patch:
        _point_twitchio_at(show.twitch, patch)
        point_discord_at(show.discord, patch)
        async with open_runtime(config, DataPaths.resolve(folder)) as runtime:
            adapters = [TwitchAdapter(config, services=runtime),
                        DiscordAdapter(config, services=runtime)]
            tasks = [asyncio.create_task(a.run(runtime.service.handle)) for a in adapters]
            try:
                await show.twitch.wait_until(lambda: len(show.twitch.subscriptions) >= 4, 30)
                await _ready(adapters[1], tasks[1])
                await show.arrivals(args.hours * 3600, args.rate, args.raid_every_min * 60,
                                   args.platforms)
                await runtime.service.settle()
            finally:
                for adapter in adapters:
                    await adapter.close()
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
    await show.twitch.stop()
    await show.discord.stop()
    return _report(show, _ended(DataPaths.resolve(folder).sqlite_file),
                   time.perf_counter() - started)


def _report(show: Show, ended: dict[str, int], wall: float) -> dict[str, Any]:
    twitch_posts = len(show.twitch.sent_messages())
    discord_posts = len(show.discord.posts_to(f"/channels/{CHANNEL_ID}/messages"))
    assert show.twitch.chat_limit is not None and show.discord.buckets is not None
    return {"offered": dict(show.offered), "ended": ended,
            "twitch_posts": twitch_posts, "twitch_dropped_over_limit": len(show.twitch.dropped),
            "discord_posts": discord_posts,
            "discord_429": show.discord.buckets.answered_429,
            "answered_twice": _answered_twice(show),
            "wall_s": round(wall, 1)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hours", type=float, default=4.0, help="show length")
    parser.add_argument("--speed", type=float, default=10.0, help="times faster than a show")
    parser.add_argument("--rate", type=float, default=0.5,
                        help="messages a second addressing the persona, on each platform")
    parser.add_argument("--raid-every-min", type=float, default=30.0)
    parser.add_argument("--platforms", type=lambda text: text.split(","),
                        default=["twitch", "discord"], help="where viewers talk")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    for key, value in asyncio.run(run(args)).items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
