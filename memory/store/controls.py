"""What the operator's controls keep: the audit log of every control used, and the viewers
an operator muted."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import delete, insert, select

from memory.errors import IntegrityViolation
from memory.models import MutedViewer, OperatorAction
from memory.store.database import Database
from memory.store.records import AuditEntry


class OperatorControls:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def record(self, action: str, target: str | None, detail: dict[str, Any],
                     outcome: str, at: datetime) -> None:
        async with self._db.write() as session:
            await session.execute(insert(OperatorAction).values(
                at=at, action=action, target=target, detail=detail, outcome=outcome[:200]))

    async def recent(self, limit: int) -> list[AuditEntry]:
        """The newest ``limit`` entries, newest first."""
        async with self._db.read() as session:
            rows = (await session.execute(select(
                OperatorAction.id, OperatorAction.at, OperatorAction.action,
                OperatorAction.target, OperatorAction.detail, OperatorAction.outcome,
            ).order_by(OperatorAction.id.desc()).limit(limit))).all()
            return [AuditEntry(row.id, row.at, row.action, row.target, dict(row.detail),
                               row.outcome) for row in rows]

    async def mute(self, platform: str, platform_user_id: str, at: datetime) -> None:
        try:
            async with self._db.write() as session:
                await session.execute(insert(MutedViewer).values(
                    platform=platform, platform_user_id=platform_user_id, at=at))
        except IntegrityViolation:
            return  # muted already

    async def unmute(self, platform: str, platform_user_id: str) -> None:
        async with self._db.write() as session:
            await session.execute(delete(MutedViewer).where(
                MutedViewer.platform == platform,
                MutedViewer.platform_user_id == platform_user_id))

    async def muted(self) -> set[tuple[str, str]]:
        async with self._db.read() as session:
            rows = (await session.execute(select(MutedViewer.platform,
                                                 MutedViewer.platform_user_id))).all()
        return {(row.platform, row.platform_user_id) for row in rows}
