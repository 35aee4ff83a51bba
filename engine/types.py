"""Requests and settings passed between the facade, the response generator and backends."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Literal

Role = Literal["system", "user", "assistant"]

_request_ids = itertools.count(1)


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
    request_id: str = field(default_factory=lambda: f"req-{next(_request_ids)}")

    def as_dicts(self) -> list[dict[str, Any]]:
        return [{"role": m.role, "content": m.content} for m in self.messages]
