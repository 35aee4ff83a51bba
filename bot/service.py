"""ConversationService: one inbound ChatEvent → policy → persisted → context → engine →
persisted reply and state → sent. See DESIGN.md, "One message, end to end"."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from typing import Any

from bot.config import AppConfig
from bot.events import ChatEvent, Reply
from engine.errors import EngineError
from engine.llm_manager import LLMManager
from engine.persona import Persona, PersonaState, advance, prompt_language, state_hint
from engine.response_generator import build_messages
from engine.types import GenerationRequest
from memory.errors import StoreError
from memory.rag import MemoryRetriever, RetrievedChunk
from memory.store import HistoryMessage, StateChange, StateSnapshot, Store

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]


def utcnow() -> datetime:
    return datetime.now(UTC)


# The engine's PersonaState and the store's StateSnapshot carry the same fields (engine and
# memory may not import each other); the service translates between them.
_STATE_FIELDS = tuple(f.name for f in fields(PersonaState))


def to_persona_state(snapshot: StateSnapshot) -> PersonaState:
    return PersonaState(**{name: getattr(snapshot, name) for name in _STATE_FIELDS})


def persona_rule(persona: Persona, text: str,
                 now: datetime) -> Callable[[StateSnapshot], StateChange]:
    """Adapt the engine's pure persona rule to the store's atomic read-modify-write."""

    def rule(before: StateSnapshot) -> StateChange:
        transition = advance(to_persona_state(before), text, now, persona)
        new = {name: getattr(transition.state, name) for name in _STATE_FIELDS}
        return StateChange(new=StateSnapshot(**new, version=before.version),
                           cause=transition.cause, details=transition.details)

    return rule


class SlidingWindowLimiter:
    """At most ``limit`` events per key in any ``window`` seconds."""

    def __init__(self, limit: int, window: float = 60.0) -> None:
        self._limit = limit
        self._window = window
        self._events: dict[str, deque[float]] = defaultdict(deque)

    def allow(self, key: str, now: float) -> bool:
        events = self._events[key]
        while events and now - events[0] >= self._window:
            events.popleft()
        if len(events) >= self._limit:
            return False
        events.append(now)
        return True


class StreamingPreview:
    """Shows a reply while it is generated: the first text early, then at most one edit per
    ``interval`` seconds (platform rate limits), then the final text."""

    def __init__(self, sink: Any, preview: Callable[[str], str], interval: float) -> None:
        self._sink = sink
        self._preview = preview
        self._interval = interval
        self._raw: list[str] = []
        self._last = 0.0
        self._shown = ""
        self.message_id: str | None = None

    async def on_chunk(self, chunk: str) -> None:
        self._raw.append(chunk)
        now = time.monotonic()
        if now - self._last < self._interval:
            return
        text = self._preview("".join(self._raw))
        if not text or text == self._shown:
            return
        self._last = now
        if self.message_id is None:
            self.message_id = await self._sink.send(text)
        else:
            await self._sink.edit(self.message_id, text)
        self._shown = text

    async def finish(self, final: str) -> str | None:
        if self.message_id is None:
            return await self._sink.send(final)
        if final != self._shown:
            await self._sink.edit(self.message_id, final)
        return self.message_id


@dataclass(slots=True)
class _Lane:
    """One user's ordered lane: the lock, and how many messages hold or wait for it."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0
    arrived: int = 0  # arrival counter: a message's place in this lane
    burst: list[str] = field(default_factory=list)  # superseded texts, for coalescing


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
        engine: LLMManager,
        store: Store,
        *,
        clock: Clock = utcnow,
        retriever: MemoryRetriever | None = None,
    ) -> None:
        self._config = config
        self._retriever = retriever
        self._engine = engine
        self._store = store
        self._clock = clock
        self._limiter = SlidingWindowLimiter(config.limits.user_messages_per_minute)
        self._channel_limiter = (
            SlidingWindowLimiter(config.limits.channel_messages_per_minute)
            if config.limits.channel_messages_per_minute else None
        )
        self._lanes: dict[tuple[str, str], _Lane] = {}
        self._generation_slots = asyncio.Semaphore(config.limits.max_concurrent_generations)
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
        # Take a place in this user's lane before the first await, so the user's messages
        # are answered in the order they arrived even though storing them takes time.
        key = (event.platform, event.user_id)
        lane = self._lanes.setdefault(key, _Lane())
        lane.users += 1
        lane.arrived += 1
        place = lane.arrived
        turn = asyncio.ensure_future(lane.lock.acquire())
        try:
            exchange = await self._accept(event, text)
            if isinstance(exchange, Reply):
                return exchange
            self._pending += 1
            try:
                await turn
                dropped = await self._flood_control(lane, place, exchange, text)
                if dropped is not None:
                    return dropped
                if lane.burst:
                    text, lane.burst = "\n".join([*lane.burst, text]), []
                return await self._answer(exchange, text)
            finally:
                self._pending -= 1
        finally:
            if turn.done() and not turn.cancelled():
                lane.lock.release()
            else:
                turn.cancel()  # left before our turn: give up the place
            lane.users -= 1
            if lane.users == 0:
                self._lanes.pop(key, None)

    async def _flood_control(self, lane: _Lane, place: int, exchange: Exchange,
                             text: str) -> Reply | None:
        """When a message's turn comes: drop it if it went stale, or if a newer one from the
        same viewer is waiting (queue of one; its text may be folded into the newer one)."""
        limits = self._config.limits
        age = (self._clock() - exchange.event.timestamp).total_seconds()
        reason = None
        if limits.stale_after_s and age > limits.stale_after_s:
            reason = f"stale ({age:.1f} s old)"
        elif (limits.per_user_queue_of_one or limits.coalesce_bursts) and \
                place < lane.arrived:
            reason = "superseded by a newer message"
            if limits.coalesce_bursts:
                lane.burst.append(text)
        if reason is None:
            return None
        await self._store.set_status(exchange.message_id, "dropped")
        return Reply("", "dropped", reason=reason)

    async def _accept(self, event: ChatEvent, text: str) -> Exchange | Reply:
        """Persist the message first, then apply the rate limit and the queue bound."""
        user_id = await self._store.resolve_user(event.platform, event.user_id,
                                                 event.display_name)
        message_id = await self._store.record_incoming(
            user_id=user_id, persona_id=self.persona.id, platform=event.platform,
            channel_id=event.channel_id, platform_message_id=event.message_id, text=text,
            created_at=event.timestamp,
        )
        # The event's own time, so replays rate-limit exactly as the live run did.
        moment = event.timestamp.timestamp()
        if not self._limiter.allow(f"{event.platform}:{event.user_id}", moment):
            await self._store.set_status(message_id, "dropped")
            return Reply("", "dropped", reason="rate limited")
        if self._channel_limiter is not None and not self._channel_limiter.allow(
                f"{event.platform}:{event.channel_id}", moment):
            await self._store.set_status(message_id, "dropped")
            return Reply("", "dropped", reason="channel cooldown")
        if self._pending >= self._config.limits.max_pending:
            await self._store.set_status(message_id, "dropped")
            log.warning("queue full (%d pending): dropped message %d", self._pending, message_id)
            return Reply("", "dropped", reason="queue full")
        return Exchange(event, user_id, message_id, time.monotonic())

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
        persona = self.persona
        state = await self._store.get_state(exchange.user_id, persona.id, persona.moods.baseline)
        history = await self._store.recent_history(
            exchange.user_id, persona.id, self._config.store.history_messages
        )
        history = self._within_budget(history, self._config.store.history_token_budget)
        retrieved = await self._retrieve(text, exchange.user_id)
        language = prompt_language(text)
        messages = build_messages(
            persona.system_prompt(language),
            text,
            [(item.role, item.content) for item in history],
            context="\n".join(f"- {c.text}" for c in retrieved if c.scope == "persona") or None,
            state_hint=state_hint(to_persona_state(state), persona, language),
            user_notes=[c.text for c in retrieved if c.scope == "user"],
        )
        request = GenerationRequest(messages, self._engine.settings.sampling())
        await event.sink.typing()
        async with self._generation_slots:
            queue_wait = time.monotonic() - exchange.received_at
            conversion = self._config.vtuber.conversion_overrides.mode_for(
                event.platform, event.channel_id, event.user_id
            ) or event.conversion_mode
            streaming = self._streaming_preview(event, language, conversion)
            reply = await self._engine.generate(
                request, language=language, conversion_mode=conversion,
                on_chunk=streaming.on_chunk if streaming else None,
            )
        now = self._clock()
        trace = {
            **reply.trace(),
            "backend": self._engine.settings.backend,
            "model": self._engine.model_name,
            "sampling": _sampling_trace(request),
            "history_message_ids": [item.id for item in history],
            "retrieved": [chunk.trace() for chunk in retrieved],
            "request_id": request.request_id,
        }
        trace["timings_ms"]["queue_wait"] = round(queue_wait * 1000, 1)
        trace["timings_ms"]["total"] = round((time.monotonic() - exchange.received_at) * 1000, 1)
        await self._remember(exchange, text)
        reply_id, new_state = await self._store.complete_exchange(
            user_message_id=exchange.message_id,
            reply_text=reply.text,
            trace=trace,
            platform_message_id=None,
            default_mood=persona.moods.baseline,
            rule=persona_rule(persona, text, now),
            created_at=now,
        )
        if streaming is not None:
            await streaming.finish(reply.text)
        else:
            await event.sink.send(reply.text)
        self._latencies.append(time.monotonic() - exchange.received_at)
        log.debug("answered %d with %d (mood %s, intimacy %.2f)", exchange.message_id, reply_id,
                  new_state.mood, new_state.intimacy)
        return Reply(reply.text, "answered", message_id=reply_id)

    def _streaming_preview(self, event: ChatEvent, language: str,
                           conversion: str | None) -> StreamingPreview | None:
        interval = self._config.limits.stream_edit_interval_s
        if not interval or not getattr(event.sink, "supports_edits", False):
            return None

        def preview(raw: str) -> str:
            return self._engine.preview(raw, language=language, conversion_mode=conversion)

        return StreamingPreview(event.sink, preview, interval)

    async def _retrieve(self, text: str, user_id: int) -> list[RetrievedChunk]:
        if self._retriever is None:
            return []
        return await self._retriever.search(text, user_id=user_id)

    async def _remember(self, exchange: Exchange, text: str) -> None:
        minimum = self._config.store.remember_messages_min_chars
        if self._retriever is not None and minimum and len(text) >= minimum:
            await self._retriever.remember(exchange.user_id, text,
                                           f"message:{exchange.message_id}")

    def _within_budget(self, history: list[HistoryMessage], budget: int) -> list[HistoryMessage]:
        """Keep the newest messages whose tokens fit the budget, starting on a user turn."""
        kept: list[HistoryMessage] = []
        used = 0
        for item in reversed(history):
            cost = self._engine.count_tokens(item.content)
            if used + cost > budget:
                break
            kept.append(item)
            used += cost
        kept.reverse()
        while kept and kept[0].role != "user":
            kept.pop(0)
        return kept

    def latency_percentiles(self) -> dict[str, float | None]:
        """p50/p95 of recent reply latencies (receipt to sent), in milliseconds."""
        if not self._latencies:
            return {"p50": None, "p95": None, "samples": 0}
        ordered = sorted(self._latencies)
        pick = lambda q: round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 1)  # noqa: E731
        return {"p50": pick(0.5), "p95": pick(0.95), "samples": len(ordered)}

    async def drain(self, grace_s: float) -> None:
        """Wait for in-flight replies (graceful shutdown)."""
        tasks = [t for t in self._in_flight if t is not asyncio.current_task()]
        if tasks:
            log.info("waiting for %d in-flight repl%s", len(tasks),
                     "y" if len(tasks) == 1 else "ies")
            await asyncio.wait(tasks, timeout=grace_s)


def _sampling_trace(request: GenerationRequest) -> dict[str, Any]:
    sampling = request.sampling
    return {
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": sampling.top_k,
        "max_new_tokens": sampling.max_new_tokens,
        "repetition_penalty": sampling.repetition_penalty,
    }
