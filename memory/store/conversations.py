"""Messages: intake, status, history, transcripts."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Row, and_, insert, or_, select, true, update
from sqlalchemy.orm import aliased

from memory.models import Identity, Message
from memory.store import statements as sql
from memory.store.database import Database
from memory.store.records import (
    HistoryMessage,
    Leftover,
    RecentExchange,
    StoredMessage,
    TranscriptRow,
    aware,
    aware_now,
)
from memory.store.wakeups import ViewerWakeups


def stored_message(row: Row[Any]) -> StoredMessage:
    return StoredMessage(
        id=row.id, user_id=row.user_id, persona_id=row.persona_id, role=row.role,
        content=row.content, status=row.status, platform=row.platform,
        channel_id=row.channel_id, platform_message_id=row.platform_message_id,
        reply_to_id=row.reply_to_id, trace=row.trace, created_at=aware_now(row.created_at),
        status_reason=row.status_reason,
    )


# How long a viewer's next question waits on the one before it between two checks when no
# notice comes (``wakeups.py``: the notices themselves wake it at once).
ORDER_FALLBACK_S = 1.0


class Conversations:
    def __init__(self, db: Database, wakeups: ViewerWakeups | None = None) -> None:
        self._db = db
        self._wakeups = wakeups or ViewerWakeups(None)  # None: waits check at their pause

    async def record_incoming(
        self,
        *,
        user_id: int,
        persona_id: str,
        platform: str,
        channel_id: str | None,
        platform_message_id: str | None,
        text: str,
        created_at: datetime,
    ) -> int:
        """Persist a user's message (status ``received``) before anything else happens."""
        [message_id] = await self.record_incoming_many([{
            "user_id": user_id, "persona_id": persona_id, "platform": platform,
            "channel_id": channel_id, "platform_message_id": platform_message_id,
            "content": text, "created_at": created_at,
        }])
        return message_id

    async def record_incoming_many(self, items: list[dict[str, Any]]) -> list[int]:
        """Batched ``record_incoming`` (one transaction): for bursts, imports and replays.
        Each item holds the ``Message`` columns (``content``, not ``text``)."""
        if not items:
            return []
        rows = [{"role": "user", "status": "received", **item} for item in items]
        async with self._db.write() as session:
            ids = await session.execute(
                insert(Message).returning(Message.id, sort_by_parameter_order=True), rows)
            return list(ids.scalars())

    async def mark_send_started(self, message_id: int, at: datetime) -> None:
        """The reply to ``message_id`` starts going out now (``Leftover.send_started_at``)."""
        async with self._db.write() as session:
            await session.execute(update(Message).where(Message.id == message_id)
                                  .values(send_started_at=at))

    async def set_status(self, message_id: int, status: str,
                         reason: str | None = None) -> None:
        async with self._db.write() as session:
            await session.execute(update(Message).where(Message.id == message_id)
                                  .values(status=status, status_reason=reason))

    async def set_statuses(self, changes: list[tuple[int, str, str | None]]) -> None:
        """Several (message id, status, reason) in one transaction."""
        if not changes:
            return
        async with self._db.write() as session:
            for message_id, status, reason in changes:
                await session.execute(update(Message).where(Message.id == message_id)
                                      .values(status=status, status_reason=reason))

    async def expire_received(self, reason: str, before: datetime | None = None,
                              owner: str | None = None) -> int:
        """End every user message still ``received`` (older than ``before``, if given; taken
        by the runtime role ``owner``, if given) as ``expired`` with ``reason``: crash
        recovery and shutdown."""
        query = update(Message).where(Message.status == "received", Message.role == "user")
        if before is not None:
            query = query.where(Message.created_at < before)
        if owner is not None:
            query = query.where(Message.owner == owner)
        async with self._db.write() as session:
            result = await session.execute(
                query.values(status="expired", status_reason=reason))
            return int(getattr(result, "rowcount", 0) or 0)

    async def leftovers(self, since: datetime, before: datetime | None = None,
                        owner: str | None = None,
                        ids: list[int] | None = None) -> list[Leftover]:
        """User messages still ``received`` created at or after ``since``, oldest first,
        with the viewer's identity on their platform: those created before ``before`` (if
        given), and with ``owner``, also every one that runtime role took, however recent
        (its holder is this process now, so none of them is in flight elsewhere); messages
        other roles took are theirs to recover. ``ids``: only these (adopted ones)."""
        query = (select(Message.id, Message.user_id, Message.platform, Message.channel_id,
                        Message.platform_message_id, Message.content, Message.created_at,
                        Message.send_started_at, Identity.platform_user_id,
                        Identity.display_name)
                 .join(Identity, (Identity.user_id == Message.user_id)
                       & (Identity.platform == Message.platform))
                 .where(Message.status == "received", Message.role == "user",
                        Message.created_at >= since)
                 .order_by(Message.id))
        if ids is not None:
            query = query.where(Message.id.in_(ids))
        if owner is not None:
            query = query.where(or_(Message.owner == owner, and_(
                Message.owner.is_(None),
                Message.created_at < before if before is not None else true())))
        elif before is not None:
            query = query.where(Message.created_at < before)
        async with self._db.read() as session:
            rows = (await session.execute(query)).all()
        seen: set[int] = set()
        found = []
        for r in rows:  # a viewer linked twice on one platform: the first identity will do
            if r.id not in seen:
                seen.add(r.id)
                found.append(Leftover(r.id, r.user_id, r.platform, r.platform_user_id,
                                      r.display_name, r.channel_id, r.platform_message_id,
                                      r.content, aware_now(r.created_at),
                                      aware(r.send_started_at)))
        return found

    async def wait_for_earlier(self, user_id: int, message_id: int, since: datetime,
                               timeout_s: float) -> bool:
        """On PostgreSQL (several processes), wait until the viewer's questions before
        ``message_id`` (received after ``since``) are final, so a viewer linked across
        platforms is answered in arrival order whichever process took each message. True when
        nothing was left waiting, False after ``timeout_s`` (the caller goes on: a crashed
        process's message must not hold the viewer for long). SQLite has one process: the
        per-viewer lanes already keep the order."""
        if self._db.dialect != "postgresql":
            return True
        key = {"user_id": user_id, "message_id": message_id, "since": since}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        with self._wakeups.watching(user_id) as wakeup:
            while await self._db.read_unit(
                    lambda connection: connection.execute(sql.EARLIER_PENDING, key).first()):
                left = deadline - loop.time()
                if left <= 0:
                    return False
                await wakeup.wait(min(left, ORDER_FALLBACK_S))
        return True

    async def recent_history(self, user_id: int, persona_id: str,
                             limit: int) -> list[HistoryMessage]:
        """The last ``limit`` messages of finished exchanges, oldest first."""
        return await self._db.read_unit(
            lambda connection: self.read_history(connection, user_id, persona_id, limit))

    @staticmethod
    def read_history(connection: Connection, user_id: int, persona_id: str,
                     limit: int) -> list[HistoryMessage]:
        if limit <= 0:
            return []
        rows = connection.execute(sql.HISTORY, {"user_id": user_id, "persona_id": persona_id,
                                             "limit": limit})
        history = [HistoryMessage(id=r.id, role=r.role, content=r.content,
                                  created_at=aware_now(r.created_at)) for r in rows]
        history.reverse()
        return history

    async def get_message(self, message_id: int) -> StoredMessage | None:
        async with self._db.read() as session:
            row = (await session.execute(
                select(sql.messages).where(Message.id == message_id))).first()
            return stored_message(row) if row is not None else None

    async def reply_to(self, message_id: int) -> StoredMessage | None:
        """The assistant message answering ``message_id``, if any."""
        async with self._db.read() as session:
            row = (await session.execute(
                select(sql.messages).where(Message.reply_to_id == message_id,
                                           Message.role == "assistant").limit(1))).first()
            return stored_message(row) if row is not None else None

    async def messages_for(self, user_id: int,
                           persona_id: str | None = None) -> list[StoredMessage]:
        query = select(sql.messages).where(Message.user_id == user_id).order_by(Message.id)
        if persona_id is not None:
            query = query.where(Message.persona_id == persona_id)
        async with self._db.read() as session:
            return [stored_message(row) for row in await session.execute(query)]

    async def transcript_rows(self, persona_id: str, *, platform: str | None = None,
                              platform_user_id: str | None = None,
                              channel_id: str | None = None,
                              since: datetime | None = None) -> list[TranscriptRow]:
        """Answered user messages with their replies, oldest first, for transcripts."""
        reply = aliased(Message)
        query = (
            select(Message.platform, Identity.platform_user_id, Identity.display_name,
                   Message.channel_id, Message.content, Message.created_at,
                   reply.content.label("reply"))
            .join(Identity, (Identity.user_id == Message.user_id)
                  & (Identity.platform == Message.platform))
            .outerjoin(reply, (reply.reply_to_id == Message.id) & (reply.role == "assistant"))
            .where(Message.persona_id == persona_id, Message.role == "user",
                   Message.status == "answered")
            .order_by(Message.id)
        )
        for column, value in ((Message.platform, platform),
                              (Identity.platform_user_id, platform_user_id),
                              (Message.channel_id, channel_id)):
            if value is not None:
                query = query.where(column == value)
        if since is not None:
            query = query.where(Message.created_at >= since)
        async with self._db.read() as session:
            rows = await session.execute(query)
            return [
                TranscriptRow(platform=r.platform, user=r.platform_user_id,
                              name=r.display_name, channel=r.channel_id, text=r.content,
                              at=aware_now(r.created_at).isoformat(), reply=r.reply)
                for r in rows
            ]

    async def recent_exchanges(self, limit: int) -> list[RecentExchange]:
        """The last ``limit`` viewer messages of any persona, newest first, with their
        replies: what the operator's dashboard lists, restarts or not."""
        reply = aliased(Message)
        query = (
            select(Message.created_at, Message.platform, Message.channel_id,
                   Identity.platform_user_id, Identity.display_name, Message.content,
                   Message.status, Message.status_reason, reply.id.label("reply_id"),
                   reply.content.label("reply"), reply.trace.label("trace"))
            .join(Identity, (Identity.user_id == Message.user_id)
                  & (Identity.platform == Message.platform))
            .outerjoin(reply, (reply.reply_to_id == Message.id) & (reply.role == "assistant"))
            .where(Message.role == "user")
            # The newest ids (the primary key, no sort of the table); refused messages are
            # recorded in batches after later ones, so their order is by when they came.
            .order_by(Message.id.desc()).limit(2 * limit))
        async with self._db.read() as session:
            rows = sorted((await session.execute(query)).all(),
                          key=lambda r: aware_now(r.created_at), reverse=True)
        return [RecentExchange(
            at=aware_now(r.created_at).isoformat(), platform=r.platform,
            channel_id=r.channel_id, platform_user_id=r.platform_user_id,
            display_name=r.display_name, text=r.content, status=r.status,
            reason=r.status_reason, reply=r.reply or "", reply_id=r.reply_id,
            latency_ms=((r.trace or {}).get("timings_ms") or {}).get("total"))
            for r in rows[:limit]]


__all__ = ["Conversations", "aware", "stored_message"]
