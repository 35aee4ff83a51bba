"""Every message ends final, with a reason: fault injection at each stage of the pipeline, on
SQLite and PostgreSQL. The viewer gets the reply or exactly one fallback; one log line names
the message."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from bot.config import parse_config
from bot.events import ChatEvent, DeliveryError
from bot.paths import DataPaths
from bot.runtime import Runtime, open_runtime
from engine.backends.scripted import ScriptedBackend
from engine.types import GenerationRequest
from memory.errors import StoreError
from memory.store import IntakeItem
from tests.sinks import RecordingSink
from tests.store_reads import messages_for

REPLY = "第一個回覆。"


class FlakySink:
    """A sink that fails the way platforms do, on demand."""

    supports_edits = False

    def __init__(self, *, send_failures: list[Exception] | None = None,
                 typing_error: Exception | None = None,
                 edit_error: Exception | None = None, edits: bool = False) -> None:
        self.sent: list[str] = []
        self.edited: list[str] = []
        self._send_failures = list(send_failures or [])
        self._typing_error = typing_error
        self._edit_error = edit_error
        self.supports_edits = edits
        self._ids = itertools.count(1)

    async def send(self, text: str) -> str:
        if self._send_failures:
            raise self._send_failures.pop(0)
        self.sent.append(text)
        return f"out-{next(self._ids)}"

    async def edit(self, message_id: str, text: str) -> None:
        if self._edit_error is not None:
            raise self._edit_error
        self.edited.append(text)

    async def typing(self) -> None:
        if self._typing_error is not None:
            raise self._typing_error


def config_for(db_url: str, **limits: Any) -> Any:
    return parse_config({
        "models": {"llm": {"backend": "scripted", "scripted": {"replies": [REPLY]}},
                   "embedding": {"enabled": False}},
        "store": {"url": db_url, "remember_messages_min_chars": 0},
        "limits": {"stream_edit_interval_s": 0.0001, **limits},
    }, env={})


@pytest.fixture
async def runtime(db_url: str, tmp_path: Path) -> AsyncIterator[Runtime]:
    async with open_runtime(config_for(db_url), DataPaths.resolve(tmp_path)) as opened:
        yield opened


_ids = itertools.count(1)


def event(sink: Any, text: str = "你好", **kwargs: Any) -> ChatEvent:
    kwargs.setdefault("message_id", f"m{next(_ids)}")
    return ChatEvent(platform="discord", channel_id="c1", platform_user_id="ann",
                     display_name="Ann", text=text, sink=sink, **kwargs)


async def user_rows(runtime: Runtime, user: str = "ann") -> list[Any]:
    await runtime.service.flush()
    user_id = await runtime.store.find_user("discord", user)
    assert user_id is not None
    return [m for m in await messages_for(runtime.store, user_id) if m.role == "user"]


def failure_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name in ("bot.service", "bot.recording") and r.levelno >= logging.ERROR
            and "store unavailable" not in r.getMessage()]


def fails_with(error: Exception) -> Callable[..., Any]:
    async def broken(*_args: Any, **_kwargs: Any) -> Any:
        raise error

    return broken


async def test_store_error_on_accept(runtime: Runtime, monkeypatch: pytest.MonkeyPatch,
                                     caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(runtime.store, "intake", fails_with(StoreError("store: disk I/O")))
    runtime.service._recording._writer._record = runtime.store.intake  # the writer holds it
    sink = FlakySink()
    reply = await runtime.service.handle(event(sink))
    assert (reply.status, reply.reason) == ("failed", "store")
    assert sink.sent == [reply.text]  # the reply or the fallback, once
    if runtime.store.groups_writes:  # SQLite writes the intake behind: the reply went first
        assert reply.text == REPLY
    else:
        assert reply.text in runtime.engine.persona.fallback_lines
    assert runtime.service.spooled == 1  # written once the store is back
    assert len(failure_lines(caplog)) == 1


async def test_store_error_on_history_read(runtime: Runtime, monkeypatch: pytest.MonkeyPatch,
                                           caplog: pytest.LogCaptureFixture) -> None:
    from sqlalchemy.exc import OperationalError

    def read_fails(*_args: Any) -> Any:
        raise OperationalError("SELECT", {}, Exception("disk I/O error"))

    # A known viewer (a new one has nothing to read). On SQLite the first read is made with
    # the intake; when it fails, the reply's own.
    assert (await runtime.service.handle(event(FlakySink()))).status == "answered"
    monkeypatch.setattr(runtime.store._intake_log, "_read_context", read_fails)
    monkeypatch.setattr(runtime.store, "reply_context", fails_with(StoreError("store: gone")))
    sink = FlakySink()
    reply = await runtime.service.handle(event(sink))
    assert (reply.status, reply.reason) == ("failed", "store")
    assert sink.sent == [reply.text]
    _answered, row = await user_rows(runtime)
    assert (row.status, row.status_reason) == ("failed", "store")
    [line] = failure_lines(caplog)
    assert f"message {row.id} failed (store)" in line


async def test_store_error_on_completion_keeps_the_delivered_reply(
        runtime: Runtime, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(runtime.store, "complete_exchange", fails_with(StoreError("store: x")))
    sink = FlakySink()
    reply = await runtime.service.handle(event(sink))
    assert (reply.status, reply.reason) == ("failed", "store")
    assert sink.sent == [REPLY]  # the viewer has the reply; no fallback on top
    [row] = await user_rows(runtime)
    assert (row.status, row.status_reason) == ("failed", "store")
    assert "after the reply was delivered" in failure_lines(caplog)[0]


@pytest.mark.parametrize("error", [ValueError("bad token"), KeyError("choices"),
                                   RuntimeError("CUDA error")])
async def test_backend_raising_mid_stream(runtime: Runtime, monkeypatch: pytest.MonkeyPatch,
                                          caplog: pytest.LogCaptureFixture,
                                          error: Exception) -> None:
    async def half_then_error(request: GenerationRequest) -> AsyncIterator[str]:
        yield "半句"
        raise error

    backend = runtime.engine.backend
    assert isinstance(backend, ScriptedBackend)
    monkeypatch.setattr(backend, "generate", half_then_error)
    sink = FlakySink(edits=True)
    reply = await runtime.service.handle(event(sink))
    assert (reply.status, reply.reason) == ("failed", "backend")
    assert sink.sent[-1] == reply.text and sink.sent.count(reply.text) == 1
    [row] = await user_rows(runtime)
    assert (row.status, row.status_reason) == ("failed", "backend")
    assert len(failure_lines(caplog)) == 1


async def test_typing_failure_is_cosmetic(runtime: Runtime) -> None:
    sink = FlakySink(typing_error=DeliveryError("503", retryable=True))
    reply = await runtime.service.handle(event(sink))
    assert reply.status == "answered" and sink.sent == [REPLY]


async def test_preview_edit_failure_is_cosmetic(runtime: Runtime,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    async def word_by_word(request: GenerationRequest) -> AsyncIterator[str]:
        for piece in ("第一個", "回覆", "。"):
            await asyncio.sleep(0.01)
            yield piece

    backend = runtime.engine.backend
    assert isinstance(backend, ScriptedBackend)
    monkeypatch.setattr(backend, "generate", word_by_word)
    sink = FlakySink(edits=True, edit_error=DeliveryError("edit refused", retryable=False))
    reply = await runtime.service.handle(event(sink))
    assert reply.status == "answered"
    assert sink.sent[-1] == REPLY  # the final text arrived, as a new message
    [row] = await user_rows(runtime)
    assert row.status == "answered"


async def test_send_failing_once_then_succeeding(runtime: Runtime) -> None:
    sink = FlakySink(send_failures=[DeliveryError("503", retryable=True)])
    reply = await runtime.service.handle(event(sink))
    assert reply.status == "answered" and sink.sent == [REPLY]


async def test_send_failing_for_good(runtime: Runtime,
                                     caplog: pytest.LogCaptureFixture) -> None:
    sink = FlakySink(send_failures=[DeliveryError("403 Missing Access", retryable=False)])
    reply = await runtime.service.handle(event(sink))
    assert (reply.status, reply.reason) == ("failed", "send")
    assert sink.sent == [reply.text]  # the fallback, once
    [row] = await user_rows(runtime)
    assert (row.status, row.status_reason) == ("failed", "send")
    assert len(failure_lines(caplog)) == 1


async def test_the_reply_records_its_platform_message_id(runtime: Runtime) -> None:
    sink = FlakySink()
    reply = await runtime.service.handle(event(sink))
    assert reply.message_id is not None
    stored = await runtime.store.get_message(reply.message_id)
    assert stored is not None and stored.platform_message_id == "out-1"


async def test_on_sqlite_the_reply_goes_out_before_its_intake_commits(
        runtime: Runtime) -> None:
    """SQLite writes a message's intake behind its reply: the reply is sent while the
    intake is still held, and the exchange is recorded once it commits."""
    if not runtime.store.groups_writes:
        pytest.skip("PostgreSQL records the intake first (several processes share it)")
    writer = runtime.service._recording._writer
    record, held = writer._record, asyncio.Event()

    async def held_back(items: list[IntakeItem]) -> Any:
        await held.wait()
        return await record(items)

    writer._record = held_back
    sink = FlakySink()
    handled = asyncio.create_task(runtime.service.handle(event(sink)))
    for _ in range(200):
        if sink.sent:
            break
        await asyncio.sleep(0.005)
    assert sink.sent == [REPLY] and not handled.done()  # recording waits for the commit
    held.set()
    reply = await handled
    assert reply.status == "answered" and reply.message_id is not None
    [row] = await user_rows(runtime)
    assert row.status == "answered"


async def test_a_redelivered_message_is_answered_once(runtime: Runtime, db_url: str,
                                                      tmp_path: Path) -> None:
    sink = FlakySink()
    first = event(sink, message_id="evt-1")
    replies = await asyncio.gather(runtime.service.handle(first),
                                   runtime.service.handle(first))
    assert sorted(r.status for r in replies) == ["answered", "dropped"]
    # Another process (its own memory) sees the same platform message: the database says no.
    async with open_runtime(config_for(db_url), DataPaths.resolve(tmp_path / "b")) as other:
        again = await other.service.handle(event(sink, message_id="evt-1"))
    assert (again.status, again.reason) == ("dropped", "duplicate")
    assert sink.sent == [REPLY]
    assert len(await user_rows(runtime)) == 1


async def test_unstorable_text_is_sanitised(runtime: Runtime) -> None:
    sink = FlakySink()
    bad = "hi\x00 there \ud800!"
    reply = await runtime.service.handle(ChatEvent(
        platform="discord", channel_id="c1", platform_user_id="ann", display_name="A\x00nn",
        text=bad, sink=sink, message_id="nul-1"))
    assert reply.status == "answered"
    [row] = await user_rows(runtime)
    assert row.content == "hi there !"


async def test_empty_messages_are_recorded_as_dropped(runtime: Runtime) -> None:
    reply = await runtime.service.handle(event(FlakySink(), text="   "))
    assert (reply.status, reply.reason) == ("dropped", "empty")
    [row] = await user_rows(runtime)
    assert (row.status, row.status_reason) == ("dropped", "empty")


class LeftoverAnsweringAdapter:
    """A Discord-like adapter that answers what an earlier run left, into a RecordingSink;
    it runs until those answers are recorded."""

    name = "discord"

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.sink = RecordingSink()
        self.asked: list[str] = []

    async def ready(self) -> None:
        return None

    def reply_sink(self, leftover: Any) -> RecordingSink:
        self.asked.append(leftover.text)
        return self.sink

    async def run(self, handle: Any) -> None:
        service = self.runtime.service
        for _ in range(2000):
            if not (service.leftovers or service.pending or not self.sink.sent):
                return
            await asyncio.sleep(0.01)

    async def close(self) -> None:
        return None


async def test_start_up_answers_fresh_leftovers_and_expires_old_ones(db_url: str,
                                                                     tmp_path: Path) -> None:
    """What a crash left ``received``: old messages end expired (crash); fresh ones are
    answered once their platform's adapter is connected; fresh ones of a platform no adapter
    runs for end expired (crash). PostgreSQL may be shared, so a row younger than twice the
    reply timeout (maybe in flight in another process) is left alone."""
    from datetime import UTC, datetime, timedelta

    config = config_for(db_url, reply_timeout_s=1)
    paths = DataPaths.resolve(tmp_path)
    now = datetime.now(UTC)

    def said(platform: str, key: str, text: str, age_s: float) -> IntakeItem:
        return IntakeItem(platform, "ann", "Ann", "pell", "c1", key, text,
                          now - timedelta(seconds=age_s))

    async with open_runtime(config, paths) as runtime:
        for item in (said("discord", "old-1", "lost in a crash", 3600),
                     said("discord", "fresh-1", "asked just before the crash", 5),
                     said("console", "fresh-2", "typed just before the crash", 5),
                     said("discord", "new-1", "in flight elsewhere", 0)):
            await runtime.store.intake([item])
    async with open_runtime(config, paths) as runtime:
        adapter = LeftoverAnsweringAdapter(runtime)
        await asyncio.wait_for(runtime.run_adapters([adapter]), 20)
        rows = {r.content: (r.status, r.status_reason) for r in await user_rows(runtime)}
        console_user = await runtime.store.find_user("console", "ann")
        assert console_user is not None
        rows.update({r.content: (r.status, r.status_reason)
                     for r in await messages_for(runtime.store, console_user)})
        dialect = runtime.store.dialect
    assert rows["lost in a crash"] == ("expired", "crash")
    assert rows["asked just before the crash"] == ("answered", None)
    assert rows["typed just before the crash"] == ("expired", "crash")  # no console adapter
    if dialect == "sqlite":  # one process per file: every leftover is ours
        assert rows["in flight elsewhere"] == ("answered", None)
        assert sorted(adapter.asked) == ["asked just before the crash", "in flight elsewhere"]
    else:
        assert rows["in flight elsewhere"] == ("received", None)
        assert adapter.asked == ["asked just before the crash"]
    assert adapter.sink.sent == [REPLY] * len(adapter.asked)


async def test_leftovers_nobody_claims_expire_at_shutdown(db_url: str, tmp_path: Path) -> None:
    from datetime import UTC, datetime, timedelta

    config = config_for(db_url, reply_timeout_s=1)
    paths = DataPaths.resolve(tmp_path)
    async with open_runtime(config, paths) as runtime:
        await runtime.store.intake([IntakeItem(
            "discord", "ann", "Ann", "pell", "c1", "fresh-1", "asked before the crash",
            datetime.now(UTC) - timedelta(seconds=5))])
    async with open_runtime(config, paths) as runtime:
        assert [m.text for m in runtime.service.leftovers] == ["asked before the crash"]
    async with open_runtime(config, paths) as runtime:  # e.g. `replay`: no adapters ran
        rows = [(r.status, r.status_reason) for r in await user_rows(runtime)]
    assert rows == [("expired", "crash")]


async def test_shutdown_expires_what_cannot_finish(runtime: Runtime,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    async def never_done(request: GenerationRequest) -> AsyncIterator[str]:
        await asyncio.sleep(3600)
        yield ""

    backend = runtime.engine.backend
    assert isinstance(backend, ScriptedBackend)
    monkeypatch.setattr(backend, "generate", never_done)
    sink = FlakySink()
    tasks = [asyncio.create_task(runtime.service.handle(event(sink))) for _ in range(3)]
    await asyncio.sleep(0.2)
    await runtime.service.drain(grace_s=0.2)
    late = await runtime.service.handle(event(sink))
    assert (late.status, late.reason) == ("dropped", "shutdown")
    await asyncio.gather(*tasks, return_exceptions=True)
    rows = await user_rows(runtime)
    assert sorted((r.status, r.status_reason) for r in rows) == [
        ("dropped", "shutdown")] + [("expired", "shutdown")] * 3


async def test_a_reply_sent_before_the_grace_ends_is_recorded_answered(
        runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    """Shutdown's grace ends while a delivered reply's record is being written: the viewer
    has the reply, so it is recorded answered (not expired, which would say they had none)."""
    writing, release = asyncio.Event(), asyncio.Event()
    complete = runtime.store.complete_exchange

    async def slow_complete(**kwargs: Any) -> Any:
        writing.set()
        await release.wait()
        return await complete(**kwargs)

    monkeypatch.setattr(runtime.store, "complete_exchange", slow_complete)
    sink = FlakySink()
    task = asyncio.create_task(runtime.service.handle(event(sink)))
    await writing.wait()
    task.cancel()  # what shutdown does to an answer still running when its grace is over
    await asyncio.sleep(0)  # the answer's task takes the cancel before the write goes on
    release.set()
    await asyncio.gather(task, return_exceptions=True)
    rows = await user_rows(runtime)
    assert [(r.status, r.status_reason) for r in rows] == [("answered", None)]
    assert sink.sent == [REPLY]


class SlowBackend(ScriptedBackend):
    async def generate(self, request: GenerationRequest) -> AsyncIterator[str]:
        await asyncio.sleep(0.3)
        async for chunk in super().generate(request):
            yield chunk


class BurstAdapter:
    """Thirty viewers at once, then a quiet channel until the runtime stops it."""

    name = "burst"

    def __init__(self, sink: FlakySink) -> None:
        self.sink = sink
        self.replies: list[Any] = []

    async def run(self, handle: Callable[[ChatEvent], Any]) -> None:
        async def one(i: int) -> None:
            self.replies.append(await handle(ChatEvent(
                platform="discord", channel_id="c1", platform_user_id=f"v{i}",
                display_name=f"v{i}", text="你好", sink=self.sink, message_id=f"burst-{i}")))

        tasks = [asyncio.create_task(one(i)) for i in range(30)]
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def close(self) -> None:
        return None


async def test_sigterm_with_thirty_in_flight(db_url: str, tmp_path: Path) -> None:
    import os
    import signal

    config = config_for(db_url, shutdown_grace_s=1.0, max_concurrent_generations=4,
                        user_messages_per_minute=100)
    sink = FlakySink()
    adapter = BurstAdapter(sink)
    async with open_runtime(config, DataPaths.resolve(tmp_path),
                            backend=SlowBackend([REPLY])) as runtime:
        running = asyncio.create_task(runtime.run_adapters([adapter]))
        await asyncio.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(running, 20)  # returns normally: `vtuber-bot run` exits 0
        await runtime.service.flush()
        rows = []
        for i in range(30):
            user_id = await runtime.store.find_user("discord", f"v{i}")
            assert user_id is not None
            rows += [m for m in await messages_for(runtime.store, user_id) if m.role == "user"]
    finals = {(r.status, r.status_reason) for r in rows}
    assert len(rows) == 30
    assert finals <= {("answered", None), ("expired", "shutdown")}
    assert ("answered", None) in finals and ("expired", "shutdown") in finals
    answered = sum(r.status == "answered" for r in rows)
    assert len(sink.sent) == answered  # no fallback sent while shutting down


async def test_a_leftover_its_adapter_cannot_rebuild_expires_and_the_rest_are_answered(
        db_url: str, tmp_path: Path) -> None:
    from datetime import UTC, datetime, timedelta

    config = config_for(db_url, reply_timeout_s=1)
    paths = DataPaths.resolve(tmp_path)
    before = datetime.now(UTC) - timedelta(seconds=5)
    async with open_runtime(config, paths) as runtime:
        for key, text in (("bad-1", "a channel the platform no longer knows"),
                          ("good-1", "asked just before the crash")):
            await runtime.store.intake([IntakeItem("discord", "ann", "Ann", "pell", "c1", key,
                                                   text, before)])
    async with open_runtime(config, paths) as runtime:
        sink = RecordingSink()

        def sink_for(leftover: Any) -> RecordingSink:
            if leftover.platform_message_id == "bad-1":
                raise ValueError("invalid literal for int(): 'c1'")
            return sink

        replies = await runtime.service.answer_leftovers("discord", sink_for)
        rows = {r.content: (r.status, r.status_reason) for r in await user_rows(runtime)}
    assert sorted(r.status for r in replies) == ["answered", "expired"]
    assert rows["a channel the platform no longer knows"] == ("expired", "crash")
    assert rows["asked just before the crash"] == ("answered", None)
    assert sink.sent == [REPLY]


async def test_a_message_abandoned_by_a_process_that_never_returns_ends_expired(
        db_url: str, tmp_path: Path) -> None:
    """Another process took it and died; nothing restarts that one. Whoever runs expires it
    once no reply could still be under way (twice the reply timeout)."""
    config = parse_config({
        "models": {"llm": {"backend": "scripted"}, "embedding": {"enabled": False}},
        "store": {"url": db_url},
        "limits": {"reply_timeout_s": 30},
    }, env={})
    async with open_runtime(config, DataPaths.resolve(tmp_path)) as runtime:
        now = datetime.now(UTC)
        [old, recent] = await runtime.store.intake([IntakeItem(
            platform="twitch", platform_user_id="ann", display_name="Ann", persona_id="pell",
            channel_id="c", platform_message_id=f"m{age}", text="hi",
            created_at=now - timedelta(seconds=age), owner="discord[0/2]")
            for age in (61, 5)])
        assert await runtime.service.expire_abandoned() == 1
        rows = {m.id: m.status for m in await messages_for(runtime.store, old.user_id)}
    assert rows == {old.message_id: "expired", recent.message_id: "received"}
