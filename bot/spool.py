"""What the store could not take while it was away: kept in memory (bounded) and written when
it is back, so a database outage loses no message that was offered while the process ran.
With a ``SpoolFile`` it is on disk too, so a crash during the outage loses nothing either:
the next run writes it before it looks for messages left unanswered (see
docs/ARCHITECTURE.md)."""

from __future__ import annotations

import asyncio
import logging

from bot.spool_file import SpoolFile, StatusChange
from memory.errors import StoreError
from memory.store import IntakeItem, Store

log = logging.getLogger(__name__)


class Spool:
    def __init__(self, store: Store, *, limit: int = 10_000, retry_s: float = 1.0,
                 file: SpoolFile | None = None) -> None:
        self._store = store
        self._limit = limit
        self._retry_s = retry_s
        self._file = file
        self._intake: list[IntakeItem] = []
        self._statuses: list[StatusChange] = []
        self._task: asyncio.Task[None] | None = None
        self.lost = 0  # dropped because the spool was full

    def __len__(self) -> int:
        return len(self._intake) + len(self._statuses)

    def add_intake(self, item: IntakeItem) -> None:
        if self._room():
            self._intake.append(item)
            if self._file is not None:
                self._file.append_intake(item)

    def add_status(self, message_id: int, status: str, reason: str | None) -> None:
        if self._room():
            self._statuses.append((message_id, status, reason))
            if self._file is not None:
                self._file.append_status((message_id, status, reason))

    async def restore(self) -> int:
        """Start-up: take back what an earlier run spooled on disk and never wrote, and try
        to write it now; how many writes there were."""
        if self._file is None:
            return 0
        intake, statuses = self._file.read()
        self._intake[:0], self._statuses[:0] = intake, statuses
        if len(self):
            log.warning("start-up: %d write(s) an earlier run could not make are written now",
                        len(self))
            if not await self.write():
                self._start_retrying()
        return len(intake) + len(statuses)

    def _room(self) -> bool:
        if len(self) >= self._limit:
            self.lost += 1
            if self.lost == 1:
                log.error("store spool full (%d writes): further writes are lost until the "
                          "store is back", self._limit)
            return False
        self._start_retrying()
        return True

    def _start_retrying(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._retry(), name="store-spool")

    async def _retry(self) -> None:
        while len(self):
            await asyncio.sleep(self._retry_s)
            try:
                await self.write()
            except Exception:  # a bug must not end the retries: the spool would never drain
                log.exception("writing the store spool failed unexpectedly; retrying")

    async def write(self) -> bool:
        """Try once to write everything spooled; True when the spool is empty."""
        intake, statuses = self._intake[:], self._statuses[:]
        try:
            await self._store.intake(intake)
            await self._store.set_statuses(statuses)
        except StoreError as exc:
            log.debug("store still unavailable (%d writes spooled): %s", len(self), exc)
            return False
        del self._intake[:len(intake)], self._statuses[:len(statuses)]
        if self._file is not None:
            self._file.rewrite(self._intake, self._statuses)
        log.info("store is back: wrote %d spooled message(s) and %d status change(s)",
                 len(intake), len(statuses))
        return not len(self)

    async def flush(self, timeout_s: float) -> None:
        """At shutdown: a last few tries within ``timeout_s``."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while len(self) and asyncio.get_running_loop().time() < deadline:
            if await self.write():
                break
            await asyncio.sleep(min(self._retry_s, 0.5))
        if self._file is not None:
            await self._file.settled()
        if len(self):
            kept = f"; kept in {self._file.path} for the next run" if self._file else ""
            log.error("shutting down with %d write(s) the store never took%s", len(self), kept)
        if self._task is not None:
            self._task.cancel()
