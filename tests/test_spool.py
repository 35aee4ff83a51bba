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


def test_the_spool_file_reads_back_what_was_appended_and_skips_a_torn_line(
        tmp_path: Any) -> None:
    from datetime import UTC, datetime

    from bot.spool_file import SpoolFile
    from memory.store import IntakeItem

    item = IntakeItem(platform="twitch", platform_user_id="ann", display_name="安",
                      persona_id="pell", channel_id="c", platform_message_id="m1",
                      text="你好", created_at=datetime(2026, 12, 7, tzinfo=UTC),
                      status="failed", reason="store")
    file = SpoolFile(tmp_path / "spool.jsonl")
    file.append_intake(item)
    file.append_status((7, "answered", None))
    with file.path.open("a", encoding="utf-8") as handle:
        handle.write('{"status": [8, "fail')  # the run died while writing this one
    assert file.read() == ([item], [(7, "answered", None)])
    file.rewrite([], [])
    assert not file.path.exists() and file.read() == ([], [])
