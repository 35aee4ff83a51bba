"""The store spool keeps retrying whatever goes wrong, until the store takes everything."""

from __future__ import annotations

import asyncio
from typing import Any

from bot.spool import Spool
from memory.errors import StoreError


class FlakyStore:
    """Fails the first writes: a StoreError, then an error nobody expected."""

    def __init__(self) -> None:
        self.failures: list[BaseException] = [StoreError("store: down"), RuntimeError("bug")]
        self.written: list[Any] = []
        self.drained = asyncio.Event()

    async def intake(self, items: list[Any]) -> None:
        if self.failures:
            raise self.failures.pop(0)
        self.written += items
        self.drained.set()

    async def set_statuses(self, statuses: list[Any]) -> None:
        return None


async def test_an_unexpected_error_does_not_end_the_retries() -> None:
    store = FlakyStore()
    spool = Spool(store, retry_s=0.001)  # type: ignore[arg-type]
    spool.add_intake("item")  # type: ignore[arg-type]
    await asyncio.wait_for(store.drained.wait(), timeout=30)
    assert store.written == ["item"] and len(spool) == 0
