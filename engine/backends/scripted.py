"""Deterministic backend for tests and replays: replies come from a list, in order.

Selected only explicitly (``models.llm.backend: scripted``). It records every request it got,
so tests can assert what the prompt contained.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from engine.types import GenerationRequest, PromptUsage


class ScriptedBackend:
    name = "scripted"

    def __init__(self, replies: list[str] | None = None, chunk_delay_s: float = 0.0) -> None:
        self._replies = list(replies or ["收到：{user_text}"])
        self._chunk_delay_s = chunk_delay_s
        self._next = 0
        self.requests: list[GenerationRequest] = []
        self.finished = 0  # replies generated to their end

    async def start(self) -> None:
        return None

    async def generate(self, request: GenerationRequest) -> AsyncIterator[str]:
        self.requests.append(request)
        template = self._replies[self._next % len(self._replies)]
        self._next += 1
        user_text = next(
            (m.content for m in reversed(request.messages) if m.role == "user"), ""
        )
        text = template.replace("{user_text}", user_text)
        # Stream word by word so streaming consumers are exercised too.
        for index, piece in enumerate(text.split(" ")):
            await asyncio.sleep(self._chunk_delay_s)
            yield piece if index == 0 else " " + piece
        self.finished += 1

    async def abort(self, request_id: str) -> None:
        return None

    def health(self) -> dict[str, Any]:
        return {"ok": True, "backend": self.name}

    def info(self) -> dict[str, Any]:
        return {"backend": self.name, "model": "scripted", "replies": len(self._replies)}

    def count_tokens(self, text: str) -> int:
        return max(1, len(text) // 3) if text else 0

    def prompt_usage(self, request_id: str) -> PromptUsage | None:
        return None

    async def close(self) -> None:
        return None
