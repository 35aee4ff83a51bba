"""Inbound messages, many per transaction: viewers resolved (created on first sight) and
messages inserted under the unique intake key, so a redelivered platform message is a no-op in
every process. ``IntakeWriter`` groups concurrent submissions into one commit."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import timedelta
from typing import Any

from sqlalchemy import Connection, delete, update

from memory.errors import StoreError
from memory.models import Message, User, utcnow
from memory.store import statements as sql
from memory.store.database import Database
from memory.store.records import (
    ContextWanted,
    IntakeItem,
    IntakeOutcome,
    LookAhead,
    ReplyContext,
    StateSnapshot,
)

log = logging.getLogger(__name__)
SHARED_LIMIT_WINDOW = timedelta(minutes=1)

Key = tuple[str, str]
Waiter = asyncio.Future[IntakeOutcome | None] | None
BatchEnded = Callable[[list[IntakeItem], Exception | None], None]  # the items, and the error
ReadContext = Callable[[Connection, int, str, ContextWanted], ReplyContext]


class Intake:
    def __init__(self, db: Database, read_context: ReadContext) -> None:
        self._db = db
        self._read_context = read_context  # (connection, user id, persona id, wanted)

    async def record(self, items: list[IntakeItem]) -> list[IntakeOutcome]:
        """Record ``items`` in one transaction, in order."""
        if not items:
            return []
        return await self._db.write_unit(lambda connection: self._record(connection, items))

    def _record(self, connection: Connection, items: list[IntakeItem]) -> list[IntakeOutcome]:
        users = self._resolve_users(connection, items)
        self._lock_limited_viewers(connection, items, users)
        outcomes = []
        for item in items:
            user_id = users[(item.platform, item.platform_user_id)]
            if self._over_shared_limit(connection, item, user_id):
                refused = replace(item, status="dropped", reason="rate_limited")
                message_id = self._insert_message(connection, refused, user_id, settle=False)
                # A redelivery inserts nothing: it is a duplicate, whatever the limit says.
                outcomes.append(IntakeOutcome(user_id, None, refused.reason)
                                if message_id is not None else IntakeOutcome(user_id, None))
                continue
            message_id = self._insert_message(connection, item, user_id)
            outcomes.append(IntakeOutcome(user_id, message_id))
        return outcomes

    async def look_ahead(self, item: IntakeItem, wanted: ContextWanted) -> LookAhead:
        """What the store holds for ``item`` while its intake is still being written: its
        viewer, whether it was recorded before, and the reply's context (read at once, see
        ``Database.read_on_event_loop``)."""
        return await self._db.read_on_event_loop(
            lambda connection: self._look_ahead(connection, item, wanted))

    def _look_ahead(self, connection: Connection, item: IntakeItem,
                    wanted: ContextWanted) -> LookAhead:
        viewer = connection.execute(sql.VIEWER_AND_KEY, {
            "platform": item.platform, "platform_user_id": item.platform_user_id,
            "channel_id": item.channel_id,
            "platform_message_id": item.platform_message_id}).first()
        if viewer is None:  # a viewer never seen has no messages and nothing to read
            return LookAhead(None, False, ReplyContext(
                item.persona_id, StateSnapshot(mood=wanted.default_mood), []))
        return LookAhead(viewer.user_id, bool(viewer.recorded), self._read_context(
            connection, viewer.user_id, item.persona_id, wanted))

    def _limited(self, item: IntakeItem) -> bool:
        return (item.shared_per_minute is not None and item.status == "received"
                and self._db.dialect == "postgresql")

    def _lock_limited_viewers(self, connection: Connection, items: list[IntakeItem],
                              users: dict[Key, int]) -> None:
        """Lock the viewers whose limit is checked, in id order (no deadlock between two
        processes' batches): a viewer's intakes then count one after the other."""
        for user_id in sorted({users[(i.platform, i.platform_user_id)]
                               for i in items if self._limited(i)}):
            connection.execute(sql.LOCK_USER, {"user_id": user_id})

    def _over_shared_limit(self, connection: Connection, item: IntakeItem,
                           user_id: int) -> bool:
        if not self._limited(item):
            return False
        admitted = connection.execute(sql.RECENT_ADMITTED, {
            "user_id": user_id, "platform": item.platform,
            "since": item.created_at - SHARED_LIMIT_WINDOW}).scalar_one()
        return bool(item.shared_per_minute is not None and admitted >= item.shared_per_minute)

    def _resolve_users(self, connection: Connection, items: list[IntakeItem]) -> dict[Key, int]:
        """Each item's viewer id (created on first sight)."""
        names = {(i.platform, i.platform_user_id): i.display_name for i in items}
        found = self._known(connection, list(names))
        missing = [key for key in names if key not in found]
        if not missing:
            return found
        now = utcnow()
        created: list[int] = list(connection.scalars(
            sql.INSERT_USERS, [{"display_name": names[key], "created_at": now}
                               for key in missing]))
        claimed = connection.execute(sql.claim_identities(self._db.dialect), [
            {"user_id": user_id, "platform": key[0], "platform_user_id": key[1],
             "display_name": names[key], "created_at": now}
            for key, user_id in zip(missing, created, strict=True)])
        found.update({(r.platform, r.platform_user_id): r.user_id for r in claimed})
        lost = [key for key in missing if key not in found]
        if lost:  # another process created these viewers first: theirs win, ours go
            found.update(self._known(connection, lost))
            connection.execute(delete(User).where(User.id.in_(
                [u for key, u in zip(missing, created, strict=True) if key in lost])))
        return found

    @staticmethod
    def _known(connection: Connection, keys: list[Key]) -> dict[Key, int]:
        """The viewer ids of ``keys`` already stored: one indexed lookup per platform (a
        single viewer's without an IN list, whose SQL would be rendered anew)."""
        by_platform: dict[str, list[str]] = {}
        for platform, platform_user_id in keys:
            by_platform.setdefault(platform, []).append(platform_user_id)
        found: dict[Key, int] = {}
        for platform, ids in by_platform.items():
            rows = (connection.execute(sql.KNOWN_IDENTITY, {
                        "platform": platform, "platform_user_id": ids[0]}) if len(ids) == 1
                    else connection.execute(sql.KNOWN_IDENTITIES, {
                        "platform": platform, "platform_user_ids": ids}))
            found.update({(r.platform, r.platform_user_id): r.user_id for r in rows})
        return found

    async def record_final(self, items: list[IntakeItem]) -> None:
        """Record messages that are already final (dropped with a reason) in one transaction
        and one statement: nobody waits for their ids, and a redelivered one is skipped."""
        if items:
            await self._db.write_unit(lambda connection: self._record_final(connection, items))

    def _record_final(self, connection: Connection, items: list[IntakeItem]) -> None:
        users = self._resolve_users(connection, items)
        rows = [_values(i, users[(i.platform, i.platform_user_id)]) for i in items]
        connection.execute(sql.intake_final(self._db.dialect), rows)

    def _insert_message(self, connection: Connection, item: IntakeItem, user_id: int,
                        settle: bool = True) -> int | None:
        statement = sql.intake_message(self._db.dialect, item.platform_message_id is not None)
        message_id: int | None = connection.execute(statement, _values(item, user_id)).scalar()
        if message_id is None and item.status != "received" and settle:
            self._settle(connection, item)
        return message_id

    @staticmethod
    def _settle(connection: Connection, item: IntakeItem) -> None:
        """A final state for a message already recorded ``received`` (its first write
        committed, but the answer was lost with the connection): the final state wins."""
        connection.execute(
            update(Message)
            .where(Message.platform == item.platform, Message.channel_id == item.channel_id,
                   Message.platform_message_id == item.platform_message_id,
                   Message.role == "user", Message.status == "received")
            .values(status=item.status, status_reason=item.reason))


def _values(item: IntakeItem, user_id: int) -> dict[str, Any]:
    return {"user_id": user_id, "persona_id": item.persona_id, "role": "user",
            "content": item.text, "status": item.status, "status_reason": item.reason,
            "platform": item.platform, "channel_id": item.channel_id,
            "platform_message_id": item.platform_message_id, "reply_to_id": None,
            "trace": None, "created_at": item.created_at, "owner": item.owner}


class IntakeWriter:
    """Group commit: submissions arriving while a batch is written wait for the next one
    (at most ``max_batch`` items); one transaction per batch instead of one per message.

    ``pipelined``: the database groups concurrent writes itself, in order (SQLite's
    ``WriteRounds``), so a batch is handed over without waiting for the one before it to
    commit; the batch then shares a transaction with whatever else is being written."""

    def __init__(self, record: Callable[[list[IntakeItem]],
                                        Awaitable[list[IntakeOutcome] | None]],
                 *, max_batch: int = 256, max_delay_s: float = 0.0,
                 pipelined: bool = False, on_batch: BatchEnded | None = None) -> None:
        self._record = record  # returns an outcome per item, or None when nobody needs them
        self._max_batch = max_batch
        self._max_delay_s = max_delay_s
        self._pipelined = pipelined
        self._on_batch = on_batch  # told how each batch ended (for items ``add``ed)
        self._writing: set[asyncio.Task[None]] = set()
        self._queue: list[tuple[IntakeItem, Waiter]] = []
        self._task: asyncio.Task[None] | None = None

    def submit(self, item: IntakeItem) -> asyncio.Future[IntakeOutcome | None]:
        """Queue ``item``; the future resolves once its batch committed (or fails with the
        batch's ``StoreError``)."""
        future: asyncio.Future[IntakeOutcome | None] = (
            asyncio.get_running_loop().create_future())
        self._enqueue(item, future)
        return future

    def add(self, item: IntakeItem) -> None:
        """Queue ``item`` with nobody waiting for it (a flood's refusals: no future and no
        callback each); ``on_batch`` hears how its batch ended."""
        self._enqueue(item, None)

    def _enqueue(self, item: IntakeItem, waiter: Waiter) -> None:
        self._queue.append((item, waiter))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._drain(), name="intake-writer")

    async def _drain(self) -> None:
        # With no delay this yields once: a burst delivered in one loop iteration shares a
        # batch, and what arrives while a batch is written waits for the next one.
        await asyncio.sleep(self._max_delay_s)
        while self._queue:
            batch, self._queue = (self._queue[:self._max_batch],
                                  self._queue[self._max_batch:])
            if not self._pipelined:
                await self._write(batch)
                if self._max_delay_s and len(self._queue) < self._max_batch:
                    await asyncio.sleep(self._max_delay_s)  # a fuller batch next time
                continue
            task = asyncio.create_task(self._write(batch), name="intake-batch")
            self._writing.add(task)
            task.add_done_callback(self._writing.discard)

    async def _write(self, batch: list[tuple[IntakeItem, Waiter]]) -> None:
        items = [item for item, _ in batch]
        try:
            outcomes = await self._record(items)
        except Exception as exc:  # every waiter must hear how its batch ended
            if not isinstance(exc, StoreError):
                log.exception("intake batch of %d failed", len(batch))
            for _, future in batch:
                if future is not None and not future.done():
                    future.set_exception(exc)
            if self._on_batch is not None:
                self._on_batch(items, exc)
            return
        results = outcomes if outcomes is not None else [None] * len(batch)
        for (_, future), outcome in zip(batch, results, strict=True):
            if future is not None and not future.done():
                future.set_result(outcome)
        if self._on_batch is not None:
            self._on_batch(items, None)

    async def flush(self) -> None:
        """Wait until everything submitted so far is written (shutdown)."""
        while self._task is not None and not self._task.done():
            await asyncio.shield(self._task)
        while self._writing:
            await asyncio.wait(set(self._writing))
