"""Platform-neutral types: what adapters hand to the runtime and what the runtime hands back.

Adapters import these; ``bot`` never imports an adapter.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol, runtime_checkable

from bot.reports import (
    PersonaInfo,
    ReplyTrace,
    RuntimeDiagnosis,
    RuntimeGpuStatus,
    ViewerStats,
)
from engine.reports import OptimizeReport
from memory.store import ExportedUserData, StoredMemory

# Re-exported: adapters take it from here (they may import bot, not memory).
from memory.store import Leftover as Leftover


@runtime_checkable
class ReplySink(Protocol):
    """Where a reply goes. Adapters implement it over their platform's send/edit/typing.
    A sink may set ``supports_edits = True`` to get streaming previews (send, then edits),
    and ``idempotent_sends = True`` where the platform posts a send that is retried (or
    repeated after a crash) only once (Discord's nonce); without it, a question is marked
    before its reply goes out, so recovery never sends a second copy."""

    async def send(self, text: str) -> str | None:
        """Send a new message; return its platform message id if the platform has one."""
        ...

    async def edit(self, message_id: str, text: str) -> None:
        """Replace the text of a message sent earlier (streaming edits)."""
        ...

    async def typing(self) -> None:
        """Show a typing indicator, if the platform has one."""
        ...


class DeliveryError(Exception):
    """A sink could not deliver. Adapters translate their platform's errors into this:
    ``retryable`` for 429/5xx and timeouts (the service retries with backoff, honouring
    ``retry_after``), not for a refusal that would fail again (403, 404)."""

    def __init__(self, message: str, *, retryable: bool,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class Roles:
    is_admin: bool = False  # bot-wide, from the config only
    is_moderator: bool = False
    is_broadcaster: bool = False
    # Administrator of the server (Discord guild) the command runs in: a moderator there, and
    # an admin of that server's own data (its messages' traces, its members' stats) only.
    is_server_admin: bool = False


@dataclass(frozen=True, slots=True)
class ChatEvent:
    """One inbound chat message, the same shape for every platform."""

    platform: str
    channel_id: str
    platform_user_id: str  # the platform's id for the author (the store's user id is an int)
    display_name: str
    text: str
    sink: ReplySink = field(repr=False, compare=False)
    message_id: str | None = None
    timestamp: datetime = field(default_factory=lambda: datetime.now(UTC))
    addressed: bool = True
    is_bot: bool = False
    is_self: bool = False
    roles: Roles = field(default_factory=Roles)
    reply_to_message_id: str | None = None
    # A platform-level setting (e.g. a Discord server's language); per-user and per-channel
    # overrides in vtuber.conversion_overrides still win.
    conversion_mode: str | None = None


@dataclass(frozen=True, slots=True)
class Reply:
    """The outcome of one event, for adapters and tests."""

    text: str
    status: str  # answered | dropped | failed | expired
    message_id: int | None = None
    # Why it ended so: rate_limited, channel_cooldown, queue_full, duplicate, empty,
    # bot_author, stale, send_backlog, superseded, paused, shutdown, store, backend, send,
    # timeout, crash, crash_during_send (a run stopped while its reply went out: not resent).
    reason: str | None = None


EventHandler = Callable[[ChatEvent], Awaitable[Reply]]


class RuntimeServices(Protocol):
    """What platform adapters may ask of the runtime besides answering messages
    (commands such as /stats, /forget, /gpu status). Implemented by ``bot.runtime.Runtime``."""

    async def stats(self, platform: str, platform_user_id: str) -> ViewerStats | None: ...

    async def chart(self, platform: str, platform_user_id: str) -> bytes | None: ...

    async def forget(self, platform: str, platform_user_id: str) -> dict[str, int]: ...

    async def export(self, platform: str,
                     platform_user_id: str) -> ExportedUserData | None: ...

    async def memories(self, platform: str, platform_user_id: str) -> list[StoredMemory]:
        """The viewer's own long-term memories, newest first."""
        ...

    async def forget_memory(self, platform: str, platform_user_id: str,
                            memory_id: int) -> bool:
        """Delete one of the viewer's own memories; False when it is not theirs."""
        ...

    async def purge_message(self, platform: str, platform_message_id: str) -> int: ...

    async def purge_messages(self, platform: str, channel_id: str,
                             platform_user_id: str | None = None) -> int: ...

    async def trace(self, message_id: int) -> ReplyTrace | None: ...

    async def create_link_code(self, platform: str, platform_user_id: str) -> str: ...

    def allow_command(self, platform: str, platform_user_id: str) -> bool: ...

    async def redeem_link_code(self, code: str, platform: str, platform_user_id: str,
                               display_name: str) -> bool: ...

    def gpu_status(self) -> RuntimeGpuStatus: ...

    def gpu_optimize(self) -> OptimizeReport: ...

    def diagnose(self) -> RuntimeDiagnosis: ...

    def persona_info(self) -> PersonaInfo: ...


class Adapter(Protocol):
    """A platform adapter. ``run`` returns when the platform session ends or on cancellation."""

    name: str

    async def run(self, handle: EventHandler) -> None: ...

    async def close(self) -> None: ...


@runtime_checkable
class PostsToChannels(Protocol):
    """An adapter that can post into one of its channels unprompted (the dashboard's "say as
    the persona"): a sink for that channel (a Discord channel id, a Twitch broadcaster id)."""

    def channel_sink(self, channel_id: str) -> ReplySink: ...


@runtime_checkable
class AnswersLeftovers(Protocol):
    """An adapter that can answer, once connected, a message an earlier run stored and never
    answered (it crashed): ``ready`` returns once it can send; ``reply_sink`` builds the
    sink for one such message (None: it cannot be answered any more)."""

    async def ready(self) -> None: ...

    def reply_sink(self, leftover: Leftover) -> ReplySink | None: ...
