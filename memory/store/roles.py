"""Runtime roles on a shared PostgreSQL: the work one process does ("discord[0/2]", "twitch",
...) is held by one process at a time, through a lease: a row naming its owner and when it
expires, which the owner renews (``renew``) a few times per lease.

That makes crash recovery exact: the process that takes a role after a crash knows the
messages recorded under that role are its own (no live process renews that role), and no
other process touches them. Unlike a session advisory lock, a lease is a row: it outlives a
database restart and needs no session of its own (PgBouncer in transaction pooling is fine).
The database's clock decides expiry, so the hosts' clocks never matter. A process that stops
renewing (killed, cut off) loses the role when the lease expires; its owner name is stable
per instance, so the same instance restarted takes its own lease back at once. SQLite needs
none: one process per file is enforced by a file lock.

A process whose lease runs out and is not started again leaves its questions waiting: a live
process running the same platform adopts them (``adopt_orphans``, every few seconds) and
answers them, instead of their waiting for a restart that may never come.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from sqlalchemy import text

from memory.errors import StoreError
from memory.store.database import Database

# Writers of leases queue here, so checking the live roles and taking one is one step.
_LOCK = text("LOCK TABLE role_leases IN SHARE ROW EXCLUSIVE MODE")
_LIVE = text("SELECT role FROM role_leases WHERE expires_at >= now() AND owner <> :owner")
_TAKE = text(
    "INSERT INTO role_leases (role, owner, expires_at)"
    " VALUES (:role, :owner, now() + CAST(:lease AS float8) * interval '1 second')"
    " ON CONFLICT (role) DO UPDATE SET owner = excluded.owner, expires_at = excluded.expires_at"
    " WHERE role_leases.expires_at < now() OR role_leases.owner = excluded.owner"
    " RETURNING owner")
_RENEW = text("UPDATE role_leases"
              " SET expires_at = now() + CAST(:lease AS float8) * interval '1 second'"
              " WHERE role = :role AND owner = :owner RETURNING role")
_RELEASE = text("DELETE FROM role_leases WHERE role = :role AND owner = :owner")
# The questions still waiting under a role no live lease holds (its process is gone), on the
# platforms this process runs: re-owned by its role. An UPDATE re-checks its WHERE after a
# concurrent one, so two live processes never adopt the same question.
_ADOPT = text(
    "UPDATE messages SET owner = :role"
    " WHERE status = 'received' AND role = 'user' AND platform = ANY(:platforms)"
    " AND created_at >= :since AND owner <> :role AND owner NOT IN"
    " (SELECT role FROM role_leases WHERE expires_at >= now())"
    " RETURNING id")


class RoleTakenError(StoreError):
    """Another live process holds this role (or one that overlaps it) on the database."""


class RoleLostError(RoleTakenError):
    """This process's lease ran out and another process holds the role now."""


class RoleLease:
    def __init__(self, db: Database) -> None:
        self._db = db
        self._held: dict[str, str | float] | None = None

    async def take(self, role: str, owner: str, lease_s: float,
                   overlaps: Callable[[str], bool] = lambda other: False) -> None:
        """Hold ``role`` for ``lease_s`` (then ``renew``); ``RoleTakenError`` when a live
        process holds it or a role that ``overlaps`` says shares its work."""
        if self._db.dialect != "postgresql":
            return
        held: dict[str, str | float] = {"role": role, "owner": owner, "lease": lease_s}
        async with self._db.write() as session:
            await session.execute(_LOCK)
            live = (await session.scalars(_LIVE, {"owner": owner})).all()
            clash = next((other for other in live if other != role and overlaps(other)), None)
            if clash is not None:
                raise RoleTakenError(
                    f"store: {role} overlaps {clash}, which another process runs on this "
                    "database; give each process shards of its own")
            taken = (await session.execute(_TAKE, held)).first()
        if taken is None:
            raise RoleTakenError(
                f"store: another process already runs {role} on this database; each role "
                "(a platform, a set of Discord shards) runs in one process at a time")
        self._held = held

    async def renew(self) -> None:
        """Extend the lease; ``RoleLostError`` if it ran out and another process took it."""
        if self._held is None:
            return
        async with self._db.write() as session:
            renewed = (await session.execute(_RENEW, self._held)).first()
        if renewed is None:
            raise RoleLostError(
                f"store: the lease on {self._held['role']} ran out and another process runs "
                "it now; stopping so that one process answers its messages")

    async def release(self) -> None:
        if self._held is not None:
            held, self._held = self._held, None
            async with self._db.write() as session:
                await session.execute(_RELEASE, held)

    async def adopt_orphans(self, platforms: list[str], since: datetime) -> list[int]:
        """Take over the questions (received at or after ``since``, on ``platforms``) that
        processes whose lease ran out left waiting: they are this process's role's now.
        Returns their ids (none where no role is held: SQLite, a console)."""
        if self._held is None or not platforms:
            return []
        async with self._db.write() as session:
            rows = await session.execute(_ADOPT, {"role": self._held["role"],
                                                  "platforms": platforms, "since": since})
            return [row.id for row in rows]
