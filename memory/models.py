"""ORM tables. Every table that holds per-user data has a ``user_id`` column (or is reached
through one), which is what ``delete_user_data`` / ``export_user_data`` rely on."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Deterministic constraint names, so SQLite batch migrations and PostgreSQL agree.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


INTAKE_WHERE = "role = 'user' AND platform_message_id IS NOT NULL"
RECEIVED_WHERE = "status = 'received'"


def utcnow() -> datetime:
    return datetime.now(UTC)


# SQLite reuses the largest id after a delete unless told not to; a deleted viewer's id must
# never become a new viewer's (migration 0006).
MONOTONIC_IDS: dict[str, Any] = {"sqlite_autoincrement": True}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        dict[str, Any]: JSON,
        datetime: DateTime(timezone=True),
    }


class User(Base):
    """A person. Several platform identities may point at one user (linked accounts)."""

    __tablename__ = "users"
    __table_args__ = MONOTONIC_IDS

    id: Mapped[int] = mapped_column(primary_key=True)
    display_name: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Identity(Base):
    __tablename__ = "identities"
    __table_args__ = (UniqueConstraint("platform", "platform_user_id"), MONOTONIC_IDS)

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    platform: Mapped[str] = mapped_column(String(32))
    platform_user_id: Mapped[str] = mapped_column(String(128))
    display_name: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class RelationshipState(Base):
    """Mood and intimacy of one persona towards one user. ``version`` counts every change."""

    __tablename__ = "relationship_states"
    __table_args__ = (UniqueConstraint("user_id", "persona_id"), MONOTONIC_IDS)

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    persona_id: Mapped[str] = mapped_column(String(64))
    mood: Mapped[str] = mapped_column(String(32))
    mood_intensity: Mapped[float] = mapped_column(Float, default=0.0)
    intimacy: Mapped[float] = mapped_column(Float, default=0.0)
    # Intimacy gained inside the current UTC day, for the persona's daily cap.
    intimacy_gained_today: Mapped[float] = mapped_column(Float, default=0.0)
    conversation_count: Mapped[int] = mapped_column(Integer, default=0)
    last_interaction_at: Mapped[datetime | None] = mapped_column(default=None)
    version: Mapped[int] = mapped_column(Integer, default=0)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class StateEvent(Base):
    """Audit trail: every state change with its cause and before/after values."""

    __tablename__ = "state_events"
    __table_args__ = MONOTONIC_IDS

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    persona_id: Mapped[str] = mapped_column(String(64))
    message_id: Mapped[int | None] = mapped_column(
        ForeignKey("messages.id", ondelete="SET NULL"), default=None
    )
    cause: Mapped[str] = mapped_column(String(200))
    changes: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Message(Base):
    """A chat message in a user's conversation with a persona (``role`` user or assistant)."""

    __tablename__ = "messages"
    __table_args__ = (
        Index("ix_messages_user_persona_id", "user_id", "persona_id", "id"),
        Index("ix_messages_platform_message", "platform", "platform_message_id"),
        # A viewer's messages of the last minute (the shared rate limit): found by time, not
        # by scanning the viewer's whole history.
        Index("ix_messages_user_created", "user_id", "created_at"),
        # Idempotent intake: a redelivered platform message is the same row, in every process.
        Index("uq_messages_intake", "platform", "channel_id", "platform_message_id",
              unique=True, sqlite_where=text(INTAKE_WHERE), postgresql_where=text(INTAKE_WHERE)),
        Index("ix_messages_received", "id", sqlite_where=text(RECEIVED_WHERE),
              postgresql_where=text(RECEIVED_WHERE)),
        MONOTONIC_IDS,
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    persona_id: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(16))
    content: Mapped[str] = mapped_column(Text)
    # received | answered | dropped | failed | expired | purged (user messages); sent (assistant)
    status: Mapped[str] = mapped_column(String(16))
    # Why a message ended as it did: rate_limited, queue_full, backend, store, send, shutdown, ...
    status_reason: Mapped[str | None] = mapped_column(String(40), default=None)
    platform: Mapped[str] = mapped_column(String(32))
    channel_id: Mapped[str | None] = mapped_column(String(128), default=None)
    platform_message_id: Mapped[str | None] = mapped_column(String(128), default=None)
    reply_to_id: Mapped[int | None] = mapped_column(
        ForeignKey("messages.id", ondelete="SET NULL"), default=None
    )
    trace: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # The role of the runtime that took an inbound message (memory.store.roles): after a crash,
    # the process that takes that role again recovers it, and no other process does.
    owner: Mapped[str | None] = mapped_column(String(120), default=None)
    # When the reply to this question started going out, where the platform cannot tell a
    # retried send from a new one (Twitch): recovery does not send it again.
    send_started_at: Mapped[datetime | None] = mapped_column(default=None)


