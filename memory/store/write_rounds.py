"""Group commit for SQLite's single writer: units of work (``Database.write_unit``) that queue
while a round is being written go together in the next round, one transaction and one trip to
the store thread for all of them.

Under a busy chat an answered message costs two units (its intake batch and its completion)
and refused messages one batch more; run one transaction each, they kept the writer busy
almost all the time and every unit waited for the ones ahead of it. A round's units commit or
fail together; when one of them raises, the round is rolled back and each unit runs again
alone, so only the unit at fault fails (units are functions of a connection with no other
effects, like any transaction that may be retried).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from sqlalchemy import Connection

log = logging.getLogger(__name__)
T = TypeVar("T")
Work = Callable[[Connection], Any]
# A unit's result, or the exception it raised (the waiter re-raises it as its own).
Outcome = tuple[bool, Any]
RunRound = Callable[[list[Work]], Awaitable[list[Outcome]]]
MAX_UNITS = 64  # a round stays short: a unit queued behind it waits for one round, not more


class WriteRounds:
    def __init__(self, run_round: RunRound, lock: asyncio.Lock,
                 max_units: int = MAX_UNITS) -> None:
        self._run_round = run_round  # runs its units in the store thread (see module doc)
        self._lock = lock  # the writer lock that session-based writes take too
        self._max_units = max_units
        self._queue: list[tuple[Work, asyncio.Future[Any]]] = []
        self._task: asyncio.Task[None] | None = None

    async def run(self, work: Callable[[Connection], T]) -> T:
        """``work`` in the next round; its result, or what it (or the round's commit)
        raised."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.append((work, future))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._drain(), name="store-writer")
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            # The unit may be in a round being written: it ends (committed or not) before the
            # caller moves on, as a transaction of its own would.
            await asyncio.wait([future])
            raise

    async def _drain(self) -> None:
        while self._queue:
            batch = self._queue[:self._max_units]
            del self._queue[:self._max_units]
            try:
                async with self._lock:
                    outcomes = await self._run_round([work for work, _ in batch])
            except asyncio.CancelledError:
                self._fail([*batch, *self._queue], asyncio.CancelledError())
                self._queue.clear()
                raise
            except Exception as exc:  # noqa: BLE001 - not a unit's: the executor is gone
                outcomes = [(False, exc)] * len(batch)
            for (_, future), (ok, value) in zip(batch, outcomes, strict=True):
                if future.done():
                    continue
                if ok:
                    future.set_result(value)
                else:
                    future.set_exception(value)

    @staticmethod
    def _fail(units: list[tuple[Work, asyncio.Future[Any]]], exc: BaseException) -> None:
        for _, future in units:
            if not future.done():
                future.set_exception(exc)

    async def wait_idle(self) -> None:
        """Until every unit queued so far is written (closing the database)."""
        while self._task is not None and not self._task.done():
            await asyncio.wait([self._task])
