"""The conversation store (SQLAlchemy 2 async; SQLite or PostgreSQL).

``Store`` is the facade the runtime uses; its parts live in this package by seam:
``database`` (opening, tuning, units of work), ``identities``, ``conversations``, ``state``,
``privacy`` and ``search``. Everything handed out is a frozen record (``records``).
"""

from memory.store.database import sqlite_url
from memory.store.facade import Store
from memory.store.intake import IntakeWriter
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
    StateChange,
    StateRule,
    StateSnapshot,
    StoredMemory,
    StoredMessage,
    TimelinePoint,
    TranscriptRow,
    UserStats,
)

__all__ = [
    "AuditEntry",
    "ContextWanted",
    "ExportedUserData",
    "HistoryMessage",
    "IntakeItem",
    "IntakeOutcome",
    "IntakeWriter",
    "Leftover",
    "LookAhead",
    "NewMemory",
    "RecentExchange",
    "ReplyContext",
    "StateChange",
    "StateRule",
    "StateSnapshot",
    "Store",
    "StoredMemory",
    "StoredMessage",
    "TimelinePoint",
    "TranscriptRow",
    "UserStats",
    "sqlite_url",
]
