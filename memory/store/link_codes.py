"""One-time link codes, kept as hashes: single use (taken with ``DELETE ... RETURNING``, so
two processes can never both redeem one), expiring, at most ``max_open`` at a time."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import delete, func, insert, select

from memory.models import LinkAttempt, LinkCode
from memory.store.database import Database


class LinkCodeStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def open_code(self, code_hash: str, platform: str, platform_user_id: str, *,
                        now: datetime, expires_at: datetime, max_open: int) -> None:
        """Store a new code; the viewer's earlier code and expired ones go, and the oldest
        make room beyond ``max_open``."""
        async with self._db.write() as session:
            await session.execute(delete(LinkCode).where(
                (LinkCode.expires_at <= now)
                | ((LinkCode.platform == platform)
                   & (LinkCode.platform_user_id == platform_user_id))))
            count = int(await session.scalar(select(func.count()).select_from(LinkCode)) or 0)
            if count >= max_open:
                oldest = select(LinkCode.code_hash).order_by(LinkCode.created_at).limit(
                    count - max_open + 1)
                await session.execute(delete(LinkCode).where(LinkCode.code_hash.in_(oldest)))
            await session.execute(insert(LinkCode).values(
                code_hash=code_hash, platform=platform, platform_user_id=platform_user_id,
                expires_at=expires_at, created_at=now))

    async def take_code(self, code_hash: str, *, now: datetime,
                        redeeming_platform: str) -> tuple[str, str] | None:
        """The (platform, platform user id) that opened the code, which is used up; None if
        unknown, expired, or opened on the redeeming platform itself (then it stays)."""
        async with self._db.write() as session:
            row = (await session.execute(
                delete(LinkCode)
                .where(LinkCode.code_hash == code_hash, LinkCode.expires_at > now,
                       LinkCode.platform != redeeming_platform)
                .returning(LinkCode.platform, LinkCode.platform_user_id))).first()
        return (row.platform, row.platform_user_id) if row is not None else None

    async def attempts(self, viewer: str, since: datetime) -> tuple[int, int]:
        """Since ``since``: this viewer's tries, and everyone's wrong guesses."""
        async with self._db.read() as session:
            mine = await session.scalar(select(func.count()).select_from(LinkAttempt).where(
                LinkAttempt.viewer == viewer, LinkAttempt.at > since))
            wrong = await session.scalar(select(func.count()).select_from(LinkAttempt).where(
                LinkAttempt.wrong.is_(True), LinkAttempt.at > since))
        return int(mine or 0), int(wrong or 0)

    async def record_attempt(self, viewer: str, *, wrong: bool, now: datetime,
                             forget_before: datetime) -> None:
        """One try; tries older than any window still counted go."""
        async with self._db.write() as session:
            await session.execute(delete(LinkAttempt).where(LinkAttempt.at <= forget_before))
            await session.execute(insert(LinkAttempt).values(viewer=viewer, wrong=wrong, at=now))
