"""How messages reach the store: admitted ones through the intake (on SQLite written behind
their reply), refused ones in background batches, final states as they come, and, while the
store is away, the spool that writes them once it is back (docs/ARCHITECTURE.md, "One
message")."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
from collections.abc import Callable

from bot.answer import Behind, Exchange
from bot.config import AppConfig
from bot.context import ContextBuilder
from bot.events import ChatEvent, Reply
from bot.spool import Spool
from bot.spool_file import SpoolFile
from bot.store_health import StoreHealth
from memory.errors import StoreError
from memory.store import IntakeItem, IntakeOutcome, IntakeWriter, Store

log = logging.getLogger(__name__)


class Recording:
    """The service's side of the store: intake writers, final states, the spool, health."""

    def __init__(self, config: AppConfig, store: Store, context: ContextBuilder,
                 persona_id: Callable[[], str], role: str | None,
                 spool_file: SpoolFile | None = None) -> None:
        self._config = config
        self._store = store
        self._context = context
        self._persona_id = persona_id
        self._role = role  # this process's runtime role (memory.store.roles), if it holds one
        self.health = StoreHealth()
        self.spool = Spool(store, file=spool_file)
        self._writer = IntakeWriter(store.intake, pipelined=store.groups_writes)
        # Drops go in batches of up to 64, one batch per 30 ms unless more wait: a flood's
        # bookkeeping costs a few short transactions a second, out of the answers' way.
        self._drop_writer = IntakeWriter(store.intake_final, max_batch=64, max_delay_s=0.03,
                                         on_batch=self._drops_recorded)
        self._keys = itertools.count(1)  # observers' key for each admitted message

    def key(self, event: ChatEvent) -> str:
        return f"{event.platform}:{next(self._keys)}"

    def item(self, event: ChatEvent, text: str, status: str = "received",
             reason: str | None = None) -> IntakeItem:
        return IntakeItem(
            platform=event.platform, platform_user_id=event.platform_user_id,
            display_name=event.display_name, persona_id=self._persona_id(),
            channel_id=event.channel_id, platform_message_id=event.message_id, text=text,
            created_at=event.timestamp, status=status, reason=reason, owner=self._role,
            shared_per_minute=self._config.limits.user_messages_per_minute)

    def drop(self, event: ChatEvent, text: str, reason: str) -> None:
        """Record a refused message in the background (batched; it costs no transaction of
        its own and never delays the chat)."""
        self._drop_writer.add(self.item(event, text, "dropped", reason))

    def _drops_recorded(self, items: list[IntakeItem], error: Exception | None) -> None:
        if error is None:
            self.health.succeeded()
            return
        self.health.failed(error)
        for item in items:  # written once the store is back
            self.spool.add_intake(item)

    async def take(self, event: ChatEvent, text: str, admitted_at: float, *,
                   behind: bool) -> Exchange | Reply:
        """An admitted message, recorded (``behind``: being recorded, see ``_behind``), or
        how it was dropped. ``StoreError`` when it could not be recorded (it is spooled)."""
        item = self.item(event, text)
        written = self._writer.submit(item)
        if behind:
            return await self._behind(event, item, written, admitted_at)
        return await self._recorded(event, item, written, admitted_at)

    async def _behind(self, event: ChatEvent, item: IntakeItem,
                      written: asyncio.Future[IntakeOutcome | None],
                      admitted_at: float) -> Exchange | Reply:
        """SQLite: the reply does not wait for the intake's commit. What it needs is read at
        once (``Store.look_ahead``); recording the reply waits for the commit
        (``Exchange.recorded``). A crash in between loses the exchange, like any write not
        yet committed (docs/ARCHITECTURE.md)."""
        written.add_done_callback(self.health.heard)
        try:
            ahead = await self._store.look_ahead(item, self._context.wanted())
        except StoreError as exc:
            log.debug("message %s: nothing read ahead, waiting for its intake: %s",
                      event.message_id, exc)
            return await self._recorded(event, item, written, admitted_at)
        if ahead.recorded:  # a redelivery, or this very intake committed already
            return await self._recorded(event, item, written, admitted_at)
        return Exchange(event, ahead.user_id, None, admitted_at, self.key(event),
                        ahead.context, Behind(item, written))

    async def _recorded(self, event: ChatEvent, item: IntakeItem,
                        written: asyncio.Future[IntakeOutcome | None],
                        admitted_at: float) -> Exchange | Reply:
        try:
            outcome = await written
        except StoreError as exc:
            self.health.failed(exc)
            log.error("message %s from %s:%s failed (store): spooled until the store is "
                      "back: %s", event.message_id, event.platform, event.platform_user_id, exc)
            self.spool.add_intake(dataclasses.replace(item, status="failed", reason="store"))
            raise
        self.health.succeeded()
        if outcome is not None and outcome.refused is not None:  # another process's share
            return Reply("", "dropped", reason=outcome.refused)
        if outcome is None or outcome.message_id is None:
            return Reply("", "dropped", reason="duplicate")
        return Exchange(event, outcome.user_id, outcome.message_id, admitted_at,
                        self.key(event))

    async def finish(self, exchange: Exchange, status: str, reason: str) -> None:
        """End an admitted message ``status(reason)``. An intake written behind that never
        committed is spooled with that final state, to be written once the store is back."""
        try:
            message_id = await exchange.recorded()
        except Exception:  # noqa: BLE001 - never committed (the writer logged a bug's cause)
            if exchange.behind is not None:
                self.spool.add_intake(dataclasses.replace(exchange.behind.item,
                                                          status=status, reason=reason))
            return
        await self.end(message_id, status, reason)

    async def end(self, message_id: int, status: str, reason: str) -> None:
        try:
            await self._store.set_status(message_id, status, reason)
        except StoreError as exc:
            self.health.failed(exc)
            log.debug("message %d: %s (%s) spooled: %s", message_id, status, reason, exc)
            self.spool.add_status(message_id, status, reason)

    async def flush(self, spool_timeout_s: float = 0) -> None:
        """Wait until every message taken so far is recorded (drops are written behind);
        with ``spool_timeout_s``, also try that long to write what a store outage spooled."""
        await self._writer.flush()
        await self._drop_writer.flush()
        if spool_timeout_s:
            await self.spool.flush(spool_timeout_s)
