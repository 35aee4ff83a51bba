"""SQLite's group commit (``memory.store.write_rounds``): concurrent units of work share
transactions, keep their order, and fail one by one."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, event, text

from memory.errors import IntegrityViolation
from memory.store import Store


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[Store]:
    store = await Store.open(f"sqlite+aiosqlite:///{tmp_path / 'rounds.db'}")
    try:
        await store.database.write_unit(lambda c: c.execute(text(
            "CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT NOT NULL UNIQUE)")))
        yield store
    finally:
        await store.close()


def _note(body: str) -> Any:
    def work(connection: Connection) -> int:
        return connection.execute(text("INSERT INTO notes (body) VALUES (:body) RETURNING id"),
                                  {"body": body}).scalar_one()
    return work


def _failing(connection: Connection) -> None:
    connection.execute(text("INSERT INTO notes (body) VALUES ('doomed')"))
    raise ValueError("a bug in this unit")


async def _bodies(store: Store) -> list[str]:
    return list(await store.database.read_unit(
        lambda c: c.scalars(text("SELECT body FROM notes ORDER BY id")).all()))


def _count_write_transactions(store: Store) -> list[int]:
    counted = [0]
    for sync_engine in store.database.sync_engines:
        event.listen(sync_engine, "commit", lambda _c: counted.__setitem__(0, counted[0] + 1))
    return counted


async def test_concurrent_units_share_transactions_in_order(sqlite_store: Store) -> None:
    assert sqlite_store.groups_writes
    commits = _count_write_transactions(sqlite_store)
    bodies = [f"note {i}" for i in range(40)]
    ids = await asyncio.gather(*(sqlite_store.database.write_unit(_note(b)) for b in bodies))
    assert ids == sorted(ids)  # each caller got its own row's id, in submission order
    assert await _bodies(sqlite_store) == bodies
    assert 1 <= commits[0] < 10  # 40 units, a few rounds


async def test_a_failing_unit_fails_alone(sqlite_store: Store) -> None:
    db = sqlite_store.database
    await db.write_unit(_note("taken"))
    outcomes = await asyncio.gather(
        db.write_unit(_note("first")), db.write_unit(_failing),
        db.write_unit(_note("taken")),  # breaks the UNIQUE constraint
        db.write_unit(_note("last")), return_exceptions=True)
    assert isinstance(outcomes[0], int) and isinstance(outcomes[3], int)
    assert isinstance(outcomes[1], ValueError)
    assert isinstance(outcomes[2], IntegrityViolation)
    assert await _bodies(sqlite_store) == ["taken", "first", "last"]


async def test_a_cancelled_caller_waits_for_its_round(sqlite_store: Store) -> None:
    """A caller cancelled while its unit is queued or being written returns only once that
    round ended; the other units are unaffected."""
    db = sqlite_store.database
    others = [asyncio.create_task(db.write_unit(_note(f"other {i}"))) for i in range(5)]
    cancelled = asyncio.create_task(db.write_unit(_note("cancelled")))
    await asyncio.sleep(0)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    await asyncio.gather(*others)
    assert [b for b in await _bodies(sqlite_store) if b.startswith("other")] == [
        f"other {i}" for i in range(5)]


async def test_a_failed_commit_fails_every_unit_of_the_round(sqlite_store: Store) -> None:
    """The commit itself fails (a full disk, say): no unit of the round reports success."""
    db = sqlite_store.database

    def refuse(*_args: object) -> None:
        raise OSError(28, "No space left on device")

    engine: Engine = db.sync_engines[-1]
    event.listen(engine, "commit", refuse)
    try:
        outcomes = await asyncio.gather(*(db.write_unit(_note(f"n{i}")) for i in range(6)),
                                        return_exceptions=True)
    finally:
        event.remove(engine, "commit", refuse)
    assert all(isinstance(o, Exception) for o in outcomes), outcomes
    assert await _bodies(sqlite_store) == []
