"""Flood control and send limits for busy chats (platform-neutral parts of the Twitch work)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from adapters.common.send_limiter import SendLimiter
from bot.config import parse_config
from bot.paths import DataPaths
from bot.runtime import Runtime, open_runtime
from engine.backends.scripted import ScriptedBackend
from engine.types import GenerationRequest
from tests.sinks import RecordingSink
from tests.store_reads import messages_for
from tests.test_service import event


async def test_send_limiter_never_exceeds_its_window() -> None:
    now = [0.0]
    sent_at: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        now[0] += seconds

    limiter = SendLimiter(3, 10.0, clock=lambda: now[0], sleep=fake_sleep)
    for _ in range(10):
        await limiter.acquire()
        sent_at.append(now[0])
    for index, moment in enumerate(sent_at):
        in_window = [t for t in sent_at if moment <= t < moment + 10.0]
        assert len(in_window) <= 3, (index, sent_at)
    assert sent_at[-1] == pytest.approx(30.0)  # 10 sends at 3 per 10 s: the last at t=30


async def test_send_limiter_says_how_long_a_new_send_would_wait() -> None:
    """Nothing sent: no wait. A full window: until it frees. Sends already waiting: a whole
    window more for each ``limit`` of them."""
    now = [0.0]
    release = asyncio.Event()

    async def held_sleep(seconds: float) -> None:
        await release.wait()

    limiter = SendLimiter(2, 30.0, clock=lambda: now[0], sleep=held_sleep)
    assert limiter.backlog_s() == 0.0
    await limiter.acquire()
    assert limiter.backlog_s() == 0.0  # one slot left
    await limiter.acquire()
    assert limiter.backlog_s() == pytest.approx(30.0)  # window full
    waiting = [asyncio.create_task(limiter.acquire()) for _ in range(2)]
    await asyncio.sleep(0)
    assert limiter.backlog_s() == pytest.approx(60.0)  # two queued: the next window too
    release.set()
    now[0] = 31.0
    await asyncio.gather(*waiting)
    assert limiter.backlog_s() == pytest.approx(30.0)


@pytest.fixture
async def flood_runtime(tmp_path: Path, request: pytest.FixtureRequest
                        ) -> AsyncIterator[Runtime]:
    limits = {"user_messages_per_minute": 1000, "max_pending": 1000,
              "max_concurrent_generations": 4, **getattr(request, "param", {})}
    config = parse_config({
        "models": {"llm": {"backend": "scripted", "scripted": {"replies": ["ok"]}},
                   "embedding": {"enabled": False}},
        "store": {"url": f"sqlite+aiosqlite:///{tmp_path / 'flood.db'}",
                  "remember_messages_min_chars": 0},
        "limits": limits,
    }, env={})
    async with open_runtime(config, DataPaths.resolve(tmp_path)) as runtime:
        backend = runtime.engine.backend
        assert isinstance(backend, ScriptedBackend)
        original = backend.generate

        async def slow(request: GenerationRequest) -> AsyncIterator[str]:
            await asyncio.sleep(0.02)  # generation takes time, so bursts pile up
            async for chunk in original(request):
                yield chunk

        backend.generate = slow  # type: ignore[method-assign]
        yield runtime


@pytest.mark.parametrize("flood_runtime", [{"per_user_queue_of_one": True}], indirect=True)
async def test_200_messages_from_50_viewers(flood_runtime: Runtime) -> None:
    runtime = flood_runtime
    sink = RecordingSink()
    events = [event(f"訊息 {i}", user=f"viewer{i % 50}", sink=sink) for i in range(200)]
    replies = await asyncio.gather(*(runtime.service.handle(e) for e in events))
    assert {r.status for r in replies} <= {"answered", "dropped"}
    assert len(sink.sent) == sum(r.status == "answered" for r in replies)
    for viewer in range(50):
        user_id = await runtime.store.find_user("discord", f"viewer{viewer}")
        assert user_id is not None
        inbound = [m for m in await messages_for(runtime.store, user_id) if m.role == "user"]
        assert len(inbound) == 4  # every message stored...
        assert {m.status for m in inbound} <= {"answered", "dropped"}  # ...and settled
    for viewer in range(50):  # each viewer's newest message always gets an answer
        newest = max(i for i in range(200) if i % 50 == viewer)
        assert replies[newest].status == "answered"


@pytest.mark.parametrize("flood_runtime", [{"coalesce_bursts": True}], indirect=True)
async def test_a_burst_gets_one_answer_that_saw_all_of_it(flood_runtime: Runtime) -> None:
    runtime = flood_runtime
    backend = runtime.engine.backend
    assert isinstance(backend, ScriptedBackend)
    texts = ("first", "wait", "one more", "last")
    replies = await asyncio.gather(*(runtime.service.handle(event(text)) for text in texts))
    assert replies[-1].status == "answered"
    dropped = [text for text, reply in zip(texts, replies, strict=True)
               if reply.status == "dropped"]
    assert dropped, "nothing was coalesced"
    last_prompt = backend.requests[-1].messages[-1].content
    assert last_prompt == "\n".join([*dropped, "last"])  # one answer that saw the burst


@pytest.mark.parametrize("flood_runtime", [{"stale_after_s": 5}], indirect=True)
async def test_stale_messages_are_dropped(flood_runtime: Runtime) -> None:
    old = datetime.now(UTC) - timedelta(seconds=30)
    stale = await flood_runtime.service.handle(event("still there?", timestamp=old))
    fresh = await flood_runtime.service.handle(event("hello"))
    assert stale.status == "dropped" and stale.reason is not None
    assert "stale" in stale.reason
    assert fresh.status == "answered"




@pytest.mark.parametrize("flood_runtime", [{"channel_messages_per_minute": 3}], indirect=True)
async def test_channel_cooldown_applies_to_all_viewers_together(flood_runtime: Runtime) -> None:
    replies = [await flood_runtime.service.handle(event("hi", user=f"u{i}")) for i in range(5)]
    assert [r.status for r in replies] == ["answered"] * 3 + ["dropped"] * 2
    assert replies[-1].reason == "channel_cooldown"


@pytest.mark.parametrize("flood_runtime", [{"max_concurrent_generations": 2,
                                            "max_wait_s": 0.5}], indirect=True)
async def test_beyond_capacity_new_messages_are_refused_busy_so_waits_stay_bounded(
        flood_runtime: Runtime) -> None:
    """Overload policy: at the pace replies finish, a message that would wait longer than
    `limits.max_wait_s` for the model is refused at once (dropped, busy) instead of queueing;
    the admitted ones are answered within a bounded time. (Without it the last of 40 would
    wait ~20 rounds of generation.)"""
    import time

    runtime = flood_runtime
    backend = runtime.engine.backend
    assert isinstance(backend, ScriptedBackend)
    quick = backend.generate

    async def slow(request: GenerationRequest) -> AsyncIterator[str]:
        await asyncio.sleep(0.2)  # 2 slots, ~0.2 s a reply: ~10 replies/s at most
        async for chunk in quick(request):
            yield chunk

    backend.generate = slow  # type: ignore[method-assign]
    warm = await asyncio.gather(*(runtime.service.handle(event("hi", user=f"w{i}"))
                                  for i in range(4)))
    assert [r.status for r in warm] == ["answered"] * 4  # the pace is known now

    async def timed(index: int) -> tuple[str, str | None, float]:
        started = time.monotonic()
        reply = await runtime.service.handle(event(f"m{index}", user=f"f{index}"))
        return reply.status, reply.reason, time.monotonic() - started

    flood = await asyncio.gather(*(timed(i) for i in range(40)))
    answered = [took for status, _, took in flood if status == "answered"]
    busy = [took for status, reason, took in flood if reason == "busy"]
    assert len(answered) + len(busy) == 40
    assert answered and len(busy) >= 30
    assert max(answered) < 1.5  # bounded: at most the wait allowed and a reply or two
    assert max(busy) < 0.1  # refused at once, not after queueing
    await runtime.service.flush()
    user_id = await runtime.store.find_user("discord", "f39")
    assert user_id is not None
    [stored] = await messages_for(runtime.store, user_id)
    assert (stored.status, stored.status_reason) == ("dropped", "busy")


class _SentAll(RecordingSink):
    """Sets ``all_sent`` once ``wanted`` replies went out."""

    def __init__(self, wanted: int) -> None:
        super().__init__()
        self.all_sent = asyncio.Event()
        self._wanted = wanted

    async def send(self, text: str) -> str:
        sent = await super().send(text)
        if len(self.sent) >= self._wanted:
            self.all_sent.set()
        return sent


@pytest.mark.parametrize("flood_runtime", [{"max_overhead_ms": 1}], indirect=True)
async def test_while_the_bot_itself_stalls_new_messages_are_refused_busy_at_once(
        flood_runtime: Runtime) -> None:
    """The bot's own overload (``limits.max_overhead_ms``): messages stuck in the store
    stall the pipeline, and new ones are refused at once instead of queueing behind them;
    once they move, they are answered and the refused one is on record."""
    from bot.flow import STALL_QUEUE

    runtime = flood_runtime
    release = asyncio.Event()
    record = runtime.store._intake_log.record

    async def stalled(items: list[Any]) -> Any:
        await release.wait()
        return await record(items)

    runtime.store._intake_log.record = stalled  # type: ignore[method-assign]
    sink = _SentAll(STALL_QUEUE)
    stuck = [asyncio.create_task(runtime.service.handle(event("one", user=f"stuck{i}",
                                                              sink=sink)))
             for i in range(STALL_QUEUE)]
    try:
        await sink.all_sent.wait()  # each reply is out, its recording held by the store
        await asyncio.sleep(0.05)  # 25 x the 2 ms that make a queue of them a stall
        second = asyncio.create_task(runtime.service.handle(event("two", user="next")))
        # Refused while the store still holds the others: it did not queue behind them (a
        # message admitted here would wait for the release below, and this for it).
        await asyncio.wait({second}, timeout=30)
        assert second.done() and not release.is_set()
        refused = second.result()
        assert (refused.status, refused.reason) == ("dropped", "busy")
    finally:
        release.set()
    assert [r.status for r in await asyncio.gather(*stuck)] == ["answered"] * STALL_QUEUE
    await runtime.service.flush()
    user_id = await runtime.store.find_user("discord", "next")
    assert user_id is not None
    [stored] = await messages_for(runtime.store, user_id)
    assert (stored.status, stored.status_reason) == ("dropped", "busy")
