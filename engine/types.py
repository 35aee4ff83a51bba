"""Requests, settings and results passed between the runtime, the facade, the response
generator and backends: data types only (nothing here imports torch or transformers)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: Role
    content: str


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_new_tokens: int = 150
    min_new_tokens: int = 0
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 50
    repetition_penalty: float = 1.1
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def trace(self) -> dict[str, float | int | None]:
        """What a reply's trace records of how it was sampled."""
        return {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                "max_new_tokens": self.max_new_tokens,
                "repetition_penalty": self.repetition_penalty}


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    messages: tuple[ChatMessage, ...]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    # The viewer's language ("zh" or "en"): picks the persona wording the filters compare with.
    language: str = "zh"
    # The caller's name for it (what ``abort`` takes); one of its own if the caller has none.
    request_id: str = field(default_factory=lambda: f"req-{uuid.uuid4().hex[:12]}")
    # Text of the prompt the viewer did not write and must never see echoed (the state hint).
    private: tuple[str, ...] = ()

    def as_dicts(self, fold_system: bool = False) -> list[dict[str, Any]]:
        """The messages as chat-template dicts; ``fold_system``: every later system turn
        joined to the first, for templates that accept a system turn only at the start."""
        messages = folded_system(self.messages) if fold_system else self.messages
        return [{"role": m.role, "content": m.content} for m in messages]


def folded_system(messages: tuple[ChatMessage, ...]) -> tuple[ChatMessage, ...]:
    """``messages`` with the content of every system turn after the first appended to the
    first (which must be a system turn for anything to fold)."""
    late = [m.content for m in messages[1:] if m.role == "system"]
    if not late or not messages or messages[0].role != "system":
        return messages
    first = ChatMessage("system", "\n\n".join([messages[0].content, *late]))
    return (first, *(m for m in messages[1:] if m.role != "system"))


@dataclass(frozen=True, slots=True)
class PromptUsage:
    """A request's prompt as the engine saw it: its tokens, and how many of them came from
    a prefix cache instead of being prefilled; and the tokens it generated, where it counted
    them (None: the reply's text is counted again)."""

    prompt_tokens: int
    cached_tokens: int = 0
    completion_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class ReplyChunk:
    """Text the model has just added to a reply being generated, before the output stage."""

    text: str


@dataclass(slots=True)
class GeneratedReply:
    text: str
    raw_text: str
    truncated: bool
    filter_edits: list[str]
    conversion_mode: str
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int = 0  # of prompt_tokens: from a prefix cache, not prefilled
    timings: dict[str, float] = field(default_factory=dict)
    # Who made it (backend, model, request id, sampling), filled in by the engine facade.
    context: dict[str, Any] = field(default_factory=dict)

    def trace(self) -> dict[str, Any]:
        return {
            **self.context,
            "prompt_tokens": self.prompt_tokens,
            "cached_prompt_tokens": self.cached_prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "truncated": self.truncated,
            "filter_edits": self.filter_edits,
            "conversion_mode": self.conversion_mode,
            "timings_ms": {k: round(v * 1000, 1) for k, v in self.timings.items()},
        }
