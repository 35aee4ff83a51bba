"""What the in-process backend's worker thread passes around: a job per request, the items
it emits to the request's async consumer (through an ``Outbox``), and the sentinel that stops
the worker."""

from __future__ import annotations

import asyncio
import contextlib
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


class Outbox:
    """Items for the requests' consumers, handed to their event loop once per pass of the
    worker's loop rather than once per item.

    Each hand-over (``call_soon_threadsafe``) wakes the loop with a system call, and after it
    the worker thread may wait for the GIL while the loop runs Python. Per item, that was
    every row's every token: 32 wake-ups a step in a full batch where one does."""

    def __init__(self) -> None:
        self._items: list[tuple[asyncio.AbstractEventLoop, Callable[[Any], None], Any]] = []
        self._lock = threading.Lock()

    def sender(self, loop: asyncio.AbstractEventLoop,
               put: Callable[[Any], None]) -> Callable[[Any], None]:
        """A job's ``emit``: ``put`` runs on ``loop`` at the next ``send``."""
        def emit(item: Any) -> None:
            with self._lock:
                self._items.append((loop, put, item))
        return emit

    def send(self) -> None:
        """Hand over everything emitted so far: one wake-up per event loop, items in order."""
        with self._lock:
            items, self._items = self._items, []
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Callable[[Any], None], Any]]] = {}
        for loop, put, item in items:
            by_loop.setdefault(loop, []).append((put, item))
        for loop, batch in by_loop.items():
            # A closed loop raises: nobody is left to read its items.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_put_all, batch)


def _put_all(batch: list[tuple[Callable[[Any], None], Any]]) -> None:
    for put, item in batch:
        put(item)


def is_oom(error: BaseException) -> bool:
    import torch

    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()
