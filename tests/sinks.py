"""A ReplySink that records what the viewer would see (tests and drills share it)."""

from __future__ import annotations

import itertools


class RecordingSink:
    def __init__(self) -> None:
        self.sent: list[str] = []
        self.typing_calls = 0
        self._ids = itertools.count(1)

    async def send(self, text: str) -> str:
        self.sent.append(text)
        return f"out-{next(self._ids)}"

    async def edit(self, message_id: str, text: str) -> None:
        self.sent.append(text)

    async def typing(self) -> None:
        self.typing_calls += 1
