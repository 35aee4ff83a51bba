"""What the store hands out: frozen records, never live ORM rows."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypedDict


def aware(moment: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; everything we store is UTC."""
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=UTC)


def aware_now(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class HistoryMessage:
    id: int
    role: str
    content: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class StoredMessage:
    id: int
    user_id: int
    persona_id: str
    role: str
    content: str
    status: str
    platform: str
    channel_id: str | None
    platform_message_id: str | None
    reply_to_id: int | None
    trace: dict[str, Any] | None
    created_at: datetime
    status_reason: str | None = None


@dataclass(frozen=True, slots=True)
class StoredMemory:
    id: int
    scope: str  # persona | user
    persona_id: str
    user_id: int | None
    text: str
    source: str


@dataclass(frozen=True, slots=True)
class IntakeItem:
    """An inbound message to record: ``received`` (to be answered) or already final
    (``dropped`` with its reason)."""

    platform: str
    platform_user_id: str
    display_name: str
    persona_id: str
    channel_id: str | None
    platform_message_id: str | None
    text: str
    created_at: datetime
    status: str = "received"
    reason: str | None = None
    owner: str | None = None  # the runtime role taking it (see memory.store.roles)
    # On PostgreSQL, refuse (``dropped(rate_limited)``) a ``received`` message when the viewer
    # already has this many admitted messages on this platform in the last minute, in any
    # process: the per-viewer limit holds across processes (one viewer on two Discord shards).
    shared_per_minute: int | None = None


@dataclass(frozen=True, slots=True)
class ContextWanted:
    """How to read a reply's context: the persona's baseline mood, history length."""

    default_mood: str
    history_limit: int


@dataclass(frozen=True, slots=True)
class ReplyContext:
    """What a reply needs from the store: the viewer's state and recent history."""

    persona_id: str
    state: StateSnapshot
    history: list[HistoryMessage]


@dataclass(frozen=True, slots=True)
class LookAhead:
    """What the store already holds for a message not yet recorded: its viewer's id (None for
    a viewer never seen), whether the platform message is in the store already (a
    redelivery, or the intake committed meanwhile), and the reply's context."""

    user_id: int | None
    recorded: bool
    context: ReplyContext


@dataclass(frozen=True, slots=True)
class IntakeOutcome:
    """The viewer's user id and the stored message's id; ``message_id`` is None when the
    platform message was already recorded (a redelivery)."""

    user_id: int
    message_id: int | None
    refused: str | None = None  # why the database refused it (recorded dropped): rate_limited

    @property
    def duplicate(self) -> bool:
        return self.message_id is None


@dataclass(frozen=True, slots=True)
class Leftover:
    """A message an earlier run recorded ``received`` and never finished (it crashed or was
    killed), with what it takes to answer it now."""

    message_id: int
    user_id: int
    platform: str
    platform_user_id: str
    display_name: str
    channel_id: str | None
    platform_message_id: str | None
    text: str
    created_at: datetime
    send_started_at: datetime | None = None  # its reply was going out when the run stopped


@dataclass(frozen=True, slots=True)
class NewMemory:
    scope: str  # persona | user
    persona_id: str
    text: str
    source: str
    user_id: int | None = None
    source_hash: str | None = None
    embedding: bytes | None = None


@dataclass(frozen=True, slots=True)
class StateSnapshot:
    mood: str
    mood_intensity: float = 0.0
    intimacy: float = 0.0
    intimacy_gained_today: float = 0.0
    conversation_count: int = 0
    last_interaction_at: datetime | None = None
    version: int = 0


# The fields a state rule may change (``version`` is the store's own).
STATE_FIELDS = (
    "mood",
    "mood_intensity",
    "intimacy",
    "intimacy_gained_today",
    "conversation_count",
    "last_interaction_at",
)


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


class UserStats(TypedDict):
    """The seed's ``get_conversation_stats`` keys for one user, plus who they are."""

    user_id: int
    platform: str
    platform_user_id: str
    persona_id: str
    conversation_count: int
    current_mood: str
    mood_intensity: float
    intimacy_level: float
    last_interaction_at: str | None


class TranscriptRow(TypedDict):
    platform: str
    user: str
    name: str
    channel: str | None
    text: str
    at: str
    reply: str | None


class RecentExchange(TypedDict):
    """A viewer's message as the dashboard lists it, newest first, with the reply if any."""

    at: str
    platform: str
    channel_id: str | None
    platform_user_id: str
    display_name: str
    text: str
    status: str
    reason: str | None
    reply: str
    reply_id: int | None
    latency_ms: float | None  # from admission to the reply sent, when answered


ExportedUserData = dict[str, list[dict[str, Any]]]


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One control an operator used (``Store.operator_actions``)."""

    id: int
    at: datetime
    action: str
    target: str | None
    detail: dict[str, Any]
    outcome: str
