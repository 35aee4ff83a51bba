"""``Store``: the one object the runtime holds, and the one way into the store. The parts
(identities, conversations, state, privacy, memories, intake, link codes, the role lock) are
its own: callers never reach past it, so a query has one name and the seams can move."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any

from sqlalchemy import Connection

from memory.errors import StoreError
from memory.store import statements as sql
from memory.store.controls import OperatorControls
from memory.store.conversations import Conversations
from memory.store.database import Database
from memory.store.identities import Identities
from memory.store.intake import Intake
from memory.store.link_codes import LinkCodeStore
from memory.store.privacy import Privacy
from memory.store.records import (
    AuditEntry,
    ContextWanted,
    ExportedUserData,
    HistoryMessage,
    IntakeItem,
    IntakeOutcome,
    Leftover,
    LookAhead,
    NewMemory,
    RecentExchange,
    ReplyContext,
    StateRule,
    StateSnapshot,
    StoredMemory,
    StoredMessage,
    TimelinePoint,
    TranscriptRow,
    UserStats,
)
from memory.store.roles import RoleLease
from memory.store.search import Memories
from memory.store.state import States
from memory.store.wakeups import ViewerWakeups

log = logging.getLogger(__name__)


class Store:
    """Async repository over the conversation database (SQLite or PostgreSQL)."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._identities = Identities(db)
        self._wakeups = ViewerWakeups(db.url if db.dialect == "postgresql" else None)
        self._conversations = Conversations(db, self._wakeups)
        self._states = States(db)
        self._privacy = Privacy(db)
        self._memories = Memories(db)
        self._intake_log = Intake(db, self._read_reply_context)
        self._link_codes = LinkCodeStore(db)
        self._role_lease = RoleLease(db)
        self._controls = OperatorControls(db)

    @classmethod
    async def open(cls, url: str, *, auto_migrate: bool = True, busy_timeout_ms: int = 10_000,
                   pool_size: int = 15, pool_timeout_s: float = 30.0) -> Store:
        """Open (and by default migrate) the database at ``url``. A SQLite file locked by
        another process for longer than ``busy_timeout_ms`` is a StoreError; on PostgreSQL
        the process keeps ``pool_size`` connections."""
        store = cls(await Database.open(url, auto_migrate=auto_migrate,
                                        busy_timeout_ms=busy_timeout_ms, pool_size=pool_size,
                                        pool_timeout_s=pool_timeout_s))
        await store._wakeups.start()
        return store

    @property
    def database(self) -> Database:
        """Units of work (``read()``/``write()``) for code that needs raw SQL, such as tests."""
        return self._db

    @property
    def url(self) -> str:
        return self._db.url

    @property
    def dialect(self) -> str:
        return self._db.dialect

    @property
    def groups_writes(self) -> bool:
        return self._db.groups_writes

    async def take_role(self, role: str, owner: str, lease_s: float,
                        overlaps: Callable[[str], bool] = lambda other: False) -> None:
        """Hold ``role`` for this process by a lease renewed with ``renew_role`` until
        ``close`` (PostgreSQL; a no-op on SQLite); ``RoleTakenError`` when a live process
        holds it or a role that ``overlaps`` it."""
        await self._role_lease.take(role, owner, lease_s, overlaps)

    async def renew_role(self) -> None:
        """``RoleLostError`` when the lease ran out and another process holds the role."""
        await self._role_lease.renew()

    async def close(self) -> None:
        try:
            await self._role_lease.release()
        except StoreError as exc:  # it expires by itself
            log.warning("store: the role's lease was not released: %s", exc)
        await self._wakeups.close()
        await self._db.close()

    async def ping(self) -> None:
        """One trivial query (readiness probes); raises ``StoreError`` if it cannot run."""
        await self._db.read_unit(lambda connection: connection.execute(sql.PING).scalar())

    # -- identities -------------------------------------------------------------------------

    async def find_user(self, platform: str, platform_user_id: str) -> int | None:
        return await self._identities.find_user(platform, platform_user_id)

    async def resolve_user(self, platform: str, platform_user_id: str, display_name: str) -> int:
        return await self._identities.resolve_user(platform, platform_user_id, display_name)

    async def link_identity(self, user_id: int, platform: str, platform_user_id: str,
                            display_name: str) -> int:
        return await self._identities.link_identity(user_id, platform, platform_user_id,
                                                   display_name)

    # -- conversations ----------------------------------------------------------------------

    async def set_status(self, message_id: int, status: str,
                         reason: str | None = None) -> None:
        await self._conversations.set_status(message_id, status, reason)

    async def set_statuses(self, changes: list[tuple[int, str, str | None]]) -> None:
        await self._conversations.set_statuses(changes)

    async def mark_send_started(self, message_id: int, at: datetime) -> None:
        """The reply to ``message_id`` starts going out to a platform that cannot tell a
        retried send from a new one: a run that stops now does not send it again."""
        await self._conversations.mark_send_started(message_id, at)

    async def expire_received(self, reason: str, before: datetime | None = None,
                              owner: str | None = None) -> int:
        return await self._conversations.expire_received(reason, before, owner)

    async def wait_for_earlier(self, user_id: int, message_id: int, since: datetime,
                               timeout_s: float) -> bool:
        return await self._conversations.wait_for_earlier(user_id, message_id, since, timeout_s)

    async def leftovers(self, since: datetime, before: datetime | None = None,
                        owner: str | None = None) -> list[Leftover]:
        return await self._conversations.leftovers(since, before, owner)

    async def adopt_orphans(self, platforms: list[str], since: datetime) -> list[Leftover]:
        """The questions processes whose lease ran out left waiting on ``platforms``
        (received at or after ``since``), now this process's role's (``RoleLease``)."""
        ids = await self._role_lease.adopt_orphans(platforms, since)
        return await self._conversations.leftovers(since, ids=ids) if ids else []

    async def intake(self, items: list[IntakeItem]) -> list[IntakeOutcome]:
        """Record inbound messages (viewers created on first sight) in one transaction;
        a platform message recorded before comes back with ``message_id`` None."""
        return await self._intake_log.record(items)

    async def look_ahead(self, item: IntakeItem, wanted: ContextWanted) -> LookAhead:
        """While ``item`` is written behind (SQLite): its viewer, whether the platform message
        is recorded already, and the reply's context."""
        return await self._intake_log.look_ahead(item, wanted)

    async def intake_final(self, items: list[IntakeItem]) -> None:
        """Record messages already final (dropped), in one statement; duplicates skipped."""
        await self._intake_log.record_final(items)

    async def get_message(self, message_id: int) -> StoredMessage | None:
        return await self._conversations.get_message(message_id)

    async def reply_to(self, message_id: int) -> StoredMessage | None:
        return await self._conversations.reply_to(message_id)

    async def transcript_rows(self, persona_id: str, *, platform: str | None = None,
                              platform_user_id: str | None = None,
                              channel_id: str | None = None,
                              since: datetime | None = None) -> list[TranscriptRow]:
        return await self._conversations.transcript_rows(
            persona_id, platform=platform, platform_user_id=platform_user_id,
            channel_id=channel_id, since=since)

    async def recent_exchanges(self, limit: int) -> list[RecentExchange]:
        return await self._conversations.recent_exchanges(limit)

    # -- state ------------------------------------------------------------------------------

    async def update_state(self, user_id: int, persona_id: str, default_mood: str,
                           rule: StateRule, message_id: int | None = None) -> StateSnapshot:
        return await self._states.update_state(user_id, persona_id, default_mood, rule,
                                              message_id)

    async def complete_exchange(self, *, user_message_id: int, reply_text: str,
                                trace: dict[str, Any], platform_message_id: str | None,
                                default_mood: str, rule: StateRule,
                                created_at: datetime, seen: StateSnapshot | None = None
                                ) -> tuple[int, StateSnapshot]:
        return await self._states.complete_exchange(
            user_message_id=user_message_id, reply_text=reply_text, trace=trace,
            platform_message_id=platform_message_id, default_mood=default_mood, rule=rule,
            created_at=created_at, seen=seen)

    async def state_timeline(self, user_id: int, persona_id: str,
                             limit: int = 500) -> list[TimelinePoint]:
        return await self._states.state_timeline(user_id, persona_id, limit)

    async def reply_context(self, user_id: int, persona_id: str, default_mood: str,
                            history_limit: int) -> tuple[StateSnapshot, list[HistoryMessage]]:
        """What a reply needs from the store, in one read transaction: the viewer's state and
        their recent finished exchanges (oldest first)."""
        wanted = ContextWanted(default_mood, history_limit)
        context = await self._db.read_unit(
            lambda connection: self._read_reply_context(connection, user_id, persona_id,
                                                        wanted))
        return context.state, context.history

    def _read_reply_context(self, connection: Connection, user_id: int, persona_id: str,
                            wanted: ContextWanted) -> ReplyContext:
        return ReplyContext(
            persona_id,
            self._states.read_state(connection, user_id, persona_id, wanted.default_mood),
            self._conversations.read_history(connection, user_id, persona_id,
                                            wanted.history_limit))

    async def stats(self, platform: str, platform_user_id: str, persona_id: str,
                    default_mood: str) -> UserStats | None:
        """The seed's ``get_conversation_stats`` shape for one user, or None if unknown."""
        user_id = await self.find_user(platform, platform_user_id)
        if user_id is None:
            return None
        state = await self._states.get_state(user_id, persona_id, default_mood)
        last = state.last_interaction_at
        return UserStats(
            user_id=user_id, platform=platform, platform_user_id=platform_user_id,
            persona_id=persona_id, conversation_count=state.conversation_count,
            current_mood=state.mood, mood_intensity=round(state.mood_intensity, 3),
            intimacy_level=round(state.intimacy, 2),
            last_interaction_at=last.isoformat() if last else None,
        )

    # -- link codes -------------------------------------------------------------------------

    async def open_link_code(self, code_hash: str, platform: str, platform_user_id: str, *,
                             now: datetime, expires_at: datetime, max_open: int) -> None:
        await self._link_codes.open_code(code_hash, platform, platform_user_id, now=now,
                                        expires_at=expires_at, max_open=max_open)

    async def take_link_code(self, code_hash: str, *, now: datetime,
                             redeeming_platform: str) -> tuple[str, str] | None:
        return await self._link_codes.take_code(code_hash, now=now,
                                               redeeming_platform=redeeming_platform)

    async def link_attempts(self, viewer: str, since: datetime) -> tuple[int, int]:
        return await self._link_codes.attempts(viewer, since)

    async def record_link_attempt(self, viewer: str, *, wrong: bool, now: datetime,
                                  forget_before: datetime) -> None:
        await self._link_codes.record_attempt(viewer, wrong=wrong, now=now,
                                             forget_before=forget_before)

    # -- the operator's controls -----------------------------------------------------------

    async def record_operator_action(self, action: str, target: str | None,
                                     detail: dict[str, Any], outcome: str,
                                     at: datetime) -> None:
        await self._controls.record(action, target, detail, outcome, at)

    async def operator_actions(self, limit: int) -> list[AuditEntry]:
        return await self._controls.recent(limit)

    async def mute_viewer(self, platform: str, platform_user_id: str, at: datetime) -> None:
        await self._controls.mute(platform, platform_user_id, at)

    async def unmute_viewer(self, platform: str, platform_user_id: str) -> None:
        await self._controls.unmute(platform, platform_user_id)

    async def muted_viewers(self) -> set[tuple[str, str]]:
        return await self._controls.muted()

    # -- privacy ----------------------------------------------------------------------------

    async def delete_user_data(self, user_id: int) -> dict[str, int]:
        return await self._privacy.delete_user_data(user_id)

    async def export_user_data(self, user_id: int) -> ExportedUserData:
        return await self._privacy.export_user_data(user_id)

    async def purge_platform_message(self, platform: str, platform_message_id: str) -> int:
        return await self._privacy.purge_platform_message(platform, platform_message_id)

    async def purge_messages(self, platform: str, channel_id: str,
                             platform_user_id: str | None = None) -> int:
        return await self._privacy.purge_messages(platform, channel_id, platform_user_id)

    # -- memories ---------------------------------------------------------------------------

    async def add_memories(self, items: list[NewMemory]) -> list[int]:
        return await self._memories.add_memories(items)

    async def add_message_memory(self, item: NewMemory, message_id: int) -> int | None:
        return await self._memories.add_message_memory(item, message_id)

    async def source_hashes(self, persona_id: str, scope: str = "persona") -> dict[str, str]:
        return await self._memories.source_hashes(persona_id, scope)

    async def delete_sources(self, persona_id: str, sources: list[str]) -> int:
        return await self._memories.delete_sources(persona_id, sources)

    async def memory_vectors(self, persona_id: str, after_id: int = 0,
                             batch: int = 50_000) -> list[tuple[int, int | None, bytes]]:
        return await self._memories.memory_vectors(persona_id, after_id, batch)

    async def memory_ids(self, persona_id: str) -> set[int]:
        return await self._memories.memory_ids(persona_id)

    async def get_memories(self, ids: list[int]) -> dict[int, StoredMemory]:
        return await self._memories.get_memories(ids)

    async def viewer_memory_search(self, terms: list[str], persona_id: str, user_id: int,
                                   limit: int) -> list[int]:
        return await self._memories.viewer_memory_search(terms, persona_id, user_id, limit)

    async def viewer_memories(self, persona_id: str, user_id: int,
                              limit: int) -> list[StoredMemory]:
        return await self._memories.viewer_memories(persona_id, user_id, limit)

    async def delete_viewer_memory(self, persona_id: str, user_id: int,
                                   memory_id: int) -> bool:
        return await self._memories.delete_viewer_memory(persona_id, user_id, memory_id)

    async def lexical_search(self, terms: list[str], persona_id: str, user_id: int | None,
                             limit: int) -> list[int]:
        return await self._memories.lexical_search(terms, persona_id, user_id, limit)
