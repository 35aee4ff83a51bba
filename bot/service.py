"""ConversationService: one inbound ChatEvent → policy → persisted → context → engine →
persisted reply and state → sent. See docs/ARCHITECTURE.md, "One message, end to end".

Flow control (rate limits, lanes) lives in ``bot.flow``, context building in ``bot.context``,
streaming previews in ``bot.streaming``; this module is the answer path and its error boundary.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from bot.config import AppConfig
from bot.context import ContextBuilder, PreparedPrompt
from bot.events import ChatEvent, Reply
from bot.flow import Lanes, SlidingWindowLimiter, Ticket
from bot.reports import LatencySummary
from bot.state_rules import persona_rule
from bot.streaming import StreamingPreview, supports_edits
from engine.client import EngineClient
from engine.errors import EngineError
from engine.persona import Persona
from engine.response_generator import GeneratedReply
from memory.errors import StoreError
from memory.rag import MemoryRetriever
from memory.store import Store

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class Exchange:
    """What the service knows about an accepted message while answering it."""

    event: ChatEvent
    user_id: int
    message_id: int
    received_at: float


class ConversationService:
    def __init__(
        self,
        config: AppConfig,
        engine: EngineClient,
        store: Store,
        *,
        clock: Clock = utcnow,
        retriever: MemoryRetriever | None = None,
    ) -> None:
        self._config = config
        self._engine = engine
        self._store = store
        self._clock = clock
        self._context = ContextBuilder(
            engine, store, retriever,
            history_messages=config.store.history_messages,
            history_token_budget=config.store.history_token_budget,
            remember_min_chars=config.store.remember_messages_min_chars,
        )
        limits = config.limits
        self._limiter = SlidingWindowLimiter(limits.user_messages_per_minute)
        self._channel_limiter = (SlidingWindowLimiter(limits.channel_messages_per_minute)
                                 if limits.channel_messages_per_minute else None)
        self._lanes = Lanes()
        self._generation_slots = asyncio.Semaphore(limits.max_concurrent_generations)
        self._pending = 0
        self._in_flight: set[asyncio.Task[Any]] = set()
        self._latencies: deque[float] = deque(maxlen=500)

    @property
    def persona(self) -> Persona:
        return self._engine.persona

    @property
    def pending(self) -> int:
        return self._pending

    async def handle(self, event: ChatEvent) -> Reply:
        """Answer one event. Never raises for model or store trouble: the user gets an
        in-character fallback and the cause goes to the log."""
        if event.is_self or event.is_bot:
            return Reply("", "dropped", reason="bot author")
        text = event.text.strip()
        if not text:
            return Reply("", "dropped", reason="empty")
        task = asyncio.current_task()
        if task is not None:
            self._in_flight.add(task)
        try:
            return await self._handle_accepted(event, text)
        finally:
            if task is not None:
                self._in_flight.discard(task)

    async def _handle_accepted(self, event: ChatEvent, text: str) -> Reply:
        # Take a place in this viewer's lane before the first await, so the viewer's messages
        # are answered in the order they arrived even though storing them takes time.
        ticket = self._lanes.enter((event.platform, event.platform_user_id))
        try:
            exchange = await self._accept(event, text)
            if isinstance(exchange, Reply):
                return exchange
            self._pending += 1
            try:
                await ticket.turn
                dropped = await self._flood_control(ticket, exchange, text)
                if dropped is not None:
                    return dropped
                lane = ticket.lane
                if lane.burst:
                    text, lane.burst = "\n".join([*lane.burst, text]), []
                return await self._answer(exchange, text)
            finally:
                self._pending -= 1
        finally:
            self._lanes.leave(ticket)

    async def _flood_control(self, ticket: Ticket, exchange: Exchange,
                             text: str) -> Reply | None:
        """When a message's turn comes: drop it if it went stale, or if a newer one from the
        same viewer is waiting (queue of one; its text may be folded into the newer one)."""
        limits = self._config.limits
        age = (self._clock() - exchange.event.timestamp).total_seconds()
        reason = None
        if limits.stale_after_s and age > limits.stale_after_s:
            reason = f"stale ({age:.1f} s old)"
        elif ((limits.per_user_queue_of_one or limits.coalesce_bursts)
              and ticket.lane.newer_waiting(ticket.place)):
            reason = "superseded by a newer message"
            if limits.coalesce_bursts:
                ticket.lane.burst.append(text)
        if reason is None:
            return None
        await self._store.set_status(exchange.message_id, "dropped")
        return Reply("", "dropped", reason=reason)

    async def _accept(self, event: ChatEvent, text: str) -> Exchange | Reply:
        """Persist the message first, then apply the rate limit and the queue bound."""
        user_id = await self._store.resolve_user(event.platform, event.platform_user_id,
                                                 event.display_name)
        message_id = await self._store.record_incoming(
            user_id=user_id, persona_id=self.persona.id, platform=event.platform,
            channel_id=event.channel_id, platform_message_id=event.message_id, text=text,
            created_at=event.timestamp,
        )
        reason = self._admission_refusal(event)
        if reason is not None:
            await self._store.set_status(message_id, "dropped")
            if reason == "queue full":
                log.warning("queue full (%d pending): dropped message %d", self._pending,
                            message_id)
            return Reply("", "dropped", reason=reason)
        return Exchange(event, user_id, message_id, time.monotonic())

    def _admission_refusal(self, event: ChatEvent) -> str | None:
        # The event's own time, so replays rate-limit exactly as the live run did.
        moment = event.timestamp.timestamp()
        if not self._limiter.allow(f"{event.platform}:{event.platform_user_id}", moment):
            return "rate limited"
        if self._channel_limiter is not None and not self._channel_limiter.allow(
                f"{event.platform}:{event.channel_id}", moment):
            return "channel cooldown"
        if self._pending >= self._config.limits.max_pending:
            return "queue full"
        return None

    async def _answer(self, exchange: Exchange, text: str) -> Reply:
        event = exchange.event
        try:
            async with asyncio.timeout(self._config.limits.reply_timeout_s):
                return await self._generate_and_store(exchange, text)
        except (EngineError, StoreError, TimeoutError, RuntimeError, OSError) as exc:
            log.exception("reply to message %d failed: %s", exchange.message_id, exc)
            await self._mark_failed(exchange.message_id)
            fallback = self.persona.fallback(exchange.message_id)
            try:
                await event.sink.send(fallback)
            except (OSError, RuntimeError) as send_exc:
                log.error("could not send fallback for message %d: %s", exchange.message_id,
                          send_exc)
            return Reply(fallback, "failed", reason=f"{type(exc).__name__}: {exc}")

    async def _mark_failed(self, message_id: int) -> None:
        try:
            await self._store.set_status(message_id, "failed")
        except StoreError as exc:
            log.error("could not mark message %d failed: %s", message_id, exc)

    async def _generate_and_store(self, exchange: Exchange, text: str) -> Reply:
        event = exchange.event
        prompt = await self._context.prepare(exchange.user_id, text)
        await event.sink.typing()
        async with self._generation_slots:
            queue_wait = time.monotonic() - exchange.received_at
            streaming = self._streaming_preview(event, prompt)
            reply = await self._engine.generate(
                prompt.request, conversion_mode=self._conversion_mode(event),
                on_chunk=streaming.on_chunk if streaming else None,
            )
        await self._context.remember(exchange.user_id, exchange.message_id, text)
        reply_id = await self._store_reply(exchange, text, reply,
                                           self._trace(exchange, prompt, reply, queue_wait))
        if streaming is not None:
            await streaming.finish(reply.text)
        else:
            await event.sink.send(reply.text)
        self._latencies.append(time.monotonic() - exchange.received_at)
        return Reply(reply.text, "answered", message_id=reply_id)

    def _trace(self, exchange: Exchange, prompt: PreparedPrompt, reply: GeneratedReply,
               queue_wait: float) -> dict[str, Any]:
        trace = {**reply.trace(), **prompt.trace()}
        trace["timings_ms"]["queue_wait"] = round(queue_wait * 1000, 1)
        trace["timings_ms"]["total"] = round((time.monotonic() - exchange.received_at) * 1000, 1)
        return trace

    async def _store_reply(self, exchange: Exchange, text: str, reply: GeneratedReply,
                           trace: dict[str, Any]) -> int:
        """Reply, state change (with its audit row) and the question's status, in one unit."""
        persona = self.persona
        now = self._clock()
        reply_id, new_state = await self._store.complete_exchange(
            user_message_id=exchange.message_id,
            reply_text=reply.text,
            trace=trace,
            platform_message_id=None,
            default_mood=persona.moods.baseline,
            rule=persona_rule(persona, text, now),
            created_at=now,
        )
        log.debug("answered %d with %d (mood %s, intimacy %.2f)", exchange.message_id, reply_id,
                  new_state.mood, new_state.intimacy)
        return reply_id

    def _conversion_mode(self, event: ChatEvent) -> str | None:
        """Per-user, then per-channel overrides, then the platform's own setting."""
        return self._config.vtuber.conversion_overrides.mode_for(
            event.platform, event.channel_id, event.platform_user_id
        ) or event.conversion_mode

    def _streaming_preview(self, event: ChatEvent,
                           prompt: PreparedPrompt) -> StreamingPreview | None:
        interval = self._config.limits.stream_edit_interval_s
        if not interval or not supports_edits(event.sink):
            return None
        conversion = self._conversion_mode(event)

        def preview(raw: str) -> str:
            return self._engine.preview(raw, prompt.request, conversion_mode=conversion)

        return StreamingPreview(event.sink, preview, interval)

    def latency_percentiles(self) -> LatencySummary:
        """p50/p95 of recent reply latencies (receipt to sent), in milliseconds."""
        if not self._latencies:
            return LatencySummary(p50=None, p95=None, samples=0)
        ordered = sorted(self._latencies)

        def pick(q: float) -> float:
            return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 1)

        return LatencySummary(p50=pick(0.5), p95=pick(0.95), samples=len(ordered))

    async def drain(self, grace_s: float) -> None:
        """Wait for in-flight replies (graceful shutdown)."""
        tasks = [t for t in self._in_flight if t is not asyncio.current_task()]
        if tasks:
            log.info("waiting for %d in-flight repl%s", len(tasks),
                     "y" if len(tasks) == 1 else "ies")
            await asyncio.wait(tasks, timeout=grace_s)
