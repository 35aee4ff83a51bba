"""``LLMManager``: the seed's facade, same names and return keys, over the runtime's
``Engine`` (``engine/core.py``). What the seed kept in process stays here: per-user mood and
intimacy, a RAG object found by its method, a synchronous ``cleanup``, ``create_llm_manager``.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime
from typing import Any

from engine.client import PromptInputs
from engine.config import EngineConfig
from engine.core import Engine
from engine.errors import BackendUnavailableError, EngineConfigError, EngineError
from engine.persona import Persona, PersonaState, advance
from engine.response_generator import seed_history
from engine.types import GenerationRequest

log = logging.getLogger(__name__)

DEFAULT_USER = "default"


class LLMManager(Engine):
    """The seed's ``LLMManager``: the engine, plus the seed's API kept in this process
    (per-user mood and intimacy, a RAG object found by its method, a synchronous cleanup)."""

    def __init__(self, config: Mapping[str, Any] | EngineConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self._rag: Any = None
        self._states: dict[str, PersonaState] = {}
        self._closing: asyncio.Task[None] | None = None

    async def initialize(self) -> bool:
        """Seed API: start everything; False (resources released) on failure."""
        try:
            await self.start()
        except (EngineError, OSError, RuntimeError, ValueError) as exc:
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.error("LLM manager failed to initialise: %s", self.last_error)
            await self.aclose()
            return False
        return True

    def cleanup(self) -> None:
        """Seed API (synchronous). Inside a running loop prefer ``await aclose()``."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            asyncio.run(self.aclose())
            return
        self._closing = loop.create_task(self.aclose())

    async def generate_response(
        self,
        prompt: str,
        context: str | None = None,
        conversation_history: list[tuple[str, str]] | None = None,
        stream: bool = False,
        rag_enabled: bool = True,
        *,
        user_id: str = DEFAULT_USER,
    ) -> Any:
        """Seed API. Returns the filtered reply; with ``stream=True`` an async iterator of
        raw text chunks instead. Mood and intimacy are tracked per ``user_id``."""
        persona = self.persona
        state = self._states.get(user_id, PersonaState(mood=persona.moods.baseline))
        if rag_enabled and self._rag is not None and context is None:
            context = await self._retrieve(prompt, user_id)
        request = self.build_request(PromptInputs(
            prompt, seed_history(conversation_history), state, context))
        self._states[user_id] = advance(state, prompt, datetime.now(UTC), persona).state
        if stream:
            return self._stream(request)
        return (await self.final_reply(request)).text

    async def _stream(self, request: GenerationRequest) -> AsyncIterator[str]:
        async for chunk in self.backend.generate(request):
            yield chunk

    async def _retrieve(self, query: str, user_id: str) -> str | None:
        search = getattr(self._rag, "search", None) or getattr(self._rag, "retrieve", None)
        if search is None:
            return None
        results = search(query)
        if inspect.isawaitable(results):
            results = await results
        texts = [getattr(item, "text", item) for item in results or ()]
        return "\n".join(str(t) for t in texts) or None

    # -- seed API: status and diagnostics ---------------------------------------------------

    def set_rag_system_reference(self, rag_system: Any) -> None:
        """Any object with ``search(query)`` (sync or async) returning items with ``.text``."""
        self._rag = rag_system

    def get_embeddings(self, texts: list[str]) -> list[list[float]]:
        """Blocking: call from a worker thread inside async code."""
        if self._embedder is None:
            raise BackendUnavailableError("embeddings are disabled or the manager is not started")
        vectors: list[list[float]] = self._embedder.encode(list(texts)).tolist()
        return vectors

    def get_conversation_stats(self, user_id: str | None = None) -> dict[str, Any]:
        """Seed API, tracked in this process; the runtime's persistent stats live in the store."""
        persona = self.persona
        if user_id is not None:
            state = self._states.get(user_id, PersonaState(mood=persona.moods.baseline))
            return _stats(state, persona) | {"user_id": user_id}
        total = sum(s.conversation_count for s in self._states.values())
        default = self._states.get(DEFAULT_USER, PersonaState(mood=persona.moods.baseline))
        return _stats(default, persona) | {"conversation_count": total,
                                           "users": len(self._states)}

    # -- seed API: component access (backward compatible properties) -----------------------

    @property
    def llm_model(self) -> Any:
        return getattr(self._backend, "model", None)

    @property
    def llm_tokenizer(self) -> Any:
        return getattr(self._backend, "tokenizer", None)

    @property
    def embedding_model(self) -> Any:
        return self._embedder.model if self._embedder else None

    @property
    def device(self) -> str:
        placement = getattr(self._backend, "placement", None)
        return placement.llm_device if placement else "cpu"


def _stats(state: PersonaState, persona: Persona) -> dict[str, Any]:
    return {
        "conversation_count": state.conversation_count,
        "current_mood": state.mood,
        "intimacy_level": round(state.intimacy, 2),
        "intimacy_tier": persona.tier_for(state.intimacy).name,
    }


async def create_llm_manager(config: Mapping[str, Any], **kwargs: Any) -> LLMManager | None:
    """Seed API: a started manager, or None (with resources released) if it cannot start."""
    try:
        manager = LLMManager(config, **kwargs)
    except EngineConfigError as exc:
        log.error("LLM manager config is invalid: %s", exc)
        return None
    if await manager.initialize():
        return manager
    return None
