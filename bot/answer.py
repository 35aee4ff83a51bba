"""The answer path of one admitted message: context → engine → delivery → the store.

``Answerer.answer`` raises on failure; it records on the ``Attempt`` how far it got (the stage
names the reason: ``store``, ``backend``, ``send``) and whether the viewer already has the
reply, so the service's error boundary can end the message and send at most one fallback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from bot.config import AppConfig
from bot.context import ContextBuilder, PreparedPrompt
from bot.delivery import cosmetic, deliver
from bot.events import ChatEvent
from bot.flow import Stay
from bot.signals import ReplyProgress, Signals
from bot.state_rules import persona_rule
from bot.streaming import StreamingPreview, supports_edits
from engine.client import EngineClient
from engine.errors import EngineError
from engine.types import GeneratedReply
from memory.errors import StoreError
from memory.store import IntakeItem, IntakeOutcome, ReplyContext, StateSnapshot, Store

log = logging.getLogger(__name__)
PROGRESS_INTERVAL_S = 0.1  # how often observers (the overlay) see a reply grow
QUESTION_CHARS = 200  # of the viewer's message, shown with the reply on the overlay
ORDER_WAIT_LIMIT_S = 30.0  # a crashed process's unanswered message holds a viewer no longer
ChunkHandler = Callable[[str], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Behind:
    """An intake written behind the reply: the item, and its outcome once committed."""

    item: IntakeItem
    outcome: asyncio.Future[IntakeOutcome | None]


@dataclass(slots=True)
class Exchange:
    """What the service knows about an admitted message while answering it. With ``behind``
    (SQLite), the reply goes out without waiting for the intake to commit: the ids stay None
    (``user_id`` for good, when the viewer is new) until ``recorded()``."""

    event: ChatEvent
    user_id: int | None
    message_id: int | None
    received_at: float  # time.monotonic() at admission
    key: str  # for observers: one per message, known from admission on
    context: ReplyContext | None = None  # read before the reply (see ContextBuilder.prepare)
    behind: Behind | None = None

    @property
    def label(self) -> str:
        """For log lines: the stored id, or the platform's while not stored yet."""
        if self.message_id is not None:
            return str(self.message_id)
        return f"{self.event.platform}:{self.event.message_id or self.key}"

    async def recorded(self) -> int:
        """The stored message's id, once its intake committed; ``StoreError`` if it did not."""
        if self.message_id is None and self.behind is not None:
            outcome = await asyncio.shield(self.behind.outcome)
            if outcome is None or outcome.message_id is None:
                raise StoreError("store: the platform message was recorded before the reply "
                                 "(a redelivery)")
            self.user_id, self.message_id = outcome.user_id, outcome.message_id
        if self.message_id is None:
            raise StoreError("store: the message was never recorded")
        return self.message_id


@dataclass(slots=True)
class Attempt:
    """How far an answer got: the stage it is in, and whether the viewer has the reply."""

    stay: Stay  # its time in the bot's own stages (the model's time is not)
    stage: str = "store"  # store (reading context) | backend | send | store (recording)
    delivered: bool = False
    text: str = ""  # the reply, once generated
    # The delivered reply's record: shutdown cancelling the answer does not stop it (the
    # viewer has the reply, so the store must say so).
    recording: asyncio.Future[int] | None = None

    async def recorded(self) -> bool:
        """Whether a delivered reply's record landed (waited for while it is written)."""
        if self.recording is None:
            return False
        with contextlib.suppress(Exception):  # a failed write was logged where it failed
            await asyncio.shield(self.recording)
        return (self.recording.done() and not self.recording.cancelled()
                and self.recording.exception() is None)


