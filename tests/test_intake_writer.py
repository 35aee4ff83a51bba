"""``IntakeWriter``: submissions share batches in order; a batch's failure reaches every
waiter, and the ``on_batch`` hook hears of items queued with nobody waiting (refusals)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from memory.errors import StoreError
from memory.store import IntakeItem, IntakeOutcome, IntakeWriter


def _item(index: int) -> IntakeItem:
    return IntakeItem(platform="twitch", platform_user_id=f"v{index}", display_name="v",
                      persona_id="pell", channel_id="c", platform_message_id=f"m{index}",
                      text="hi", created_at=datetime.now(UTC), status="dropped",
                      reason="queue_full")


class Recorder:
    def __init__(self, fail: bool = False) -> None:
        self.batches: list[list[str | None]] = []
        self.fail = fail

    async def __call__(self, items: list[IntakeItem]) -> list[IntakeOutcome] | None:
        self.batches.append([item.platform_message_id for item in items])
        if self.fail:
            raise StoreError("store: database is locked")
        return None


async def test_items_added_and_submitted_share_batches_and_the_hook_hears_each() -> None:
    record, ended = Recorder(), []
    writer = IntakeWriter(record, max_batch=4, on_batch=lambda items, error: ended.append(
        ([i.platform_message_id for i in items], error)))
    waiting = writer.submit(_item(0))
    for index in range(1, 6):
        writer.add(_item(index))
    await writer.flush()
    assert await waiting is None
    assert record.batches == [["m0", "m1", "m2", "m3"], ["m4", "m5"]]
    assert ended == [(["m0", "m1", "m2", "m3"], None), (["m4", "m5"], None)]


async def test_a_failed_batch_reaches_its_waiters_and_the_hook() -> None:
    record, ended = Recorder(fail=True), []
    writer = IntakeWriter(record, on_batch=lambda items, error: ended.append((len(items), error)))
    waiting = writer.submit(_item(0))
    writer.add(_item(1))
    await writer.flush()
    with pytest.raises(StoreError):
        await waiting
    [(count, error)] = ended
    assert count == 2 and isinstance(error, StoreError)


async def test_pipelined_batches_do_not_wait_for_each_other() -> None:
    release = asyncio.Event()
    started: list[int] = []

    async def slow(items: list[IntakeItem]) -> list[IntakeOutcome] | None:
        started.append(len(items))
        await release.wait()
        return None

    writer = IntakeWriter(slow, pipelined=True)
    first = writer.submit(_item(0))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    second = writer.submit(_item(1))
    for _ in range(5):
        await asyncio.sleep(0)
    assert started == [1, 1]  # the second batch went out while the first was unfinished
    release.set()
    await writer.flush()
    assert await first is None and await second is None
