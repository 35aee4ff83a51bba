"""The backend interface, modelled on vLLM's engine client: generate, abort, health."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

from engine.types import GenerationRequest


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

    async def close(self) -> None: ...