class Answerer:
    def __init__(self, config: AppConfig, engine: EngineClient, store: Store,
                 context: ContextBuilder, clock: Any, signals: Signals | None = None) -> None:
        self._config = config
        self._engine = engine
        self._store = store
        self._context = context
        self._clock = clock
        self._signals = signals or Signals()
        self.generation_limit = (config.limits.max_concurrent_generations
                                 or engine.parallel_requests())
        self._generation_slots = asyncio.Semaphore(self.generation_limit)

    async def answer(self, exchange: Exchange, text: str, attempt: Attempt) -> int:
        """Answer and record; return the stored reply's id (the text is ``attempt.text``)."""
        if exchange.message_id is not None:  # (written behind: one process, no one to wait for)
            with attempt.stay.away():  # another process's work, not this one's
                await self._earlier_first(exchange.user_id, exchange.message_id)
        prompt = await self._context.prepare(exchange.user_id, text, exchange.context,
                                             request_id=exchange.key)
        with attempt.stay.away():  # the model's and the platform's time
            reply, sent_id, queue_wait = await self._generate_and_send(exchange, prompt,
                                                                       attempt)
        attempt.stage = "store"
        attempt.recording = asyncio.ensure_future(
            self._recorded(exchange, prompt, text, reply, sent_id, queue_wait))
        reply_id = await asyncio.shield(attempt.recording)
        message_id = await exchange.recorded()
        try:  # a long-term memory is a bonus: losing one must not fail the exchange
            if exchange.user_id is not None:
                await self._context.remember(exchange.user_id, message_id, text)
        except StoreError as exc:
            log.warning("message %d: not kept as a memory: %s", message_id, exc)
        return reply_id

    async def _recorded(self, exchange: Exchange, prompt: PreparedPrompt, text: str,
                        reply: GeneratedReply, sent_id: str | None, queue_wait: float) -> int:
        """The delivered reply, its state change and its question's status written; the
        stored reply's id."""
        message_id = await exchange.recorded()
        trace = self._trace(exchange, prompt, reply, queue_wait)
        reply_id, mood = await self._record(message_id, text, reply, trace, sent_id,
                                            prompt.state)
        if self._signals.active:
            self._signals.reply_progress(self._progress(
                exchange, reply.text, done=True, mood=mood,
                timings_ms={**trace["timings_ms"], "tokens": reply.completion_tokens}))
        return reply_id

    async def _generate_and_send(self, exchange: Exchange, prompt: PreparedPrompt,
                                 attempt: Attempt) -> tuple[GeneratedReply, str | None, float]:
        """The reply, generated and delivered: it, its platform message id, and how long the
        message waited before a generation slot was free."""
        event = exchange.event
        attempt.stage = "backend"
        # Beside the reply, never before it: a platform that stalls the indicator must not
        # hold the reply (or time it out into a fallback).
        typing = asyncio.create_task(cosmetic(event.sink.typing(), "typing"))
        streaming: StreamingPreview | None = None
        try:
            async with self._generation_slots:
                queue_wait = time.monotonic() - exchange.received_at
                streaming = self._streaming_preview(event)
                reply = await self._generated(prompt, self.conversion_mode(event),
                                              self._on_chunk(exchange, prompt, streaming))
            attempt.stage, attempt.text = "send", reply.text
            if streaming is not None:
                sent_id = await streaming.finish(reply.text)
            else:
                await self._send_starting(exchange)
                sent_id = await deliver(lambda: event.sink.send(reply.text), "send")
        finally:
            typing.cancel()  # the reply is out (or failed): the indicator is moot
            if streaming is not None:
                streaming.abandon()  # done by now if the reply went out
        attempt.delivered = True
        return reply, sent_id, queue_wait

    async def _send_starting(self, exchange: Exchange) -> None:
        """Where the platform cannot tell a retried send from a new one (no nonce: Twitch),
        the question is marked before its reply goes out, so a run that stops mid-send is
        not followed by a second copy after a restart or a takeover. Best effort: a store
        outage must not cost the viewer the reply, and an intake still being written behind
        the reply (SQLite) is not waited for."""
        if getattr(exchange.event.sink, "idempotent_sends", False):
            return
        behind = exchange.behind
        if exchange.message_id is None and (behind is None or not behind.outcome.done()):
            return
        try:
            await self._store.mark_send_started(await exchange.recorded(), self._clock())
        except StoreError as exc:
            log.warning("message %s: sending without the mark that prevents a second copy "
                        "after a crash: %s", exchange.label, exc)

    async def _generated(self, prompt: PreparedPrompt, conversion: str | None,
                         on_chunk: ChunkHandler | None) -> GeneratedReply:
        """The engine's stream, read to its end. An answer given up on mid-way (its timeout,
        shutdown, a failing preview) closes the stream and aborts the request, so the engine
        frees the row at once instead of generating for no one."""
        request = prompt.request
        reply: GeneratedReply | None = None
        try:
            async with aclosing(self._engine.generate(request,
                                                      conversion_mode=conversion)) as stream:
                async for out in stream:
                    if isinstance(out, GeneratedReply):
                        reply = out
                    elif on_chunk is not None:
                        await on_chunk(out.text)
        finally:
            if reply is None:
                await asyncio.shield(self._engine.abort(request.request_id))
        if reply is None:
            raise EngineError(f"request {request.request_id}: the stream ended without a reply")
        return reply

    async def _earlier_first(self, user_id: int | None, message_id: int) -> None:
        """Several processes (PostgreSQL): this viewer's earlier messages, taken by another
        process (another platform, another shard), are answered first."""
        limits = self._config.limits
        waited = min(limits.reply_timeout_s, ORDER_WAIT_LIMIT_S)
        since = self._clock() - timedelta(seconds=limits.reply_timeout_s)
        if user_id is not None and not await self._store.wait_for_earlier(
                user_id, message_id, since, waited):
            log.warning("message %d: an earlier message of this viewer is still unanswered "
                        "after %.0f s (another process?); answering this one anyway",
                        message_id, waited)

    def _trace(self, exchange: Exchange, prompt: PreparedPrompt, reply: GeneratedReply,
               queue_wait: float) -> dict[str, Any]:
        trace = {**reply.trace(), **prompt.trace()}
        trace["timings_ms"]["queue_wait"] = round(queue_wait * 1000, 1)
        trace["timings_ms"]["total"] = round((time.monotonic() - exchange.received_at) * 1000, 1)
        return trace

    async def _record(self, message_id: int, text: str, reply: GeneratedReply,
                      trace: dict[str, Any], sent_id: str | None,
                      seen: StateSnapshot) -> tuple[int, str]:
        """Reply, state change (with its audit row) and the question's status, in one unit."""
        persona = self._engine.persona
        now: datetime = self._clock()
        reply_id, state = await self._store.complete_exchange(
            user_message_id=message_id, reply_text=reply.text, trace=trace,
            platform_message_id=sent_id, default_mood=persona.moods.baseline,
            rule=persona_rule(persona, text, now), created_at=now, seen=seen,
        )
        return reply_id, state.mood

    def _progress(self, exchange: Exchange, text: str, *, mood: str | None,
                  **extra: Any) -> ReplyProgress:
        event, persona = exchange.event, self._engine.persona
        moods = persona.moods.states
        mood_name = (moods[mood].name or mood) if mood in moods else mood
        return ReplyProgress(exchange.key, event.platform, event.platform_user_id,
                             event.display_name, text, mood=mood, mood_name=mood_name,
                             question=event.text[:QUESTION_CHARS], persona=persona.names.zh,
                             **extra)

    def _on_chunk(self, exchange: Exchange, prompt: PreparedPrompt,
                  streaming: StreamingPreview | None) -> ChunkHandler | None:
        """What to do with each chunk of the engine's stream: the reply so far, after the
        output-safety stage like every text a viewer sees, for the platform's streaming
        preview and for observers (the overlay). The stage reruns over the whole text, so it
        runs only when one of them is due (observers every PROGRESS_INTERVAL_S, previews at
        the platform's pace), once for both, not once per token (the final text goes out when
        the reply is recorded)."""
        observed = self._signals.active
        if streaming is None and not observed:
            return None
        raw: list[str] = []
        shown, last = [""], [0.0]
        conversion = self.conversion_mode(exchange.event)

        async def on_chunk(chunk: str) -> None:
            raw.append(chunk)
            now = time.monotonic()
            progress_due = observed and now - last[0] >= PROGRESS_INTERVAL_S
            preview_due = streaming is not None and streaming.due(now)
            if not (progress_due or preview_due):
                return
            text = self._engine.preview("".join(raw), prompt.request,
                                        conversion_mode=conversion)
            if progress_due:
                last[0] = now
                if text and text != shown[0]:
                    shown[0] = text
                    self._signals.reply_progress(self._progress(
                        exchange, text, mood=prompt.state.mood))
            if preview_due and streaming is not None:
                streaming.show(text, now)

        return on_chunk

    def conversion_mode(self, event: ChatEvent) -> str | None:
        """Per-user, then per-channel overrides, then the platform's own setting."""
        return self._config.vtuber.conversion_overrides.mode_for(
            event.platform, event.channel_id, event.platform_user_id
        ) or event.conversion_mode

    def _streaming_preview(self, event: ChatEvent) -> StreamingPreview | None:
        interval = self._config.limits.stream_edit_interval_s
        if not interval or not supports_edits(event.sink):
            return None
        # A sink may ask for its own pace (a terminal has no rate limit to respect).
        return StreamingPreview(event.sink, getattr(event.sink, "edit_interval_s", interval))
