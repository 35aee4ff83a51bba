"""A local OpenAI-compatible server that answers at once: for end-to-end tests where the
model server is not what is under test (the scale-out fleet), so their pace is the runtime's
and not a CPU vLLM's. It speaks what the openai backend uses: ``GET /v1/models`` and a
streamed ``POST /v1/chat/completions`` (server-sent events, a final chunk with
``finish_reason`` and ``usage``, then ``[DONE]``). The real servers are tested against real
vLLM and ``transformers serve`` in test_openai_backend.py."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from aiohttp import web

from tests.local_server import LocalServer, json_response

MODEL = "fake-model"
WORDS = ("好呀", "，", "我", "在", "這裡", "～")


class FakeOpenAI(LocalServer):
    """``hold(predicate)``: requests whose body matches wait, unanswered, until ``release()``
    (a model still working on them when their process is killed). ``capacity``: requests
    beyond this many at once are refused with 429, as vLLM behind a gateway or a hosted API
    does; ``word_delay_s`` makes each reply take a while (so requests overlap)."""

    _holding: Callable[[dict[str, Any]], bool] | None = None
    _released: asyncio.Event | None = None
    capacity: int | None = None
    word_delay_s: float = 0.0
    busy: int = 0
    refused: int = 0
    answered: int = 0

    def hold(self, predicate: Callable[[dict[str, Any]], bool]) -> None:
        self._holding, self._released = predicate, asyncio.Event()

    def release(self) -> None:
        if self._released is not None:
            self._released.set()

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._chat)

    @property
    def base_url(self) -> str:
        return f"{self.base}/v1"

    async def _models(self, request: web.Request) -> web.Response:
        self.record(request.method, request.path, None)
        return json_response({"object": "list", "data": [
            {"id": MODEL, "object": "model", "created": 0, "owned_by": "tests"}]})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.record(request.method, request.path, body)
        if self._holding is not None and self._released is not None and self._holding(body):
            await self._released.wait()
        if self.capacity is not None and self.busy >= self.capacity:
            self.refused += 1
            return json_response({"error": {"message": "over capacity"}}, status=429)
        self.busy += 1
        try:
            response = await self._stream(request, body)
            self.answered += 1
            return response
        except ConnectionResetError:  # its client is gone (a killed process)
            return web.Response(status=499)
        finally:
            self.busy -= 1

    async def _stream(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        words = WORDS[:max(1, min(len(WORDS), int(body.get("max_tokens") or len(WORDS))))]
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for word in words:
            await asyncio.sleep(self.word_delay_s)
            await response.write(_event(_chunk({"content": word}, None)))
        final = _chunk({}, "stop")
        final["usage"] = {"prompt_tokens": 1, "completion_tokens": len(words),
                          "total_tokens": 1 + len(words)}
        await response.write(_event(final))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


def _chunk(delta: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
    return {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0,
            "model": MODEL, "choices": [{"index": 0, "delta": delta,
                                         "finish_reason": finish_reason}]}


def _event(data: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()
