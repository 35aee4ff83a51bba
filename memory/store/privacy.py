"""Per-user data: the delete-user-data and export contracts, and moderation purges."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from memory.models import USER_DATA_TABLES, Identity, LinkAttempt, LinkCode, Memory, Message
from memory.store.database import Database
from memory.store.records import ExportedUserData

log = logging.getLogger(__name__)


def _row_dict(row: Any) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for col in row.__table__.columns:
        value = getattr(row, col.key)
        if isinstance(value, datetime):
            value = value.isoformat()
        elif isinstance(value, bytes):
            value = f"<{len(value)} bytes>"
        data[col.key] = value
    return data


async def _blank_messages(session: AsyncSession, ids: list[int]) -> int:
    """Purge messages: keep the rows (the audit trail of what happened) but not the words,
    and drop the long-term memories made from them. The persona's replies to them go too:
    a reply may quote what was purged, and must not bring it back in a later prompt or an
    export."""
    if not ids:
        return 0
    await session.execute(
        update(Message).where(Message.id.in_(ids)).values(content="", status="purged"))
    await session.execute(
        update(Message).where(Message.reply_to_id.in_(ids), Message.role == "assistant")
        .values(content="", status="purged"))
    await session.execute(
        delete(Memory).where(Memory.source.in_([f"message:{i}" for i in ids])))
    return len(ids)


class Privacy:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def delete_user_data(self, user_id: int) -> dict[str, int]:
        """Delete every row about this user (the delete-user-data contract). Returns counts."""
        counts: dict[str, int] = {}
        async with self._db.write() as session:
            identities = (await session.execute(
                select(Identity.platform, Identity.platform_user_id)
                .where(Identity.user_id == user_id))).all()
            for platform, platform_user_id in identities:  # their link codes and tries too
                await session.execute(delete(LinkCode).where(
                    LinkCode.platform == platform,
                    LinkCode.platform_user_id == platform_user_id))
                await session.execute(delete(LinkAttempt).where(
                    LinkAttempt.viewer == f"{platform}:{platform_user_id}"))
            for model, attr in USER_DATA_TABLES:
                result = await session.execute(
                    delete(model).where(getattr(model, attr) == user_id))
                counts[str(model.__tablename__)] = int(getattr(result, "rowcount", 0) or 0)
        log.info("deleted data of user %d: %s", user_id, counts)
        return counts

    async def export_user_data(self, user_id: int) -> ExportedUserData:
        """Every row about this user, table by table, JSON-ready."""
        export: ExportedUserData = {}
        async with self._db.read() as session:
            for model, attr in reversed(USER_DATA_TABLES):
                rows = await session.scalars(select(model).where(getattr(model, attr) == user_id))
                export[str(model.__tablename__)] = [_row_dict(row) for row in rows]
        return export

    async def purge_platform_message(self, platform: str, platform_message_id: str) -> int:
        """Moderation: blank a deleted platform message, drop memories made from it."""
        async with self._db.write() as session:
            ids = await session.scalars(
                select(Message.id).where(Message.platform == platform,
                                         Message.platform_message_id == platform_message_id))
            return await _blank_messages(session, list(ids))

    async def purge_messages(self, platform: str, channel_id: str,
                             platform_user_id: str | None = None) -> int:
        """Moderation: blank a channel's messages (chat cleared), or one viewer's there (ban or
        timeout), and drop the memories made from them."""
        async with self._db.write() as session:
            query = select(Message.id).where(Message.platform == platform,
                                             Message.channel_id == channel_id,
                                             Message.status != "purged")
            if platform_user_id is not None:
                user_id = await session.scalar(select(Identity.user_id).where(
                    Identity.platform == platform,
                    Identity.platform_user_id == platform_user_id))
                if user_id is None:
                    return 0
                query = query.where(Message.user_id == user_id, Message.role == "user")
            return await _blank_messages(session, list(await session.scalars(query)))
