"""Cosmetic platform calls (the typing indicator, preview edits) never sit on a reply's path:
a platform that stalls them still gets the reply as soon as it is generated."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bot.config import parse_config
from bot.events import ChatEvent
from bot.paths import DataPaths
from bot.runtime import open_runtime
from tests.sinks import RecordingSink

REPLY = "第一句話。第二句話。第三句話。"


class StallingSink(RecordingSink):
    """Typing and edits hang until released (a platform endpoint that stopped answering)."""

    supports_edits = True

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()

    async def typing(self) -> None:
        await self.release.wait()

    async def edit(self, message_id: str, text: str) -> None:
        await self.release.wait()
        await super().edit(message_id, text)


async def test_a_stalled_typing_indicator_does_not_hold_the_reply(tmp_path: Path) -> None:
    config = parse_config({
        "models": {"llm": {"backend": "scripted", "scripted": {"replies": [REPLY]}},
                   "embedding": {"enabled": False}},
        # A window the stall would run into if the reply waited for it; the test never
        # waits that long when it passes.
        "limits": {"reply_timeout_s": 60, "stream_edit_interval_s": 0},
    }, env={})
    sink = StallingSink()
    async with open_runtime(config, DataPaths.resolve(tmp_path)) as runtime:
        reply = await asyncio.wait_for(runtime.service.handle(ChatEvent(
            platform="discord", channel_id="c", platform_user_id="ann", display_name="Ann",
            text="hello", sink=sink, message_id="m1")), timeout=30)
        sink.release.set()
    assert reply.status == "answered"
    assert sink.sent == [REPLY]


class SlowEditSink(RecordingSink):
    """Edits wait for ``release`` (a platform holding them for its rate limit)."""

    supports_edits = True

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.edits_started = 0
        self.edits: list[str] = []

    async def edit(self, message_id: str, text: str) -> None:
        self.edits_started += 1
        await self.release.wait()
        self.edits.append(text)


async def test_previews_wait_for_the_platform_one_at_a_time_and_never_hold_generation(
        tmp_path: Path) -> None:
    """A platform that holds an edit (its rate limit): the reply keeps being generated, no
    further previews queue up behind the held one, and once it is through the final text
    goes out as the one edit after it."""
    words = " ".join(f"第{index}句。" for index in range(30))
    config = parse_config({
        "models": {"llm": {"backend": "scripted",
                           "scripted": {"replies": [words], "chunk_delay_s": 0.002}},
                   "embedding": {"enabled": False}},
        "limits": {"reply_timeout_s": 60, "stream_edit_interval_s": 0.0001},
    }, env={})
    sink = SlowEditSink()
    async with open_runtime(config, DataPaths.resolve(tmp_path)) as runtime:
        task = asyncio.create_task(runtime.service.handle(ChatEvent(
            platform="discord", channel_id="c", platform_user_id="ann", display_name="Ann",
            text="hello", sink=sink, message_id="m1")))
        backend = runtime.engine.backend
        for _ in range(3000):  # until the whole reply was generated (or the test times out)
            if backend.finished >= 1:
                break
            await asyncio.sleep(0.01)
        assert sink.edits_started == 1, (sink.sent, backend.finished)
        sink.release.set()
        reply = await asyncio.wait_for(task, timeout=30)
    assert reply.status == "answered"
    assert sink.edits[-1] == words
    assert sink.edits_started == 2  # the held preview, then the final text


class BackloggedSink(RecordingSink):
    """A channel whose platform send limit is spoken for this many seconds ahead."""

    def __init__(self, backlog_s: float) -> None:
        super().__init__()
        self.backlog_s = backlog_s

    def send_backlog_s(self) -> float:
        return self.backlog_s


async def test_a_message_whose_reply_could_not_be_sent_in_time_is_dropped_before_generating(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Twitch lets a bot send 20 messages in 30 s: when the replies already waiting for the
    channel would hold a new one past its timeout, the new message is dropped at its turn
    (``send_backlog``), without a generation or a fallback that would wait in the same line;
    a channel with room is answered as usual."""
    config = parse_config({
        "models": {"llm": {"backend": "scripted", "scripted": {"replies": [REPLY]}},
                   "embedding": {"enabled": False}},
        "limits": {"reply_timeout_s": 60},
    }, env={})
    async with open_runtime(config, DataPaths.resolve(tmp_path)) as runtime:
        full, free = BackloggedSink(45.0), BackloggedSink(0.0)
        for index in range(3):
            dropped = await runtime.service.handle(ChatEvent(
                platform="twitch", channel_id="c", platform_user_id=f"ann{index}",
                display_name="Ann", text="hello", sink=full, message_id=f"m1-{index}"))
        answered = await runtime.service.handle(ChatEvent(
            platform="twitch", channel_id="d", platform_user_id="bob", display_name="Bob",
            text="hello", sink=free, message_id="m2"))
        assert len(runtime.engine.backend.requests) == 1
    assert (dropped.status, dropped.reason) == ("dropped", "send_backlog")
    assert full.sent == []
    told = [r for r in caplog.records if "send_backlog" in r.getMessage()]
    assert len(told) == 1 and told[0].levelname == "WARNING"  # once for the episode
    assert answered.status == "answered" and free.sent == [REPLY]


class StalledFirstSendSink(RecordingSink):
    """The first send (the first preview) hangs until released; later sends go out."""

    supports_edits = True

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self._calls = 0

    async def send(self, text: str) -> str:
        self._calls += 1
        if self._calls == 1:
            await self.release.wait()
        return await super().send(text)


async def test_a_preview_still_going_when_the_reply_fails_never_lands_after_the_fallback(
        tmp_path: Path) -> None:
    """The reply times out, still being generated, while its first preview is held by the
    platform: the viewer gets the one fallback, and the held preview is called off rather
    than posted after it."""
    words = " ".join(f"第{index}句。" for index in range(10))
    config = parse_config({
        "models": {"llm": {"backend": "scripted",
                           "scripted": {"replies": [words], "chunk_delay_s": 0.2}},
                   "embedding": {"enabled": False}},
        # The window the held preview runs the reply into; the test waits for the outcome.
        "limits": {"reply_timeout_s": 0.5, "stream_edit_interval_s": 0.0001},
    }, env={})
    sink = StalledFirstSendSink()
    async with open_runtime(config, DataPaths.resolve(tmp_path)) as runtime:
        reply = await runtime.service.handle(ChatEvent(
            platform="discord", channel_id="c", platform_user_id="ann", display_name="Ann",
            text="hello", sink=sink, message_id="m1"))
        sink.release.set()  # the platform lets the held preview through now
        for _ in range(5):
            await asyncio.sleep(0)
    assert (reply.status, reply.reason) == ("failed", "timeout")
    assert sink.sent == [reply.text]  # the fallback, and nothing after it
