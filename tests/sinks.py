"""A ReplySink that records what the viewer would see, and a wait for the service to settle
(tests and drills share them)."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any


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


async def settled(service: Any, seconds: float = 10.0) -> None:
    """Until no admitted message is in flight (a reply sent may still be being recorded)."""
    for _ in range(int(seconds / 0.01)):
        if not service.pending:
            return
        await asyncio.sleep(0.01)
