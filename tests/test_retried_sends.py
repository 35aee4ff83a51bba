"""A reply that goes out in several messages and fails part way is retried from the piece that
failed: the viewer never sees a piece twice (Discord and Twitch sinks under ``deliver``)."""

from __future__ import annotations

import itertools
from types import SimpleNamespace
from typing import Any

import pytest

discord = pytest.importorskip("discord")
twitchio = pytest.importorskip("twitchio")

from adapters.common.send_limiter import SendLimiter  # noqa: E402
from adapters.common.text_split import split_message  # noqa: E402
from adapters.discord_adapter.sink import DiscordSink  # noqa: E402
from adapters.twitch_adapter.adapter import TwitchSink  # noqa: E402
from bot.delivery import deliver  # noqa: E402

# Three Discord messages (2,000 characters each at most), more on Twitch (500).
SENTENCE = "第{:03d}顆星今晚也很亮喔，我們一起把它畫進星圖裡吧。好不好呀～"
LONG = "".join(SENTENCE.format(i) for i in range(150))


async def _no_wait(_seconds: float) -> None:
    return None


class FlakyPlatform:
    """Accepts posts, but answers the second one with a 503 once."""

    def __init__(self, fail: BaseException) -> None:
        self.posted: list[str] = []
        self._fail: BaseException | None = fail
        self._ids = itertools.count(1)

    def post(self, text: str) -> Any:
        if len(self.posted) == 1 and self._fail is not None:
            error, self._fail = self._fail, None
            raise error
        self.posted.append(text)
        return SimpleNamespace(id=str(next(self._ids)), content=text)


async def test_a_discord_reply_retried_after_a_5xx_posts_each_piece_once() -> None:
    response = SimpleNamespace(status=503, reason="Service Unavailable")
    platform = FlakyPlatform(discord.HTTPException(response, "upstream"))

    class Channel:
        async def send(self, content: str, **_: Any) -> Any:
            return platform.post(content)

    sink = DiscordSink(Channel())
    first = await deliver(lambda: sink.send(LONG), "reply", sleep=_no_wait)
    assert platform.posted == split_message(LONG, 2000) and len(platform.posted) == 3
    assert first == "1"


async def test_a_twitch_reply_retried_after_a_5xx_posts_each_piece_once() -> None:
    platform = FlakyPlatform(twitchio.HTTPException("upstream", status=503, extra=""))

    class Broadcaster:
        async def send_message(self, text: str, *_: Any, **__: Any) -> Any:
            return platform.post(text)

    sink = TwitchSink(Broadcaster(), "bot", SendLimiter(1000, 1.0), None)  # type: ignore[arg-type]
    first = await deliver(lambda: sink.send(LONG), "reply", sleep=_no_wait)
    assert platform.posted == split_message(LONG, 500)
    assert first == "1"
