"""What tests read or write in the store beyond what the runtime needs: over the store's own
database, through its parts (the runtime's one way in, ``Store``, does not offer these)."""

from __future__ import annotations

from typing import Any

from memory.store import HistoryMessage, StateSnapshot, Store, StoredMessage
from memory.store.conversations import Conversations
from memory.store.identities import Identities
from memory.store.state import States


async def messages_for(store: Store, user_id: int,
                       persona_id: str | None = None) -> list[StoredMessage]:
    return await Conversations(store.database).messages_for(user_id, persona_id)


async def recent_history(store: Store, user_id: int, persona_id: str,
                         limit: int) -> list[HistoryMessage]:
    return await Conversations(store.database).recent_history(user_id, persona_id, limit)


async def record_incoming(store: Store, **fields: Any) -> int:
    return await Conversations(store.database).record_incoming(**fields)


async def record_incoming_many(store: Store, items: list[dict[str, Any]]) -> list[int]:
    return await Conversations(store.database).record_incoming_many(items)


async def get_state(store: Store, user_id: int, persona_id: str,
                    default_mood: str) -> StateSnapshot:
    return await States(store.database).get_state(user_id, persona_id, default_mood)


async def unlink_identity(store: Store, platform: str, platform_user_id: str) -> int | None:
    return await Identities(store.database).unlink_identity(platform, platform_user_id)
