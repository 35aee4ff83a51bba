"""What the conversation service tells observers such as the operator server (overlay,
dashboard, metrics): every message's final state, and each reply while it is generated.

Observers run on the event loop and must return quickly; one that raises is logged and never
changes what happens to the message (Red-DiscordBot's signals, without the import magic)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Protocol

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class FinalState:
    """A message reached its final state (``answered``, ``dropped``, ``failed``, ...)."""

    platform: str
    channel_id: str | None
    platform_user_id: str
    display_name: str
    text: str
    status: str
    reason: str | None
    latency_s: float  # from ``handle()`` being called to the final state
    reply: str = ""
    reply_id: int | None = None  # the stored reply (its trace), when answered


@dataclass(frozen=True, slots=True)
class ReplyProgress:
    """A reply as the viewer will see it (after the output-safety stage), growing until
    ``done``; ``mood`` is the persona's mood toward this viewer: as it stood when the reply
    began, then as it is once the reply is recorded."""

    key: str  # one per message: progress updates of the same reply share it
    platform: str
    platform_user_id: str
    display_name: str
    text: str
    done: bool = False
    mood: str | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)
    question: str = ""  # what the viewer said
    persona: str = ""  # who is speaking: the persona's name
    mood_name: str | None = None  # the mood as the persona names it for viewers


class Observer(Protocol):
    def message_final(self, state: FinalState) -> None: ...

    def reply_progress(self, progress: ReplyProgress) -> None: ...


class Signals:
    def __init__(self) -> None:
        self._observers: list[Observer] = []

    @property
    def active(self) -> bool:
        return bool(self._observers)

    def connect(self, observer: Observer) -> None:
        self._observers.append(observer)

    def disconnect(self, observer: Observer) -> None:
        if observer in self._observers:
            self._observers.remove(observer)

    def message_final(self, state: FinalState) -> None:
        self._emit("message_final", state)

    def reply_progress(self, progress: ReplyProgress) -> None:
        self._emit("reply_progress", progress)

    def _emit(self, method: str, payload: FinalState | ReplyProgress) -> None:
        for observer in list(self._observers):
            try:
                getattr(observer, method)(payload)
            except Exception:  # an observer's bug must not touch the conversation
                log.exception("observer %r failed in %s", observer, method)
