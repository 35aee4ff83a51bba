"""A viewer's next question woken when the one before it ends, in any process (PostgreSQL
``LISTEN``/``NOTIFY``).

Several processes answer one viewer in arrival order (``Conversations.wait_for_earlier``): a
question waits while an earlier one of the same viewer is still ``received``. The trigger of
migration 0011 notifies ``CHANNEL`` with the viewer's id whenever one of their questions
leaves ``received``; this process listens on a connection of its own and wakes the waits on
that viewer. Without the connection (a database restart, a pooler in transaction mode that
does not pass ``LISTEN`` on) a wait lasts its fallback pause and checks again: slower, never
wrong. The connection is opened again in the background, with a growing pause.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from sqlalchemy.engine import make_url

log = logging.getLogger(__name__)
CHANNEL = "vtuber_viewer_final"
RECONNECT_PAUSES_S = (0.5, 1.0, 2.0, 5.0, 15.0, 30.0)  # the last repeats


class Wakeup:
    """Registered before the check it follows, so a notice between the check and the wait
    is not lost."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def set(self) -> None:
        self._event.set()

    async def wait(self, timeout_s: float) -> None:
        """Until woken or ``timeout_s`` passed, whichever comes first."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._event.wait()
        self._event.clear()


class ViewerWakeups:
    def __init__(self, url: str | None) -> None:
        """``url``: the PostgreSQL database's (SQLAlchemy form); None: nothing to listen to
        (SQLite has one process)."""
        self._dsn = (make_url(url).set(drivername="postgresql")
                     .render_as_string(hide_password=False)) if url else None
        self._connection: Any = None
        self._waiting: dict[int, set[Wakeup]] = {}
        self._reconnecting: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def listening(self) -> bool:
        return self._connection is not None

    async def start(self) -> None:
        if self._dsn is None:
            return
        try:
            await self._listen()
        except Exception as exc:  # noqa: BLE001 - a wait falls back to its pause meanwhile
            log.warning("store: not listening for viewers' answered questions (%s); "
                        "trying again", exc)
            self._reconnect()

    @contextlib.contextmanager
    def watching(self, user_id: int) -> Iterator[Wakeup]:
        wakeup = Wakeup()
        self._waiting.setdefault(user_id, set()).add(wakeup)
        try:
            yield wakeup
        finally:
            waiting = self._waiting.get(user_id)
            if waiting is not None:
                waiting.discard(wakeup)
                if not waiting:
                    del self._waiting[user_id]

    def watched(self, user_id: int) -> int:
        """How many waits on ``user_id`` there are now."""
        return len(self._waiting.get(user_id, ()))

    async def close(self) -> None:
        self._closed = True
        if self._reconnecting is not None:
            self._reconnecting.cancel()
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.close(timeout=5)

    async def _listen(self) -> None:
        import asyncpg

        connection = await asyncpg.connect(self._dsn)
        await connection.add_listener(CHANNEL, self._notified)
        connection.add_termination_listener(self._lost)
        self._connection = connection

    def _notified(self, _connection: Any, _pid: int, _channel: str, payload: str) -> None:
        with contextlib.suppress(ValueError):
            for wakeup in self._waiting.get(int(payload), ()):
                wakeup.set()

    def _lost(self, _connection: Any) -> None:
        self._connection = None
        if not self._closed:
            log.warning("store: the connection listening for answered questions was lost; "
                        "opening it again")
            self._reconnect()

    def _reconnect(self) -> None:
        if self._reconnecting is None or self._reconnecting.done():
            self._reconnecting = asyncio.get_running_loop().create_task(self._listen_again())

    async def _listen_again(self) -> None:
        for attempt in range(1_000_000):
            await asyncio.sleep(RECONNECT_PAUSES_S[min(attempt, len(RECONNECT_PAUSES_S) - 1)])
            if self._closed:
                return
            try:
                await self._listen()
            except Exception as exc:  # noqa: BLE001 - tried again until the database is back
                log.debug("store: listening again failed: %s", exc)
                continue
            log.info("store: listening for answered questions again")
            return
