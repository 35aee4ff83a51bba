"""Relationship state (mood, intimacy) per user and persona: atomic rule application with an
audit row for every change, the exchange's unit of work, and the stats built on it."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, select

from memory.errors import StoreError
from memory.models import StateEvent
from memory.store import statements as sql
from memory.store.database import Database
from memory.store.records import (
    STATE_FIELDS,
    StateChange,
    StateRule,
    StateSnapshot,
    TimelinePoint,
    aware,
    aware_now,
)


def snapshot(row: Any) -> StateSnapshot:
    return StateSnapshot(
        mood=row.mood,
        mood_intensity=row.mood_intensity,
        intimacy=row.intimacy,
        intimacy_gained_today=row.intimacy_gained_today,
        conversation_count=row.conversation_count,
        last_interaction_at=aware(row.last_interaction_at),
        version=row.version,
    )


def _jsonable(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


class States:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def get_state(self, user_id: int, persona_id: str, default_mood: str) -> StateSnapshot:
        return await self._db.read_unit(
            lambda connection: self.read_state(connection, user_id, persona_id, default_mood))

    @staticmethod
    def read_state(connection: Connection, user_id: int, persona_id: str,
                   default_mood: str) -> StateSnapshot:
        row = connection.execute(sql.STATE, {"user_id": user_id, "persona_id": persona_id}).first()
        return snapshot(row) if row else StateSnapshot(mood=default_mood)

    async def update_state(self, user_id: int, persona_id: str, default_mood: str,
                           rule: StateRule, message_id: int | None = None) -> StateSnapshot:
        """Apply ``rule`` to the current state atomically and write an audit row."""
        return await self._db.write_unit(lambda connection: self._apply_rule(
            connection, user_id, persona_id, default_mood, rule, message_id))

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
        seen: StateSnapshot | None = None,
    ) -> tuple[int, StateSnapshot]:
        """One unit of work: persist the reply, apply the state rule, mark the question
        answered. Either all of it lands or none. ``seen`` is the state the caller read for
        this reply: if the row is still at its version, the rule applies to it without
        reading the row again."""

        def work(connection: Connection) -> tuple[int, StateSnapshot]:
            asked = {"question_id": user_message_id}
            question = connection.execute(sql.ANSWER_QUESTION, asked).first()
            purged = False  # a moderator deleted it while it was answered
            if question is None:
                question = connection.execute(sql.QUESTION, asked).first()
                if question is None:
                    raise StoreError(f"store: message {user_message_id} does not exist")
                landed = (connection.execute(sql.REPLY_OF, asked).scalar()
                          if question.status == "answered" else None)
                if landed is not None:  # written before, its commit not known: not twice
                    return landed, self._locked_state(connection, question.user_id,
                                                      question.persona_id, default_mood)[1]
                purged = question.status == "purged"
            # A reply to a purged message may quote it: kept as a row, not as words.
            reply_id: int = connection.execute(sql.INSERT_MESSAGE, {
                "user_id": question.user_id, "persona_id": question.persona_id,
                "role": "assistant", "content": "" if purged else reply_text,
                "status": "purged" if purged else "sent",
                "status_reason": None, "platform": question.platform,
                "channel_id": question.channel_id, "platform_message_id": platform_message_id,
                "reply_to_id": user_message_id, "trace": trace, "created_at": created_at,
            }).scalar_one()
            state = self._apply_rule(connection, question.user_id, question.persona_id,
                                     default_mood, rule, user_message_id, seen)
            return reply_id, state

        return await self._db.write_unit(work)

    def _apply_rule(self, connection: Connection, user_id: int, persona_id: str,
                    default_mood: str, rule: StateRule, message_id: int | None,
                    seen: StateSnapshot | None = None) -> StateSnapshot:
        now = datetime.now(UTC)
        applied = self._apply_to_seen(connection, user_id, persona_id, rule, seen, now)
        if applied is None:
            row_id, before = self._locked_state(connection, user_id, persona_id, default_mood)
            change = rule(before)
            after = replace(change.new, version=before.version + 1)
            connection.execute(sql.UPDATE_STATE, {
                "row_id": row_id, **{name: getattr(after, name) for name in STATE_FIELDS},
                "version": after.version, "updated_at": now})
        else:
            before, change, after = applied
        diff = {
            name: [_jsonable(getattr(before, name)), _jsonable(getattr(after, name))]
            for name in STATE_FIELDS
            if getattr(before, name) != getattr(after, name)
        }
        connection.execute(sql.INSERT_STATE_EVENT, {
            "user_id": user_id, "persona_id": persona_id, "message_id": message_id,
            "created_at": after.last_interaction_at or now, "cause": change.cause[:200],
            "changes": {
                "diff": diff,
                "after": {"intimacy": after.intimacy, "mood": after.mood,
                          "mood_intensity": after.mood_intensity},
                **change.details,
            },
        })
        return after

    @staticmethod
    def _apply_to_seen(connection: Connection, user_id: int, persona_id: str, rule: StateRule,
                       seen: StateSnapshot | None, now: datetime
                       ) -> tuple[StateSnapshot, StateChange, StateSnapshot] | None:
        """Apply ``rule`` to the state the caller read, if the stored row is still at that
        version (one conditional UPDATE; on PostgreSQL it also waits for and then re-checks
        a concurrent writer's row). None when there is no row yet or it has moved on."""
        if seen is None or seen.version == 0:  # version 0: no row stored yet
            return None
        change = rule(seen)
        after = replace(change.new, version=seen.version + 1)
        updated = connection.execute(sql.UPDATE_STATE_IF_UNCHANGED, {
            "key_user_id": user_id, "key_persona_id": persona_id,
            "seen_version": seen.version, "version": after.version, "updated_at": now,
            **{name: getattr(after, name) for name in STATE_FIELDS}}).rowcount
        return (seen, change, after) if updated == 1 else None

    def _locked_state(self, connection: Connection, user_id: int, persona_id: str,
                      default_mood: str) -> tuple[int, StateSnapshot]:
        """The state row's id and values, locked for this transaction (``FOR UPDATE`` on
        PostgreSQL; SQLite's write transaction holds the database), created if new."""
        query = sql.STATE_FOR_UPDATE if self._db.dialect == "postgresql" else sql.STATE
        key = {"user_id": user_id, "persona_id": persona_id}
        row = connection.execute(query, key).first()
        if row is None:
            # Losing a creation race to another process inserts nothing: read theirs.
            row = connection.execute(sql.create_state(self._db.dialect), {
                **key, "mood": default_mood, "mood_intensity": 0.0, "intimacy": 0.0,
                "intimacy_gained_today": 0.0, "conversation_count": 0,
                "last_interaction_at": None, "version": 0, "updated_at": datetime.now(UTC)},
            ).first() or connection.execute(query, key).one()
        return row.id, snapshot(row)

    async def state_timeline(self, user_id: int, persona_id: str,
                             limit: int = 500) -> list[TimelinePoint]:
        """The user's intimacy and mood after each recorded change, oldest first."""
        async with self._db.read() as session:
            rows = await session.execute(
                select(StateEvent.created_at, StateEvent.changes)
                .where(StateEvent.user_id == user_id, StateEvent.persona_id == persona_id)
                .order_by(StateEvent.id.desc())
                .limit(limit)
            )
            points = [
                TimelinePoint(aware_now(r.created_at), float(r.changes["after"]["intimacy"]),
                              str(r.changes["after"]["mood"]))
                for r in rows
                if isinstance(r.changes, dict) and "after" in r.changes
            ]
        points.reverse()
        return points
