"""Inbound messages, many per transaction: viewers resolved (created on first sight) and
messages inserted under the unique intake key, so a redelivered platform message is a no-op in
every process. ``IntakeWriter`` groups concurrent submissions into one commit."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy import delete, select, text, tuple_, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from memory.errors import StoreError
from memory.models import INTAKE_WHERE, Identity, Message, User
from memory.store.database import Database
from memory.store.records import IntakeItem, IntakeOutcome

log = logging.getLogger(__name__)

Key = tuple[str, str]


def _insert(dialect: str) -> Any:
    return postgresql.insert if dialect == "postgresql" else sqlite.insert


class Intake:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def record(self, items: list[IntakeItem]) -> list[IntakeOutcome]:
        """Record ``items`` in one transaction, in order."""
        if not items:
            return []
        async with self._db.write() as session:
            users = await self._resolve_users(session, items)
            outcomes = []
            for item in items:
                user_id = users[(item.platform, item.platform_user_id)]
                outcomes.append(IntakeOutcome(user_id, await self._insert_message(
                    session, item, user_id)))
            return outcomes

    async def _resolve_users(self, session: AsyncSession,
                             items: list[IntakeItem]) -> dict[Key, int]:
        names = {(i.platform, i.platform_user_id): i.display_name for i in items}
        found = await self._known(session, list(names))
        missing = [key for key in names if key not in found]
        if not missing:
            return found
        created = [User(display_name=names[key]) for key in missing]
        session.add_all(created)
        await session.flush()
        statement = _insert(self._db.dialect)(Identity).on_conflict_do_nothing(
            index_elements=["platform", "platform_user_id"])
        await session.execute(statement, [
            {"user_id": user.id, "platform": key[0], "platform_user_id": key[1],
             "display_name": names[key]} for key, user in zip(missing, created, strict=True)])
        found.update(await self._known(session, missing))
        # Another process created some of these viewers first: theirs win, ours go.
        orphans = [u.id for key, u in zip(missing, created, strict=True) if found[key] != u.id]
        if orphans:
            await session.execute(delete(User).where(User.id.in_(orphans)))
        return found

    @staticmethod
    async def _known(session: AsyncSession, keys: list[Key]) -> dict[Key, int]:
        rows = await session.execute(
            select(Identity.platform, Identity.platform_user_id, Identity.user_id)
            .where(tuple_(Identity.platform, Identity.platform_user_id).in_(keys)))
        return {(r.platform, r.platform_user_id): r.user_id for r in rows}

    async def record_final(self, items: list[IntakeItem]) -> None:
        """Record messages that are already final (dropped with a reason) in one transaction
        and one statement: nobody waits for their ids, and a redelivered one is skipped."""
        if not items:
            return
        async with self._db.write() as session:
            users = await self._resolve_users(session, items)
            rows = [_values(i, users[(i.platform, i.platform_user_id)]) for i in items]
            statement = _insert(self._db.dialect)(Message).on_conflict_do_nothing(
                index_elements=["platform", "channel_id", "platform_message_id"],
                index_where=text(INTAKE_WHERE))
            await session.execute(statement, rows)

    async def _insert_message(self, session: AsyncSession, item: IntakeItem,
                              user_id: int) -> int | None:
        values = _values(item, user_id)
        statement = (_insert(self._db.dialect)(Message).values(**values)
                     .on_conflict_do_nothing(
                         index_elements=["platform", "channel_id", "platform_message_id"],
                         index_where=text(INTAKE_WHERE))
                     .returning(Message.id))
        if item.platform_message_id is None:
            statement = _insert(self._db.dialect)(Message).values(**values).returning(Message.id)
        message_id: int | None = (await session.execute(statement)).scalar()
        if message_id is None and item.status != "received":
            await self._settle(session, item)
        return message_id

    @staticmethod
    async def _settle(session: AsyncSession, item: IntakeItem) -> None:
        """A final state for a message already recorded ``received`` (its first write
        committed, but the answer was lost with the connection): the final state wins."""
        await session.execute(
            update(Message)
            .where(Message.platform == item.platform, Message.channel_id == item.channel_id,
                   Message.platform_message_id == item.platform_message_id,
                   Message.role == "user", Message.status == "received")
            .values(status=item.status, status_reason=item.reason))


def _values(item: IntakeItem, user_id: int) -> dict[str, Any]:
    return {"user_id": user_id, "persona_id": item.persona_id, "role": "user",
            "content": item.text, "status": item.status, "status_reason": item.reason,
            "platform": item.platform, "channel_id": item.channel_id,
            "platform_message_id": item.platform_message_id, "created_at": item.created_at}


class IntakeWriter:
    """Group commit: submissions arriving while a batch is written wait for the next one
    (at most ``max_batch`` items); one transaction per batch instead of one per message."""

    def __init__(self, record: Callable[[list[IntakeItem]],
                                        Awaitable[list[IntakeOutcome] | None]],
                 *, max_batch: int = 256, max_delay_s: float = 0.002) -> None:
        self._record = record  # returns an outcome per item, or None when nobody needs them
        self._max_batch = max_batch
        self._max_delay_s = max_delay_s
        self._queue: list[tuple[IntakeItem, asyncio.Future[IntakeOutcome | None]]] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def submit(self, item: IntakeItem) -> asyncio.Future[IntakeOutcome | None]:
        """Queue ``item``; the future resolves once its batch committed (or fails with the
        batch's ``StoreError``)."""
        future: asyncio.Future[IntakeOutcome | None] = (
            asyncio.get_running_loop().create_future())
        self._queue.append((item, future))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._drain(), name="intake-writer")
        return future

    async def _drain(self) -> None:
        await asyncio.sleep(self._max_delay_s)  # let a burst gather
        while self._queue:
            batch, self._queue = (self._queue[:self._max_batch],
                                  self._queue[self._max_batch:])
            await self._write(batch)

    async def _write(self,
                     batch: list[tuple[IntakeItem, asyncio.Future[IntakeOutcome | None]]]
                     ) -> None:
        try:
            outcomes = await self._record([item for item, _ in batch])
        except Exception as exc:  # every waiter must hear how its batch ended
            if not isinstance(exc, StoreError):
                log.exception("intake batch of %d failed", len(batch))
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        results = outcomes if outcomes is not None else [None] * len(batch)
        for (_, future), outcome in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(outcome)

    async def flush(self) -> None:
        """Wait until everything submitted so far is written (shutdown)."""
        while self._task is not None and not self._task.done():
            await asyncio.shield(self._task)
