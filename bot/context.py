"""Context for one reply: the viewer's stored state, recent history within a token budget,
and retrieved memories, handed to the engine, which assembles the prompt."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bot.history_window import HistoryWindows
from bot.state_rules import to_persona_state
from engine.client import EngineClient, PromptInputs
from engine.types import GenerationRequest
from memory.rag import MemoryRetriever, RetrievedChunk
from memory.store import ContextWanted, HistoryMessage, ReplyContext, StateSnapshot, Store


@dataclass(frozen=True, slots=True)
class PreparedPrompt:
    """A request ready for the engine, and what went into it (for the trace)."""

    request: GenerationRequest
    history: list[HistoryMessage]
    retrieved: list[RetrievedChunk]
    state: StateSnapshot  # as read for this reply: the state change applies to it if unchanged

    def trace(self) -> dict[str, Any]:
        return {"history_message_ids": [item.id for item in self.history],
                "retrieved": [chunk.trace() for chunk in self.retrieved]}


class ContextBuilder:
    def __init__(self, engine: EngineClient, store: Store, retriever: MemoryRetriever | None,
                 *, history_messages: int, history_token_budget: int,
                 remember_min_chars: int) -> None:
        self._engine = engine
        self._store = store
        self._retriever = retriever
        self._history_messages = history_messages
        self._windows = HistoryWindows(history_token_budget, engine.count_tokens)
        self._remember_min_chars = remember_min_chars

    def wanted(self) -> ContextWanted:
        """What to read of a viewer's context before the reply (``Store.look_ahead``)."""
        return ContextWanted(self._engine.persona.moods.baseline, self._history_messages)

    async def prepare(self, user_id: int | None, text: str, read: ReplyContext | None = None,
                      *, request_id: str | None = None) -> PreparedPrompt:
        """The request for this reply (named ``request_id``, where given); ``read``: the
        context read before (read again if the persona changed since); ``user_id`` None: a
        viewer not stored yet."""
        persona = self._engine.persona
        if read is not None and read.persona_id == persona.id:
            state, history = read.state, read.history
        elif user_id is None:
            state, history = StateSnapshot(mood=persona.moods.baseline), []
        else:
            state, history = await self._store.reply_context(
                user_id, persona.id, persona.moods.baseline, self._history_messages)
        history = self._windows.window(user_id, history)
        retrieved = _not_in(history, await self._retrieve(text, user_id))
        knowledge = "\n".join(f"- {c.text}" for c in retrieved if c.scope == "persona")
        request = self._engine.build_request(PromptInputs(
            text=text,
            history=[(item.role, item.content) for item in history],
            state=to_persona_state(state),
            context=knowledge or None,
            user_notes=[c.text for c in retrieved if c.scope == "user"],
        ), request_id=request_id)
        return PreparedPrompt(request, history, retrieved, state)

    async def _retrieve(self, text: str, user_id: int | None) -> list[RetrievedChunk]:
        if self._retriever is None:
            return []
        return await self._retriever.search(text, user_id=user_id)

    async def remember(self, user_id: int, message_id: int, text: str) -> None:
        """Keep a viewer's longer messages as long-term memories (retrievable later)."""
        minimum = self._remember_min_chars
        if self._retriever is not None and minimum and len(text) >= minimum:
            await self._retriever.remember_message(user_id, message_id, text)


def _not_in(history: list[HistoryMessage], retrieved: list[RetrievedChunk]
            ) -> list[RetrievedChunk]:
    """``retrieved`` less the memories of messages the prompt's history holds already: the
    prompt would say them twice, and each is prefilled again with every message."""
    shown = {f"message:{item.id}" for item in history if item.role == "user"}
    return [chunk for chunk in retrieved if chunk.source not in shown]
