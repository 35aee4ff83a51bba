"""Streaming previews: a reply shown while it is generated, on platforms that can edit."""

from __future__ import annotations

import time
from collections.abc import Callable

from bot.events import ReplySink


class StreamingPreview:
    """Shows a reply while it is generated: the first text early, then at most one edit per
    ``interval`` seconds (platform rate limits), then the final text."""

    def __init__(self, sink: ReplySink, preview: Callable[[str], str], interval: float) -> None:
        self._sink = sink
        self._preview = preview
        self._interval = interval
        self._raw: list[str] = []
        self._last = 0.0
        self._shown = ""
        self.message_id: str | None = None

    async def on_chunk(self, chunk: str) -> None:
        self._raw.append(chunk)
        now = time.monotonic()
        if now - self._last < self._interval:
            return
        text = self._preview("".join(self._raw))
        if not text or text == self._shown:
            return
        self._last = now
        if self.message_id is None:
            self.message_id = await self._sink.send(text)
        else:
            await self._sink.edit(self.message_id, text)
        self._shown = text

    async def finish(self, final: str) -> str | None:
        if self.message_id is None:
            return await self._sink.send(final)
        if final != self._shown:
            await self._sink.edit(self.message_id, final)
        return self.message_id


def supports_edits(sink: ReplySink) -> bool:
    return bool(getattr(sink, "supports_edits", False))
