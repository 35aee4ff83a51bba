"""Relationship state (mood, intimacy) per user and persona: atomic rule application with an
audit row for every change, the exchange's unit of work, and the stats built on it."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from memory.errors import StoreError
from memory.models import Message, RelationshipState, StateEvent
from memory.store.database import Database
from memory.store.records import (
    STATE_FIELDS,
    StateRule,
    StateSnapshot,
    TimelinePoint,
    aware,
    aware_now,
)


def snapshot(row: RelationshipState) -> StateSnapshot:
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


def _state_query(user_id: int, persona_id: str) -> Any:
    return select(RelationshipState).where(RelationshipState.user_id == user_id,
                                           RelationshipState.persona_id == persona_id)


class States:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def get_state(self, user_id: int, persona_id: str, default_mood: str) -> StateSnapshot:
        async with self._db.read() as session:
            return await self.read_state(session, user_id, persona_id, default_mood)

    @staticmethod
    async def read_state(session: AsyncSession, user_id: int, persona_id: str,
                         default_mood: str) -> StateSnapshot:
        row = await session.scalar(_state_query(user_id, persona_id))
        return snapshot(row) if row else StateSnapshot(mood=default_mood)

    async def update_state(self, user_id: int, persona_id: str, default_mood: str,
                           rule: StateRule, message_id: int | None = None) -> StateSnapshot:
        """Apply ``rule`` to the current state atomically and write an audit row."""
        async with self._db.write() as session:
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
        async with self._db.write() as session:
            question = await session.get(Message, user_message_id)
            if question is None:
                raise StoreError(f"store: message {user_message_id} does not exist")
            reply = Message(
                user_id=question.user_id, persona_id=question.persona_id, role="assistant",
                content=reply_text, status="sent", platform=question.platform,
                channel_id=question.channel_id, platform_message_id=platform_message_id,
                reply_to_id=question.id, trace=trace, created_at=created_at,
            )
            session.add(reply)
            if question.status != "purged":  # a moderator may have deleted it meanwhile
                question.status = "answered"
                question.status_reason = None
            await session.flush()
            state = await self._apply_rule(
                session, question.user_id, question.persona_id, default_mood, rule, question.id
            )
            return reply.id, state

    async def _apply_rule(self, session: AsyncSession, user_id: int, persona_id: str,
                          default_mood: str, rule: StateRule,
                          message_id: int | None) -> StateSnapshot:
        row = await self._locked_state_row(session, user_id, persona_id, default_mood)
        before = snapshot(row)
        change = rule(before)
        after = replace(change.new, version=before.version + 1)
        diff = {
            name: [_jsonable(getattr(before, name)), _jsonable(getattr(after, name))]
            for name in STATE_FIELDS
            if getattr(before, name) != getattr(after, name)
        }
        for name in STATE_FIELDS:
            setattr(row, name, getattr(after, name))
        row.version = after.version
        row.updated_at = datetime.now(UTC)
        session.add(StateEvent(
            user_id=user_id, persona_id=persona_id, message_id=message_id,
            created_at=after.last_interaction_at or datetime.now(UTC),
            cause=change.cause[:200],
            changes={
                "diff": diff,
                "after": {"intimacy": after.intimacy, "mood": after.mood,
                          "mood_intensity": after.mood_intensity},
                **change.details,
            },
        ))
        return after

    async def _locked_state_row(self, session: AsyncSession, user_id: int, persona_id: str,
                                default_mood: str) -> RelationshipState:
        query = _state_query(user_id, persona_id)
        if self._db.dialect == "postgresql":
            query = query.with_for_update()
        row: RelationshipState | None = await session.scalar(query)
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
