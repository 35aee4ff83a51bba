"""What the in-process backend's worker thread passes around: a job per request, the items
it emits to the request's async consumer, and the sentinel that stops the worker."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from engine.backends.detokenize import IncrementalDecoder
from engine.errors import EngineError
from engine.types import GenerationRequest

END = object()
STOP_WORKER = None


@dataclass(frozen=True, slots=True)
class Failure:
    error: BaseException


@dataclass
class Job:
    request: GenerationRequest
    emit: Callable[[Any], None]
    abort: threading.Event
    decoder: IncrementalDecoder | None = None
    generated: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0  # of the prompt's, not prefilled: a kept prefix's
    done: bool = False
    ended: bool = False

    def push(self, token: int) -> None:
        """One generated token: count it and stream whatever text it completes."""
        self.generated += 1
        assert self.decoder is not None
        delta = self.decoder.push([token])
        if delta:
            self.emit(delta)

    def fail(self, error: BaseException) -> None:
        """End with ``error`` (an ``EngineError``, wrapping anything else), once."""
        if self.ended:
            return
        self.ended = True
        self.emit(Failure(error if isinstance(error, EngineError) else EngineError(
            f"generation failed: {type(error).__name__}: {error}")))

    def finish(self) -> None:
        if not self.ended:
            self.ended = True
            if self.decoder is not None:
                tail = self.decoder.flush()
                if tail:
                    self.emit(tail)
            self.emit(END)


def is_oom(error: BaseException) -> bool:
    import torch

    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()
