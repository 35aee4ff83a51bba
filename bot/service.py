"""ConversationService: one inbound ChatEvent → admission → recorded → answered, and the one
error boundary that owns every message's lifecycle (docs/ARCHITECTURE.md, "One message").

``received → answered | dropped | failed | expired``, each final state with a reason. Admission
(flood control, rate limits, the pending bound, duplicates) is decided in memory before any
database work; refused messages are recorded as ``dropped`` in the background, in batches.
Whatever fails later (store, backend, send, timeout, shutdown) ends the message with a reason,
the viewer gets the reply or at most one in-character fallback, and one log line names it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from bot.admission import Admission
from bot.answer import Answerer, Attempt, Exchange
from bot.config import AppConfig, LimitsConfig
from bot.context import ContextBuilder
from bot.delivery import DeliveryFailed, backlog_limit, deliver, send_backlog
from bot.events import ChatEvent, Reply, ReplySink
from bot.flow import Episodes, Lanes, Ticket
from bot.recording import Recording
from bot.recovery import sort_out_leftovers
from bot.reports import LatencySummary
from bot.signals import FinalState, Signals
from bot.spool_file import SpoolFile
from bot.text import sanitized
from engine.client import EngineClient
from engine.errors import EngineError
from engine.persona import Persona
from memory.errors import StoreError
from memory.rag import MemoryRetriever
from memory.store import Leftover, Store

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]
# Failures we expect and describe in one line; anything else is a bug and logs its traceback.
EXPECTED_FAILURES = (StoreError, EngineError, DeliveryFailed, TimeoutError)


def utcnow() -> datetime:
    return datetime.now(UTC)


class ConversationService:
    def __init__(self, config: AppConfig, engine: EngineClient, store: Store, *,
                 clock: Clock = utcnow, retriever: MemoryRetriever | None = None,
                 role: str | None = None, spool_file: SpoolFile | None = None) -> None:
        self._config = config
        self._role = role  # this process's runtime role (memory.store.roles), if it holds one
        self._engine = engine
        self._store = store
        self._clock = clock
        context = ContextBuilder(
            engine, store, retriever,
            history_messages=config.store.history_messages,
            history_token_budget=config.store.history_token_budget,
            remember_min_chars=config.store.remember_messages_min_chars,
        )
        # Observers (the operator server) hear of final states and replies being made.
        self.signals = Signals()
        self._answerer = Answerer(config, engine, store, context, clock, self.signals)
        self._context = context
        self._admission = Admission(config)
        self._lanes = Lanes()
        self._recording = Recording(config, store, context, lambda: self.persona.id, role,
                                    spool_file)
        self.store_health = self._recording.health
        self._pending = 0
        self._backlogged = Episodes()  # channels whose send line is full
        self._closing = False
        # Each message being answered: a future done when it ends, and the task answering it
        # (to cancel at the end of a shutdown's grace). Messages, not tasks, are waited for:
        # an adapter may answer in its own long-lived task (the console's read loop).
        self._in_flight: dict[asyncio.Future[None], asyncio.Task[Any] | None] = {}
        self.leftovers: list[Leftover] = []  # see recover()

    @property
    def persona(self) -> Persona:
        return self._engine.persona

    @property
    def pending(self) -> int:
        return self._pending

    # -- intake -------------------------------------------------------------------------------

    def apply_limits(self, old: LimitsConfig) -> None:
        """After a reload changed ``config.limits``."""
        self._admission.apply_limits(old)

    @property
    def paused(self) -> set[str]:
        """Platforms whose messages end ``dropped(paused)``."""
        return self._admission.paused

    def pause(self, platform: str) -> None:
        """Stop replying on ``platform``: its messages end ``dropped(paused)``."""
        self._admission.paused.add(platform)

    def resume(self, platform: str) -> None:
        self._admission.paused.discard(platform)

    def mute(self, platform: str, platform_user_id: str, muted: bool) -> None:
        """A muted viewer's messages are recorded and end ``dropped(muted)``."""
        viewer = (platform, platform_user_id)
        if muted:
            self._admission.muted.add(viewer)
        else:
            self._admission.muted.discard(viewer)

    async def handle(self, event: ChatEvent) -> Reply:
        """Take one event to a final state. Never raises for store, model or platform trouble:
        the viewer gets the reply or one in-character fallback, the log gets the cause."""
        started = time.monotonic()
        reply = await self._handle(event)
        if self.signals.active:
            self.signals.message_final(FinalState(
                event.platform, event.channel_id, event.platform_user_id, event.display_name,
                event.text, reply.status, reply.reason, time.monotonic() - started,
                reply.text, reply.message_id))
        return reply

    async def _handle(self, event: ChatEvent) -> Reply:
        if event.is_self or event.is_bot:
            return Reply("", "dropped", reason="bot_author")
        event = sanitized(event)
        text = event.text.strip()
        if self._admission.redelivered(event):
            return Reply("", "dropped", reason="duplicate")
        refusal = "shutdown" if self._closing else self._admission.refusal(
            event, text, pending=self._pending,
            generation_limit=self._answerer.generation_limit)
        if refusal is not None:
            self._recording.drop(event, text, refusal)
            return Reply("", "dropped", reason=refusal)
        return await self._admitted(event, text)

    def allow_command(self, platform: str, platform_user_id: str) -> bool:
        return self._admission.allow_command(platform, platform_user_id)

    async def _admitted(self, event: ChatEvent, text: str,
                        recorded: tuple[int, int] | None = None) -> Reply:
        """Record (unless ``recorded`` gives the user and message ids already stored), then
        take the message through its lifecycle."""
        admitted_at = time.monotonic()
        self._pending += 1
        attempt = Attempt(self._admission.admitted())
        # A place in this viewer's lane before the first await keeps arrival order.
        ticket = self._lanes.enter(self._lane_of(event, recorded))
        ended = asyncio.get_running_loop().create_future()
        self._in_flight[ended] = asyncio.current_task()
        # The intake can be written behind the reply when no earlier message of this viewer
        # is still being answered: in one process (SQLite) nothing else changes its context.
        behind = ticket.lane.users == 1 and self._store.groups_writes
        try:
            if recorded is not None:
                exchange: Exchange | Reply = Exchange(event, *recorded, admitted_at,
                                                      self._recording.key(event))
            else:
                try:
                    exchange = await self._recording.take(event, text, admitted_at,
                                                          behind=behind)
                except StoreError:  # not recorded (spooled): the fallback, no lifecycle
                    return Reply(await self._fallback(event, None), "failed", reason="store")
            if isinstance(exchange, Reply):
                return exchange
            return await self._lifecycle(exchange, ticket, text, attempt)
        finally:
            attempt.stay.leave()
            self._pending -= 1
            self._lanes.leave(ticket)
            self._in_flight.pop(ended, None)
            ended.set_result(None)

    def _lane_of(self, event: ChatEvent, recorded: tuple[int, int] | None) -> tuple[str, str]:
        """The viewer's lane; a question taken over from a stopped process (PostgreSQL) has
        one of its own: the database orders it with the viewer's others (``_earlier_first``),
        and in the viewer's lane a later one may hold the turn while it waits for it."""
        if recorded is not None and not self._store.groups_writes:
            return event.platform, f"{event.platform_user_id}@{recorded[1]}"
        return event.platform, event.platform_user_id

    # -- the lifecycle's one owner ------------------------------------------------------------

    async def _lifecycle(self, exchange: Exchange, ticket: Ticket, text: str,
                         attempt: Attempt) -> Reply:
        try:
            with attempt.stay.away():  # this viewer's earlier message first
                await ticket.turn
            dropped = await self._flood_control(ticket, exchange, text)
            if dropped is not None:
                return dropped
            if ticket.lane.burst:
                text, ticket.lane.burst = "\n".join([*ticket.lane.burst, text]), []
            async with asyncio.timeout(self._config.limits.reply_timeout_s):
                reply_id = await self._answerer.answer(exchange, text, attempt)
        except asyncio.CancelledError:  # shutdown: a reply the viewer has is recorded still
            if not await asyncio.shield(attempt.recorded()):
                await asyncio.shield(self._recording.finish(exchange, "expired", "shutdown"))
                log.warning("message %s expired (shutdown)", exchange.label)
            raise
        except Exception as exc:  # noqa: BLE001 - the one error boundary; the cause is logged
            return await self._failed(exchange, attempt, exc)
        self._admission.answered(time.monotonic() - exchange.received_at, attempt.stay)
        return Reply(attempt.text, "answered", message_id=reply_id)

    async def _failed(self, exchange: Exchange, attempt: Attempt, exc: Exception) -> Reply:
        reason = "timeout" if isinstance(exc, TimeoutError) else attempt.stage
        if isinstance(exc, StoreError):
            self.store_health.failed(exc)
        log.error("message %s failed (%s)%s: %s: %s", exchange.label, reason,
                  " after the reply was delivered" if attempt.delivered else "",
                  type(exc).__name__, exc, exc_info=not isinstance(exc, EXPECTED_FAILURES))
        await self._recording.finish(exchange, "failed", reason)
        if attempt.delivered:
            return Reply(attempt.text, "failed", reason=reason)
        fallback = await self._fallback(exchange.event, exchange.message_id)
        return Reply(fallback, "failed", reason=reason)

    async def _fallback(self, event: ChatEvent, message_id: int | None) -> str:
        """Send the one in-character fallback line (retried like any send)."""
        fallback = self.persona.fallback(message_id or 0)
        try:
            await deliver(lambda: event.sink.send(fallback), "fallback")
        except DeliveryFailed as exc:
            log.error("message %s: the fallback could not be delivered either: %s",
                      message_id if message_id is not None else event.message_id, exc)
        return fallback

    async def _flood_control(self, ticket: Ticket, exchange: Exchange,
                             text: str) -> Reply | None:
        """When a message's turn comes: drop it if it went stale, or if a newer one from the
        same viewer is waiting (queue of one; its text may be folded into the newer one)."""
        limits = self._config.limits
        age = (self._clock() - exchange.event.timestamp).total_seconds()
        reason = None
        if limits.stale_after_s and age > limits.stale_after_s:
            reason = "stale"
        elif self._send_line_full(exchange.event, limits):
            reason = "send_backlog"
        elif ((limits.per_user_queue_of_one or limits.coalesce_bursts)
              and ticket.lane.newer_waiting(ticket.place)):
            reason = "superseded"
            if limits.coalesce_bursts:
                ticket.lane.burst.append(text)
        if reason is None:
            return None
        await self._recording.finish(exchange, "dropped", reason)
        return Reply("", "dropped", reason=reason)

    def _send_line_full(self, event: ChatEvent, limits: LimitsConfig) -> bool:
        """Whether replies already waiting for this channel's send limit would hold a new one
        too long; the operator is told once when that starts and once when it clears."""
        backlog, channel = send_backlog(event), f"{event.platform}:{event.channel_id}"
        if backlog > backlog_limit(limits):
            if self._backlogged.begin(channel):
                log.warning("%s: replies wait %.0f s for the platform's send limit; new "
                            "messages there are dropped (send_backlog) until it clears",
                            channel, backlog)
            return True
        if self._backlogged.end(channel):
            log.info("%s: the send line has room again", channel)
        return False

    # -- start-up and shutdown ----------------------------------------------------------------

    async def recover(self) -> int:
        """Start-up: messages an earlier run left ``received`` (it crashed or was killed).
        First what it spooled on disk is written (the final states it could not record:
        those messages were answered, or got a fallback, and are not answered again). Those
        still ``received`` that this process may answer wait in ``leftovers`` for their
        platform (``answer_leftovers``); older ones end ``expired(crash)``
        (see ``bot.recovery``)."""
        await self._recording.spool.restore()
        self._admission.muted = await self._store.muted_viewers()
        expired, self.leftovers = await sort_out_leftovers(
            self._store, self._config.limits, self._clock(), self._role)
        if expired or self.leftovers:
            log.warning("start-up: an earlier run left %d message(s) unanswered: %d to be "
                        "answered now, %d ended expired (crash)",
                        expired + len(self.leftovers), len(self.leftovers), expired)
        return expired

    async def expire_abandoned(self) -> int:
        """Messages still ``received`` long after any reply could have finished (twice the
        reply timeout): their process died while others run on the shared database, and
        nobody would recover them before someone restarts. They end ``expired(crash)``."""
        before = self._clock() - timedelta(seconds=2 * self._config.limits.reply_timeout_s)
        expired = await self._store.expire_received("crash", before=before)
        if expired:
            log.warning("%d message(s) a stopped process left unanswered ended expired "
                        "(crash)", expired)
        return expired

    async def adopt_orphans(self, platforms: list[str]) -> int:
        """PostgreSQL: what a stopped process (its lease ran out) left waiting on
        ``platforms`` is this one's to answer now, not at a restart that may never come."""
        since = self._clock() - timedelta(seconds=self._config.limits.answer_leftovers_within_s)
        adopted = await self._store.adopt_orphans(platforms, since)
        if adopted:
            log.warning("%d question(s) a stopped process left waiting are answered here",
                        len(adopted))
            self.leftovers += adopted
        return len(adopted)

    async def answer_leftovers(self, platform: str,
                               sink_for: Callable[[Leftover], ReplySink | None] | None
                               ) -> list[Reply]:
        """Answer ``platform``'s leftovers through the sinks its adapter builds (``sink_for``
        None, or a sink of None: that message ends ``expired(crash)``)."""
        mine = [m for m in self.leftovers if m.platform == platform]
        self.leftovers = [m for m in self.leftovers if m.platform != platform]
        replies = await asyncio.gather(*(self._answer_leftover(m, sink_for) for m in mine))
        return list(replies)

    async def _answer_leftover(self, leftover: Leftover,
                               sink_for: Callable[[Leftover], ReplySink | None] | None
                               ) -> Reply:
        try:
            sink = sink_for(leftover) if sink_for is not None else None
        except Exception as exc:  # noqa: BLE001 - one bad row must not strand the others
            log.warning("message %d: cannot answer it after the restart: %s: %s",
                        leftover.message_id, type(exc).__name__, exc)
            sink = None
        if sink is None:
            await self._recording.end(leftover.message_id, "expired", "crash")
            return Reply("", "expired", reason="crash")
        if leftover.send_started_at is not None:  # the viewer may have it: not a second copy
            log.warning("message %d: its reply was going out when the run stopped; not sent "
                        "again", leftover.message_id)
            await self._recording.end(leftover.message_id, "expired", "crash_during_send")
            return Reply("", "expired", reason="crash_during_send")
        event = ChatEvent(
            platform=leftover.platform, channel_id=leftover.channel_id or "",
            platform_user_id=leftover.platform_user_id, display_name=leftover.display_name,
            text=leftover.text, sink=sink, message_id=leftover.platform_message_id,
            timestamp=leftover.created_at, addressed=True)
        return await self._admitted(event, leftover.text,
                                    recorded=(leftover.user_id, leftover.message_id))

    async def expire_leftovers(self) -> None:
        """Leftovers no adapter claimed (none runs for their platform) end expired."""
        for platform in {m.platform for m in self.leftovers}:
            await self.answer_leftovers(platform, None)

    def stop_intake(self) -> None:
        """From now on every new message is dropped (shutdown); in-flight ones go on."""
        self._closing = True

    async def drain(self, grace_s: float) -> None:
        """Stop intake, wait up to ``grace_s`` for in-flight replies, end the rest
        ``expired(shutdown)``, then write what the intake still holds."""
        self.stop_intake()
        await self.expire_leftovers()
        answering = self._answering_elsewhere()
        if answering:
            log.info("waiting for %d in-flight repl%s", len(answering),
                     "y" if len(answering) == 1 else "ies")
            _done, late = await asyncio.wait(answering, timeout=grace_s)
            for ended in late:
                task = self._in_flight.get(ended)
                if task is not None:
                    task.cancel()
            if late:
                await asyncio.wait(late, timeout=5)
        await self.flush(spool_timeout_s=5)

    async def settle(self) -> None:
        """Wait until every message taken so far has ended (its reply sent and recorded,
        or its final state written)."""
        while answering := self._answering_elsewhere():
            await asyncio.wait(answering)
        await self.flush()

    def _answering_elsewhere(self) -> list[asyncio.Future[None]]:
        """Messages being answered, but not by the calling task (it would wait on itself)."""
        return [ended for ended, task in self._in_flight.items()
                if task is not asyncio.current_task()]

    async def flush(self, spool_timeout_s: float = 0) -> None:
        """Wait until every message taken so far is recorded (drops are written behind);
        with ``spool_timeout_s``, also try that long to write what a store outage spooled."""
        await self._recording.flush(spool_timeout_s)

    @property
    def spooled(self) -> int:
        """Writes waiting for the store to come back."""
        return len(self._recording.spool)

    def latency_percentiles(self) -> LatencySummary:
        """p50/p95 of recent reply latencies (admission to sent), in milliseconds."""
        return self._admission.latency_percentiles()
