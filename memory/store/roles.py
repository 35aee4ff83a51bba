"""Runtime roles on a shared PostgreSQL: the work one process does ("discord[0/2]", "twitch",
...) is held by one process at a time, through a session advisory lock keyed by the role.

That makes crash recovery exact: the process that takes a role again after a crash knows the
messages recorded under that role are its own (the lock says no live process holds the role),
and no other process touches them. The lock ends with its connection, however the process
ends (kill -9 included). SQLite needs none: one process per file is enforced by a file lock.
"""

from __future__ import annotations

import hashlib

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from memory.errors import StoreError
from memory.store.database import Database, store_errors


def role_key(role: str) -> int:
    """A signed 64-bit advisory lock key of the role's name."""
    return int.from_bytes(hashlib.sha256(f"vtuber-bot role {role}".encode()).digest()[:8],
                          "big", signed=True)


class RoleTakenError(StoreError):
    """Another live process holds this role on the database."""


class RoleLock:
    def __init__(self, db: Database) -> None:
        self._db = db
        self._connection: AsyncConnection | None = None

    async def take(self, role: str) -> None:
        """Hold ``role`` until ``release`` (or the end of the process); raise
        ``RoleTakenError`` when another process holds it."""
        if self._db.dialect != "postgresql":
            return
        with store_errors():
            connection = await self._db.sql_engine.connect()
            try:
                taken = await connection.scalar(text("SELECT pg_try_advisory_lock(:key)"),
                                                {"key": role_key(role)})
                await connection.commit()
            except BaseException:
                await connection.close()
                raise
        if not taken:
            await connection.close()
            raise RoleTakenError(
                f"store: another process already runs {role} on this database; each role "
                "(a platform, a set of Discord shards) runs in one process at a time")
        self._connection = connection

    async def release(self) -> None:
        if self._connection is not None:
            connection, self._connection = self._connection, None
            await connection.close()  # a session lock ends with its session
