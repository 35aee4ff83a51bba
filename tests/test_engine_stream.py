"""The engine interface as the runtime uses it: ``generate`` is a stream (the model's chunks,
then the finished reply, last), requests carry the caller's id, and an answer the service gives
up on (its reply timeout) aborts the engine's request under that id."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

from bot.config import parse_config
from bot.events import ChatEvent
from bot.paths import DataPaths
from bot.runtime import open_runtime
from engine.backends.scripted import ScriptedBackend
from engine.client import PromptInputs
from engine.types import GeneratedReply, GenerationRequest, ReplyChunk
from tests.sinks import RecordingSink
from tests.store_reads import messages_for

REPLY = "今天 也 很 開心"


class HangingBackend(ScriptedBackend):
    """Says one word, then never finishes; remembers what it was asked to abort and whether
    its stream was closed."""

    def __init__(self) -> None:
        super().__init__([REPLY])
        self.aborted: list[str] = []
        self.closed = asyncio.Event()

    async def generate(self, request: GenerationRequest) -> AsyncIterator[str]:
        self.requests.append(request)
        try:
            yield "今天"
            await asyncio.Event().wait()
        finally:
            self.closed.set()

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)


def config(reply_timeout_s: float) -> object:
    return parse_config({
        "models": {"llm": {"backend": "scripted", "scripted": {"replies": [REPLY]}},
                   "embedding": {"enabled": False}},
        "limits": {"reply_timeout_s": reply_timeout_s},
    }, env={})


def chat(sink: RecordingSink, message_id: str) -> ChatEvent:
    return ChatEvent(platform="discord", channel_id="c", platform_user_id="ann",
                     display_name="Ann", text="你好", sink=sink, message_id=message_id)


async def test_the_stream_gives_chunks_then_the_finished_reply_under_the_callers_id(
        tmp_path: Path) -> None:
    async with open_runtime(config(60), DataPaths.resolve(tmp_path)) as runtime:
        engine = runtime.engine
        request = engine.build_request(PromptInputs("你好"), request_id="mine-1")
        outputs = [out async for out in engine.generate(request)]
    *chunks, last = outputs
    assert request.request_id == "mine-1"
    assert chunks and all(isinstance(chunk, ReplyChunk) for chunk in chunks)
    assert "".join(chunk.text for chunk in chunks) == REPLY
    assert isinstance(last, GeneratedReply) and last.context["request_id"] == "mine-1"


async def test_requests_without_a_callers_id_never_share_one(tmp_path: Path) -> None:
    async with open_runtime(config(60), DataPaths.resolve(tmp_path)) as runtime:
        ids = {runtime.engine.build_request(PromptInputs("你好")).request_id
               for _ in range(50)}
    assert len(ids) == 50


async def test_the_service_names_its_requests_and_records_the_name(tmp_path: Path) -> None:
    sink = RecordingSink()
    async with open_runtime(config(60), DataPaths.resolve(tmp_path)) as runtime:
        backend = runtime.engine.backend
        assert isinstance(backend, ScriptedBackend)
        await runtime.service.handle(chat(sink, "m1"))
        await runtime.service.flush()
        user_id = await runtime.store.find_user("discord", "ann")
        assert user_id is not None
        [_question, stored] = await messages_for(runtime.store, user_id)
    [request] = backend.requests
    assert request.request_id.startswith("discord:")
    assert stored.trace is not None and stored.trace["request_id"] == request.request_id


async def test_a_reply_that_times_out_aborts_its_generation(tmp_path: Path) -> None:
    """The service gives up on the answer (its reply timeout): the engine is told to abort
    that very request, and the backend's stream is closed, so no row generates for no one."""
    backend = HangingBackend()
    sink = RecordingSink()
    async with open_runtime(config(0.5), DataPaths.resolve(tmp_path),
                            backend=backend) as runtime:
        reply = await runtime.service.handle(chat(sink, "m1"))
        await asyncio.wait_for(backend.closed.wait(), timeout=30)
    assert (reply.status, reply.reason) == ("failed", "timeout")
    [request] = backend.requests
    assert backend.aborted == [request.request_id]