class Memory(Base):
    """Retrievable text: persona knowledge (``scope`` persona) or a user's long-term memory."""

    __tablename__ = "memories"
    __table_args__ = MONOTONIC_IDS

    id: Mapped[int] = mapped_column(primary_key=True)
    scope: Mapped[str] = mapped_column(String(16))
    persona_id: Mapped[str] = mapped_column(String(64), index=True)
    user_id: Mapped[int | None] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), default=None, index=True
    )
    text: Mapped[str] = mapped_column(Text)
    source: Mapped[str] = mapped_column(String(500))
    source_hash: Mapped[str | None] = mapped_column(String(64), default=None)
    embedding: Mapped[bytes | None] = mapped_column(LargeBinary, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class LinkCode(Base):
    """An open account-link code, as a hash (a copy of the database reveals no live code)."""

    __tablename__ = "link_codes"
    __table_args__ = (Index("ix_link_codes_platform_user", "platform", "platform_user_id"),)

    code_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    platform: Mapped[str] = mapped_column(String(32))
    platform_user_id: Mapped[str] = mapped_column(String(128))
    expires_at: Mapped[datetime] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class LinkAttempt(Base):
    """One try at redeeming a link code, for the limits every process shares: per viewer
    ("platform:id"), and everyone's wrong guesses together."""

    __tablename__ = "link_attempts"
    __table_args__ = (Index("ix_link_attempts_viewer_at", "viewer", "at"),
                      Index("ix_link_attempts_at", "at"), MONOTONIC_IDS)

    id: Mapped[int] = mapped_column(primary_key=True)
    viewer: Mapped[str] = mapped_column(String(200))
    wrong: Mapped[bool] = mapped_column(Boolean, default=False)
    at: Mapped[datetime] = mapped_column()


# Tables scanned by delete/export: (table, column that names the user).
USER_DATA_TABLES: tuple[tuple[type[Base], str], ...] = (
    (StateEvent, "user_id"),
    (Message, "user_id"),
    (Memory, "user_id"),
    (RelationshipState, "user_id"),
    (Identity, "user_id"),
    (User, "id"),
)


class OperatorAction(Base):
    """One control an operator used (the dashboard's pause, say, state edit, mute, forget,
    reload...): when, what, on whom, with what, and how it ended. Kept for the audit."""

    __tablename__ = "operator_actions"
    __table_args__ = (Index("ix_operator_actions_at", "at"), MONOTONIC_IDS)

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column()
    action: Mapped[str] = mapped_column(String(40))
    target: Mapped[str | None] = mapped_column(String(200), default=None)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON)
    outcome: Mapped[str] = mapped_column(String(200))


class MutedViewer(Base):
    """A viewer the operator muted: their messages are recorded and dropped (``muted``)."""

    __tablename__ = "muted_viewers"
    __table_args__ = (UniqueConstraint("platform", "platform_user_id"), MONOTONIC_IDS)

    id: Mapped[int] = mapped_column(primary_key=True)
    platform: Mapped[str] = mapped_column(String(32))
    platform_user_id: Mapped[str] = mapped_column(String(128))
    at: Mapped[datetime] = mapped_column()


class RoleLease(Base):
    """Which process runs a role (a platform, a set of Discord shards) on a shared PostgreSQL,
    until when: the owner renews it; one that stops renewing loses it at ``expires_at``."""

    __tablename__ = "role_leases"

    role: Mapped[str] = mapped_column(String(200), primary_key=True)
    owner: Mapped[str] = mapped_column(String(200))
    expires_at: Mapped[datetime] = mapped_column()
