"""The conversation store: one ``AsyncSession`` per unit of work, SQLite or PostgreSQL.

SQLite: WAL, ``synchronous=NORMAL``, and ``BEGIN IMMEDIATE`` for every transaction, because the
driver's default deferred transactions silently lose read-modify-write updates under
concurrency. PostgreSQL: ``SELECT ... FOR UPDATE`` on the state row.
"""

from __future__ import annotations

import functools
import logging
import operator
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import case, column, delete, event, func, or_, select, table, update
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import aliased

from memory.errors import StoreError
from memory.migrate import upgrade_to_head
from memory.models import (
    USER_DATA_TABLES,
    Identity,
    Memory,
    Message,
    RelationshipState,
    StateEvent,
    User,
)
from memory.urls import mask_url

log = logging.getLogger(__name__)

SQLITE_MAGIC = b"SQLite format 3\x00"
# The FTS5 table made by migration 0002 (raw SQL, so not part of the ORM metadata).
_FTS = table("memories_fts", column("rowid"), column("memories_fts"))
_FTS_VOCAB = table("memories_fts_vocab", column("term"), column("doc"))


def sqlite_url(path: Path) -> str:
    return f"sqlite+aiosqlite:///{path}"


def _aware(moment: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; everything we store is UTC."""
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class HistoryMessage:
    id: int
    role: str
    content: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class StateSnapshot:
    mood: str
    mood_intensity: float = 0.0
    intimacy: float = 0.0
    intimacy_gained_today: float = 0.0
    conversation_count: int = 0
    last_interaction_at: datetime | None = None
    version: int = 0


@dataclass(frozen=True, slots=True)
class StateChange:
    """What a state rule decided: the new state and why (kept in the audit trail)."""

    new: StateSnapshot
    cause: str
    details: dict[str, Any] = field(default_factory=dict)


StateRule = Callable[[StateSnapshot], StateChange]


@dataclass(frozen=True, slots=True)
class TimelinePoint:
    at: datetime
    intimacy: float
    mood: str

_STATE_FIELDS = (
    "mood",
    "mood_intensity",
    "intimacy",
    "intimacy_gained_today",
    "conversation_count",
    "last_interaction_at",
)


def _snapshot(row: RelationshipState) -> StateSnapshot:
    return StateSnapshot(
        mood=row.mood,
        mood_intensity=row.mood_intensity,
        intimacy=row.intimacy,
        intimacy_gained_today=row.intimacy_gained_today,
        conversation_count=row.conversation_count,
        last_interaction_at=_aware(row.last_interaction_at),
        version=row.version,
    )


def _jsonable(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


def _check_sqlite_file(path: Path) -> None:
    """Refuse, before touching it, a file that is not SQLite or cannot be written."""
    if path.is_dir():
        raise StoreError(f"store: {path} is a directory, expected a SQLite file")
    if path.exists():
        with path.open("rb") as handle:
            header = handle.read(len(SQLITE_MAGIC))
        if header and header != SQLITE_MAGIC:
            raise StoreError(f"store: {path} is not a SQLite database; refusing to touch it")
        if not path.stat().st_size == 0 and not _writable(path):
            raise StoreError(f"store: {path} is read-only; the store needs write access")
    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True)
    if not _writable(parent):
        raise StoreError(f"store: directory {parent} is not writable")


def _writable(path: Path) -> bool:
    return os.access(path, os.W_OK)


def _tune_sqlite(engine: AsyncEngine, busy_timeout_ms: int) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let us issue BEGIN ourselves (the driver's implicit BEGIN is DEFERRED).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        for pragma in (
            "PRAGMA journal_mode=WAL",
            "PRAGMA synchronous=NORMAL",
            "PRAGMA foreign_keys=ON",
            f"PRAGMA busy_timeout={int(busy_timeout_ms)}",
        ):
            cursor.execute(pragma)
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


class Store:
    """Async repository over the conversation database."""

    def __init__(self, engine: AsyncEngine, url: str) -> None:
        self._engine = engine
        self._sessions = async_sessionmaker(engine, expire_on_commit=False)
        self.url = url

    @property
    def dialect(self) -> str:
        return self._engine.dialect.name

    @classmethod
    async def open(cls, url: str, *, auto_migrate: bool = True,
                   busy_timeout_ms: int = 10_000) -> Store:
        """Open (and by default migrate) the database at ``url``. A SQLite file locked by
        another process for longer than ``busy_timeout_ms`` is a StoreError."""
        if url.startswith("sqlite"):
            path = url.split(":///", 1)[1] if ":///" in url else ""
            if path and path != ":memory:":
                _check_sqlite_file(Path(path))
        try:
            if auto_migrate:
                await upgrade_to_head(url, busy_timeout_ms)
            engine = create_async_engine(url, pool_pre_ping=not url.startswith("sqlite"))
            if engine.dialect.name == "sqlite":
                _tune_sqlite(engine, busy_timeout_ms)
            store = cls(engine, url)
            await store._ping()
        except (OperationalError, DBAPIError, OSError) as exc:
            raise StoreError(f"store: cannot open {mask_url(url)}: {_first_line(exc)}") from exc
        return store

    async def _ping(self) -> None:
        async with self._sessions() as session, session.begin():
            await session.execute(select(User.id).limit(1))

    async def close(self) -> None:
        await self._engine.dispose()

    # -- identities -------------------------------------------------------------------------

    async def resolve_user(self, platform: str, platform_user_id: str, display_name: str) -> int:
        """The user id behind a platform identity, created on first sight."""
        async with self._sessions() as session:
            try:
                async with session.begin():
                    user_id = await session.scalar(
                        select(Identity.user_id).where(
                            Identity.platform == platform,
                            Identity.platform_user_id == platform_user_id,
                        )
                    )
                    if user_id is not None:
                        return user_id
                    user = User(display_name=display_name)
                    session.add(user)
                    await session.flush()
                    session.add(
                        Identity(
                            user_id=user.id,
                            platform=platform,
                            platform_user_id=platform_user_id,
                            display_name=display_name,
                        )
                    )
                    return user.id
            except IntegrityError:
                # Another task created the same identity first; theirs wins.
                pass
        async with self._sessions() as session, session.begin():
            found = await session.scalar(
                select(Identity.user_id).where(
                    Identity.platform == platform, Identity.platform_user_id == platform_user_id
                )
            )
            if found is None:
                raise StoreError(f"store: identity {platform}:{platform_user_id} vanished")
            return found

    async def link_identity(self, user_id: int, platform: str, platform_user_id: str,
                            display_name: str) -> int:
        """Attach a platform identity to ``user_id`` (e.g. a viewer's Twitch account to their
        Discord user). If that identity already had a user of its own, that user's messages,
        memories and audit rows move over and its relationship state is merged (conversation
        counts added, the higher intimacy kept), then the emptied user is deleted."""
        async with self._sessions() as session, session.begin():
            identity = await session.scalar(select(Identity).where(
                Identity.platform == platform, Identity.platform_user_id == platform_user_id))
            if identity is None:
                session.add(Identity(user_id=user_id, platform=platform,
                                     platform_user_id=platform_user_id,
                                     display_name=display_name))
                return user_id
            old = identity.user_id
            if old == user_id:
                return user_id
            for model in (Message, Memory, StateEvent):
                await session.execute(update(model).where(model.user_id == old)
                                      .values(user_id=user_id))
            await self._merge_states(session, old, user_id)
            await session.execute(update(Identity).where(Identity.user_id == old)
                                  .values(user_id=user_id))
            await session.execute(delete(User).where(User.id == old))
            return user_id

    async def _merge_states(self, session: AsyncSession, source: int, target: int) -> None:
        rows = (await session.scalars(select(RelationshipState).where(
            RelationshipState.user_id.in_((source, target))))).all()
        by_persona: dict[str, dict[int, RelationshipState]] = {}
        for row in rows:
            by_persona.setdefault(row.persona_id, {})[row.user_id] = row
        for pair in by_persona.values():
            moved, kept = pair.get(source), pair.get(target)
            if moved is None:
                continue
            if kept is None:
                moved.user_id = target
                continue
            kept.conversation_count += moved.conversation_count
            kept.intimacy = max(kept.intimacy, moved.intimacy)
            kept.version += 1
            await session.delete(moved)
        await session.flush()

    async def unlink_identity(self, platform: str, platform_user_id: str) -> int | None:
        """Give a linked identity a user of its own again (history stays where it is)."""
        async with self._sessions() as session, session.begin():
            identity = await session.scalar(select(Identity).where(
                Identity.platform == platform, Identity.platform_user_id == platform_user_id))
            if identity is None:
                return None
            others = await session.scalar(select(func.count()).select_from(Identity).where(
                Identity.user_id == identity.user_id))
            if others == 1:
                return identity.user_id  # not linked to anything
            user = User(display_name=identity.display_name)
            session.add(user)
            await session.flush()
            identity.user_id = user.id
            return user.id

    async def find_user(self, platform: str, platform_user_id: str) -> int | None:
        async with self._sessions() as session, session.begin():
            return await session.scalar(
                select(Identity.user_id).where(
                    Identity.platform == platform, Identity.platform_user_id == platform_user_id
                )
            )

    # -- messages ---------------------------------------------------------------------------

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
        async with self._sessions() as session, session.begin():
            message = Message(
                user_id=user_id,
                persona_id=persona_id,
                role="user",
                content=text,
                status="received",
                platform=platform,
                channel_id=channel_id,
                platform_message_id=platform_message_id,
                created_at=created_at,
            )
            session.add(message)
            await session.flush()
            return message.id

    async def record_incoming_many(self, items: list[dict[str, Any]]) -> list[int]:
        """Batched ``record_incoming`` (one transaction): for bursts, imports and replays.
        Each item has the keyword arguments of ``record_incoming``."""
        if not items:
            return []
        async with self._sessions() as session, session.begin():
            rows = [Message(role="user", status="received", **item) for item in items]
            session.add_all(rows)
            await session.flush()
            return [row.id for row in rows]

    async def set_status(self, message_id: int, status: str) -> None:
        async with self._sessions() as session, session.begin():
            await session.execute(
                update(Message).where(Message.id == message_id).values(status=status)
            )

    async def recent_history(
        self, user_id: int, persona_id: str, limit: int
    ) -> list[HistoryMessage]:
        """The last ``limit`` messages of finished exchanges, oldest first."""
        if limit <= 0:
            return []
        async with self._sessions() as session, session.begin():
            rows = await session.execute(
                select(Message.id, Message.role, Message.content, Message.created_at)
                .where(
                    Message.user_id == user_id,
                    Message.persona_id == persona_id,
                    Message.status.in_(("answered", "sent")),
                )
                .order_by(Message.id.desc())
                .limit(limit)
            )
            history = [
                HistoryMessage(id=r.id, role=r.role, content=r.content,
                               created_at=_aware(r.created_at) or r.created_at)
                for r in rows
            ]
        history.reverse()
        return history

    async def get_message(self, message_id: int) -> Message | None:
        async with self._sessions() as session, session.begin():
            return await session.get(Message, message_id)

    async def reply_to(self, message_id: int) -> Message | None:
        """The assistant message answering ``message_id``, if any."""
        async with self._sessions() as session, session.begin():
            return await session.scalar(
                select(Message).where(Message.reply_to_id == message_id,
                                      Message.role == "assistant").limit(1)
            )

    async def transcript_rows(self, persona_id: str, *, platform: str | None = None,
                              platform_user_id: str | None = None,
                              channel_id: str | None = None,
                              since: datetime | None = None) -> list[dict[str, Any]]:
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
        if platform is not None:
            query = query.where(Message.platform == platform)
        if platform_user_id is not None:
            query = query.where(Identity.platform_user_id == platform_user_id)
        if channel_id is not None:
            query = query.where(Message.channel_id == channel_id)
        if since is not None:
            query = query.where(Message.created_at >= since)
        async with self._sessions() as session, session.begin():
            rows = await session.execute(query)
            return [
                {"platform": r.platform, "user": r.platform_user_id, "name": r.display_name,
                 "channel": r.channel_id, "text": r.content,
                 "at": (_aware(r.created_at) or r.created_at).isoformat(), "reply": r.reply}
                for r in rows
            ]

    async def messages_for(self, user_id: int, persona_id: str | None = None) -> list[Message]:
        async with self._sessions() as session, session.begin():
            query = select(Message).where(Message.user_id == user_id).order_by(Message.id)
            if persona_id is not None:
                query = query.where(Message.persona_id == persona_id)
            return list((await session.scalars(query)).all())

    # -- state ------------------------------------------------------------------------------

    async def get_state(self, user_id: int, persona_id: str, default_mood: str) -> StateSnapshot:
        async with self._sessions() as session, session.begin():
            row = await session.scalar(
                select(RelationshipState).where(
                    RelationshipState.user_id == user_id,
                    RelationshipState.persona_id == persona_id,
                )
            )
            return _snapshot(row) if row else StateSnapshot(mood=default_mood)

    async def update_state(
        self,
        user_id: int,
        persona_id: str,
        default_mood: str,
        rule: StateRule,
        message_id: int | None = None,
    ) -> StateSnapshot:
        """Apply ``rule`` to the current state atomically and write an audit row."""
        async with self._sessions() as session, session.begin():
            return await self._apply_rule(session, user_id, persona_id, default_mood, rule,
                                          message_id)

    async def complete_exchange(
        self,
        *,
        user_message_id: int,
        reply_text: str,
        trace: dict[str, Any],
        platform_message_id: str | None,
        default_mood: str,
        rule: StateRule,
        created_at: datetime,
    ) -> tuple[int, StateSnapshot]:
        """One unit of work: persist the reply, apply the state rule, mark the question
        answered. Either all of it lands or none."""
        async with self._sessions() as session, session.begin():
            question = await session.get(Message, user_message_id)
            if question is None:
                raise StoreError(f"store: message {user_message_id} does not exist")
            reply = Message(
                user_id=question.user_id,
                persona_id=question.persona_id,
                role="assistant",
                content=reply_text,
                status="sent",
                platform=question.platform,
                channel_id=question.channel_id,
                platform_message_id=platform_message_id,
                reply_to_id=question.id,
                trace=trace,
                created_at=created_at,
            )
            session.add(reply)
            question.status = "answered"
            await session.flush()
            state = await self._apply_rule(
                session, question.user_id, question.persona_id, default_mood, rule, question.id
            )
            return reply.id, state

    async def _apply_rule(
        self,
        session: AsyncSession,
        user_id: int,
        persona_id: str,
        default_mood: str,
        rule: StateRule,
        message_id: int | None,
    ) -> StateSnapshot:
        row = await self._locked_state_row(session, user_id, persona_id, default_mood)
        before = _snapshot(row)
        change = rule(before)
        after = replace(change.new, version=before.version + 1)
        diff = {
            name: [_jsonable(getattr(before, name)), _jsonable(getattr(after, name))]
            for name in _STATE_FIELDS
            if getattr(before, name) != getattr(after, name)
        }
        for name in _STATE_FIELDS:
            setattr(row, name, getattr(after, name))
        row.version = after.version
        row.updated_at = datetime.now(UTC)
        session.add(
            StateEvent(
                user_id=user_id,
                persona_id=persona_id,
                message_id=message_id,
                created_at=after.last_interaction_at or datetime.now(UTC),
                cause=change.cause[:200],
                changes={
                    "diff": diff,
                    "after": {"intimacy": after.intimacy, "mood": after.mood,
                              "mood_intensity": after.mood_intensity},
                    **change.details,
                },
            )
        )
        return after

    async def _locked_state_row(
        self, session: AsyncSession, user_id: int, persona_id: str, default_mood: str
    ) -> RelationshipState:
        query = select(RelationshipState).where(
            RelationshipState.user_id == user_id, RelationshipState.persona_id == persona_id
        )
        if self.dialect == "postgresql":
            query = query.with_for_update()
        row = await session.scalar(query)
        if row is not None:
            return row
        row = RelationshipState(user_id=user_id, persona_id=persona_id, mood=default_mood,
                                mood_intensity=0.0, intimacy=0.0, intimacy_gained_today=0.0,
                                conversation_count=0, version=0)
        # A savepoint, so losing a creation race only retries the select.
        try:
            async with session.begin_nested():
                session.add(row)
                await session.flush()
        except IntegrityError:
            row = (await session.scalars(query)).one()
        return row

    async def state_timeline(self, user_id: int, persona_id: str,
                             limit: int = 500) -> list[TimelinePoint]:
        """The user's intimacy and mood after each recorded change, oldest first."""
        async with self._sessions() as session, session.begin():
            rows = await session.execute(
                select(StateEvent.created_at, StateEvent.changes)
                .where(StateEvent.user_id == user_id, StateEvent.persona_id == persona_id)
                .order_by(StateEvent.id.desc())
                .limit(limit)
            )
            points = [
                TimelinePoint(
                    _aware(r.created_at) or r.created_at,
                    float(r.changes["after"]["intimacy"]),
                    str(r.changes["after"]["mood"]),
                )
                for r in rows
                if isinstance(r.changes, dict) and "after" in r.changes
            ]
        points.reverse()
        return points

    # -- per-user data: delete / export / moderation ------------------------------------------

    async def delete_user_data(self, user_id: int) -> dict[str, int]:
        """Delete every row about this user (the delete-user-data contract). Returns counts."""
        counts: dict[str, int] = {}
        async with self._sessions() as session, session.begin():
            for model, attr in USER_DATA_TABLES:
                result = await session.execute(
                    delete(model).where(getattr(model, attr) == user_id)
                )
                counts[model.__tablename__] = int(getattr(result, "rowcount", 0) or 0)
        log.info("deleted data of user %d: %s", user_id, counts)
        return counts

    async def export_user_data(self, user_id: int) -> dict[str, list[dict[str, Any]]]:
        """Every row about this user, table by table, JSON-ready."""
        export: dict[str, list[dict[str, Any]]] = {}
        async with self._sessions() as session, session.begin():
            for model, attr in reversed(USER_DATA_TABLES):
                rows = await session.scalars(
                    select(model).where(getattr(model, attr) == user_id)
                )
                export[model.__tablename__] = [_row_dict(row) for row in rows]
        return export

    async def purge_platform_message(self, platform: str, platform_message_id: str) -> int:
        """Moderation: blank a deleted platform message, drop memories made from it."""
        async with self._sessions() as session, session.begin():
            ids = await session.scalars(
                select(Message.id).where(Message.platform == platform,
                                         Message.platform_message_id == platform_message_id)
            )
            return await _blank_messages(session, list(ids))

    async def purge_messages(self, platform: str, channel_id: str,
                             platform_user_id: str | None = None) -> int:
        """Moderation: blank a channel's messages (chat cleared), or one viewer's there (ban or
        timeout), and drop the memories made from them."""
        async with self._sessions() as session, session.begin():
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

    # -- memories -------------------------------------------------------------------------

    async def add_memories(self, items: list[NewMemory]) -> list[int]:
        if not items:
            return []
        async with self._sessions() as session, session.begin():
            rows = [Memory(scope=i.scope, persona_id=i.persona_id, user_id=i.user_id,
                           text=i.text, source=i.source, source_hash=i.source_hash,
                           embedding=i.embedding) for i in items]
            session.add_all(rows)
            await session.flush()
            return [row.id for row in rows]

    async def source_hashes(self, persona_id: str, scope: str = "persona") -> dict[str, str]:
        async with self._sessions() as session, session.begin():
            rows = await session.execute(
                select(Memory.source, Memory.source_hash)
                .where(Memory.persona_id == persona_id, Memory.scope == scope)
                .distinct()
            )
            return {r.source: r.source_hash or "" for r in rows}

    async def delete_sources(self, persona_id: str, sources: list[str]) -> int:
        if not sources:
            return 0
        async with self._sessions() as session, session.begin():
            result = await session.execute(
                delete(Memory).where(Memory.persona_id == persona_id,
                                     Memory.source.in_(sources))
            )
            return int(getattr(result, "rowcount", 0) or 0)

    async def memory_vectors(self, persona_id: str, after_id: int = 0,
                             batch: int = 50_000) -> list[tuple[int, int | None, bytes]]:
        """(id, user_id, embedding) of memories newer than ``after_id`` (for the vector index)."""
        async with self._sessions() as session, session.begin():
            rows = await session.execute(
                select(Memory.id, Memory.user_id, Memory.embedding)
                .where(Memory.persona_id == persona_id, Memory.id > after_id,
                       Memory.embedding.is_not(None))
                .order_by(Memory.id)
                .limit(batch)
            )
            return [(r.id, r.user_id, r.embedding) for r in rows]

    async def memory_ids(self, persona_id: str) -> set[int]:
        async with self._sessions() as session, session.begin():
            return set(await session.scalars(
                select(Memory.id).where(Memory.persona_id == persona_id)))

    async def get_memories(self, ids: list[int]) -> dict[int, Memory]:
        if not ids:
            return {}
        async with self._sessions() as session, session.begin():
            rows = await session.scalars(select(Memory).where(Memory.id.in_(ids)))
            return {row.id: row for row in rows}

    async def lexical_search(self, terms: list[str], persona_id: str, user_id: int | None,
                             limit: int) -> list[int]:
        """Memory ids ranked by lexical match: FTS5 trigram + bm25 on SQLite for terms of 3+
        characters; otherwise (and on PostgreSQL, through the pg_trgm index) by how many
        terms each text contains."""
        if not terms:
            return []
        scope = or_(Memory.scope == "persona", Memory.user_id == user_id)
        async with self._sessions() as session, session.begin():
            long_terms = [t for t in terms if len(t) >= 3]
            if self.dialect == "sqlite" and long_terms:
                chosen, ranked = await self._selective_terms(session, long_terms)
                if not chosen:
                    return []
                match = " OR ".join('"' + t.replace('"', '""') + '"' for t in chosen)
                # bm25 scores every match; for terms that match most documents that is a
                # pass over the index, so those fall back to newest-first (cheap, bounded).
                order = (func.bm25(_FTS.c.memories_fts) if ranked else _FTS.c.rowid.desc())
                rows = await session.execute(
                    select(Memory.id)
                    .join(_FTS, _FTS.c.rowid == Memory.id)
                    .where(_FTS.c.memories_fts.match(match), Memory.persona_id == persona_id,
                           scope)
                    .order_by(order)
                    .limit(limit)
                )
                return [r.id for r in rows]
            hits = functools.reduce(operator.add, (
                case((Memory.text.icontains(t, autoescape=True), 1), else_=0) for t in terms
            ))
            rows = await session.execute(
                select(Memory.id)
                .where(Memory.persona_id == persona_id, scope,
                       or_(*(Memory.text.icontains(t, autoescape=True) for t in terms)))
                .order_by(hits.desc(), Memory.id.desc())
                .limit(limit)
            )
            return [r.id for r in rows]

    async def _selective_terms(self, session: AsyncSession,
                               terms: list[str]) -> tuple[list[str], bool]:
        """Terms worth matching, and whether to rank them by bm25. Terms found in over 5% of
        documents are left out (stop-word-like: scoring them is a pass over most of the index
        and says little). A term's frequency is bounded by its rarest trigram; a term with an
        unknown trigram cannot match and is dropped. If every term is common, the two rarest
        are kept and ranked newest-first instead of by bm25."""
        grams = {t: {t.casefold()[i:i + 3] for i in range(len(t) - 2)} for t in terms}
        rows = await session.execute(
            select(_FTS_VOCAB.c.term, _FTS_VOCAB.c.doc)
            .where(_FTS_VOCAB.c.term.in_(set().union(*grams.values())))
        )
        docs = {term: doc for term, doc in rows}
        frequency = {t: min(docs.get(g, 0) for g in grams[t]) for t in terms}
        known = [t for t in terms if frequency[t] > 0]
        if not known:
            return [], False
        total = await session.scalar(select(func.count()).select_from(Memory)) or 0
        selective = [t for t in known if frequency[t] <= max(50, 0.05 * total)]
        if selective:
            return selective, True
        return sorted(known, key=frequency.__getitem__)[:2], False


    async def stats(
        self, platform: str, platform_user_id: str, persona_id: str, default_mood: str
    ) -> dict[str, Any] | None:
        """The seed's ``get_conversation_stats`` shape for one user, or None if unknown."""
        user_id = await self.find_user(platform, platform_user_id)
        if user_id is None:
            return None
        state = await self.get_state(user_id, persona_id, default_mood)
        return {
            "user_id": user_id,
            "platform": platform,
            "platform_user_id": platform_user_id,
            "persona_id": persona_id,
            "conversation_count": state.conversation_count,
            "current_mood": state.mood,
            "mood_intensity": round(state.mood_intensity, 3),
            "intimacy_level": round(state.intimacy, 2),
            "last_interaction_at": (
                state.last_interaction_at.isoformat() if state.last_interaction_at else None
            ),
        }


@dataclass(frozen=True, slots=True)
class NewMemory:
    scope: str  # persona | user
    persona_id: str
    text: str
    source: str
    user_id: int | None = None
    source_hash: str | None = None
    embedding: bytes | None = None


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
    and drop the long-term memories made from them."""
    if not ids:
        return 0
    await session.execute(
        update(Message).where(Message.id.in_(ids)).values(content="", status="purged")
    )
    await session.execute(
        delete(Memory).where(Memory.source.in_([f"message:{i}" for i in ids]))
    )
    return len(ids)


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc)
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__


