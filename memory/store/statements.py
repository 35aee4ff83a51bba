"""Statements of the per-message hot path, built once with bound parameters.

Building a SQLAlchemy statement and its cache key on every call cost more than running it
(~0.1-0.2 ms each, several per message); these are Core statements on the tables, so no
ORM unit-of-work bookkeeping runs either. Values go in as parameters at execution.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from sqlalchemy import Insert, Table, bindparam, func, or_, select, text
from sqlalchemy.dialects import postgresql, sqlite

from memory.models import INTAKE_WHERE, Identity, Message, RelationshipState, StateEvent, User

PING = text("SELECT 1")
messages: Table = Message.__table__  # type: ignore[assignment]
states: Table = RelationshipState.__table__  # type: ignore[assignment]
users: Table = User.__table__  # type: ignore[assignment]
identities: Table = Identity.__table__  # type: ignore[assignment]
state_events: Table = StateEvent.__table__  # type: ignore[assignment]

STATE_COLUMNS = (states.c.id, states.c.mood, states.c.mood_intensity, states.c.intimacy,
                 states.c.intimacy_gained_today, states.c.conversation_count,
                 states.c.last_interaction_at, states.c.version)
QUESTION_COLUMNS = (messages.c.user_id, messages.c.persona_id, messages.c.platform,
                    messages.c.channel_id)

# Parameters: user_id, persona_id.
STATE = select(*STATE_COLUMNS).where(states.c.user_id == bindparam("user_id"),
                                     states.c.persona_id == bindparam("persona_id"))
STATE_FOR_UPDATE = STATE.with_for_update()
# Parameters: row_id and the columns to set.
UPDATE_STATE = states.update().where(states.c.id == bindparam("row_id"))
# Parameters: key_user_id, key_persona_id, seen_version and the columns to set. Updates only a
# row still at the version the caller read: no re-read when nothing changed in between.
UPDATE_STATE_IF_UNCHANGED = states.update().where(
    states.c.user_id == bindparam("key_user_id"),
    states.c.persona_id == bindparam("key_persona_id"),
    states.c.version == bindparam("seen_version"))
INSERT_STATE_EVENT = state_events.insert()

# Parameters: question_id. Marks a question answered unless a moderator purged it meanwhile.
ANSWER_QUESTION = (messages.update()
                   .where(messages.c.id == bindparam("question_id"),
                          messages.c.status.not_in(("purged", "answered")))
                   .values(status="answered", status_reason=None)
                   .returning(*QUESTION_COLUMNS))
QUESTION = select(*QUESTION_COLUMNS, messages.c.status).where(
    messages.c.id == bindparam("question_id"))
# Parameters: question_id. A question's reply, where one is stored.
REPLY_OF = (select(messages.c.id).where(messages.c.reply_to_id == bindparam("question_id"),
                                        messages.c.role == "assistant").limit(1))
INSERT_MESSAGE = messages.insert().returning(messages.c.id)

# Parameters: user_id, persona_id, limit. Newest first.
HISTORY = (select(messages.c.id, messages.c.role, messages.c.content, messages.c.created_at)
           .where(messages.c.user_id == bindparam("user_id"),
                  messages.c.persona_id == bindparam("persona_id"),
                  # Not ``IN``: an IN list is re-rendered into the SQL on every execution.
                  or_(messages.c.status == "answered", messages.c.status == "sent"))
           .order_by(messages.c.id.desc())
           .limit(bindparam("limit")))

# Parameters: user_id, message_id, since. A viewer's earlier question still waiting for its
# answer (in another process: scale-out keeps each viewer's order across processes).
EARLIER_PENDING = (select(messages.c.id)
                   .where(messages.c.user_id == bindparam("user_id"),
                          messages.c.role == "user", messages.c.status == "received",
                          messages.c.id < bindparam("message_id"),
                          messages.c.created_at >= bindparam("since"))
                   .limit(1))

# Parameters: user_id. Serialises one viewer's intake across processes (PostgreSQL).
# FOR NO KEY UPDATE: it serialises intakes but leaves alone the key-share locks that inserting
# rows pointing at the viewer takes (FOR UPDATE would wait on them, and they on it: deadlocks).
LOCK_USER = (select(users.c.id).where(users.c.id == bindparam("user_id"))
             .with_for_update(key_share=True))
# Parameters: user_id, platform, since. The viewer's admitted messages on a platform lately.
RECENT_ADMITTED = (select(func.count()).select_from(messages)
                   .where(messages.c.user_id == bindparam("user_id"),
                          messages.c.platform == bindparam("platform"),
                          messages.c.role == "user", messages.c.status != "dropped",
                          messages.c.created_at >= bindparam("since")))

# Parameters: platform, platform_user_ids (a list). One platform at a time: SQLite answers
# a row-value ``(platform, platform_user_id) IN (...)`` by scanning every identity (0.6 ms
# for 64 keys among 3,000 viewers, growing with the audience); this form searches the
# unique index.
KNOWN_IDENTITIES = (select(identities.c.platform, identities.c.platform_user_id,
                           identities.c.user_id)
                    .where(identities.c.platform == bindparam("platform"),
                           identities.c.platform_user_id.in_(
                               bindparam("platform_user_ids", expanding=True))))
# Parameters: platform, platform_user_id. The common batch of one, without the IN list.
KNOWN_IDENTITY = (select(identities.c.platform, identities.c.platform_user_id,
                         identities.c.user_id)
                  .where(identities.c.platform == bindparam("platform"),
                         identities.c.platform_user_id == bindparam("platform_user_id")))
# Parameters: platform, platform_user_id, channel_id, platform_message_id. A viewer's id and
# whether the platform message was recorded before (the intake's unique key, its partial
# index's condition spelled out), in one statement.
VIEWER_AND_KEY = select(
    identities.c.user_id,
    select(messages.c.id).where(
        messages.c.platform == bindparam("platform"),
        messages.c.channel_id == bindparam("channel_id"),
        messages.c.platform_message_id == bindparam("platform_message_id"),
        text(INTAKE_WHERE)).exists().label("recorded"),
).where(identities.c.platform == bindparam("platform"),
        identities.c.platform_user_id == bindparam("platform_user_id"))
INSERT_USERS = users.insert().returning(users.c.id, sort_by_parameter_order=True)


def _insert(dialect: str, table: Any) -> postgresql.Insert | sqlite.Insert:
    """An INSERT that knows ``ON CONFLICT`` (both dialects spell it the same way)."""
    return postgresql.insert(table) if dialect == "postgresql" else sqlite.insert(table)


@cache
def create_state(dialect: str) -> Insert:
    """A new state row, returned; nothing when another process created it first."""
    return _insert(dialect, states).on_conflict_do_nothing(
        index_elements=["user_id", "persona_id"]).returning(*STATE_COLUMNS)


@cache
def claim_identities(dialect: str) -> Insert:
    """New identities; those another process claimed first are skipped (not returned)."""
    return (_insert(dialect, identities)
            .on_conflict_do_nothing(index_elements=["platform", "platform_user_id"])
            .returning(identities.c.platform, identities.c.platform_user_id,
                       identities.c.user_id))


@cache
def intake_message(dialect: str, keyed: bool) -> Insert:
    """An inbound message; with a platform message id (``keyed``), a redelivery inserts
    nothing and returns no id."""
    statement = _insert(dialect, messages)
    if keyed:
        statement = statement.on_conflict_do_nothing(
            index_elements=["platform", "channel_id", "platform_message_id"],
            index_where=text(INTAKE_WHERE))
    return statement.returning(messages.c.id)


@cache
def intake_final(dialect: str) -> Insert:
    """Already-final inbound messages, many at once, redeliveries skipped."""
    return _insert(dialect, messages).on_conflict_do_nothing(
        index_elements=["platform", "channel_id", "platform_message_id"],
        index_where=text(INTAKE_WHERE))
