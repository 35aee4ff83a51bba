"""The one interface the runtime uses to talk to the engine (in the spirit of vLLM's
``EngineClient``): build a request from what the runtime knows, generate it as a stream,
preview a partial reply, abort, count tokens, report health.

``LLMManager`` implements it; tests may substitute anything with the same shape.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Protocol, TypedDict

from engine.persona import Persona, PersonaState
from engine.types import GeneratedReply, GenerationRequest, ReplyChunk


@dataclass(frozen=True, slots=True)
class PromptInputs:
    """Everything a prompt is made of; the engine decides how it is assembled.

    ``context`` is operator-written reference material (persona knowledge) and may join the
    system turn; ``user_notes`` are things the viewer wrote earlier (long-term memories) and
    stay in a user turn of their own, so nothing a viewer wrote speaks with the system's voice.
    """

    text: str
    history: Sequence[tuple[str, str]] = ()  # (role, text), oldest first
    state: PersonaState | None = None
    context: str | None = None
    user_notes: Sequence[str] = ()


class EngineHealth(TypedDict):
    ok: bool
    backend: str
    model: str
    detail: str | None


class EngineClient(Protocol):
    @property
    def persona(self) -> Persona: ...

    def build_request(self, inputs: PromptInputs, *,
                      request_id: str | None = None) -> GenerationRequest:
        """The request for ``inputs``, under the caller's ``request_id`` where given."""
        ...

    def generate(self, request: GenerationRequest, *,
                 conversion_mode: str | None = None
                 ) -> AsyncGenerator[ReplyChunk | GeneratedReply, None]:
        """The reply as it is made: ``ReplyChunk`` s of raw model text, then, last and only
        when generation completed, the finished ``GeneratedReply`` (after the output stage).
        Closing the stream early, or ``abort`` with the request's id, stops the generation."""
        ...

    def preview(self, raw: str, request: GenerationRequest, *,
                conversion_mode: str | None = None) -> str: ...

    async def abort(self, request_id: str) -> None:
        """Stop that request's generation and free what it holds; a no-op for a request that
        is unknown or already finished."""
        ...

    def count_tokens(self, text: str) -> int: ...

    def parallel_requests(self) -> int:
        """How many generations this engine serves at once to good effect: the runtime lets
        that many run (``limits.max_concurrent_generations``, unless set)."""
        ...

    def health(self) -> EngineHealth: ...
