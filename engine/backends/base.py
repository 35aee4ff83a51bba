"""The backend interface, modelled on vLLM's engine client: generate, abort, health."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any, Protocol

from engine.types import GenerationRequest, PromptUsage


class Backend(Protocol):
    name: str

    async def start(self) -> None:
        """Load models / open connections. Blocking work happens off the event loop."""

    def generate(self, request: GenerationRequest) -> AsyncIterator[str]:
        """Stream the reply's text in chunks. Cancelling the iterator aborts the request."""
        ...

    async def abort(self, request_id: str) -> None: ...

    def health(self) -> dict[str, Any]: ...

    def info(self) -> dict[str, Any]: ...

    def count_tokens(self, text: str) -> int: ...

    def prompt_usage(self, request_id: str) -> PromptUsage | None:
        """How a finished request's prompt was processed, where the backend knows."""
        ...

    async def close(self) -> None: ...


class RecentUsage:
    """The prompt usage of the last ``size`` requests, for ``prompt_usage`` (read once)."""

    def __init__(self, size: int = 1024) -> None:
        self._size = size
        self._usage: OrderedDict[str, PromptUsage] = OrderedDict()

    def record(self, request_id: str, usage: PromptUsage) -> None:
        self._usage[request_id] = usage
        while len(self._usage) > self._size:
            self._usage.popitem(last=False)

    def pop(self, request_id: str) -> PromptUsage | None:
        return self._usage.pop(request_id, None)
